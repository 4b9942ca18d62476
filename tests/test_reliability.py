"""Bad input never passes silently: non-finite values, unvalidated blocks, damaged state, odd images,
shell characters in paths. Each test here failed on the code before these guards existed."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import stat
import typing
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from dodlib import config as C
from dodlib.config import ConfigError, DataConfig, deep_merge, load_params, nest, parse_params
from dodlib.data import ImageShards, prepare_data
from dodlib.errors import DataError
from dodlib.sample import NonFiniteSamples, PriorCache, sample_stage
from dodlib.tokenizers import PixelTokenizer
from dodlib.train import NonFiniteTraining, list_checkpoints, train
from tests.conftest import TINY_OVERRIDES, repo_params_raw
from tests.workspace import REPO, copy_tracked, dod_workspace, run


# ---- validation ---------------------------------------------------------------------------------


def _float_keys(cls, prefix: str) -> list[str]:
    """Dotted keys of every float (or list-of-float) field of a config dataclass, recursively."""
    keys = []
    for f in dataclasses.fields(cls):
        hint = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(hint):
            keys += _float_keys(hint, f"{prefix}.{f.name}")
        elif hint is float or typing.get_args(hint) == (float,):
            keys.append(f"{prefix}.{f.name}")
    return keys


FLOAT_KEYS = [k for block, cls in C._BLOCK_TYPES.items() for k in _float_keys(cls, block)]


def test_the_schema_has_float_fields_to_check():
    assert {"train.lr", "sample.cfg.scale", "lem.prior_dropout", "train.betas"} <= set(FLOAT_KEYS)


@pytest.mark.parametrize("key", FLOAT_KEYS)
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_every_float_parameter_rejects_nan_and_inf_naming_its_key(key, bad):
    current = repo_params_raw()
    for part in key.split("."):
        current = current.get(part, {}) if isinstance(current, dict) else {}
    value = [bad] * len(current) if isinstance(current, list) else bad
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        parse_params(deep_merge(repo_params_raw(), nest(key, value)))


def test_yaml_nan_and_inf_spellings_are_rejected(tmp_path):
    (tmp_path / "p.yaml").write_text((REPO / "params.yaml").read_text())
    for spelling in (".nan", ".inf", "-.inf", ".NaN"):
        with pytest.raises(ConfigError, match="train.lr: must be a finite number"):
            load_params(tmp_path / "p.yaml", sets=[f"train.lr={spelling}"])


@pytest.mark.parametrize("override, key", [
    ({"sampler": {"method": "ddim"}}, "stages.overrides.2.sampler.method"),
    ({"cfg": {"scael": 2}}, "stages.overrides.2.cfg.scael"),
    ({"sampler": {"num_steps": -1}}, "stages.overrides.2.sampler.num_steps"),
    ({"cfg": {"scale": math.nan}}, "stages.overrides.2.cfg.scale"),
])
def test_stage_overrides_are_validated_like_the_base_blocks(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        parse_params(deep_merge(repo_params_raw(), {"stages": {"overrides": {"2": override}}}))


@pytest.mark.parametrize("edit, key", [
    ({"report": {"main_table": ["nope"]}}, "report.main_table"),
    ({"eval": {"pr_k": 1000}}, "eval.pr_k"),
])
def test_report_names_and_pr_k_are_checked_before_any_job(edit, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        parse_params(deep_merge(repo_params_raw(), edit))


def test_an_empty_or_partial_params_file_names_the_missing_block(tmp_path):
    from dodlib import pipeline as P

    for text in ("", "data: {resolution: 16}\n"):
        (tmp_path / "p.yaml").write_text(text)
        with pytest.raises(ConfigError, match="missing from the params file"):
            P.stages(load_params(tmp_path / "p.yaml"))


# ---- training guard and damaged checkpoints ------------------------------------------------------


def _tiny(**edits):
    return parse_params(deep_merge(deep_merge(repo_params_raw(), TINY_OVERRIDES), edits))


def test_a_non_finite_loss_stops_training_and_keeps_the_last_good_checkpoint(prepared, tmp_path, monkeypatch):
    import dodlib.train as T

    exp = _tiny().experiment("sit")
    real_make_batch = T.make_batch

    def poisoned(cfg, prior_dropout, data, step, *args):
        batch = real_make_batch(cfg, prior_dropout, data, step, *args)
        if step == 11:  # mid-run, after the checkpoint at 256 images (step 8)
            batch.x1[0, 0, 0, 0] = math.nan
        return batch

    monkeypatch.setattr(T, "make_batch", poisoned)
    with pytest.raises(NonFiniteTraining, match=r"step 12 \(352 images seen"):
        train(exp, prepared / "latents" / "train", tmp_path / "out", tmp_path / "state")
    (run_dir,) = (tmp_path / "state").iterdir()
    latest = list_checkpoints(run_dir)[-1]
    assert latest.name == "ckpt-000000000256"
    assert all(torch.isfinite(v).all() for v in load_file(str(latest / "model.safetensors")).values())
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_the_cli_exits_with_a_distinct_code_on_a_non_finite_loss():
    from dodlib.train import EXIT_NON_FINITE, EXIT_PREEMPTED

    assert EXIT_NON_FINITE not in (0, 1, 2, EXIT_PREEMPTED)


def test_a_truncated_checkpoint_falls_back_to_the_one_before_with_a_warning(prepared, tmp_path, caplog):
    from dodlib.train import Preempted

    exp = _tiny().experiment("sit")
    latents = prepared / "latents" / "train"
    train(exp, latents, tmp_path / "straight" / "out", tmp_path / "straight" / "state")
    with pytest.raises(Preempted):
        train(exp, latents, tmp_path / "r" / "out", tmp_path / "r" / "state", stop_after_images=768)
    (run_dir,) = (tmp_path / "r" / "state").iterdir()
    previous, damaged = list_checkpoints(run_dir)[-2:]
    blob = (damaged / "model.safetensors").read_bytes()
    (damaged / "model.safetensors").write_bytes(blob[: len(blob) // 3])
    with caplog.at_level(logging.WARNING):
        train(exp, latents, tmp_path / "r" / "out", tmp_path / "r" / "state")
    assert str(damaged) in caplog.text and "damaged" in caplog.text
    a = load_file(str(tmp_path / "straight" / "out" / "model.safetensors"))
    b = load_file(str(tmp_path / "r" / "out" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


# ---- sampling and evaluation guards ------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained_dod(prepared, tmp_path_factory):
    root = tmp_path_factory.mktemp("trained_dod")
    params = _tiny()
    train(params.experiment("dod"), prepared / "latents" / "train", root / "out", root / "state")
    return params, root / "out" / "model.safetensors"


def _sample(params, weights, tmp, name, **kw):
    e = params.experiment("dod")
    return sample_stage(e, 1, weights, tmp / name / "out", tmp / name / "state",
                        PixelTokenizer(e.tokenizer.space_to_depth), **kw)


def test_non_finite_samples_are_an_error_naming_the_shard_and_never_finished(trained_dod, tmp_path):
    params, weights = trained_dod
    state = load_file(str(weights))
    name = next(k for k in state if k.startswith("final_layer") and k.endswith("bias"))
    state[name][0] = math.nan
    bad = tmp_path / "bad" / "model.safetensors"
    bad.parent.mkdir()
    save_file(state, str(bad))
    bad.with_suffix(".json").write_text(weights.with_suffix(".json").read_text())
    with pytest.raises(NonFiniteSamples, match=r"shard 0 has non-finite latents at sample indices \[0, 1"):
        _sample(params, bad, tmp_path, "nan")
    assert not list((tmp_path / "nan" / "state").rglob("shard-*.json"))
    assert not (tmp_path / "nan" / "out" / "meta.json").exists()


def test_a_truncated_shard_in_state_is_resampled_and_stale_shards_are_removed(trained_dod, tmp_path, caplog):
    params, weights = trained_dod
    _sample(params, weights, tmp_path, "straight")
    with pytest.raises(InterruptedError):
        _sample(params, weights, tmp_path, "r", stop_after_shards=2)
    (state,) = (tmp_path / "r" / "state").iterdir()
    shard = state / "latents-00001.npy"
    shard.write_bytes(shard.read_bytes()[:100])
    stale = tmp_path / "r" / "out" / "images-00042.npy"  # left by a run with more samples
    stale.parent.mkdir(parents=True, exist_ok=True)
    np.save(stale, np.zeros(1))
    with caplog.at_level(logging.WARNING):
        _sample(params, weights, tmp_path, "r")
    assert "latents-00001.npy is damaged" in caplog.text
    assert not stale.exists()
    a, b = PriorCache(tmp_path / "straight" / "out"), PriorCache(tmp_path / "r" / "out")
    assert np.array_equal(a.load("latents"), b.load("latents"))


def test_evaluation_refuses_non_finite_features():
    from dodlib.metrics.evaluate import evaluate_images

    class NaNDetector:
        name, metric_prefix, feature_dim, num_logits, logits_are_labels, device = "nan", "FD_x", 2, 0, False, "cpu"

        def features_and_logits(self, batch):
            return np.full((len(batch), 2), np.nan), None

    reference = {"detector": "nan", "mu": np.zeros(2), "sigma": np.eye(2), "features": None}
    with pytest.raises(ValueError, match="non-finite detector features"):
        evaluate_images([np.zeros((4, 8, 8, 3), np.uint8)], NaNDetector(), reference)


# ---- image folders --------------------------------------------------------------------------------


def _folder(root: Path, per_class: int = 4):
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(root / c / f"{i}.png")


def test_16_bit_png_is_scaled_not_saturated_and_gif_is_read(tmp_path):
    root = tmp_path / "raw"
    _folder(root)
    Image.fromarray(np.full((20, 20), 32768, np.uint16)).save(root / "a" / "wide.png")  # mid-grey in 16 bits
    Image.fromarray(np.full((20, 20), 200, np.uint8), mode="L").convert("P").save(root / "b" / "pal.gif")
    cfg = DataConfig(source="imagefolder", root=str(root), resolution=8, val_per_class=1)
    prepare_data(cfg, tmp_path / "out")
    splits = [ImageShards(tmp_path / "out" / s) for s in ("train", "val")]
    images = np.concatenate([s.images(0, len(s)) for s in splits])
    assert len(images) == 10  # the GIF is not ignored
    grey = [img for img in images if np.ptp(img) == 0]
    assert sorted(int(g[0, 0, 0]) for g in grey) == [128, 200]  # 16-bit mid-grey, not white (255)


def test_a_class_of_only_unreadable_files_is_an_error(tmp_path):
    root = tmp_path / "raw"
    _folder(root)
    (root / "broken").mkdir()
    for name in ("x.png", "y.png", "z.jpg"):
        (root / "broken" / name).write_bytes(b"not an image")
    with pytest.raises(DataError, match="broken"):
        prepare_data(DataConfig(source="imagefolder", root=str(root), resolution=8, val_per_class=1),
                     tmp_path / "out")


def test_images_smaller_than_the_resolution_are_reported(tmp_path, caplog):
    root = tmp_path / "raw"
    _folder(root)
    Image.fromarray(np.zeros((2, 3, 3), np.uint8)).save(root / "a" / "tiny.png")
    with caplog.at_level(logging.WARNING):
        summary = prepare_data(DataConfig(source="imagefolder", root=str(root), resolution=8, val_per_class=1),
                               tmp_path / "out")
    assert any("tiny.png (3x2)" in u for u in summary["upscaled"]) and "upscaled" in caplog.text


def test_a_missing_data_root_names_the_key(tmp_path):
    with pytest.raises(DataError, match="data.root"):
        prepare_data(DataConfig(source="imagefolder", root=str(tmp_path / "nowhere"), resolution=8), tmp_path / "o")


def test_reference_and_feature_net_files_are_group_readable(tmp_path):
    from dodlib.metrics.stats import atomic_savez

    atomic_savez(tmp_path / "ref.npz", mu=np.zeros(2))
    mode = stat.S_IMODE(os.stat(tmp_path / "ref.npz").st_mode)
    assert mode & 0o044 == 0o044 & ~_umask(), oct(mode)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ---- shell characters --------------------------------------------------------------------------------


@pytest.mark.slow
def test_an_overlay_path_with_shell_characters_runs_no_command(tmp_path):
    ws = copy_tracked(tmp_path / "ws")
    odd = ws / "my overlays" / "$(touch PWNED)" / "x; touch PWNED2.yaml"
    odd.parent.mkdir(parents=True)
    odd.write_text((REPO / "params" / "smoke.yaml").read_text())
    run(["snakemake", "--cores", "1", "prepare_data", "--configfile", str(odd)], ws)
    assert not list(ws.rglob("PWNED*"))
    assert json.loads((ws / "artifacts" / "data" / "summary.json").read_text())["resolution"] == 8


# ---- one tool at a time ------------------------------------------------------------------------------


def _wait_for(condition, what: str, timeout: float = 120):
    import time

    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.5)


def _background(cmd: list[str], ws: Path, log: Path):
    import subprocess

    from tests.workspace import ENV

    # Its own session: the test's clean-up kills the whole tree (a tool and the jobs it started).
    return subprocess.Popen(cmd, cwd=ws, env=ENV, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)


def _stop(proc) -> None:
    import signal

    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)


@pytest.mark.slow
def test_dvc_refuses_to_run_while_snakemake_holds_the_workspace(finished, tmp_path):
    import shutil

    ws = tmp_path / "ws"
    shutil.copytree(finished, ws, symlinks=True)
    (ws / "logs" / "sit" / "train_stage1.log").unlink()
    long_training = ["snakemake", "--cores", "1", "-f", "artifacts/exp/sit/train/model.safetensors",
                     "--config", "experiments={sit: {train: {images: 60000}}}"]
    proc = _background(long_training, ws, tmp_path / "snakemake.log")
    try:
        _wait_for(lambda: (ws / "logs" / "sit" / "train_stage1.log").exists(), "Snakemake's training job")
        out = run(["dvc", "repro"], ws, check=False)
        assert "Unable to acquire lock" in out, out[-2000:]
        assert (ws / "artifacts" / "exp" / "dod" / "stage3" / "meta.json").exists()  # DVC deleted nothing
    finally:
        _stop(proc)


@pytest.mark.slow
def test_snakemake_refuses_to_start_while_dvc_runs(finished, tmp_path):
    import shutil

    import yaml

    from dodlib.workspace import dvc_processes

    ws = tmp_path / "ws"
    shutil.copytree(finished, ws, symlinks=True)
    raw = yaml.safe_load((ws / "params.yaml").read_text())
    raw["experiments"]["sit"]["train"]["images"] = 60000
    (ws / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    proc = _background(["dvc", "repro", "train_stage1-sit"], ws, tmp_path / "dvc.log")
    try:
        _wait_for(lambda: dvc_processes(ws), "DVC's stage to start")
        out = run(["snakemake", "--cores", "1"], ws, check=False)
        assert "DVC is running in this workspace" in out, out[-2000:]
    finally:
        _stop(proc)


# ---- kill -9 ------------------------------------------------------------------------------------------


def _kill_when(cmd: list[str], ws: Path, ready, what: str) -> None:
    """Start a `dod` command, SIGKILL it as soon as `ready()` holds (no handler runs), and wait."""
    import signal

    proc = _background(cmd, ws, ws / f"killed-{len(list(ws.glob('killed-*')))}.log")
    try:
        _wait_for(lambda: ready() or proc.poll() is not None, what)
        assert proc.poll() is None, f"{' '.join(cmd)} ended before it could be killed ({what})"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)


@pytest.mark.slow
def test_kill_9_of_training_and_of_sampling_at_two_moments_resumes_bit_identical(prepared, tmp_path):
    from dodlib import pipeline as P

    raw = deep_merge(deep_merge(repo_params_raw(), TINY_OVERRIDES),
                     {"train": {"images": 8192, "checkpoint_every": 1024},
                      "sample": {"num_samples": 200, "sampler": {"num_steps": 100}}})
    params = parse_params(raw)
    exp = params.experiment("dod")
    train(exp, prepared / "latents" / "train", tmp_path / "straight" / "out", tmp_path / "straight" / "state")
    weights = tmp_path / "straight" / "out" / "model.safetensors"
    straight = sample_stage(exp, 1, weights, tmp_path / "straight" / "s1", tmp_path / "straight" / "ss1",
                            PixelTokenizer(exp.tokenizer.space_to_depth))
    assert straight is not None

    ws = dod_workspace(tmp_path / "ws", prepared, raw)
    state = ws / "state" / "train" / "dod"
    checkpoints = lambda: list(state.glob("*/ckpt-*"))  # noqa: E731
    images = lambda d: {p.name for p in d.glob("*/ckpt-*")}  # noqa: E731
    command = ["dod", "train", "--experiment", "dod"]
    _kill_when(command, ws, lambda: len(checkpoints()) >= 1, "the first checkpoint")
    first = images(state)
    _kill_when(command, ws, lambda: images(state) - first, "a later checkpoint")
    run(command, ws)
    a, b = load_file(str(weights)), load_file(str(ws / P.weights_path("dod")))
    assert all(torch.equal(a[k], b[k]) for k in a)

    shards = lambda: list((ws / "state" / "sample").rglob("shard-*.json"))  # noqa: E731
    command = ["dod", "sample", "--experiment", "dod", "--stage", "1"]
    _kill_when(command, ws, lambda: len(shards()) >= 1, "the first finished shard")
    _kill_when(command, ws, lambda: len(shards()) >= 3, "a later shard")
    run(command, ws)
    one, two = PriorCache(tmp_path / "straight" / "s1"), PriorCache(ws / P.stage_dir("dod", 1))
    for what in ("latents", "labels", "seeds"):
        assert np.array_equal(one.load(what), two.load(what)), what
