"""The prepare_data stage: raw source -> train/ and val/ uint8 shards."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from ..config import DataConfig
from ..io import save_json
from .embedded import CLASSES as MNIST_CLASSES, load_mnist_embedded
from .imagefolder import DataError, iter_imagefolder, list_classes, list_files
from .shards import write_image_shards

log = logging.getLogger(__name__)


def prepare_data(cfg: DataConfig, out_dir: str | Path) -> dict:
    """Write `out_dir/train` and `out_dir/val`; returns a summary (also saved as summary.json)."""
    out_dir = Path(out_dir)
    if cfg.source == "mnist-embedded":
        summary = _prepare_embedded(cfg, out_dir)
    else:
        summary = _prepare_imagefolder(cfg, out_dir)
    save_json(out_dir / "summary.json", summary)
    return summary


def _batched(images: np.ndarray, labels: np.ndarray, size: int = 1024):
    for i in range(0, len(images), size):
        yield images[i : i + size], labels[i : i + size]


def _prepare_embedded(cfg: DataConfig, out_dir: Path) -> dict:
    images, labels = load_mnist_embedded(cfg.resolution)
    # Held-out split: the first `val_per_class` images of each class after a seeded shuffle.
    order = np.random.default_rng(cfg.seed).permutation(len(labels))
    val_idx, train_idx = [], []
    seen = np.zeros(len(MNIST_CLASSES), int)
    for i in order:
        c = labels[i]
        if seen[c] < cfg.val_per_class:
            val_idx.append(i)
        elif not cfg.max_per_class or seen[c] < cfg.val_per_class + cfg.max_per_class:
            train_idx.append(i)
        seen[c] += 1
    # Keep a stable, class-interleaved order on disk (sorted indices of the original file).
    splits = {"train": np.sort(train_idx), "val": np.sort(val_idx)}
    summary = {"source": cfg.source, "resolution": cfg.resolution, "skipped": []}
    for split, idx in splits.items():
        meta = write_image_shards(
            out_dir / split, _batched(images[idx], labels[idx]), classes=MNIST_CLASSES, shard_size=cfg.shard_size
        )
        summary[split] = meta["num_images"]
    log.info("prepared embedded MNIST: %d train, %d val images", summary["train"], summary["val"])
    return summary


def _prepare_imagefolder(cfg: DataConfig, out_dir: Path) -> dict:
    root = Path(cfg.root)
    if not root.is_dir():
        raise DataError(f"data.root: {root} is not a directory (expected train/<class>/ images in it)")
    train_dir = root / "train" if (root / "train").is_dir() else root
    classes = list_classes(train_dir)
    files = list_files(train_dir, classes, cfg.max_per_class)
    val_dir = root / "val"
    if val_dir.is_dir():
        val_classes = list_classes(val_dir)
        if val_classes != classes:
            missing = sorted(set(classes) ^ set(val_classes))
            raise DataError(f"{val_dir}: classes differ from {train_dir} (e.g. {missing[:5]})")
        val_files = list_files(val_dir, classes, cfg.val_per_class or 0)
    else:
        # No val/ split: hold out `val_per_class` images of each class, chosen with the split seed.
        rng = np.random.default_rng(cfg.seed)
        by_class: dict[int, list] = {}
        for f in files:
            by_class.setdefault(f[1], []).append(f)
        val_files, train_files = [], []
        for label in sorted(by_class):
            members = by_class[label]
            picks = set(rng.permutation(len(members))[: cfg.val_per_class].tolist())
            for j, f in enumerate(members):
                (val_files if j in picks else train_files).append(f)
        files = train_files
    summary = {"source": cfg.source, "root": str(root), "resolution": cfg.resolution, "skipped": [], "upscaled": []}
    for split, split_files in (("train", files), ("val", val_files)):
        skipped: list[str] = []
        upscaled: list[str] = []
        per_class = np.zeros(len(classes), dtype=np.int64)

        def counted(batches):
            for images, labels in batches:
                np.add.at(per_class, labels, 1)
                yield images, labels

        meta = write_image_shards(
            out_dir / split,
            counted(iter_imagefolder(split_files, cfg.resolution, 256, skipped, upscaled)),
            classes=classes,
            shard_size=cfg.shard_size,
            extra_meta={"skipped": skipped, "upscaled": upscaled},
        )
        summary[split] = meta["num_images"]
        summary["skipped"] += skipped
        summary["upscaled"] += upscaled
        if skipped:
            log.warning("%s: skipped %d unreadable images (listed in meta.json)", split, len(skipped))
        if upscaled:
            log.warning("%s: %d images are smaller than data.resolution=%d and were upscaled (listed in "
                        "meta.json), e.g. %s", split, len(upscaled), cfg.resolution, upscaled[0])
        if meta["num_images"] == 0:
            raise DataError(f"{split}: every image was unreadable")
        empty = [classes[c] for c in np.flatnonzero(per_class == 0)]
        if empty and split == "train":
            raise DataError(f"{train_dir}: {len(empty)} class(es) kept no readable image: {', '.join(empty[:10])} "
                            "(every file unreadable); remove the folder or fix its files")
    log.info("prepared %s: %d train, %d val images, %d skipped", root, summary["train"], summary["val"], len(summary["skipped"]))
    return summary
