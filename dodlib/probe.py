"""Linear probe of the LEM's bottleneck: how much class information survives the compression.

Features are the LEM bottleneck of real latents (posterior means), flattened per image; a
multinomial logistic regression is fitted on the training split and its top-1 accuracy reported
on the held-out split. A tight bottleneck that still separates classes keeps semantics while
discarding detail, which is what the LEM is for.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .io import save_json
from .latents import LatentSet
from .models.weights import load_weights

log = logging.getLogger(__name__)


@torch.no_grad()
def bottleneck_features(model, latents: LatentSet, batch_size: int = 500) -> torch.Tensor:
    feats = []
    for lo in range(0, len(latents), batch_size):
        index = np.arange(lo, min(lo + batch_size, len(latents)))
        feats.append(model.bottleneck_features(latents.means(index)).flatten(1))
    return torch.cat(feats)


def fit_linear_probe(x_train, y_train, x_test, y_test, num_classes: int, *, epochs: int = 300,
                     lr: float = 0.05, weight_decay: float = 1e-4, seed: int = 0) -> dict:
    """Multinomial logistic regression, full batch, Adam on standardised features: exact enough
    for probe-sized problems and deterministic for a seed."""
    torch.manual_seed(seed)
    mean, std = x_train.mean(0), x_train.std(0).clamp_min(1e-6)
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    linear = torch.nn.Linear(x_train.shape[1], num_classes)
    opt = torch.optim.Adam(linear.parameters(), lr=lr, weight_decay=weight_decay)
    with torch.enable_grad():
        for _ in range(epochs):
            opt.zero_grad()
            loss = F.cross_entropy(linear(x_train), y_train)
            loss.backward()
            opt.step()
    with torch.no_grad():
        train_top1 = (linear(x_train).argmax(1) == y_train).float().mean().item()
        top1 = (linear(x_test).argmax(1) == y_test).float().mean().item()
    return {"top1": top1, "train_top1": train_top1, "final_loss": float(loss)}


def probe_stage(weights: str | Path, latents_dir: str | Path, out_path: str | Path, *, exp_name: str = "") -> dict:
    model = load_weights(weights)
    if model.lem is None:
        raise ValueError(f"{weights}: the model has no LEM to probe")
    train, val = LatentSet(Path(latents_dir) / "train"), LatentSet(Path(latents_dir) / "val")
    x_train, x_val = bottleneck_features(model, train), bottleneck_features(model, val)
    result = fit_linear_probe(x_train, train.labels, x_val, val.labels, train.num_classes)
    result.update({
        "experiment": exp_name, "feature_dim": int(x_train.shape[1]),
        "bottleneck_dim": model.config["lem"]["bottleneck_dim"], "lem_kind": model.config["lem"]["kind"],
        "train_images": len(train), "test_images": len(val),
        "chance": 1.0 / train.num_classes,
    })
    save_json(out_path, result)
    log.info("linear probe %s: top-1 %.3f on %d held-out images (%d features)", exp_name, result["top1"],
             len(val), result["feature_dim"])
    return result
