"""The benchmark script still runs against the library (its figures go into notes and the README)."""

import json
import subprocess
import sys

from tests.conftest import REPO


def test_benchmark_runs_and_reports_every_figure(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(REPO / "benchmarks" / "bench_dod.py"), "--size", "tiny", "--train-steps", "1",
           "--train-warmup", "1", "--steps", "2", "--sample-repeats", "1", "--matmul-n", "128", "--matmul-repeats",
           "2", "--threads", "1", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "matmul peak" in proc.stdout and "img/s" in proc.stdout
    figures = json.loads(out.read_text())
    text = json.dumps(figures)
    for key in ("train_dod", "train_sit", "gflops_peak"):
        assert key in text, key
