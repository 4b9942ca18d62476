"""A stage's samples as one ADM-format `.npz`: the batch OpenAI's guided-diffusion evaluator (and
the DiT / SiT / REPA sampling scripts that feed it) reads.

Layout: `arr_0` uint8 [N, H, W, 3] (greyscale samples repeated to RGB), `arr_1` int64 [N] class
labels, stored uncompressed so the evaluator can read it in chunks. The sample shards are copied
into the archive through a fixed-size buffer, so 50,000 images at 256x256 (9.8 GB) never sit in
memory even once, and the archive's bytes depend only on the samples (fixed entry timestamps).
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from .errors import DataError
from .io import atomic_path, load_json
from .priors import shard_file

IMAGES_KEY, LABELS_KEY = "arr_0", "arr_1"
_EPOCH = (1980, 1, 1, 0, 0, 0)  # the earliest time zip can store: no wall-clock in the bytes


def export_npz(samples_dir: str | Path, out_path: str | Path, *, chunk_rows: int = 1024) -> dict:
    """Write the samples of `samples_dir` (a `dod sample` output) to `out_path`; returns a summary."""
    samples_dir, out_path = Path(samples_dir), Path(out_path)
    meta_path = samples_dir / "meta.json"
    if not meta_path.exists():
        raise FileNotFoundError(f"{meta_path}: missing (is {samples_dir} the output of `dod sample`?)")
    meta = load_json(meta_path)
    shards = [(np.load(samples_dir / shard_file("images", j), mmap_mode="r"), samples_dir / shard_file("labels", j))
              for j in range(int(meta["num_shards"]))]
    if not shards:
        raise DataError(f"{samples_dir}: no sample shards")
    shapes = {tuple(images.shape[1:]) for images, _ in shards}
    dtypes = {images.dtype for images, _ in shards}
    if len(shapes) != 1 or dtypes != {np.dtype(np.uint8)}:
        raise DataError(f"{samples_dir}: expected uint8 image shards [n, H, W, C] of one shape, got "
                        f"{sorted(map(str, dtypes))} {sorted(shapes)}")
    height, width, channels = shapes.pop()
    if channels not in (1, 3):
        raise DataError(f"{samples_dir}: images with {channels} channels (expected 1 or 3)")
    count = sum(len(images) for images, _ in shards)
    with atomic_path(out_path) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
        with archive.open(_entry(IMAGES_KEY), "w", force_zip64=True) as f:
            _write_header(f, np.uint8, (count, height, width, 3))
            for images, _ in shards:
                for lo in range(0, len(images), chunk_rows):
                    chunk = np.asarray(images[lo : lo + chunk_rows])
                    f.write(np.ascontiguousarray(np.broadcast_to(chunk, (*chunk.shape[:3], 3))).tobytes())
        with archive.open(_entry(LABELS_KEY), "w", force_zip64=True) as f:
            _write_header(f, np.int64, (count,))
            for _, labels_path in shards:
                f.write(np.load(labels_path).astype("<i8").tobytes())
    return {"path": str(out_path), "count": count, "shape": [count, height, width, 3],
            "bytes": out_path.stat().st_size}


def _entry(key: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(f"{key}.npy", date_time=_EPOCH)
    info.compress_type = zipfile.ZIP_STORED
    info.external_attr = 0o644 << 16
    return info


def _write_header(f, dtype, shape: tuple[int, ...]) -> None:
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": shape}
    np.lib.format.write_array_header_1_0(f, header)
