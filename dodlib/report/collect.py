"""Read what the other stages wrote (metrics, training logs, sampling metadata) into DataFrames.

Everything the report shows goes through `collect()`, which reads all inputs before a single
output is written: a missing input fails the report at once, naming the file and the command that
makes it, instead of leaving a half-written results/ directory behind.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .. import pipeline as P
from ..config import ExperimentConfig, Params
from ..io import load_json
from ..metrics.measures import measure_keys

log = logging.getLogger(__name__)

# Keys of a metrics JSON that identify the row rather than measure anything.
ID_KEYS = ("experiment", "stage", "detector", "metric_name")
# Records beside the numbers (read by report/provenance.py, not tabulated).
RECORD_KEYS = ("provenance",)
# Numeric keys every table knows how to show (others are kept in the frame but not tabulated).
MEASURED_KEYS = measure_keys()
COST_KEYS = ("params", "lem_params", "train_images", "nfe", "cfg_scale", "sampling_gflops_per_image", "num_samples")


@dataclass
class ReportData:
    """All inputs of the report, read once."""

    params: Params
    root: Path  # the directory holding artifacts/
    metrics: pd.DataFrame  # one row per (experiment, stage)
    train_logs: pd.DataFrame  # rows of every trainer's train_log.csv, plus experiment/label
    stage_meta: pd.DataFrame  # one row per (experiment, stage): the sampling meta.json
    snapshots: pd.DataFrame  # optional: experiment, label, train_images, stage, metric_name, value
    probes: pd.DataFrame  # optional: experiment, label, group, top1, bottleneck_dim, ...

    @property
    def metric_names(self) -> list[str]:
        """Fréchet metrics present, in order of first appearance (normally exactly one)."""
        return list(dict.fromkeys(self.metrics["metric_name"]))

    @property
    def main_experiments(self) -> list[str]:
        return P.main_experiments(self.params)

    def rows(self, experiments: list[str]) -> pd.DataFrame:
        """Metric rows of `experiments`, in that order, stages ascending."""
        order = {name: i for i, name in enumerate(experiments)}
        df = self.metrics[self.metrics["experiment"].isin(order)].copy()
        df["_order"] = df["experiment"].map(order)
        return df.sort_values(["_order", "stage"], kind="stable").drop(columns="_order").reset_index(drop=True)


def groups(params: Params) -> list[str]:
    """Group names other than "main", in order of first appearance."""
    return list(dict.fromkeys(e.group for e in params.experiments.values() if e.group != "main"))


def collect(params: Params, root: str | Path = ".") -> ReportData:
    root = Path(root)
    return ReportData(
        params=params,
        root=root,
        metrics=load_metrics(params, root),
        train_logs=load_train_logs(params, root),
        stage_meta=load_stage_meta(params, root),
        snapshots=load_snapshots(params, root),
        probes=load_probes(params, root),
    )


def _require(paths: list[tuple[Path, str]], what: str) -> None:
    """Raise one FileNotFoundError listing every missing file with the command that makes it."""
    missing = [(p, cmd) for p, cmd in paths if not p.exists()]
    if missing:
        lines = "\n".join(f"  {p}  (made by `{cmd}`)" for p, cmd in missing)
        raise FileNotFoundError(f"missing {what} file(s):\n{lines}")


def _is_number(value) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def _experiment_columns(exp: ExperimentConfig, owner: ExperimentConfig) -> dict:
    """Config facts the tables and findings need beside the measured numbers (`owner`: the
    experiment whose networks `exp` samples, itself unless it borrows them)."""
    return {
        "experiment": exp.name,
        "label": exp.label,
        "group": exp.group,
        "description": exp.description,
        "trainer": exp.trainer,
        "lem_enabled": bool(exp.lem.enabled),
        "stages_count": exp.stages.count,
        "prior_source": exp.sample.prior_source,
        "bottleneck_dim": owner.lem.bottleneck_dim if owner.lem.enabled and owner.lem.kind == "lem" else np.nan,
        "finetuned_stages": len(owner.stages.finetuned()),
    }


def load_metrics(params: Params, root: Path) -> pd.DataFrame:
    """One row per experiment and stage. The Fréchet value sits both under its own name
    (e.g. "FD_mnist") and under "metric", with "metric_name" saying which it is."""
    paths = {
        (name, k): root / P.metrics_path(name, k)
        for name, exp in params.experiments.items()
        for k in range(1, exp.stages.count + 1)
    }
    _require([(p, f"dod evaluate --experiment {n} --stage {k}") for (n, k), p in paths.items()], "metrics")
    rows = []
    for (name, k), path in paths.items():
        exp = params.experiments[name]
        m = load_json(path)
        # A file at the wrong place (copied, stale) would silently mislabel a row: refuse it.
        if m.get("experiment", name) != name or int(m.get("stage", k)) != k:
            raise ValueError(f"{path}: holds experiment={m.get('experiment')!r} stage={m.get('stage')!r}, "
                             f"expected {name!r} stage {k}")
        metric_name = m.get("metric_name")
        if not metric_name:
            raise ValueError(f"{path}: no 'metric_name' key (which Fréchet distance is this?)")
        row = _experiment_columns(exp, params.experiments[exp.trainer])
        row.update(stage=k, detector=m.get("detector", ""), metric_name=metric_name)
        for key, value in m.items():
            if key in ID_KEYS or key in RECORD_KEYS:
                continue
            # null (e.g. msd_* at stage 1) and absent keys both become NaN, shown as "–".
            row[key] = float(value) if _is_number(value) else (np.nan if value is None else value)
        row["metric"] = row.get(metric_name, np.nan)
        # Fill what the config knows when the evaluator did not record it.
        if math.isnan(row.get("cfg_scale", np.nan)):
            row["cfg_scale"] = exp.stage_sampling(k).cfg.scale
        if math.isnan(row.get("train_images", np.nan)):
            row["train_images"] = params.experiments[exp.trainer].train_images(k)
        rows.append(row)
    df = pd.DataFrame(rows)
    for key in MEASURED_KEYS + COST_KEYS:
        if key not in df:
            df[key] = np.nan
    return df


def load_train_logs(params: Params, root: Path) -> pd.DataFrame:
    """Rows of every training log; a fine-tuned stage's rows follow its experiment's stage-1 rows,
    its images counted on from where the previous run ended (column train_stage says which)."""
    paths = {(name, k): root / P.train_dir(name, k) / "train_log.csv"
             for name in params.trainers for k in [1] + params.experiments[name].stages.finetuned()}
    _require([(p, f"dod train --experiment {n} --stage {k}") for (n, k), p in paths.items()], "training log")
    frames = []
    for (name, k), path in paths.items():
        df = pd.read_csv(path)
        for col in ("images", "loss"):
            if col not in df:
                raise ValueError(f"{path}: no column {col!r} (have {', '.join(df.columns)})")
        exp = params.experiments[name]
        df["images"] += exp.train_images(k - 1) if k > 1 else 0
        df.insert(0, "experiment", name)
        df.insert(1, "label", exp.label)
        df.insert(2, "train_stage", k)
        frames.append(df)
    if not frames:
        return pd.DataFrame(columns=["experiment", "label", "train_stage", "images", "step", "loss", "lr",
                                     "images_per_sec"])
    return pd.concat(frames, ignore_index=True)


def load_stage_meta(params: Params, root: Path) -> pd.DataFrame:
    paths = {
        (name, k): root / P.stage_dir(name, k) / "meta.json"
        for name, exp in params.experiments.items()
        for k in range(1, exp.stages.count + 1)
    }
    _require([(p, f"dod sample --experiment {n} --stage {k}") for (n, k), p in paths.items()], "sampling meta")
    rows = []
    for (name, k), path in paths.items():
        meta = load_json(path)
        rows.append({"experiment": name, "stage": k,
                     **{key: v for key, v in meta.items() if key not in ("experiment", "stage")}})
    return pd.DataFrame(rows)


def load_samples(root: str | Path, exp: str, stage: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The first `n` samples of a stage (uint8 [n, H, W, 3]) and their labels, across shards."""
    directory = Path(root) / P.stage_dir(exp, stage)
    meta_path = directory / "meta.json"
    if not meta_path.exists():
        raise FileNotFoundError(f"{meta_path}: missing (made by `dod sample --experiment {exp} --stage {stage}`)")
    meta = load_json(meta_path)
    images, labels, have = [], [], 0
    for j in range(int(meta.get("num_shards", 1))):
        if have >= n:
            break
        img_path, lab_path = directory / f"images-{j:05d}.npy", directory / f"labels-{j:05d}.npy"
        _require([(img_path, f"dod sample --experiment {exp} --stage {stage}")], "sample shard")
        # mmap: only the few rows of the grid are read, even from an ImageNet-size shard.
        img = np.load(img_path, mmap_mode="r")[: n - have]
        images.append(np.asarray(img))
        labels.append(np.load(lab_path)[: len(img)] if lab_path.exists() else np.full(len(img), -1))
        have += len(img)
    if not images:
        raise ValueError(f"{directory}: no samples")
    out = np.concatenate(images)
    if out.dtype != np.uint8 or out.ndim != 4 or out.shape[-1] not in (1, 3):
        raise ValueError(f"{directory}: expected uint8 images [n, H, W, 3], got {out.dtype} {list(out.shape)}")
    if out.shape[-1] == 1:
        out = np.repeat(out, 3, axis=-1)
    return out, np.concatenate(labels)


def load_snapshots(params: Params, root: Path) -> pd.DataFrame:
    """Optional training-efficiency points (`snapshots.json`): tidy rows, one per metric value."""
    rows = []
    for name, exp in params.experiments.items():
        path = root / P.snapshots_path(name)
        if not path.exists():
            continue
        entries = load_json(path)
        if not isinstance(entries, list):
            raise ValueError(f"{path}: expected a list of {{train_images, <metric>: value}} records")
        for entry in entries:
            if "train_images" not in entry:
                raise ValueError(f"{path}: record without 'train_images': {entry}")
            stage = entry.get("stage")
            for key, value in entry.items():
                if key in ("train_images", "stage", "metric_name") or not _is_number(value):
                    continue
                rows.append({"experiment": name, "label": exp.label, "group": exp.group,
                             "train_images": int(entry["train_images"]),
                             "stage": int(stage) if stage is not None else np.nan,
                             "metric_name": key, "value": float(value)})
    return pd.DataFrame(rows, columns=["experiment", "label", "group", "train_images", "stage", "metric_name", "value"])


def load_probes(params: Params, root: Path) -> pd.DataFrame:
    """Optional linear-probe results (`probe.json`) of the LEM bottleneck features."""
    rows = []
    for name, exp in params.experiments.items():
        path = root / P.probe_path(name)
        if path.exists():
            probe = load_json(path)
            rows.append({"experiment": name, "label": exp.label, "group": exp.group,
                         **{k: v for k, v in probe.items() if _is_number(v) or isinstance(v, str)}})
    return pd.DataFrame(rows)
