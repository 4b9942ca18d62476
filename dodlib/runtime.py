"""The numerical runtime every `dod` job runs under: pinned CPU code paths and threads, and a record.

On a CPU the bytes a float computation produces depend on more than its inputs: on the SIMD code
path each library picks at run time for the processor it finds (ATen's vectorisation level, MKL's
GEMM kernels, oneDNN's convolutions, numpy's ufunc loops, OpenBLAS's core type) and on the number of
threads (a reduction split over two threads adds in another order). Two machines of the same kind
with different CPU generations (AVX-512 or not) therefore train different weights from one seed.

`pin(runtime)` fixes all of these, through the environment variables each library reads when it
loads, so it must run before torch or numpy is imported: the `dod` CLI calls it right after reading
params.yaml, before any command imports either. Snakemake rules and DVC stages both run `dod`
commands, so this is the one place that pins both tools. With `runtime.cpu_isa: avx2` (the default)
every x86-64 CPU with AVX2 (Intel Haswell / AMD Zen and later) takes the same code paths; `native`
lets every library use the widest instructions of the machine (faster, machine-dependent bytes).

`provenance()` records what decided the bytes (pinned level and the active one, threads, library
versions) plus the machine itself; evaluation writes it into each stage's metrics JSON.
"""

from __future__ import annotations

import logging
import os
import platform
import sys
from importlib import metadata

log = logging.getLogger(__name__)

ISAS = ("avx2", "native")
# Written by training and sampling into their output directories; evaluation gathers them.
PROVENANCE_FILE = "provenance.json"

# What each library reads to cap its code path at AVX2 (x86-64 only; the names are each library's).
_X86_AVX2 = {
    "ATEN_CPU_CAPABILITY": "avx2",  # PyTorch's own vectorised kernels (and Sleef's math)
    "MKL_CBWR": "AVX2,STRICT",  # MKL's conditional numerical reproducibility: AVX2 kernels, strict mode
    "ONEDNN_MAX_CPU_ISA": "AVX2",  # oneDNN (convolutions, e.g. the patch embedding and the feature net)
    # numpy's runtime-dispatched loops above AVX2 (numpy 2.x names first, then 1.x; unknown names are ignored)
    "NPY_DISABLE_CPU_FEATURES": "X86_V4 AVX512_ICL AVX512_SPR AVX512F AVX512CD AVX512_SKX AVX512_CLX AVX512_CNL",
}
# OpenBLAS (numpy's and scipy's BLAS/LAPACK) picks its kernels by core type. Some machines set this
# already because older OpenBLAS builds miscompute on them: an existing value is kept, never changed.
_OPENBLAS_CORE = ("OPENBLAS_CORETYPE", "Haswell")
_THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def _is_x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64")


def environment(threads: int, cpu_isa: str) -> dict[str, str]:
    """The environment variables that pin a job's numerics (without the OpenBLAS core type)."""
    env = {name: str(threads) for name in _THREAD_VARIABLES}
    if cpu_isa == "avx2" and _is_x86():
        env.update(_X86_AVX2)
    return env


def pin(threads: int, cpu_isa: str = "avx2") -> None:
    """Pin kernels and threads for this process and the processes it starts (accelerate's workers).

    Run it before torch and numpy are imported; if they already are (a library user calling a
    command in-process), only the thread count can still change, and a warning says so."""
    if cpu_isa not in ISAS:
        raise ValueError(f"cpu_isa: {cpu_isa!r} is not one of {', '.join(ISAS)}")
    os.environ.update(environment(threads, cpu_isa))
    if cpu_isa == "avx2" and _is_x86():
        os.environ.setdefault(*_OPENBLAS_CORE)
    late = [m for m in ("torch", "numpy") if m in sys.modules]
    if "torch" in sys.modules:
        import torch

        torch.set_num_threads(threads)
    if late and cpu_isa != "native":
        log.debug("runtime.pin after %s was imported: kernel choice may not be pinned in this process",
                  " and ".join(late))


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def deciding(runtime, precision: str) -> dict[str, str]:
    """What decides the bytes of a CPU run under the params' `runtime` block (threads, cpu_isa), the
    same on every machine of one kind (strings: a record, not metrics). `aten_capability` is the
    level PyTorch actually runs at in this process."""
    import torch

    return {
        "cpu_isa": runtime.cpu_isa,
        "aten_capability": str(torch.backends.cpu.get_cpu_capability()),
        "threads": str(runtime.threads),
        "precision": precision,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": _version("numpy"),
        "scipy": _version("scipy"),
        "blas": "MKL (torch), OpenBLAS (numpy, scipy)",
        "openblas_coretype": os.environ.get(_OPENBLAS_CORE[0], "auto"),
    }


def provenance(runtime, precision: str) -> dict[str, str]:
    """`deciding(...)` plus the machine that ran: its CPU model, architecture and widest ISA."""
    flags = _cpu_flags()
    widest = next((isa for isa in ("avx512f", "avx2", "avx", "sse4_2") if isa in flags), "unknown")
    return {**deciding(runtime, precision), "cpu_model": _cpu_model(), "machine": platform.machine(),
            "cpu_widest_isa": widest}


__all__ = ["ISAS", "PROVENANCE_FILE", "deciding", "environment", "pin", "provenance"]
