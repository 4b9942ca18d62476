"""The read side of prior caches: what sampling stages condition on and training fine-tunes on.

- `PriorCache`: a directory of shards written by `dodlib.sample` (a stage's samples, or the
  paired priors of a fine-tuned stage) with its meta.json, written last.
- `RealPriors`: posterior means of real latents in a class-balanced order (rFID priors, and the
  clean latents that paired priors are regenerated from).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .config import fingerprint
from .io import load_json
from .latents import LatentSet


def shard_file(what: str, j: int) -> str:
    """File name of shard `j` of one array of a sample set (`latents`, `labels`, `seeds`, `images`, ...)."""
    return f"{what}-{j:05d}.npy"


def shard_record(j: int) -> str:
    """File name of the record of unfinished shard `j` (in the sampling state directory)."""
    return f"shard-{j:05d}.json"


class PriorCache:
    """Read side of a stage's output: latents, labels and seeds in shards (+ decoded images)."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        if not (self.dir / "meta.json").exists():
            raise FileNotFoundError(f"{self.dir}: no meta.json - the prior cache is missing or unfinished")
        self.meta = load_json(self.dir / "meta.json")

    def __len__(self) -> int:
        return self.meta["num_samples"]

    def load(self, what: str) -> np.ndarray:
        return np.concatenate([np.load(self.dir / shard_file(what, j)) for j in range(self.meta["num_shards"])])

    def image_batches(self):
        for j in range(self.meta["num_shards"]):
            yield np.load(self.dir / shard_file("images", j), mmap_mode="r")


class RealPriors:
    """Priors from real latents (rFID, paper Fig. 3 left): posterior means of real images, taken
    class-interleaved (the i-th prior is the (i // C)-th image of class i % C) so any prefix is
    class-balanced even when the split is stored sorted by class."""

    def __init__(self, latents_dir: str | Path):
        self.set = LatentSet(latents_dir)
        labels = self.set.labels.numpy()
        rank = np.empty(len(labels), np.int64)
        for c in np.unique(labels):
            members = np.flatnonzero(labels == c)
            rank[members] = np.arange(len(members))
        self.order = np.lexsort((labels, rank))  # by rank within class, then class
        self.meta = {"fingerprint": fingerprint(self.set.meta), "source": str(latents_dir)}

    def __len__(self) -> int:
        return len(self.set)

    def take(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        index = self.order[:n]
        return self.set.means(index).numpy(), self.set.labels[torch.from_numpy(index)].numpy()
