"""The pipeline definition: one source of truth for Snakemake and DVC."""

import subprocess
import sys

import yaml

from dodlib import pipeline as P
from dodlib.config import deep_merge, load_params, parse_params
from tests.conftest import REPO, repo_params_raw


def test_committed_dvc_yaml_is_generated_from_the_definition():
    params = load_params(REPO / "params.yaml")
    assert (REPO / "dvc.yaml").read_text() == P.dvc_yaml(params), "dvc.yaml is stale: run `dod dvc-yaml`"


def test_dvc_stages_match_pipeline_stages():
    params = load_params(REPO / "params.yaml")
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    jobs = P.by_name(params)
    all_jobs = list(jobs.values())
    assert list(dvc) == list(jobs)
    for name, job in jobs.items():
        entry = dvc[name]
        assert entry["cmd"] == job.cmd
        assert entry.get("params", []) == list(job.params)
        assert set(entry.get("deps", [])) == {P.dvc_dependency(all_jobs, d) for d in job.deps} | set(job.code)
        # an entry is a path, or {path: options} when it is not cached
        declared = [next(iter(o)) if isinstance(o, dict) else o
                    for o in entry.get("outs", []) + entry.get("metrics", [])]
        assert sorted(declared) == sorted(job.outs)
        for path in job.code:
            assert (REPO / path).is_file(), path


def test_every_param_key_exists_and_has_the_resolved_value():
    params = load_params(REPO / "params.yaml")
    for job in P.stages(params):
        for key, value in job.params.items():
            node = params.raw
            for part in key.split("."):
                node = node[part]
            assert node == value


def test_shared_stages_run_once_and_borrowed_weights_train_nothing():
    raw = deep_merge(repo_params_raw(), {"experiments": {"cfg2": {"weights_from": "dod", "stages": {
        "overrides": {"2": {"cfg": {"scale": 2.0}}}}}}})
    jobs = P.by_name(parse_params(raw))
    assert sum(1 for n in jobs if n == "prepare_data") == 1
    assert "train_stage1-cfg2" not in jobs
    assert P.weights_path("dod") in jobs["sample_stage1-cfg2"].deps
    assert "experiments.cfg2.stages.overrides.2" in jobs["sample_stage2-cfg2"].params
    assert "experiments.cfg2.stages.overrides.2" not in jobs["sample_stage1-cfg2"].params
    assert "sample_stage3-cfg2" in jobs and "sample_stage2-sit" not in jobs


def test_cli_help_for_every_stage():
    for command in ("prepare-data", "extract-latents", "train-features", "reference-stats", "train", "sample",
                    "evaluate", "report", "dvc-yaml", "validate"):
        out = subprocess.run([sys.executable, "-m", "dodlib.cli", command, "--help"], capture_output=True, text=True)
        assert out.returncode == 0 and "--params" in out.stdout, command


def test_cli_rejects_bad_params_before_work(tmp_path):
    raw = deep_merge(repo_params_raw(), {"lem": {"bottleneck_dim": 999}})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    out = subprocess.run([sys.executable, "-m", "dodlib.cli", "prepare-data"], cwd=tmp_path,
                         capture_output=True, text=True)
    assert out.returncode != 0 and "lem.bottleneck_dim" in out.stderr
    assert not (tmp_path / "artifacts").exists()


def test_a_fresh_clone_plans_the_whole_main_job(tmp_path):
    """The committed results/ must not make a fresh clone look finished to Snakemake."""
    from tests.workspace import copy_tracked, planned_jobs, run

    ws = copy_tracked(tmp_path / "clone", with_results=True)
    assert (ws / "results" / "README.md").is_file()
    planned = planned_jobs(run(["snakemake", "-n", "--cores", "2"], ws))
    assert planned == set(P.by_name(load_params(REPO / "params.yaml")))


def test_a_finetuned_stage_adds_its_pairs_and_training_and_samples_with_them():
    raw = deep_merge(repo_params_raw(), {"experiments": {
        "ft": {"stages": {"finetune": {"2": {"train": {"images": 5000}}}}},
        "ft_cfg": {"weights_from": "ft", "stages": {"overrides": {"2": {"cfg": {"scale": 2.0}}}}},
    }})
    jobs = P.by_name(parse_params(raw))
    assert not any(n.startswith(("pair_priors", "train_stage2")) and not n.endswith("-ft") for n in jobs)
    pairs, tune = jobs["pair_priors_stage2-ft"], jobs["train_stage2-ft"]
    assert P.weights_path("ft") in pairs.deps and P.marker(P.pairs_dir("ft", 2)) in tune.deps
    assert tune.markers == [P.weights_path("ft", 2)]
    assert "experiments.ft.stages.finetune.2" in tune.params
    assert not any("finetune" in key for key in jobs["train_stage1-ft"].params)
    # stage 2 and 3 sample the fine-tuned network, stage 1 the stage-1 network; borrowers too
    assert P.weights_path("ft", 2) in jobs["sample_stage2-ft"].deps
    assert P.weights_path("ft", 2) in jobs["sample_stage3-ft"].deps
    assert P.weights_path("ft") in jobs["sample_stage1-ft"].deps
    assert P.weights_path("ft", 2) in jobs["sample_stage2-ft_cfg"].deps
    assert P.weights_path("ft", 2) in jobs["report"].deps  # its training log is reported
    # both tools see the new jobs
    dvc = yaml.safe_load(P.dvc_yaml(parse_params(raw)))["stages"]
    assert dvc["train_stage2-ft"]["cmd"] == "dod train --experiment ft --stage 2"
    assert P.pairs_dir("ft", 2) in dvc["train_stage2-ft"]["deps"]
