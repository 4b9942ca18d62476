"""End to end: the smoke configuration through Snakemake and DVC, and exact rerun sets.

One workspace (a copy of the repository with params/smoke.yaml merged into params.yaml) is run
to completion once; each scenario then edits one thing in a copy of that finished workspace and
checks the exact set of jobs Snakemake's dry run plans and `dvc repro` actually reruns.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import yaml

from tests.workspace import planned_jobs, run

pytestmark = pytest.mark.slow

ALL_JOBS = {
    "prepare_data", "extract_latents", "train_feature_net", "reference_stats",
    "train_stage1-dod", "sample_stage1-dod", "sample_stage2-dod", "sample_stage3-dod",
    "evaluate_stage1-dod", "evaluate_stage2-dod", "evaluate_stage3-dod",
    "train_stage1-sit", "sample_stage1-sit", "evaluate_stage1-sit", "report",
    "probe-dod", "evaluate_snapshots-dod", "evaluate_snapshots-sit",
}


def snakemake_plan(ws: Path) -> set[str]:
    return planned_jobs(run(["snakemake", "-n", "--cores", "2"], ws))


def dvc_reruns(ws: Path) -> set[str]:
    out = run(["dvc", "repro"], ws)
    return set(re.findall(r"Running stage '([^']+)'", out))


def edited_copy(finished: Path, tmp_path: Path, edit) -> Path:
    ws = tmp_path / "ws"
    shutil.copytree(finished, ws, symlinks=True)  # copy2 keeps mtimes: Snakemake sees the same state
    edit(ws)
    return ws


def set_param(dotted: str, value):
    def edit(ws: Path):
        raw = yaml.safe_load((ws / "params.yaml").read_text())
        node = raw
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = value
        (ws / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return edit


def test_full_run_fills_results_and_nothing_is_planned_again(finished):
    assert (finished / "results" / "README.md").exists()
    assert (finished / "results" / "tables" / "main.csv").exists()
    assert snakemake_plan(finished) == set()
    assert "up to date" in run(["dvc", "status"], finished)


def test_dvc_repro_then_snakemake_plan_nothing(finished, tmp_path):
    ws = edited_copy(finished, tmp_path, lambda ws: None)
    assert dvc_reruns(ws) == set()
    assert snakemake_plan(ws) == set()


SCENARIOS = {
    "sampling key: stage-2 CFG scale": (
        set_param("stages.overrides.2", {"cfg": {"scale": 2.0}}),
        {"sample_stage2-dod", "sample_stage3-dod", "evaluate_stage2-dod", "evaluate_stage3-dod",
         "evaluate_snapshots-dod", "report"},
    ),
    "evaluation key": (
        set_param("eval.pr_k", 5),
        {"evaluate_stage1-dod", "evaluate_stage2-dod", "evaluate_stage3-dod", "evaluate_stage1-sit",
         "evaluate_snapshots-dod", "evaluate_snapshots-sit", "report"},
    ),
    "training key of one experiment": (
        set_param("experiments.sit.train.seed", 1),
        {"train_stage1-sit", "sample_stage1-sit", "evaluate_stage1-sit", "evaluate_snapshots-sit", "report"},
    ),
    "data key": (set_param("data.val_per_class", 9), ALL_JOBS),
}


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_an_edit_reruns_exactly_its_stages(finished, tmp_path, scenario):
    edit, expected = SCENARIOS[scenario]
    ws = edited_copy(finished, tmp_path, edit)
    assert snakemake_plan(ws) == expected
    assert dvc_reruns(ws) == expected
    # and once DVC has rerun them, Snakemake's outputs are consistent again for that edit
    # (only the jobs whose params Snakemake last saw differently remain planned)
    assert snakemake_plan(ws) <= expected


def test_editing_one_stage_module_reruns_that_stage_on(finished, tmp_path):
    def edit(ws: Path):
        path = ws / "dodlib" / "sample.py"
        path.write_text(path.read_text() + "\n# an edit of the sampling code\n")

    ws = edited_copy(finished, tmp_path, edit)
    expected = {"sample_stage1-dod", "sample_stage2-dod", "sample_stage3-dod", "sample_stage1-sit",
                "evaluate_stage1-dod", "evaluate_stage2-dod", "evaluate_stage3-dod", "evaluate_stage1-sit",
                "evaluate_snapshots-dod", "evaluate_snapshots-sit", "report"}
    assert snakemake_plan(ws) == expected
    assert dvc_reruns(ws) == expected
