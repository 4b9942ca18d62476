"""Data-set feature network: a small CNN classifier trained on the real training images.

Used where Inception weights are unavailable or meaningless (the embedded default data set, any
small data set). Its penultimate layer (global-average-pooled last conv block, ``feature_dim``
channels) plays the role of Inception's pool3; its logits give an IS-like score and the class
accuracy of conditional samples. Distances in its space are reported as ``FD_<dataset>``,
never as FID.

Weights are stored as safetensors (no pickle on load) with a JSON sidecar holding the config.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from ..progress import progress as _reporter

from ..io import atomic_path

log = logging.getLogger(__name__)


class FeatureNet(nn.Module):
    """3 conv blocks (conv-BN-ReLU, 2× down between blocks) → global average pool → linear head.

    Narrow early blocks on purpose: the full-resolution block dominates CPU time, and 16/32
    channels there are plenty for digit-like data (~1,500 images/s training on 2 cores).
    """

    def __init__(
        self,
        num_classes: int,
        feature_dim: int = 128,
        widths: tuple[int, ...] = (16, 32),
        input_size: int = 32,
        dataset: str = "data",
    ):
        super().__init__()
        self.config = {
            "num_classes": int(num_classes),
            "feature_dim": int(feature_dim),
            "widths": [int(w) for w in widths],
            "input_size": int(input_size),
            "dataset": str(dataset),
        }
        chans = [3, *self.config["widths"], self.config["feature_dim"]]
        blocks = []
        for i, (cin, cout) in enumerate(zip(chans[:-1], chans[1:])):
            blocks += [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
            if i < len(chans) - 2:
                blocks.append(nn.MaxPool2d(2))
        self.body = nn.Sequential(*blocks)
        self.head = nn.Linear(feature_dim, num_classes)

    @property
    def feature_dim(self) -> int:
        return self.config["feature_dim"]

    @property
    def num_classes(self) -> int:
        return self.config["num_classes"]

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """float NCHW in [0, 255] → [-1, 1] at the fixed internal size (bilinear)."""
        x = x / 127.5 - 1.0
        s = self.config["input_size"]
        if x.shape[-2:] != (s, s):
            # Antialias only when shrinking, so large inputs do not alias; upsampling is plain bilinear.
            shrink = x.shape[-1] > s or x.shape[-2] > s
            x = F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False, antialias=shrink)
        return x

    def features_and_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: preprocessed input. Returns (penultimate features [B, feature_dim], logits [B, C])."""
        feats = self.body(x).mean(dim=(2, 3))
        return feats, self.head(feats)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features_and_logits(x)[1]


# ---- data helpers --------------------------------------------------------------------------

def _uint8_hwc_to_float_nchw(images) -> torch.Tensor:
    if isinstance(images, torch.Tensor):
        t = images
    else:
        arr = np.asarray(images)
        if not arr.flags.writeable or not arr.flags.c_contiguous:
            arr = np.array(arr)  # read-only memmaps/buffers: torch wants a writable array (chunk-sized copy)
        t = torch.from_numpy(arr)
    if t.dtype != torch.uint8:
        raise TypeError(f"images must be uint8 [N, H, W, 3], got dtype {t.dtype}")
    if t.ndim == 3:  # grey [N, H, W]
        t = t[..., None]
    if t.ndim != 4 or t.shape[-1] not in (1, 3):
        raise ValueError(f"images must be [N, H, W, 3] (HWC), got shape {tuple(t.shape)}")
    t = t.permute(0, 3, 1, 2).float()
    return t.expand(-1, 3, -1, -1) if t.shape[1] == 1 else t


def _random_shift(x: torch.Tensor, max_shift: int, gen: torch.Generator) -> torch.Tensor:
    """Random translation by up to ``max_shift`` px (edge padding): cheap augmentation that keeps
    the net from keying on exact positions, which generated samples do not reproduce."""
    if max_shift <= 0:
        return x
    b, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, mode="replicate")
    offs = torch.randint(0, 2 * max_shift + 1, (b, 2), generator=gen)
    return torch.stack([padded[i, :, dy : dy + h, dx : dx + w] for i, (dy, dx) in enumerate(offs.tolist())])


@torch.inference_mode()
def predict(model: FeatureNet, images, batch_size: int = 512, device="cpu") -> np.ndarray:
    """Class predictions for uint8 HWC images."""
    model.eval()
    out = []
    for start in range(0, len(images), batch_size):
        x = _uint8_hwc_to_float_nchw(images[start : start + batch_size]).to(device)
        out.append(model(model.preprocess(x)).argmax(1).cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


def train_feature_net(
    images,
    labels,
    num_classes: int,
    *,
    epochs: int = 3,
    batch_size: int = 64,
    lr: float = 1e-2,
    seed: int = 0,
    feature_dim: int = 128,
    widths: tuple[int, ...] = (16, 32),
    input_size: int = 32,
    dataset: str = "data",
    val_fraction: float = 0.1,
    max_shift: int = 2,
    weight_decay: float = 1e-4,
    device="cpu",
    progress: bool = True,
) -> tuple[FeatureNet, list[dict]]:
    """Train the feature net on uint8 HWC ``images`` with integer ``labels``.

    A seeded ``val_fraction`` of the images is held out to report accuracy (the detector is only
    useful if it classifies real data well); the rest is trained on. Images are converted per batch,
    so ``images`` may be a memory-mapped array. Returns (model in eval mode, per-epoch log).
    """
    labels = np.asarray(labels, dtype=np.int64)
    n = len(images)
    if len(labels) != n:
        raise ValueError(f"{n} images but {len(labels)} labels")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes}), got [{labels.min()}, {labels.max()}]")

    rng = np.random.default_rng(seed)
    perm = rng.permutation(n)
    n_val = int(round(n * val_fraction)) if n >= 20 else 0
    val_idx, train_idx = np.sort(perm[:n_val]), perm[n_val:]

    gen = torch.Generator().manual_seed(seed)
    # Seed the init without disturbing the caller's global RNG stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = FeatureNet(num_classes, feature_dim, widths, input_size, dataset).to(device)

    steps_per_epoch = max(1, math.ceil(len(train_idx) / batch_size))
    total = epochs * steps_per_epoch
    warmup = max(1, total // 20)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    # Short warm-up then cosine decay: reaches high accuracy in few epochs without tuning.
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, total) / total))
    )

    train_log = []
    for epoch in range(epochs):
        model.train()
        t0 = time.perf_counter()
        order = train_idx[torch.randperm(len(train_idx), generator=gen).numpy()]
        loss_sum, correct, seen = 0.0, 0, 0
        bar = _reporter(range(steps_per_epoch), desc=f"feature net epoch {epoch + 1}/{epochs}", unit="step",
                        enabled=progress, leave=False)
        for step in bar:
            idx = np.sort(order[step * batch_size : (step + 1) * batch_size])  # sorted: friendlier to memmaps
            x = _uint8_hwc_to_float_nchw(images[idx]).to(device)
            y = torch.from_numpy(labels[idx]).to(device)
            x = _random_shift(model.preprocess(x), max_shift, gen)
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.item() * len(idx)
            correct += int((logits.argmax(1) == y).sum())
            seen += len(idx)
        dt = time.perf_counter() - t0
        entry = {
            "epoch": epoch + 1,
            "loss": loss_sum / seen,
            "train_acc": correct / seen,
            "seconds": dt,
            "images_per_sec": seen / dt,
        }
        if n_val:
            entry["val_acc"] = float((predict(model, images[val_idx], device=device) == labels[val_idx]).mean())
        log.info("feature net %s", entry)
        train_log.append(entry)
    model.eval()
    return model, train_log


# ---- persistence ---------------------------------------------------------------------------

def _config_path(path: Path) -> Path:
    return path.with_suffix(".json")


def _atomic_write(path: Path, write) -> None:
    with atomic_path(path) as tmp:
        write(str(tmp))


def save_feature_net(model: FeatureNet, path: str | Path, extra: dict | None = None) -> None:
    """Write ``path`` (safetensors weights) and ``path`` with suffix .json (config + ``extra``)."""
    path = Path(path)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    meta = {"config": model.config, **({"extra": extra} if extra else {})}
    # Config first, weights last: a complete weights file implies its config is already in place.
    _atomic_write(_config_path(path), lambda p: Path(p).write_text(json.dumps(meta, indent=2)))
    _atomic_write(path, lambda p: save_file(state, p, metadata={"format": "pt"}))


def load_feature_net(path: str | Path, device="cpu") -> FeatureNet:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"feature net weights not found: {path}")
    meta = json.loads(_config_path(path).read_text())
    cfg = meta["config"]
    model = FeatureNet(cfg["num_classes"], cfg["feature_dim"], tuple(cfg["widths"]), cfg["input_size"], cfg["dataset"])
    model.load_state_dict(load_file(str(path), device="cpu"))
    return model.to(device).eval()
