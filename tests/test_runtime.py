"""The pinned numerical runtime (dodlib/runtime.py): same bytes whatever the CPU generation or the
caller's thread settings, and a provenance record of what decided them."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dodlib import runtime

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
X86 = runtime._is_x86()
HAS_AVX512 = "avx512f" in runtime._cpu_flags()


def test_environment_pins_threads_and_avx2_code_paths():
    env = runtime.environment(3, "avx2")
    assert env["OMP_NUM_THREADS"] == env["MKL_NUM_THREADS"] == env["OPENBLAS_NUM_THREADS"] == "3"
    if X86:
        assert env["ATEN_CPU_CAPABILITY"] == "avx2" and env["MKL_CBWR"].startswith("AVX2")
        assert env["ONEDNN_MAX_CPU_ISA"] == "AVX2" and "X86_V4" in env["NPY_DISABLE_CPU_FEATURES"]
    native = runtime.environment(3, "native")
    assert "ATEN_CPU_CAPABILITY" not in native and native["OMP_NUM_THREADS"] == "3"
    with pytest.raises(ValueError, match="cpu_isa"):
        runtime.pin(1, "avx9000")


def test_provenance_names_what_decides_the_bytes_and_the_machine():
    from dodlib.config import RuntimeConfig

    record = runtime.provenance(RuntimeConfig(threads=1, cpu_isa="avx2"), "no")
    for key in ("cpu_isa", "aten_capability", "threads", "precision", "torch", "numpy", "scipy", "cpu_model", "machine"):
        assert record[key], key
    assert all(isinstance(v, str) for v in record.values())  # a record, not metrics


def _digests(ws: Path) -> dict[str, str]:
    files = ["artifacts/exp/dod/train/model.safetensors", "artifacts/exp/dod/stage1/latents-00000.npy",
             "artifacts/exp/dod/stage1/images-00000.npy"]
    return {f: hashlib.sha256((ws / f).read_bytes()).hexdigest() for f in files}


def _train_and_sample(ws: Path, env: dict[str, str], sets: tuple[str, ...] = ()) -> dict[str, str]:
    """prepare -> latents -> 16 training steps -> 8 stage-1 samples, through the CLI (a fresh process
    each, as both tools run them), in a workspace of its own."""
    shutil.rmtree(ws, ignore_errors=True)
    (ws / "params").mkdir(parents=True)
    shutil.copy(REPO / "params.yaml", ws)
    shutil.copy(REPO / "params" / "smoke.yaml", ws / "params")
    options = ["--overlay", "params/smoke.yaml", "--set", "train.images=512", "--set", "sample.num_samples=8"]
    for s in sets:
        options += ["--set", s]
    clean = {k: v for k, v in os.environ.items() if k not in runtime.environment(1, "avx2")}
    full_env = {**clean, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", **env}
    for cmd in (["prepare-data"], ["extract-latents"], ["train", "--experiment", "dod"],
                ["sample", "--experiment", "dod", "--stage", "1"]):
        proc = subprocess.run(["dod", *cmd, *options], cwd=ws, env=full_env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
    return _digests(ws)


@pytest.mark.slow
@pytest.mark.skipif(not X86, reason="the AVX2 pin is x86-64 only")
def test_same_bytes_on_an_avx2_only_machine_and_with_other_thread_settings(tmp_path):
    here = _train_and_sample(tmp_path / "here", {})
    # What an AVX2-only CPU would do differently from this one even with ATen, oneDNN and numpy
    # capped: MKL's own dispatch (emulated by capping it), and a caller's thread settings.
    elsewhere = _train_and_sample(tmp_path / "avx2-only", {"MKL_ENABLE_INSTRUCTIONS": "AVX2",
                                                           "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"})
    assert here == elsewhere
    if HAS_AVX512:
        # The pin is what makes them equal: this CPU's own widest code paths give other bytes.
        native = _train_and_sample(tmp_path / "native", {}, sets=("runtime.cpu_isa=native",))
        assert native["artifacts/exp/dod/train/model.safetensors"] != here["artifacts/exp/dod/train/model.safetensors"]


def test_the_cli_imports_neither_torch_nor_numpy_before_it_pins_the_runtime():
    """Each library reads its pin when it loads: a module-level import of either in the CLI's
    import chain would silently unpin every job."""
    code = "import sys, dodlib.cli; print(sorted(m for m in ('torch', 'numpy') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
