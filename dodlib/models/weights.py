"""A network on disk: the spec that rebuilds it (JSON) beside its weights (safetensors).

Training writes both; sampling, pair regeneration, the probe, snapshot evaluation and the
parameter counts of the metrics read them back through `load_weights`, so every consumer of a
network rebuilds it the same way and loading never unpickles anything.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from ..io import atomic_path, load_json, save_json
from .dod import LEM_DEFAULTS, DoDModel

if TYPE_CHECKING:  # the config module stays free of torch; only its type is needed here
    from ..config import ExperimentConfig


def model_spec(exp: ExperimentConfig, latent_shape, num_classes: int) -> dict:
    """Everything needed to rebuild the network; stored as JSON next to its weights."""
    lem = None
    if exp.lem.enabled:
        lem = {k: getattr(exp.lem, k) for k in LEM_DEFAULTS}
    return {
        "input_size": int(latent_shape[-1]),
        "in_channels": int(latent_shape[0]),
        "num_classes": int(num_classes),
        "size": exp.model.size,
        "patch_size": exp.model.patch_size,
        "learn_sigma": exp.model.learn_sigma,
        "lem": lem,
    }


def build_model(spec: dict) -> DoDModel:
    return DoDModel(**spec)


def cpu_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """A module's state dict as contiguous CPU tensors, the form safetensors writes."""
    return {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}


def save_weights(path: Path, model: nn.Module, spec: dict) -> None:
    """Weights as safetensors plus the model spec as JSON."""
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file(cpu_state(model), str(tmp))
    save_json(path.with_suffix(".json"), spec)


def load_weights(path: str | Path, device="cpu") -> DoDModel:
    """The network saved at `path` (with its spec beside it), in eval mode on `device`."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model weights not found: {path}")
    spec_path = path.with_suffix(".json")
    if not spec_path.exists():
        raise FileNotFoundError(f"model spec not found beside the weights: {spec_path}")
    model = build_model(load_json(spec_path))
    model.load_state_dict(load_file(str(path), device=str(device)))
    return model.to(device).eval()


__all__ = ["build_model", "cpu_state", "load_weights", "model_spec", "save_weights"]
