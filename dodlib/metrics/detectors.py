"""Feature detectors: one interface, two implementations.

- ``InceptionDetector``: the TF-ported FID Inception-v3 used by ADM/SiT (clean-fid's
  ``legacy_tensorflow`` mode), loaded from a local TorchScript file; pool3 features (2048) and
  1008-class logits from one forward. Its Fréchet distance is "FID".
- ``FeatureNetDetector``: the small classifier trained on the real data set
  (``feature_net.py``); its distance is "FD_<dataset>", never FID.

Input contract everywhere: uint8 images [N, H, W, 3] (RGB, HWC), as stored in the shards.
Requiring uint8 means generated samples are quantised exactly like the stored real images before
any feature is computed (what ADM's evaluator and clean-fid do with saved samples).
"""

from __future__ import annotations

import abc
import logging
import re
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .feature_net import FeatureNet, _uint8_hwc_to_float_nchw, load_feature_net

log = logging.getLogger(__name__)

INCEPTION_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"
INCEPTION_FILENAME = "inception-2015-12-05.pt"
INCEPTION_PARAMS_KEY = "eval.inception_weights"
INCEPTION_SIZE = 299


class Detector(abc.ABC):
    """Maps uint8 image batches to (features, logits).

    Attributes: ``name`` (e.g. "inception", "features_mnist"), ``metric_prefix`` (name of its
    Fréchet distance: "FID" or "FD_<dataset>"), ``feature_dim``, ``num_logits`` (or None),
    ``logits_are_labels`` (True if the logits index the data set's own classes, so class accuracy
    of conditional samples is meaningful).
    """

    name: str
    metric_prefix: str
    feature_dim: int
    num_logits: int | None
    logits_are_labels: bool = False
    batch_size: int = 64
    device: torch.device = torch.device("cpu")

    @abc.abstractmethod
    def _forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x: float32 [B, 3, H, W] with values in [0, 255], on ``self.device``."""

    def features_and_logits(self, batch) -> tuple[np.ndarray, np.ndarray | None]:
        """uint8 [B, H, W, 3] → (features float32 [B, D], logits float32 [B, C] or None).

        Large batches are processed in chunks of ``batch_size`` so callers may pass whole shards.
        """
        feats, logits = [], []
        with torch.inference_mode():
            for start in range(0, len(batch), self.batch_size):
                x = _uint8_hwc_to_float_nchw(batch[start : start + self.batch_size]).to(self.device)
                f, l = self._forward(x)
                feats.append(f.float().cpu().numpy())
                if l is not None:
                    logits.append(l.float().cpu().numpy())
        if not feats:
            return np.zeros((0, self.feature_dim), np.float32), None
        return np.concatenate(feats), (np.concatenate(logits) if logits else None)

    def describe(self) -> dict:
        return {"name": self.name, "metric_prefix": self.metric_prefix, "feature_dim": self.feature_dim}


# ---- Inception -------------------------------------------------------------------------------

def legacy_tf_resize(x: torch.Tensor, size: int = INCEPTION_SIZE) -> torch.Tensor:
    """Bilinear resize as TF1's ``resize_bilinear(align_corners=False)`` — what the FID graph does.

    Output pixel i samples input coordinate i * in/out (no half-pixel offset), clamped at the border,
    no antialiasing. This equals the affine-grid + ``grid_sample`` resize inside the TorchScript
    Inception that clean-fid's legacy_tensorflow mode calls, and is checked against it when the real
    weights are loaded. x: float [B, C, H, W].
    """

    def axis(n_in: int):
        src = torch.arange(size, dtype=torch.float64) * (n_in / size)
        i0 = src.floor().long().clamp(max=n_in - 1)
        i1 = (i0 + 1).clamp(max=n_in - 1)
        w = (src - src.floor()).to(x.dtype).to(x.device)
        return i0.to(x.device), i1.to(x.device), w

    h, w = x.shape[-2:]
    if (h, w) == (size, size):
        return x
    y0, y1, wy = axis(h)
    x = x[..., y0, :] * (1 - wy)[:, None] + x[..., y1, :] * wy[:, None]
    x0, x1, wx = axis(w)
    return x[..., x0] * (1 - wx) + x[..., x1] * wx


class _TorchScriptInception(nn.Module):
    """(features, logits) from NVIDIA's TorchScript FID Inception (``inception-2015-12-05.pt``).

    Normal mode takes 299×299 input already resized by ``legacy_tf_resize`` and runs the network
    body, as clean-fid's "clean" mode does. ``resize_inside`` lets the TorchScript resize itself
    (clean-fid's legacy_tensorflow call) — the fallback if the equivalence check ever fails.
    Logits are pool3 @ W without the output bias: what the original IS, ADM and StyleGAN use.
    """

    def __init__(self, base):
        super().__init__()
        self.base = base
        self.resize_inside = False
        try:
            self.register_buffer("w_out", base.output.weight.detach().clone(), persistent=False)
        except AttributeError as e:  # not the expected file
            raise RuntimeError("Inception TorchScript has no 'output.weight'; is this inception-2015-12-05.pt?") from e

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.resize_inside:
            feats = self.base(x, return_features=True)
        else:
            feats = self.base.layers.forward((x - 128) / 128).reshape(x.shape[0], 2048)
        return feats, F.linear(feats, self.w_out)


def _missing_weights_message(path: Path) -> str:
    return (
        f"Inception weights not found at '{path}'. They are never downloaded automatically (compute "
        f"nodes are usually offline). On a login node, fetch clean-fid's FID Inception once:\n"
        f"  mkdir -p '{path.parent}' && wget -O '{path}' {INCEPTION_URL}\n"
        f"  (or: curl -L -o '{path}' {INCEPTION_URL})\n"
        f"and point the params key `{INCEPTION_PARAMS_KEY}` in params.yaml at that file."
    )


class InceptionDetector(Detector):
    """FID Inception-v3 (clean-fid legacy_tensorflow) from a local weights file.

    ``InceptionDetector(weights_path)`` loads the TorchScript; ``from_module(module)`` accepts any
    module with the same contract — float [B, 3, 299, 299] in [0, 255] → (features, logits) — and
    runs the identical pre-processing (uint8 check, TF1 bilinear resize); tests use a small
    random net there.
    """

    logits_are_labels = False  # ImageNet-1008 classes, not the data set's

    def __init__(self, weights_path: str | Path, device="cpu", *, batch_size: int = 64, check: bool = True):
        path = Path(weights_path).expanduser()
        if path.is_dir():
            path = path / INCEPTION_FILENAME
        if not path.is_file():
            raise FileNotFoundError(_missing_weights_message(path))
        # TorchScript archive: code + tensors, no arbitrary pickled Python objects. The file only
        # exists in this format, so torch's TorchScript deprecation notice is not actionable here.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*torch\.jit\.load.*deprecated", category=FutureWarning)
            base = torch.jit.load(str(path), map_location=torch.device(device)).eval()
        self._setup(_TorchScriptInception(base), device, batch_size, "inception", "FID")
        self.weights_path = str(path)
        if check:
            self._check_resize(base)

    @classmethod
    def from_module(
        cls, module: nn.Module, device="cpu", *, batch_size: int = 64, name: str = "inception", metric_prefix: str = "FID"
    ) -> "InceptionDetector":
        self = cls.__new__(cls)
        self._setup(module, device, batch_size, name, metric_prefix)
        self.weights_path = None
        return self

    def _setup(self, module, device, batch_size, name, metric_prefix):
        self.device = torch.device(device)
        self.net = module.to(self.device).eval()
        self.batch_size = batch_size
        self.name, self.metric_prefix = name, metric_prefix
        self._resize_outside = True
        with torch.inference_mode():  # one dummy forward to learn the output sizes
            f, l = self.net(torch.zeros(1, 3, INCEPTION_SIZE, INCEPTION_SIZE, device=self.device))
        self.feature_dim = int(f.shape[1])
        self.num_logits = None if l is None else int(l.shape[1])

    def _check_resize(self, base) -> None:
        """Compare our resize + body with the TorchScript's own resize on a small random batch.

        If they ever disagree (a different weights file), fall back to the TorchScript's internal
        resize so the numbers stay those of clean-fid legacy_tensorflow.
        """
        g = torch.Generator().manual_seed(0)
        x = torch.randint(0, 256, (2, 3, 37, 53), generator=g).float().to(self.device)
        with torch.inference_mode():
            ref = base(x, return_features=True).float()
            ours = self.net(legacy_tf_resize(x))[0].float()
        err = float((ref - ours).abs().max())
        if err > 1e-3 * float(ref.abs().max()) + 1e-4:
            log.warning("Inception: external resize differs from the TorchScript's (max err %.3g); using its internal resize", err)
            self.net.resize_inside = True
            self._resize_outside = False

    def _forward(self, x):
        if self._resize_outside:
            x = legacy_tf_resize(x)
        return self.net(x)


# ---- data-set feature net --------------------------------------------------------------------

def _metric_safe(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_]+", "_", s).strip("_") or "data"


class FeatureNetDetector(Detector):
    """Penultimate features and class logits of the data-set ``FeatureNet``."""

    logits_are_labels = True

    def __init__(self, model: FeatureNet, *, dataset: str | None = None, device="cpu", batch_size: int = 256):
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.dataset = _metric_safe(dataset or model.config.get("dataset", "data"))
        self.name = f"features_{self.dataset}"
        self.metric_prefix = f"FD_{self.dataset}"
        self.feature_dim = model.feature_dim
        self.num_logits = model.num_classes
        self.batch_size = batch_size

    @classmethod
    def load(cls, path: str | Path, device="cpu", **kwargs) -> "FeatureNetDetector":
        return cls(load_feature_net(path, device), device=device, **kwargs)

    def _forward(self, x):
        return self.model.features_and_logits(self.model.preprocess(x))
