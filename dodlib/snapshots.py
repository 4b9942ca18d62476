"""Training efficiency: the metric of intermediate EMA snapshots (metric vs training images).

Each snapshot kept by training (`train.snapshots`) and the final weights are sampled with the
experiment's own sampling settings (stage 1, and stage 2 on top of it when the model has a LEM)
and evaluated with the pipeline's detector. Intermediate sample caches live in `state/`; the
stage's one output is snapshots.json.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from .config import ExperimentConfig
from .evaluation import build_detector, REFERENCE_FILE
from .io import save_json
from .metrics.evaluate import evaluate_images, load_reference
from .models.weights import load_weights
from .priors import PriorCache
from .sample import sample_stage

log = logging.getLogger(__name__)


def snapshot_weights(train_dir: str | Path) -> list[tuple[int, Path]]:
    """(training images, weights path) of every snapshot and of the final weights, in order."""
    train_dir = Path(train_dir)
    found = []
    for path in sorted((train_dir / "snapshots").glob("ema-*.safetensors")):
        found.append((int(re.search(r"ema-(\d+)", path.name).group(1)), path))
    return found


def evaluate_snapshots_stage(exp: ExperimentConfig, train_dir, reference_dir, features_dir, state_root, out_path,
                             tokenizer, device="cpu") -> list[dict]:
    detector = build_detector(exp, features_dir, device)
    reference = load_reference(Path(reference_dir) / REFERENCE_FILE, detector)
    points = snapshot_weights(train_dir) + [(exp.train.images, Path(train_dir) / "model.safetensors")]
    stages = 2 if load_weights(points[-1][1]).lem is not None and exp.stages.count >= 2 else 1
    rows = []
    for images, weights in points:
        prior = None
        for k in range(1, stages + 1):
            where = Path(state_root) / f"{images:012d}" / f"stage{k}"
            sample_stage(exp, k, weights, where / "out", where / "state", tokenizer, prior=prior, device=device)
            cache = PriorCache(where / "out")
            metrics = evaluate_images(cache.image_batches(), detector, reference, labels=cache.load("labels"),
                                      num_classes=cache.meta["num_classes"], k=exp.eval.pr_k, progress=False)
            rows.append({"experiment": exp.name, "train_images": images, "stage": k,
                         "metric_name": detector.metric_prefix, **metrics})
            log.info("%s at %d images, stage %d: %s = %.4f", exp.name, images, k, detector.metric_prefix,
                     metrics[detector.metric_prefix])
            prior = cache
    save_json(out_path, rows)
    return rows
