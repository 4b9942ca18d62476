"""The library's layering: the stage modules never import the workflow definition."""

import subprocess
import sys

import pytest

LIBRARY_MODULES = ["dodlib.train", "dodlib.sample", "dodlib.probe", "dodlib.snapshots", "dodlib.evaluation",
                   "dodlib.stage_metrics", "dodlib.export", "dodlib.models.weights"]


@pytest.mark.parametrize("module", LIBRARY_MODULES)
def test_stage_modules_do_not_import_the_pipeline_definition(module):
    code = f"import sys, {module}; print('dodlib.pipeline' in sys.modules, 'dodlib.cli' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"], f"{module} pulls in the workflow module (dodlib.pipeline / dodlib.cli)"


def test_config_does_not_import_torch():
    """Snakemake's process and the CLI read params before `runtime.pin`, which must precede torch."""
    code = "import sys, dodlib.config, dodlib.pipeline; print('torch' in sys.modules, 'numpy' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]
