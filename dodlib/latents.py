"""The extract_latents stage and the latent data set training reads.

Layout of a latent split directory:
    mean-00000.npy ...  float32 [n, F, C, H, W]   posterior mean (model space), F=2 with the h-flip
    std-00000.npy  ...  float32 [n, F, C, H, W]   posterior std (stochastic tokenizers only)
    labels.npy          int64 [N]
    meta.json           shape, flips, tokenizer, per-channel statistics, shards
Training draws a fresh posterior sample (mean + std * eps) and a random flip every step, so the
cache holds moments, not samples.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from .progress import progress

from .config import DataConfig, TokenizerConfig
from .data.shards import ImageShards
from .io import load_json, save_json, save_npy
from .tokenizers import hflip

log = logging.getLogger(__name__)


def extract_latents(
    tokenizer, data_cfg: DataConfig, tok_cfg: TokenizerConfig, split_dir: str | Path, out_dir: str | Path
) -> dict:
    images = ImageShards(split_dir)
    out_dir = Path(out_dir)
    flips = 2 if data_cfg.hflip else 1
    means, stds, shards = [], [], []
    count = 0
    channel_sum = channel_sq = None

    def flush() -> None:
        nonlocal means, stds
        if not means:
            return
        idx = len(shards)
        save_npy(out_dir / f"mean-{idx:05d}.npy", np.concatenate(means))
        if stds:
            save_npy(out_dir / f"std-{idx:05d}.npy", np.concatenate(stds))
        shards.append(idx)
        means, stds = [], []

    pending = 0
    stochastic = False
    latent_shape: list[int] = []
    for batch, _ in progress(images.batches(tok_cfg.batch_size), desc=f"latents {Path(split_dir).name}", unit="batch",
                             total=-(-len(images) // tok_cfg.batch_size), leave=False):
        batch = torch.from_numpy(batch)
        views = [batch, hflip(batch)][:flips]
        moments = [tokenizer.encode_moments(v) for v in views]
        mean = torch.stack([m for m, _ in moments], 1).float()
        means.append(mean.numpy())
        latent_shape = list(mean.shape[2:])
        if moments[0][1] is not None:
            stochastic = True
            stds.append(torch.stack([s for _, s in moments], 1).float().numpy())
        # Per-channel statistics of the un-flipped means: a cheap sanity check of the latent scale.
        m = mean[:, 0].double()
        s, sq = m.sum(dim=(0, 2, 3)), (m**2).sum(dim=(0, 2, 3))
        channel_sum = s if channel_sum is None else channel_sum + s
        channel_sq = sq if channel_sq is None else channel_sq + sq
        count += len(batch)
        pending += len(batch)
        if pending >= tok_cfg.shard_size:
            flush()
            pending = 0
    flush()
    if not count:
        raise ValueError(f"{split_dir}: no images to encode")
    pixels = count * latent_shape[-1] * latent_shape[-2]
    mu = (channel_sum / pixels).tolist()
    sd = (channel_sq / pixels - (channel_sum / pixels) ** 2).clamp_min(0).sqrt().tolist()
    save_npy(out_dir / "labels.npy", images.labels)
    meta = {
        "num_latents": count,
        "flips": flips,
        "stochastic": stochastic,
        "shards": shards,
        "latent_shape": latent_shape,
        "tokenizer": tok_cfg.kind,
        "classes": images.classes,
        "channel_mean": mu,
        "channel_std": sd,
    }
    save_json(out_dir / "meta.json", meta)
    log.info("%s: %d latents of shape %s, channel std %s", out_dir, count, meta["latent_shape"],
             [round(v, 3) for v in sd])
    return meta


class LatentSet:
    """Memory-mapped latent moments; `draw` samples the posterior and the flip per image."""

    def __init__(self, split_dir: str | Path):
        self.dir = Path(split_dir)
        if not (self.dir / "meta.json").exists():
            raise FileNotFoundError(f"{self.dir}: no meta.json - latents missing or extraction unfinished")
        self.meta = load_json(self.dir / "meta.json")
        self.labels = torch.from_numpy(np.load(self.dir / "labels.npy"))
        self.mean = [np.load(self.dir / f"mean-{i:05d}.npy", mmap_mode="r") for i in self.meta["shards"]]
        self.std = (
            [np.load(self.dir / f"std-{i:05d}.npy", mmap_mode="r") for i in self.meta["shards"]]
            if self.meta["stochastic"]
            else None
        )
        self.offsets = np.cumsum([0] + [len(m) for m in self.mean])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return tuple(self.meta["latent_shape"])

    @property
    def num_classes(self) -> int:
        return len(self.meta["classes"])

    def _gather(self, arrays, index: np.ndarray, flip: np.ndarray) -> torch.Tensor:
        shard = np.searchsorted(self.offsets, index, side="right") - 1
        out = np.empty((len(index),) + self.latent_shape, np.float32)
        for j, (s, i, f) in enumerate(zip(shard, index, flip)):
            out[j] = arrays[s][i - self.offsets[s], f]
        return torch.from_numpy(out)

    def draw(self, index: np.ndarray, generator: torch.Generator, *, sample_posterior: bool = True,
             flip: bool = True, rows: slice = slice(None)):
        """Latents for `index[rows]`: a random flip (if cached and `flip`) and a fresh posterior
        sample each call. The generator draws for all of `index` whatever `rows` selects, so a
        row's latent does not depend on which other rows are taken."""
        index = np.asarray(index)
        flips = torch.randint(0, self.meta["flips"] if flip else 1, (len(index),), generator=generator).numpy()
        full = len(index)
        index, flips = index[rows], flips[rows]
        mean = self._gather(self.mean, index, flips)
        if self.std is not None and sample_posterior:
            eps = torch.randn((full, *mean.shape[1:]), generator=generator)[rows]
            mean = mean + self._gather(self.std, index, flips) * eps
        return mean, self.labels[torch.from_numpy(index)]

    def means(self, index: np.ndarray) -> torch.Tensor:
        """Deterministic un-flipped posterior means (priors from real latents, linear probe)."""
        return self._gather(self.mean, np.asarray(index), np.zeros(len(index), int))
