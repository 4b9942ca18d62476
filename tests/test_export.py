"""ADM-format export of a stage's samples (`dod export-npz`)."""

import hashlib
import json
import zipfile

import numpy as np
import pytest

from dodlib import pipeline as P
from dodlib.config import parse_params
from dodlib.errors import DataError
from dodlib.export import export_npz


def _samples_dir(path, shards):
    """A `dod sample`-shaped directory: images-/labels- shards and their meta.json."""
    path.mkdir(parents=True)
    for j, (images, labels) in enumerate(shards):
        np.save(path / f"images-{j:05d}.npy", images)
        np.save(path / f"labels-{j:05d}.npy", labels)
    (path / "meta.json").write_text(json.dumps({"num_shards": len(shards)}))
    return path


def test_greyscale_shards_become_one_rgb_adm_batch_with_labels(tmp_path):
    rng = np.random.default_rng(0)
    shards = [(rng.integers(0, 256, (n, 5, 4, 1), dtype=np.uint8), rng.integers(0, 10, n)) for n in (7, 3)]
    out = tmp_path / "export" / "stage2.npz"
    summary = export_npz(_samples_dir(tmp_path / "stage2", shards), out, chunk_rows=4)  # chunks cross shards
    assert summary["count"] == 10 and summary["shape"] == [10, 5, 4, 3]
    with zipfile.ZipFile(out) as archive:
        assert archive.namelist() == ["arr_0.npy", "arr_1.npy"]
        assert all(i.compress_type == zipfile.ZIP_STORED for i in archive.infolist())  # chunked reads work
    with np.load(out) as batch:
        images, labels = batch["arr_0"], batch["arr_1"]
    expected = np.concatenate([s for s, _ in shards])
    assert images.dtype == np.uint8 and images.shape == (10, 5, 4, 3)
    assert all(np.array_equal(images[..., c], expected[..., 0]) for c in range(3))
    assert labels.dtype == np.int64 and labels.tolist() == np.concatenate([l for _, l in shards]).tolist()


def test_the_archive_bytes_depend_only_on_the_samples(tmp_path):
    rgb = np.arange(2 * 3 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3, 3)
    src = _samples_dir(tmp_path / "s", [(rgb, np.array([1, 2]))])
    digests = []
    for name, chunk in (("a.npz", 1), ("b.npz", 1024)):
        export_npz(src, tmp_path / name, chunk_rows=chunk)
        digests.append(hashlib.sha256((tmp_path / name).read_bytes()).hexdigest())
    assert digests[0] == digests[1]
    with np.load(tmp_path / "a.npz") as batch:
        assert np.array_equal(batch["arr_0"], rgb)


def test_bad_sample_directories_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="meta.json"):
        export_npz(tmp_path / "nothing", tmp_path / "x.npz")
    floats = _samples_dir(tmp_path / "floats", [(np.zeros((2, 3, 3, 3), np.float32), np.zeros(2, int))])
    with pytest.raises(DataError, match="uint8"):
        export_npz(floats, tmp_path / "x.npz")
    assert not (tmp_path / "x.npz").exists()


def test_export_stages_join_the_dag_only_when_asked(tiny_raw):
    names = {s.name for s in P.stages(parse_params(tiny_raw))}
    assert not any(n.startswith("export_npz") for n in names)
    tiny_raw["eval"]["export_npz"] = True
    params = parse_params(tiny_raw)
    exports = {s.name: s for s in P.stages(params) if s.rule.startswith("export_npz")}
    assert set(exports) == {f"export_npz_stage{k}-{n}" for n, e in params.experiments.items()
                            for k in range(1, e.stages.count + 1)}
    stage2 = exports["export_npz_stage2-dod"]
    assert stage2.deps == [P.marker(P.stage_dir("dod", 2))] and stage2.outs == [P.export_path("dod", 2)]
    assert "export_npz_stage2-dod" in P.dvc_yaml(params)
