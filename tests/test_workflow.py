"""End to end: the smoke configuration through Snakemake and DVC, and exact rerun sets.

One workspace (a copy of the repository with params/smoke.yaml merged into params.yaml) is run
to completion once; each scenario then edits one thing in a copy of that finished workspace and
checks the exact set of jobs Snakemake's dry run plans and `dvc repro` actually reruns.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import yaml

from tests.workspace import REPO, make_workspace, planned_jobs, run

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


def dvc_reruns(ws: Path, env: dict | None = None) -> set[str]:
    out = run(["dvc", "repro"], ws, env=env)
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
        run(["dod", "dvc-yaml"], ws)  # new or removed jobs reach DVC this way (a no-op otherwise)
    return edit


def test_full_run_fills_results_and_both_tools_call_it_up_to_date(finished):
    """After Snakemake alone, with no hand step, neither tool has anything to do."""
    assert (finished / "results" / "smoke" / "README.md").exists()
    assert (finished / "results" / "smoke" / "tables" / "main.csv").exists()
    assert not (finished / "results" / "main").exists()  # a report writes its own set only
    assert "outputs recorded in dvc.lock" in (finished / "logs" / "dvc_adopt.log").read_text()
    assert snakemake_plan(finished) == set()
    assert "up to date" in run(["dvc", "status"], finished)
    assert dvc_reruns(finished) == set()


def test_the_committed_smoke_results_are_regenerated_byte_for_byte(finished):
    """results/smoke/ in git is what the smoke configuration makes: a fresh run rewrites it with
    the same bytes (the provenance that decides them is in its README; no date, commit, machine)."""
    committed, regenerated = REPO / "results" / "smoke", finished / "results" / "smoke"
    files = lambda root: sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())  # noqa: E731
    assert files(regenerated) == files(committed) and files(committed)
    differ = [f for f in files(committed) if (committed / f).read_bytes() != (regenerated / f).read_bytes()]
    assert differ == [], f"regenerated results differ from the committed ones: {differ}"


def test_dvc_repro_on_a_fresh_workspace_gives_snakemakes_results(finished, tmp_path):
    """Either tool runs the whole DAG from scratch, with the same numbers and sample bytes; and
    after DVC's run Snakemake plans nothing (DVC's copy cache leaves the files' mtimes alone).
    Thread counts and CPU code paths come from the params' runtime block (every `dod` command pins
    them), so DVC needs no OMP_NUM_THREADS to match Snakemake, even against a caller's setting."""
    ws = make_workspace(tmp_path / "dvc")
    dvc_reruns(ws, env={"OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"})
    assert "up to date" in run(["dvc", "status"], ws)
    assert snakemake_plan(ws) == set()
    metrics = lambda root: {p.relative_to(root).as_posix(): p.read_text()  # noqa: E731
                            for p in sorted((root / "artifacts" / "exp").glob("*/metrics/*.json"))}
    assert metrics(ws) == metrics(finished) and metrics(ws)
    for shard in sorted((finished / "artifacts" / "exp").glob("*/stage*/images-*.npy")):
        assert (ws / shard.relative_to(finished)).read_bytes() == shard.read_bytes(), shard


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
    "fine-tuning stage 2 of one experiment (new jobs)": (
        set_param("experiments.dod.stages", {"finetune": {"2": {"t0": 0.5, "train": {"images": 256}}}}),
        {"pair_priors_stage2-dod", "train_stage2-dod", "sample_stage2-dod", "sample_stage3-dod",
         "evaluate_stage2-dod", "evaluate_stage3-dod", "report"},
    ),
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


def test_lint_is_clean(finished):
    out = run(["snakemake", "--lint"], finished)
    assert "Congratulations, your workflow is in a good condition" in out, out[-3000:]


def test_snakemake_report_includes_the_figures(finished, tmp_path):
    report = tmp_path / "report.html"
    run(["snakemake", "--report", str(report)], finished)
    html = report.read_text(errors="replace")
    for figure in ("metric_per_stage.png", "training_loss.png", "samples_dod.png", "training_efficiency.png"):
        assert figure in html, figure


def test_dvc_metrics_and_plots_read_the_pipelines_outputs(finished, tmp_path):
    """`dvc metrics show/diff` and `dvc plots show` work on what the stages write: commit the
    finished workspace (results/ in git, artifacts/ in DVC's cache), change an evaluation key,
    rerun, and the diff against the commit names exactly the metrics that moved."""
    def dvc_json(*args: str):
        out = run(["dvc", *args, "--json"], ws)
        # older revisions' per-stage metrics come from DVC's cache, so every one loads
        assert "failed to load" not in out, out
        return json.JSONDecoder().raw_decode(out)[0]  # the document; DVC's stderr would follow it

    ws = edited_copy(finished, tmp_path, lambda ws: None)
    git = ["git", "-c", "user.name=ci", "-c", "user.email=ci@localhost"]
    run([*git, "add", "-A"], ws)
    run([*git, "commit", "-q", "-m", "finished smoke run"], ws)

    # One metrics file, the headline metric per experiment and stage: no settings, no duplicates
    # (the per-stage evaluation records are outputs, not DVC metrics).
    values = dvc_json("metrics", "show")[""]["data"]
    assert list(values) == ["results/smoke/metrics.json"], list(values)
    headline = values["results/smoke/metrics.json"]["data"]
    assert set(headline["dod"]) == {"stage1", "stage2", "stage3"} and list(headline["dod"]["stage2"]) == ["FD_mnist"]

    set_param("stages.overrides.2.cfg", {"scale": 2.0})(ws)
    dvc_reruns(ws)
    diff = dvc_json("metrics", "diff")
    # stage 2's guidance moves stage 2 and the stage built on it, nothing else
    assert set(diff) == {"results/smoke/metrics.json"}
    assert set(diff["results/smoke/metrics.json"]) == {"dod.stage2.FD_mnist", "dod.stage3.FD_mnist"}, diff

    plots = tmp_path / "plots"
    run(["dvc", "plots", "show", "-o", str(plots)], ws)
    html = (plots / "index.html").read_text()
    for title in ("training loss (one line per training run)", "metric per stage"):
        assert title in html, title
    # one line per experiment: DVC labels each point with its file, one file per main experiment
    for name in ("dod", "sit"):
        assert f'"filename": "{name}.csv"' in html, name


def test_snakemake_config_values_are_validated_and_rerun_what_a_params_edit_would(finished, tmp_path):
    """`snakemake --config` (nested YAML values: Snakemake allows no dots in its keys) reaches every
    `dod` command as a quoted `--set`, and plans exactly what the same edit of params.yaml plans."""
    ws = edited_copy(finished, tmp_path, lambda ws: None)
    for value, (_, expected) in (
        ("experiments={sit: {train: {seed: 1}}}", SCENARIOS["training key of one experiment"]),
        ("stages={overrides: {2: {cfg: {scale: 2.0}}}}", SCENARIOS["sampling key: stage-2 CFG scale"]),
        ("eval={pr_k: 5}", SCENARIOS["evaluation key"]),
    ):
        out = run(["snakemake", "-n", "-p", "--cores", "2", "--config", value], ws)
        assert planned_jobs(out) == expected, value
    assert "--set experiments.sit.train.seed=1" in run(
        ["snakemake", "-n", "-p", "--cores", "2", "--config", "experiments={sit: {train: {seed: 1}}}"], ws)
    for value, key in (("train={lr: .nan}", "train.lr"), ("sample={cfg: {scael: 2}}", "sample.cfg.scael")):
        out = run(["snakemake", "-n", "--cores", "2", "--config", value], ws, check=False)
        assert key in out and "invalid configuration" in out, out[-2000:]


def test_dvc_exp_run_with_a_set_value_reruns_its_stages_and_exp_show_lists_it(finished, tmp_path):
    ws = edited_copy(finished, tmp_path, lambda ws: None)
    git = ["git", "-c", "user.name=ci", "-c", "user.email=ci@localhost"]
    run([*git, "add", "-A"], ws)
    run([*git, "commit", "-q", "-m", "finished smoke run"], ws)
    out = run(["dvc", "exp", "run", "--name", "sit-seed1", "-S", "experiments.sit.train.seed=1"], ws)
    assert set(re.findall(r"Running stage '([^']+)'", out)) == SCENARIOS["training key of one experiment"][1]
    shown = run(["dvc", "exp", "show", "--csv"], ws)
    assert "sit-seed1" in shown
    # one metric column per experiment and stage, nothing else from the metrics
    header = shown.splitlines()[0].split(",")
    assert [c.rsplit(":", 1)[-1] for c in header if c.endswith("FD_mnist")] == [
        "dod.stage1.FD_mnist", "dod.stage2.FD_mnist", "dod.stage3.FD_mnist", "sit.stage1.FD_mnist"], header


def test_dvc_runs_an_overlay_with_no_hand_merge_and_reproduces_its_committed_results(tmp_path):
    """`dod dvc-yaml --overlay params/smoke.yaml` makes a dvc.yaml whose commands pass the overlay on
    and whose parameters are tracked in the file that holds each; `dvc repro` then regenerates the
    committed results/smoke/ byte for byte, and Snakemake with the same overlay plans nothing."""
    from tests.workspace import copy_tracked

    ws = copy_tracked(tmp_path / "clone")
    run(["git", "init", "-q"], ws)
    run(["dod", "dvc-yaml", "--overlay", "params/smoke.yaml"], ws)
    stages = yaml.safe_load((ws / "dvc.yaml").read_text())["stages"]
    assert stages["train_stage1-dod"]["cmd"] == "dod train --experiment dod --overlay params/smoke.yaml"
    # runtime is in params.yaml only; lem, train and the experiment's train block in both files
    assert stages["train_stage1-dod"]["params"][-1] == {"params/smoke.yaml": ["lem", "train", "experiments.dod.train"]}
    dvc_reruns(ws)
    committed, regenerated = REPO / "results" / "smoke", ws / "results" / "smoke"
    for path in committed.rglob("*"):
        if path.is_file():
            assert (regenerated / path.relative_to(committed)).read_bytes() == path.read_bytes(), path
    assert planned_jobs(run(["snakemake", "-n", "--cores", "2", "--configfile", "params/smoke.yaml"], ws)) == set()
    assert "up to date" in run(["dvc", "status"], ws)
