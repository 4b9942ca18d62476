"""Prepared images on disk: a few uint8 shards plus labels and class names, not a file per image.

Layout of a split directory:
    images-00000.npy ...   uint8 [n, H, W, 3]
    labels.npy             int64 [N]
    meta.json              {"num_images", "resolution", "classes", "shards": [...], ...}
Shards are memory-mapped on read, so a 1.28M-image ImageNet split costs no RAM to open.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from ..io import load_json, save_json, save_npy


def write_image_shards(
    out_dir: str | Path,
    batches: Iterable[tuple[np.ndarray, np.ndarray]],
    *,
    classes: Sequence[str],
    shard_size: int,
    extra_meta: dict | None = None,
) -> dict:
    """Write (images uint8 [b,H,W,3], labels [b]) batches as shards; meta.json is written last,
    so a split without meta.json is incomplete by construction."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pending_images: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    shards: list[str] = []
    buffered = 0

    def flush() -> None:
        nonlocal pending_images, buffered
        if not pending_images:
            return
        name = f"images-{len(shards):05d}.npy"
        save_npy(out_dir / name, np.concatenate(pending_images))
        shards.append(name)
        pending_images, buffered = [], 0

    resolution = None
    for images, batch_labels in batches:
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected uint8 [b, H, W, 3] images, got {images.dtype} {images.shape}")
        resolution = images.shape[1]
        pending_images.append(images)
        labels.append(np.asarray(batch_labels, dtype=np.int64))
        buffered += len(images)
        while buffered >= shard_size:
            stacked = np.concatenate(pending_images)
            pending_images = [stacked[:shard_size]]
            rest = stacked[shard_size:]
            buffered = shard_size
            flush()
            pending_images, buffered = ([rest], len(rest)) if len(rest) else ([], 0)
    flush()
    all_labels = np.concatenate(labels) if labels else np.zeros(0, np.int64)
    save_npy(out_dir / "labels.npy", all_labels)
    meta = {
        "num_images": int(len(all_labels)),
        "resolution": resolution,
        "classes": list(classes),
        "shards": shards,
        "class_counts": np.bincount(all_labels, minlength=len(classes)).tolist(),
        **(extra_meta or {}),
    }
    save_json(out_dir / "meta.json", meta)
    return meta


class ImageShards:
    """Read side of a prepared split: random access and batch iteration over memory-mapped shards."""

    def __init__(self, split_dir: str | Path):
        self.dir = Path(split_dir)
        meta_path = self.dir / "meta.json"
        if not meta_path.exists():
            raise FileNotFoundError(f"{self.dir}: no meta.json - the split is missing or was not finished")
        self.meta = load_json(meta_path)
        self.labels = np.load(self.dir / "labels.npy")
        self.shards = [np.load(self.dir / name, mmap_mode="r") for name in self.meta["shards"]]
        self.offsets = np.cumsum([0] + [len(s) for s in self.shards])
        if self.offsets[-1] != len(self.labels):
            raise ValueError(f"{self.dir}: shards hold {self.offsets[-1]} images but labels.npy has {len(self.labels)}")

    @property
    def classes(self) -> list[str]:
        return self.meta["classes"]

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def images(self, start: int, stop: int) -> np.ndarray:
        """uint8 images [start, stop) as one array (crosses shard boundaries)."""
        parts = []
        for i, shard in enumerate(self.shards):
            lo, hi = max(start, self.offsets[i]), min(stop, self.offsets[i + 1])
            if lo < hi:
                parts.append(np.asarray(shard[lo - self.offsets[i] : hi - self.offsets[i]]))
        return np.concatenate(parts) if parts else np.zeros((0,) + self.shards[0].shape[1:], np.uint8)

    def batches(self, batch_size: int, limit: int | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        n = len(self) if limit is None else min(limit, len(self))
        for start in range(0, n, batch_size):
            stop = min(start + batch_size, n)
            yield self.images(start, stop), self.labels[start:stop]
