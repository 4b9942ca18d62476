"""The stage evaluate_stage{k}: one stage's samples measured, and the metrics JSON beside them.

Besides the numbers of dodlib.metrics it records what a table needs to compare runs fairly: the
sample count and detector, NFE and compute per sample, parameter counts, the copying diagnostic,
and the runtime records of the jobs behind it.
"""

from __future__ import annotations

import logging
from pathlib import Path

from .config import ExperimentConfig
from .evaluation import REFERENCE_FILE, build_detector
from .io import load_json, save_json
from .metrics.evaluate import evaluate_images, load_reference
from .metrics.measures import measure_keys
from .priors import PriorCache
from .runtime import PROVENANCE_FILE, provenance

log = logging.getLogger(__name__)


def evaluate_stage(exp: ExperimentConfig, stage: int, samples_dir, reference_dir, features_dir, weights_path,
                   out_path, *, train_images: int, device="cpu") -> dict:
    """Metrics of one stage's samples: metrics JSON with the sample count and the detector named.
    `train_images`: images behind the network that sampled it (fine-tuning included)."""
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
        **{key: meta.get(key) for key in measure_keys("sampling")},
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
    from .models.weights import build_model

    model = build_model(load_json(Path(weights_path).with_suffix(".json")))
    return {"params": model.num_params("total"), "lem_params": model.num_params("lem") if model.lem is not None else 0}


def _stage_gflops(meta: dict) -> float:
    """GFLOPs of one sample of one stage. CFG is counted as doubling every step (an upper bound
    for interval schedules, which skip the unconditional branch outside the interval)."""
    flops = meta["flops_per_forward"]
    per_step = flops["backbone"] * (2 if meta["cfg_doubles_batch"] else 1)
    lem = flops.get("lem", 0) if meta.get("prior_source") else 0
    return (meta["nfe"] * per_step + lem) / 1e9
