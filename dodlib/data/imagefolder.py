"""ImageFolder source (the ImageNet train layout: root/<class>/<image>), robust to bad files."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import DataError
from .crop import center_crop_arr

__all__ = ["DataError", "IMAGE_SUFFIXES", "iter_imagefolder", "list_classes", "list_files", "load_image", "to_8bit"]

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".jpe", ".gif"}
# Pillow's 16/32-bit greyscale modes: convert("RGB") would clip every value above 255 to white.
_WIDE_GREY = {"I;16", "I;16L", "I;16B", "I;16N", "I"}


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


def to_8bit(img: Image.Image) -> Image.Image:
    """16-bit greyscale (e.g. medical or scientific PNGs) scaled to 8 bits instead of clipped.
    Palette images (GIF, 8-bit PNG) and the rest convert to RGB in the crop as usual."""
    if img.mode in _WIDE_GREY:
        arr = np.asarray(img, dtype=np.int64)
        bits = 16 if arr.max(initial=0) < 1 << 16 else 32
        return Image.fromarray((np.clip(arr, 0, (1 << bits) - 1) >> (bits - 8)).astype(np.uint8), mode="L")
    return img


def load_image(path: Path, resolution: int, upscaled: list[str] | None = None) -> np.ndarray | None:
    """Decode, convert to RGB and centre-crop one image; None (with a warning) if it is unreadable.
    An image whose short side is below `resolution` is upscaled, and its path added to `upscaled`."""
    try:
        if path.stat().st_size == 0:
            raise OSError("zero-size file")
        with Image.open(path) as img:
            img.load()  # forces a full decode so truncated files fail here, not later
            if upscaled is not None and min(img.size) < resolution:
                upscaled.append(f"{path} ({img.size[0]}x{img.size[1]})")
            return center_crop_arr(to_8bit(img), resolution)
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as err:
        log.warning("skipping unreadable image %s: %s", path, err)
        return None


def iter_imagefolder(
    files: list[tuple[Path, int]], resolution: int, batch_size: int, skipped: list[str],
    upscaled: list[str] | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield (uint8 images, labels) batches; unreadable paths are appended to `skipped`, those
    smaller than `resolution` to `upscaled`."""
    images, labels = [], []
    for path, label in files:
        arr = load_image(path, resolution, upscaled)
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
