"""Evaluation stages: train_feature_net, reference_stats and evaluate_stage{k}.

The metric code lives in dodlib.metrics; this module binds it to the pipeline's artifacts:
which detector the config names, where the real images and the samples are, and what goes into
the metrics JSON beside the numbers (sample count, detector, NFE, compute, copying diagnostic).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from .config import ExperimentConfig
from .data.shards import ImageShards
from .io import load_json, save_json
from .metrics.detectors import FeatureNetDetector, InceptionDetector
from .metrics.evaluate import compute_reference, evaluate_images, load_reference, save_reference
from .metrics.feature_net import save_feature_net, train_feature_net
from .runtime import PROVENANCE_FILE, provenance

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


def evaluate_stage(exp: ExperimentConfig, stage: int, samples_dir, reference_dir, features_dir, weights_path,
                   out_path, *, train_images: int, device="cpu") -> dict:
    """Metrics of one stage's samples: metrics JSON with the sample count and the detector named.
    `train_images`: images behind the network that sampled it (fine-tuning included)."""
    from .sample import PriorCache

    samples = PriorCache(samples_dir)
    detector = build_detector(exp, features_dir, device)
    reference = load_reference(Path(reference_dir) / REFERENCE_FILE, detector)
    labels = samples.load("labels")
    metrics = evaluate_images(samples.image_batches(), detector, reference, labels=labels,
                              num_classes=samples.meta["num_classes"], k=exp.eval.pr_k)
    meta = samples.meta
    # Compute to produce one stage-k sample: every stage up to k (each restarts from noise), with
    # CFG doubling the batch, plus the LEM once per stage >= 2. Summed from the earlier stages' meta.
    gflops, k, m = _stage_gflops(meta), stage, meta
    while m.get("prior_source") == "generated":  # priors from real latents cost no sampling
        k -= 1
        m = PriorCache(Path(samples_dir).parent / f"stage{k}").meta
        gflops += _stage_gflops(m)
    result = {
        "experiment": exp.name,
        "stage": stage,
        "metric_name": detector.metric_prefix,
        **metrics,
        "nfe": meta["nfe"],
        "cfg_scale": meta["sampling"]["cfg"]["scale"],
        "prior_source": meta.get("prior_source"),
        "msd_to_prior": meta.get("msd_to_prior"),
        "msd_within_class": meta.get("msd_within_class"),
        "train_images": train_images,
        "sampling_gflops_per_image": gflops,
        **_parameter_counts(weights_path),
        # What decided the bytes of the network, the samples and these numbers, and where each ran.
        "provenance": {
            "train": _provenance_of(Path(weights_path).parent),
            "sample": _provenance_of(samples_dir),
            "evaluate": provenance(exp.runtime, "no"),
        },
    }
    save_json(out_path, result)
    log.info("%s stage %d: %s", exp.name, stage,
             {k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()})
    return result


def _provenance_of(directory) -> dict:
    """The runtime record a training or sampling stage left in its output directory."""
    path = Path(directory) / PROVENANCE_FILE
    return load_json(path) if path.exists() else {}


def _parameter_counts(weights_path) -> dict:
    from .train import build_model

    model = build_model(load_json(Path(weights_path).with_suffix(".json")))
    return {"params": model.num_params("total"), "lem_params": model.num_params("lem") if model.lem is not None else 0}


def _stage_gflops(meta: dict) -> float:
    """GFLOPs of one sample of one stage. CFG is counted as doubling every step (an upper bound
    for interval schedules, which skip the unconditional branch outside the interval)."""
    flops = meta["flops_per_forward"]
    per_step = flops["backbone"] * (2 if meta["cfg_doubles_batch"] else 1)
    lem = flops.get("lem", 0) if meta.get("prior_source") else 0
    return (meta["nfe"] * per_step + lem) / 1e9
