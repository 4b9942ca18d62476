"""The workflow through Snakemake's Slurm executor on a real one-node Slurm (.ci/slurm/up.sh).

Skipped, with the reason, when no local Slurm is up. `.ci/run` starts one as root.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file

from tests.workspace import ENV, make_workspace, run

SLURM_DIR = Path("/var/tmp/dod-slurm")
PROFILE = ["--profile", "slurm", "--workflow-profile", ".ci/slurm-profile"]


def _slurm_status_args() -> list[str]:
    mode = SLURM_DIR / "mode"
    if not mode.exists() or shutil.which("sinfo") is None:
        pytest.skip("no local Slurm: run .ci/slurm/up.sh as root (it writes /var/tmp/dod-slurm/mode)")
    probe = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True)
    if probe.returncode != 0 or not probe.stdout.strip():
        pytest.skip(f"local Slurm does not answer: {probe.stderr.strip()}")
    return ["--slurm-status-command", mode.read_text().strip()]


pytestmark = [pytest.mark.slow, pytest.mark.slurm]


def _metrics(ws: Path) -> dict:
    return {p.relative_to(ws).as_posix(): json.loads(p.read_text())
            for p in sorted((ws / "artifacts" / "exp").glob("*/metrics/*.json"))}


def test_smoke_workflow_through_slurm_equals_the_local_run(finished, tmp_path):
    status = _slurm_status_args()
    ws = make_workspace(tmp_path / "ws")
    out = run(["snakemake", *PROFILE, *status], ws, timeout=1500)
    assert "Job" in out and "has been submitted with SLURM jobid" in out, out[-3000:]
    submitted = out.count("has been submitted with SLURM jobid")
    assert submitted >= 15, out[-3000:]
    # Slurm ran the jobs: its own logs exist for them, kept where users find them
    assert list((ws / ".snakemake" / "slurm_logs").glob("rule_train_stage1/*/*.log"))
    assert (ws / "logs" / "dod" / "train_stage1.log").exists()
    # same numbers and same sample bytes as the local run
    assert _metrics(ws) == _metrics(finished)
    for stage_dir in sorted((finished / "artifacts" / "exp").glob("*/stage*")):
        rel = stage_dir.relative_to(finished)
        for shard in sorted(stage_dir.glob("images-*.npy")):
            assert np.array_equal(np.load(shard), np.load(ws / rel / shard.name)), rel / shard.name


def _job_ids(name_part: str) -> list[str]:
    out = subprocess.run(["squeue", "-h", "-o", "%i %k %T"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in out.splitlines() if name_part in line and "RUNNING" in line]


def test_requeued_training_resumes_and_equals_an_uninterrupted_run(tmp_path):
    status = _slurm_status_args()
    longer = {"train": {"images": 24000, "checkpoint_every": 2048}}  # ~750 steps: time to requeue
    ws = make_workspace(tmp_path / "slurm", extra=longer)
    target = "artifacts/exp/sit/train/model.safetensors"

    result: dict = {}

    def workflow():
        result["out"] = run(["snakemake", target, *PROFILE, *status], ws, check=False, timeout=1500)

    thread = threading.Thread(target=workflow)
    thread.start()
    # wait until the training job runs and has written a checkpoint, then requeue it
    requeued = None
    deadline = time.time() + 600
    while time.time() < deadline and requeued is None:
        jobs = _job_ids("rule_train_stage1")
        if jobs and list((ws / "state" / "train" / "sit").glob("*/ckpt-*")):
            requeued = jobs[0]
            subprocess.run(["scontrol", "requeue", requeued], check=True)
        time.sleep(1)
    thread.join(timeout=1500)
    assert requeued is not None, "the training job never ran: " + result.get("out", "")[-3000:]
    assert (ws / target).exists(), result.get("out", "")[-4000:]
    history = subprocess.run(["sacct", "-D", "-X", "-n", "-j", requeued, "-o", "State"], capture_output=True,
                             text=True).stdout if shutil.which("sacct") else ""
    if (SLURM_DIR / "mode").read_text().strip() == "sacct":
        assert "REQUEUED" in history or "PREEMPTED" in history, history
    log = (ws / "logs" / "sit" / "train_stage1.log").read_text()
    assert "resuming sit from ckpt-" in log

    # the same training, uninterrupted, without Slurm
    local = make_workspace(tmp_path / "local", extra=longer)
    run(["snakemake", target, "--cores", "2"], local)
    a, b = load_file(str(ws / target)), load_file(str(local / target))
    assert a.keys() == b.keys() and all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a)
