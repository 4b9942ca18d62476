"""Every sample-quality measure a stage's metrics JSON holds besides its Fréchet distance, once.

`evaluate_images` returns the measures computed from the detector (`source="detector"`),
evaluation adds those read from the sampling record (`source="sampling"`), the report collects
every key listed here and tabulates those with a header. Adding a measure: compute it, add its
row here. The Fréchet distance itself is named by the detector (FID, FD_<data set>).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Measure:
    key: str  # key in the metrics JSON
    source: str  # "detector" (evaluate_images) | "sampling" (the stage's sampling record)
    header: str | None = None  # column header in the report's tables (None: kept, not tabulated)
    digits: int | None = None  # fixed decimals in the tables (None: 3 significant digits)
    group: str = "quality"  # table group: "quality" (after the Fréchet column) | "copying"


MEASURES = (
    Measure("IS", "detector", "IS ↑", 2),
    Measure("IS_std", "detector"),
    Measure("precision", "detector", "Prec. ↑", 3),
    Measure("recall", "detector", "Rec. ↑", 3),
    Measure("class_accuracy", "detector", "Class acc. ↑", 3),
    # stage k's mean squared distance to its prior vs between two samples of one class (copying)
    Measure("msd_to_prior", "sampling", "MSD to prior", group="copying"),
    Measure("msd_within_class", "sampling", "MSD within class", group="copying"),
)


def measure_keys(source: str | None = None) -> tuple[str, ...]:
    """Keys of the measures (of one `source`, or all), in table order."""
    return tuple(m.key for m in MEASURES if source in (None, m.source))


__all__ = ["MEASURES", "Measure", "measure_keys"]
