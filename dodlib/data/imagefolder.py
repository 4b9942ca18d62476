"""ImageFolder source (the ImageNet train layout: root/<class>/<image>), robust to bad files."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image, UnidentifiedImageError

from .crop import center_crop_arr

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".jpe"}


class DataError(ValueError):
    """The raw data set is malformed (empty class folder, class mismatch between splits...)."""


def list_classes(split_dir: Path) -> list[str]:
    if not split_dir.is_dir():
        raise DataError(f"{split_dir}: not a directory")
    classes = sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"{split_dir}: no class folders")
    return classes


def list_files(split_dir: Path, classes: list[str], max_per_class: int = 0) -> list[tuple[Path, int]]:
    files = []
    for label, name in enumerate(classes):
        members = sorted(
            p for p in (split_dir / name).rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
        )
        if not members:
            raise DataError(f"{split_dir / name}: empty class folder (no images)")
        if max_per_class:
            members = members[:max_per_class]
        files.extend((p, label) for p in members)
    return files


def load_image(path: Path, resolution: int) -> np.ndarray | None:
    """Decode, convert to RGB and centre-crop one image; None (with a warning) if it is unreadable."""
    try:
        if path.stat().st_size == 0:
            raise OSError("zero-size file")
        with Image.open(path) as img:
            img.load()  # forces a full decode so truncated files fail here, not later
            return center_crop_arr(img, resolution)
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as err:
        log.warning("skipping unreadable image %s: %s", path, err)
        return None


def iter_imagefolder(
    files: list[tuple[Path, int]], resolution: int, batch_size: int, skipped: list[str]
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield (uint8 images, labels) batches; unreadable paths are appended to `skipped`."""
    images, labels = [], []
    for path, label in files:
        arr = load_image(path, resolution)
        if arr is None:
            skipped.append(str(path))
            continue
        images.append(arr)
        labels.append(label)
        if len(images) == batch_size:
            yield np.stack(images), np.asarray(labels)
            images, labels = [], []
    if images:
        yield np.stack(images), np.asarray(labels)
