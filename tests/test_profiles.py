"""The cluster profiles plan the paper-scale DAG with the intended resources (dry run, no Slurm)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

BIN = Path(sys.executable).parent
ENV = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}


def dry_run(profile: str, *overlays: str) -> dict[str, list[dict]]:
    """rule -> list of planned jobs, each with its resources and shell command."""
    out = subprocess.run(
        ["snakemake", "--profile", profile, "-n", "--configfile", "params/paper.yaml", *overlays],
        cwd=REPO, env=ENV, capture_output=True, text=True,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    jobs: dict[str, list[dict]] = {}
    current = None
    for line in (out.stdout + out.stderr).splitlines():
        if m := re.match(r"^rule (\w+):", line):
            current = {"resources": {}, "shell": ""}
            jobs.setdefault(m.group(1), []).append(current)
        elif current is not None and (m := re.match(r"^\s+resources: (.*)", line)):
            for item in re.split(r", (?=\w+=)", m.group(1)):
                key, _, value = item.partition("=")
                current["resources"][key] = value
        elif current is not None and line.startswith("Shell command:"):
            current["shell"] = line
    return jobs


@pytest.fixture(scope="module")
def paper_plan():
    return dry_run("slurm")


def test_paper_scale_plans_the_full_dag(paper_plan):
    counts = {rule: len(jobs) for rule, jobs in paper_plan.items()}
    assert counts == {
        "prepare_data": 1, "extract_latents": 1, "reference_stats": 1, "train_stage1": 2,
        "sample_stage1": 2, "sample_stage2": 1, "sample_stage3": 1,
        "evaluate_stage1": 2, "evaluate_stage2": 1, "evaluate_stage3": 1, "report": 1, "all": 1,
        "probe": 1, "evaluate_snapshots": 2,
    }
    assert "train_feature_net" not in counts  # Inception at paper scale, no data-set feature net


def test_training_requests_gpus_and_a_warning_signal(paper_plan):
    for job in paper_plan["train_stage1"]:
        r = job["resources"]
        assert r["gpu"] == "8" and r["cpus_per_gpu"] == "8" and r["runtime"] == "2880"
        assert "--signal=URG@600" in r["slurm_extra"]
        # one process per GPU, through accelerate launch (dod train --processes)
        assert "--processes 8 --nodes 1" in job["shell"] and "exec" in job["shell"]
        assert "params/paper.yaml" in job["shell"]


def test_sampling_and_evaluation_get_gpus(paper_plan):
    for rule in ("sample_stage1", "sample_stage2", "sample_stage3"):
        assert all(j["resources"]["gpu"] == "4" for j in paper_plan[rule])
        # one sampling process per GPU, each taking its share of the shards
        assert all("--processes 4" in j["shell"] for j in paper_plan[rule])
    for rule in ("evaluate_stage1", "reference_stats", "extract_latents"):
        assert all(j["resources"]["gpu"] == "1" for j in paper_plan[rule])


def sbatch_options(job: dict) -> list[str]:
    """The sbatch options the Slurm executor plugin builds from a planned job's resources."""
    # The plugin's own builders (the executor appends the GPU string to the submit command).
    submit = pytest.importorskip("snakemake_executor_plugin_slurm.submit_string")
    utils = pytest.importorskip("snakemake_executor_plugin_slurm.utils")

    class Resources(dict):
        __getattr__ = dict.__getitem__

    resources = Resources({k: int(v) if v.isdigit() else v for k, v in job["resources"].items()})
    params = {"run_uuid": "plan", "slurm_logfile": "slurm.log", "comment_str": "plan", "account": "",
              "partition": f"-p {resources['slurm_partition']}", "workdir": "."}
    fake_job = type("Job", (), {"resources": resources, "threads": 1})
    return (submit.get_submit_command(fake_job, params) + utils.set_gres_string(fake_job)).split()


def test_sbatch_lines_of_the_single_node_profile(paper_plan):
    train = sbatch_options(paper_plan["train_stage1"][0])
    assert "--gpus=8" in train and "--signal=URG@600" in train and "--mem" in train
    assert not any(o.startswith(("--nodes=2", "--ntasks-per-gpu")) for o in train)
    # GPU jobs get CPUs per GPU (a default cpus_per_task would override it), CPU jobs per task
    for rule in ("train_stage1", "sample_stage2", "evaluate_stage1", "extract_latents"):
        options = sbatch_options(paper_plan[rule][0])
        assert "--cpus-per-gpu=8" in options and not any(o.startswith("--cpus-per-task") for o in options), rule
    assert "--cpus-per-task=16" in sbatch_options(paper_plan["prepare_data"][0])
    assert "--cpus-per-task=4" in sbatch_options(paper_plan["report"][0])


def test_multinode_profile_uses_srun_one_task_per_node():
    plan = dry_run("slurm-multinode")
    for job in plan["train_stage1"]:
        r = job["resources"]
        assert r["nodes"] == "2" and r["mpi"] == "srun" and r["tasks"] == "2"
        assert "srun --ntasks-per-node=1 dod train" in job["shell"] and "--processes 16 --nodes 2" in job["shell"]
        options = sbatch_options(job)
        # 2 nodes x 8 GPUs, one task per node (the srun launcher), nothing per GPU
        for expected in ("--nodes=2", "--ntasks=2", "--gpus=16", "--gpus-per-node=8", "--cpus-per-task=64"):
            assert expected in options, (expected, options)
        assert not any(o.startswith("--ntasks-per-gpu") for o in options), options


def test_finetuned_stages_get_training_and_sampling_resources(tmp_path):
    overlay = tmp_path / "finetune.yaml"
    overlay.write_text("experiments:\n  dod:\n    stages:\n      finetune:\n"
                       "        '2': {t0: 0.5, num_pairs: 100000, train: {images: 25600000}}\n")
    plan = dry_run("slurm", str(overlay))
    (tune,) = plan["train_stage2"]
    assert tune["resources"]["gpu"] == "8" and "--signal=URG@600" in tune["resources"]["slurm_extra"]
    assert "dod train --experiment dod --stage 2" in tune["shell"] and "--processes 8" in tune["shell"]
    (pairs,) = plan["pair_priors_stage2"]
    assert pairs["resources"]["gpu"] == "4" and "--processes 4" in pairs["shell"]
    assert len(plan["sample_stage2"]) == 1 and "train_stage3" not in plan
