"""Training: resumable, deterministic, preemptible."""

import os
import signal
import subprocess
import sys
import threading

import pytest
import torch
from safetensors.torch import load_file

from dodlib.models.weights import load_weights
from dodlib.train import Preempted, list_checkpoints, train
from dodlib.train_step import batch_indices


def _train(exp, prepared, tmp, name, **kw):
    return train(exp, prepared / "latents" / "train", tmp / name / "out", tmp / name / "state", **kw)


def test_kill_and_resume_gives_identical_ema(tiny_params, prepared, tmp_path):
    exp = tiny_params.experiment("dod")
    _train(exp, prepared, tmp_path, "straight")
    with pytest.raises(Preempted):
        _train(exp, prepared, tmp_path, "resumed", stop_after_images=exp.train.images // 2)
    state_root = tmp_path / "resumed" / "state"
    (run_dir,) = list(state_root.iterdir())
    assert len(list_checkpoints(run_dir)) >= 1
    assert not (tmp_path / "resumed" / "out" / "model.safetensors").exists()  # no output that looks complete
    _train(exp, prepared, tmp_path, "resumed")
    a = load_file(str(tmp_path / "straight" / "out" / "model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "out" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # snapshots of the EMA survive the interruption and equal the straight run's
    snap = "snapshots/ema-000000000512.safetensors"
    sa, sb = load_file(str(tmp_path / "straight" / "out" / snap)), load_file(str(tmp_path / "resumed" / "out" / snap))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    # The live log of the resumed run: the straight run's rows, none twice (rows logged after the
    # last checkpoint before the interruption are not kept: those steps were redone).
    straight, resumed = (_live_series(tmp_path / run / "out", "loss") for run in ("straight", "resumed"))
    assert [step for step, _ in resumed] == [step for step, _ in straight]
    assert len({step for step, _ in resumed}) == len(resumed) == len(_csv_rows(tmp_path / "resumed" / "out"))
    assert [loss for _, loss in resumed] == [loss for _, loss in straight]  # deterministic replay


def _live_series(out_dir, name):
    """(images, value) rows of one DVCLive series of a training run."""
    lines = (out_dir / "live" / "plots" / "metrics" / f"{name}.tsv").read_text().splitlines()
    assert lines[0].split("\t") == ["step", name]
    return [(int(step), float(value)) for step, value in (line.split("\t") for line in lines[1:])]


def _csv_rows(out_dir):
    return (out_dir / "train_log.csv").read_text().splitlines()[1:]


def test_trained_model_learns_and_reloads(tiny_params, prepared, tmp_path):
    exp = tiny_params.experiment("sit")
    _train(exp, prepared, tmp_path, "sit")
    out = tmp_path / "sit" / "out"
    rows = (out / "train_log.csv").read_text().splitlines()
    losses = [float(r.split(",")[2]) for r in rows[1:]]
    assert losses[-1] < losses[0]  # it learns something
    model = load_weights(out / "model.safetensors")
    assert model.lem is None  # the SiT baseline has no LEM


def test_changed_training_parameter_does_not_resume_stale_state(tiny_raw, prepared, tmp_path):
    from dodlib.config import deep_merge, parse_params

    exp = parse_params(tiny_raw).experiment("sit")
    with pytest.raises(Preempted):
        _train(exp, prepared, tmp_path, "run", stop_after_images=256)
    changed = parse_params(deep_merge(tiny_raw, {"train": {"lr": 5e-4}})).experiment("sit")
    with pytest.raises(Preempted):
        _train(changed, prepared, tmp_path, "run", stop_after_images=256)
    assert len(list((tmp_path / "run" / "state").iterdir())) == 2  # a fresh run dir, the old one kept


def edited_package(tmp_path, monkeypatch, module: str):
    """A copy of dodlib with one source file edited, as the package the pipeline hashes."""
    import shutil

    from dodlib import code_deps

    copy = tmp_path / "src" / "dodlib"
    shutil.copytree(code_deps.PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    with open(copy / module, "a") as f:
        f.write("\n# edited\n")
    monkeypatch.setattr(code_deps, "PACKAGE", copy)


def test_edited_training_code_does_not_resume_stale_state(tiny_raw, prepared, tmp_path, monkeypatch):
    from dodlib.config import parse_params

    exp = parse_params(tiny_raw).experiment("sit")
    with pytest.raises(Preempted):
        _train(exp, prepared, tmp_path, "run", stop_after_images=256)
    edited_package(tmp_path, monkeypatch, "transport.py")
    with pytest.raises(Preempted):
        _train(exp, prepared, tmp_path, "run", stop_after_images=256)
    assert len(list((tmp_path / "run" / "state").iterdir())) == 2  # the edit starts a fresh run


def test_batch_order_covers_each_epoch_once():
    idx = batch_indices(seed=3, step=0, batch_size=10, dataset_size=10)
    assert sorted(idx.tolist()) == list(range(10))
    first_two = [batch_indices(3, s, 4, 10) for s in range(5)]  # 20 images = 2 epochs
    flat = torch.tensor([i for b in first_two for i in b.tolist()])
    assert sorted(flat[:10].tolist()) == list(range(10))


def test_sigusr1_checkpoints_and_exits_with_distinct_code(tmp_path, prepared):
    """The CLI on SIGUSR1: checkpoint, exit 75; rerun resumes to completion."""
    from tests.conftest import TINY_OVERRIDES, repo_params_raw
    import yaml

    from dodlib.config import deep_merge

    work = tmp_path / "ws"
    (work / "artifacts").mkdir(parents=True)
    os.symlink(prepared / "latents", work / "artifacts" / "latents")
    raw = deep_merge(repo_params_raw(), TINY_OVERRIDES)
    raw["train"]["images"] = 64_000  # long enough to be signalled mid-run
    (work / "params.yaml").write_text(yaml.safe_dump(raw))
    cmd = [sys.executable, "-m", "dodlib.cli", "train", "--experiment", "sit"]
    proc = subprocess.Popen(cmd, cwd=work, stderr=subprocess.PIPE, text=True)
    lines = []

    def watch():
        for line in proc.stderr:
            lines.append(line)

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    # wait until training is under way (a progress bar line appears), then signal
    import time

    deadline = time.time() + 60
    while time.time() < deadline and not any("img" in l for l in lines):
        time.sleep(0.2)
    proc.send_signal(signal.SIGUSR1)
    assert proc.wait(timeout=60) == 75
    t.join(timeout=5)
    # stderr is a pipe, not a terminal: progress comes as whole lines (no carriage-return bar), and
    # each training-log row is one of them, with its loss.
    text = "".join(lines)
    assert "\r" not in text
    assert any("train sit stage 1:" in line and "loss" in line for line in lines), text[-2000:]
    ckpts = list((work / "state" / "train" / "sit").glob("*/ckpt-*"))
    assert ckpts, "".join(lines)[-2000:]


def test_finetuning_a_stage_on_its_pairs_resumes_identically(tiny_raw, prepared, tmp_path):
    """train_stage2: starts from stage 1's weights, trains on the paired cache, and a kill and
    resume in the middle ends with the same EMA weights as a straight run."""
    from dodlib.config import deep_merge, parse_params
    from dodlib.sample import pair_priors

    raw = deep_merge(tiny_raw, {"stages": {"finetune": {"2": {"t0": 0.5, "num_pairs": 64,
                                                              "train": {"images": 256, "lr": 5e-4}}}}})
    exp = parse_params(raw).experiment("dod")
    latents = prepared / "latents" / "train"
    _train(exp, prepared, tmp_path, "stage1")
    stage1 = tmp_path / "stage1" / "out" / "model.safetensors"
    pairs = tmp_path / "pairs" / "out"
    pair_priors(exp, 2, stage1, latents, pairs, tmp_path / "pairs" / "state")

    def finetune(name, **kw):
        return train(exp, latents, tmp_path / name / "out", tmp_path / name / "state", stage=2,
                     init_weights=stage1, pairs_dir=pairs, **kw)

    result = finetune("straight")
    assert result["images"] == 256
    with pytest.raises(Preempted):
        finetune("resumed", stop_after_images=128)
    finetune("resumed")
    a = load_file(str(tmp_path / "straight" / "out" / "model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "out" / "model.safetensors"))
    start = load_file(str(stage1))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], start[k]) for k in a)  # it trained
    # a fine-tuned network keeps stage 1's architecture and loads like any other
    assert load_weights(tmp_path / "straight" / "out" / "model.safetensors").lem is not None


def test_finetuning_from_weights_of_another_architecture_is_an_error(tiny_raw, prepared, tmp_path):
    from dodlib.config import deep_merge, parse_params

    raw = deep_merge(tiny_raw, {"stages": {"finetune": {"2": {"train": {"images": 64}}}}})
    params = parse_params(raw)
    _train(params.experiment("sit"), prepared, tmp_path, "sit")  # no LEM
    with pytest.raises(ValueError, match="architecture"):
        train(params.experiment("dod"), prepared / "latents" / "train", tmp_path / "x" / "out", tmp_path / "x" / "state",
              stage=2, init_weights=tmp_path / "sit" / "out" / "model.safetensors", pairs_dir=tmp_path / "nowhere")


def test_the_live_log_needs_no_git_history(tmp_path, monkeypatch):
    """A fresh `git init` with no commit (DVCLive's own repository probe fails there) still gets
    its live log, and a restart from checkpointed rows replaces what an interrupted run left."""
    from dodlib.training_log import TrainingLog

    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    monkeypatch.chdir(tmp_path)
    row = lambda images, loss: {"images": images, "step": images // 64, "loss": loss, "lr": 0.1,  # noqa: E731
                                "images_per_sec": 5.0}
    log = TrainingLog([], tmp_path / "live")
    for images, loss in ((64, 1.0), (128, 0.5), (192, 0.4)):
        log.append(row(images, loss))
    TrainingLog([row(64, 1.0)], tmp_path / "live").append(row(128, 0.5))  # resumed from the 64 checkpoint
    assert _live_series(tmp_path, "loss") == [(64, 1.0), (128, 0.5)]
    with pytest.raises(ValueError, match="without lr"):
        log.append({"images": 1, "step": 1, "loss": 1.0, "images_per_sec": 1.0})
