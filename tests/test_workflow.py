"""End to end: the smoke configuration through Snakemake and DVC, and exact rerun sets.

One workspace (a copy of the repository with params/smoke.yaml merged into params.yaml) is run
to completion once; each scenario then edits one thing in a copy of that finished workspace and
checks the exact set of jobs Snakemake's dry run plans and `dvc repro` actually reruns.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dodlib.config import deep_merge
from tests.conftest import REPO

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
ENV = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}

ALL_JOBS = {
    "prepare_data", "extract_latents", "train_feature_net", "reference_stats",
    "train_stage1-dod", "sample_stage1-dod", "sample_stage2-dod", "sample_stage3-dod",
    "evaluate_stage1-dod", "evaluate_stage2-dod", "evaluate_stage3-dod",
    "train_stage1-sit", "sample_stage1-sit", "evaluate_stage1-sit", "report",
    "probe-dod", "evaluate_snapshots-dod", "evaluate_snapshots-sit",
}


def run(cmd: list[str], cwd: Path, check: bool = True) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc.stdout + proc.stderr


def make_workspace(dest: Path) -> Path:
    """The repository's tracked files, with the smoke overlay merged into params.yaml."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                           text=True, check=True).stdout.split()
    for rel in files:
        if rel.startswith("results/") or not (REPO / rel).is_file():
            continue
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, dest / rel)
    raw = deep_merge(yaml.safe_load((dest / "params.yaml").read_text()),
                     yaml.safe_load((dest / "params" / "smoke.yaml").read_text()))
    (dest / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    run(["dod", "dvc-yaml"], dest)
    run(["git", "init", "-q"], dest)
    return dest


def snakemake_plan(ws: Path) -> set[str]:
    """Jobs a Snakemake dry run plans, named like the DVC stages (rule-experiment)."""
    out = run(["snakemake", "-n", "--cores", "2"], ws)
    jobs, rule = set(), None
    for line in out.splitlines():
        if m := re.match(r"^rule (\w+):", line):
            rule = m.group(1)
            if rule != "all":
                jobs.add(rule)
        elif rule and (m := re.match(r"^\s+wildcards: exp=([\w-]+)", line)):
            jobs.discard(rule)
            jobs.add(f"{rule}-{m.group(1)}")
    return jobs


def dvc_reruns(ws: Path) -> set[str]:
    out = run(["dvc", "repro"], ws)
    return set(re.findall(r"Running stage '([^']+)'", out))


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A workspace where Snakemake ran the whole smoke DAG and DVC recorded it."""
    ws = make_workspace(tmp_path_factory.mktemp("ws"))
    run(["snakemake", "--cores", "2"], ws)
    # Adopt Snakemake's outputs into DVC without recomputing them.
    run(["dvc", "commit", "--force", "--quiet"], ws)
    return ws


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
