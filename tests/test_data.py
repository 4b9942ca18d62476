"""Data preparation: ADM centre crop, bad images skipped by path, shards, the embedded set."""

import logging

import numpy as np
import pytest
from PIL import Image

from dodlib.config import DataConfig
from dodlib.data import ImageShards, prepare_data
from dodlib.data.crop import center_crop_arr
from dodlib.data.imagefolder import DataError


def _write_folder(root, classes=("cat", "dog"), per_class=6, size=(40, 30)):
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            arr = rng.integers(0, 255, size=(size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / c / f"{i}.png")


def test_center_crop_shape_and_content():
    # a wide image whose centre column block is white: the crop keeps the centre
    arr = np.zeros((20, 60, 3), np.uint8)
    arr[:, 20:40] = 255
    out = center_crop_arr(Image.fromarray(arr), 10)
    assert out.shape == (10, 10, 3) and out.dtype == np.uint8
    assert out.mean() > 200
    gray = center_crop_arr(Image.fromarray(np.full((12, 12), 7, np.uint8), mode="L"), 8)
    assert gray.shape == (8, 8, 3) and (gray == 7).all()  # converted to RGB


def test_imagefolder_skips_bad_images_by_path(tmp_path, caplog):
    root = tmp_path / "raw" / "train"
    _write_folder(root)
    (root / "cat" / "empty.png").write_bytes(b"")
    (root / "dog" / "garbage.jpg").write_bytes(b"not an image at all")
    good = (root / "cat" / "0.png").read_bytes()
    (root / "dog" / "truncated.png").write_bytes(good[: len(good) // 2])
    cfg = DataConfig(source="imagefolder", root=str(tmp_path / "raw"), resolution=16, val_per_class=2)
    with caplog.at_level(logging.WARNING):
        summary = prepare_data(cfg, tmp_path / "out")
    skipped = {p.split("/")[-1] for p in summary["skipped"]}
    assert skipped == {"empty.png", "garbage.jpg", "truncated.png"}
    assert "garbage.jpg" in caplog.text
    train, val = ImageShards(tmp_path / "out" / "train"), ImageShards(tmp_path / "out" / "val")
    assert len(train) + len(val) == 12
    assert train.classes == ["cat", "dog"]
    assert train.images(0, 3).shape == (3, 16, 16, 3)


def test_empty_class_folder_is_an_error(tmp_path):
    root = tmp_path / "raw"
    _write_folder(root)
    (root / "empty_class").mkdir()
    with pytest.raises(DataError, match="empty_class"):
        prepare_data(DataConfig(source="imagefolder", root=str(root), resolution=8), tmp_path / "out")


def test_class_mismatch_between_splits_is_an_error(tmp_path):
    _write_folder(tmp_path / "raw" / "train")
    _write_folder(tmp_path / "raw" / "val", classes=("cat", "horse"))
    with pytest.raises(DataError, match="classes differ"):
        prepare_data(DataConfig(source="imagefolder", root=str(tmp_path / "raw"), resolution=8), tmp_path / "out")


def test_shards_split_across_files(tmp_path):
    _write_folder(tmp_path / "raw", per_class=7)
    cfg = DataConfig(source="imagefolder", root=str(tmp_path / "raw"), resolution=8, val_per_class=1, shard_size=5)
    prepare_data(cfg, tmp_path / "out")
    train = ImageShards(tmp_path / "out" / "train")
    assert len(train.meta["shards"]) == 3 and len(train) == 12
    batches = list(train.batches(4))
    assert sum(len(b[0]) for b in batches) == 12
    assert np.array_equal(np.concatenate([b[0] for b in batches]), train.images(0, 12))


def test_embedded_mnist_is_real_balanced_and_held_out(prepared):
    train, val = ImageShards(prepared / "data" / "train"), ImageShards(prepared / "data" / "val")
    assert train.classes == [str(d) for d in range(10)]
    assert np.bincount(val.labels).tolist() == [10] * 10
    assert np.bincount(train.labels).tolist() == [40] * 10
    images = train.images(0, len(train))
    # real digits: dark background, bright strokes, every image different
    assert images.mean() < 80 and images.max() == 255
    assert len({im.tobytes() for im in images}) == len(images)


def test_unfinished_split_is_reported(tmp_path):
    (tmp_path / "train").mkdir()
    with pytest.raises(FileNotFoundError, match="meta.json"):
        ImageShards(tmp_path / "train")
