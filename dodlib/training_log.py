"""The training log: one row per `train.log_every` images (images, step, loss, lr, images_per_sec).

The rows are part of the training state: every checkpoint stores the rows so far, and a resumed
run continues from them. While training runs, each new row goes out at once

- to DVCLive's series in `<train dir>/live/`: `plots/metrics/<column>.tsv` (step = images seen)
  and `metrics.json` (the latest row). Watch a running job with
  `dvc plots show <train dir>/live/plots/metrics/loss.tsv` or `tail -f` on the TSV;
- as a plain line in the job's log file (see `progress.py`),

and the whole table becomes `train_log.csv` (what the report reads) when training ends.

The live directory is rebuilt from the checkpoint's rows at every start, so a run preempted between
two checkpoints shows neither duplicate rows nor rows of steps it is about to redo.
"""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

from .io import atomic_path

COLUMNS = ("images", "step", "loss", "lr", "images_per_sec")
LIVE_SERIES = ("loss", "lr", "images_per_sec")  # the columns DVCLive plots against images
LIVE_DIR = "live"


class TrainingLog:
    """The rows so far, mirrored into a DVCLive directory when `live_dir` is given."""

    def __init__(self, rows: list[dict], live_dir: str | Path | None = None):
        self.rows = list(rows)
        self._live = None
        if live_dir is not None:
            # DVCLive's own resume appends after whatever the directory holds, rows of lost steps
            # included; starting it empty and replaying the checkpointed rows cannot duplicate.
            shutil.rmtree(live_dir, ignore_errors=True)
            self._live = _live_writer(live_dir)
            for row in self.rows:
                self._log(row)
            self._live.make_summary()

    def append(self, row: dict) -> None:
        missing = [c for c in COLUMNS if c not in row]
        if missing:
            raise ValueError(f"training log row without {', '.join(missing)}: {row}")
        self.rows.append(row)
        if self._live is not None:
            self._log(row)
            self._live.make_summary()

    def _log(self, row: dict) -> None:
        self._live.step = int(row["images"])
        for name in LIVE_SERIES:
            self._live.log_metric(name, float(row[name]))

    def write_csv(self, path: str | Path) -> None:
        with atomic_path(Path(path)) as tmp:
            with open(tmp, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=list(COLUMNS))
                writer.writeheader()
                writer.writerows(self.rows)


def _live_writer(live_dir):
    """A DVCLive writer that leaves Git and DVC alone. Training saves no DVC experiment of its own
    (the pipeline's stages are the experiment), and DVCLive's repository probe fails outright in a
    Git repository without commits (scmrepo's "Empty git repo"), which must not stop a training job;
    so the probe is skipped: files are all it writes."""
    from dvclive import Live

    class FilesOnlyLive(Live):
        def _init_dvc(self):  # DVCLive 3.x: the Git/DVC probe run from __init__
            self._save_dvc_exp = False

    return FilesOnlyLive(dir=str(live_dir), save_dvc_exp=False, dvcyaml=None, report=None)
