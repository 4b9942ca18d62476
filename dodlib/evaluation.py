"""The evaluation's detector and its reference: the stages train_feature_net and reference_stats.

The metric code lives in dodlib.metrics; this module binds it to the pipeline's artifacts: which
detector the config names and where the real images are. A stage's metrics JSON is made by
dodlib/stage_metrics.py, apart from this module so that an edit there (or of the network it counts
parameters of) does not rerun the reference statistics.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from .config import ExperimentConfig
from .data.shards import ImageShards
from .io import save_json
from .metrics.detectors import FeatureNetDetector, InceptionDetector
from .metrics.evaluate import compute_reference, load_reference, save_reference
from .metrics.feature_net import save_feature_net, train_feature_net

log = logging.getLogger(__name__)

FEATURE_NET_FILE = "model.safetensors"
REFERENCE_FILE = "reference.npz"


def dataset_name(exp: ExperimentConfig) -> str:
    """Short name of the data set for metric labels (FD_<name>), e.g. "mnist" or "imagefolder"."""
    return "mnist" if exp.data.source == "mnist-embedded" else Path(exp.data.root).name or "data"


def build_detector(exp: ExperimentConfig, features_dir: str | Path, device="cpu"):
    if exp.eval.detector == "inception":
        return InceptionDetector(exp.eval.inception_weights, device=device, batch_size=exp.eval.batch_size)
    path = Path(features_dir) / FEATURE_NET_FILE
    if not path.exists():
        raise FileNotFoundError(f"feature network not found: {path} (run the train_feature_net stage)")
    return FeatureNetDetector.load(path, device=device, dataset=dataset_name(exp), batch_size=exp.eval.batch_size)


def train_feature_net_stage(exp: ExperimentConfig, data_dir: str | Path, out_dir: str | Path, device="cpu") -> dict:
    """Train the data-set feature network on the real training images; report held-out accuracy."""
    cfg = exp.eval.feature_net
    train = ImageShards(Path(data_dir) / "train")
    model, train_log = train_feature_net(
        train.images(0, len(train)), train.labels, len(train.classes), epochs=cfg.epochs,
        batch_size=cfg.batch_size, lr=cfg.lr, seed=cfg.seed, dataset=dataset_name(exp), device=device,
    )
    val = ImageShards(Path(data_dir) / "val")
    detector = FeatureNetDetector(model, dataset=dataset_name(exp), device=device)
    _, logits = detector.features_and_logits(val.images(0, len(val)))
    val_accuracy = float((np.asarray(logits).argmax(1) == val.labels).mean())
    log.info("feature net: held-out accuracy %.4f on %d real images", val_accuracy, len(val))
    out_dir = Path(out_dir)
    save_json(out_dir / "train_log.json", {"log": train_log, "val_accuracy": val_accuracy, "val_images": len(val)})
    save_feature_net(model, out_dir / FEATURE_NET_FILE, extra={"val_accuracy": val_accuracy})
    return {"val_accuracy": val_accuracy}


def reference_stats_stage(exp: ExperimentConfig, data_dir, features_dir, out_dir, device="cpu") -> dict:
    """Detector statistics of the real training images (or of a given ADM reference batch)."""
    detector = build_detector(exp, features_dir, device)
    if exp.eval.reference_npz:
        reference = load_reference(exp.eval.reference_npz, detector, max_ref=exp.eval.max_reference)
    else:
        real = ImageShards(Path(data_dir) / "train")
        images = (batch for batch, _ in real.batches(exp.eval.batch_size))
        reference = compute_reference(images, detector, max_ref=exp.eval.max_reference)
    save_reference(Path(out_dir) / REFERENCE_FILE, reference)
    return {"detector": detector.name, "count": int(reference.get("count", -1))}
