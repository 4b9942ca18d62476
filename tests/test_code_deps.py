"""A stage's code dependencies follow its imports: an edit reruns exactly the stages that use it."""

import shutil

import pytest

from dodlib import code_deps
from dodlib import pipeline as P
from dodlib.config import load_params
from tests.conftest import REPO


def _rerun_rules(edited: str) -> set[str]:
    """Rules of the main job whose code dependencies include the edited file (what Snakemake's and
    DVC's code triggers rerun)."""
    params = load_params(REPO / "params.yaml")
    return {s.rule for s in P.stages(params) if edited in s.code}


@pytest.mark.parametrize("edited, reruns, keeps", [
    # the SDE lives with the sampler: sampling and snapshot evaluation rerun, training does not
    ("dodlib/samplers.py", {"sample_stage1", "sample_stage2", "sample_stage3", "evaluate_snapshots"},
     {"train_stage1", "evaluate_stage1", "probe", "prepare_data", "report"}),
    # a model file: everything that builds the network
    ("dodlib/models/lem.py", {"train_stage1", "sample_stage1", "sample_stage3", "evaluate_stage2", "probe"},
     {"prepare_data", "extract_latents", "reference_stats", "report"}),
    # a metric: evaluation and what reads its measures, never training or sampling
    ("dodlib/metrics/prdc.py", {"evaluate_stage1", "evaluate_stage3", "reference_stats", "report"},
     {"train_stage1", "sample_stage1", "sample_stage2", "probe"}),
])
def test_an_edit_reruns_the_stages_that_import_it(edited, reruns, keeps):
    rules = _rerun_rules(edited)
    assert reruns <= rules, f"{edited}: {sorted(reruns - rules)} would not rerun"
    assert not keeps & rules, f"{edited}: {sorted(keeps & rules)} would rerun needlessly"


def test_imports_inside_functions_count(tmp_path, monkeypatch):
    """A lazy import is a dependency too, and a new import adds its module to the digest."""
    copy = tmp_path / "dodlib"
    shutil.copytree(code_deps.PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(code_deps, "PACKAGE", copy)
    assert "dodlib/models/weights.py" in code_deps.source_files("stage_metrics")  # imported inside a function
    assert "dodlib/samplers.py" not in code_deps.source_files("probe")
    before = code_deps.code_digest(("probe",))
    with open(copy / "probe.py", "a") as f:
        f.write("\n\ndef _uses_the_sampler():\n    from .samplers import run_sampler\n    return run_sampler\n")
    assert "dodlib/samplers.py" in code_deps.source_files("probe")
    with_import = code_deps.code_digest(("probe",))
    assert with_import != before
    with open(copy / "samplers.py", "a") as f:  # and an edit of the newly imported module counts
        f.write("\n# edited\n")
    assert code_deps.code_digest(("probe",)) != with_import
