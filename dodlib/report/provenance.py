"""Provenance of a results set: what decided its bytes (in results/<set>/README.md) and where and
when it was made (in artifacts/report/<set>/provenance.json, outside git: a date, a commit and a
CPU model would make the committed files differ from run to run and machine to machine).

Every metrics JSON carries the runtime records of the jobs behind it (training, sampling,
evaluation: dodlib/runtime.py). The README lists the values that decide the bytes, and every job
that departs from the common value, so a results set made under mixed settings says so.
"""

from __future__ import annotations

import datetime as _dt
import platform
from collections import Counter
from pathlib import Path

from .. import pipeline as P
from ..config import Params
from ..io import load_json, save_json
from ..runtime import provenance

JOBS = ("train", "sample", "evaluate")
# The record's keys that decide the bytes on a CPU (the same on every machine of one kind).
DECIDING_KEYS = ("cpu_isa", "aten_capability", "threads", "precision", "python", "torch", "numpy", "scipy",
                 "blas", "openblas_coretype")


def stage_records(params: Params, root: Path) -> dict[str, dict[str, dict]]:
    """{"<experiment>/stage<k>": {"train": record, "sample": record, "evaluate": record}}."""
    out = {}
    for name, exp in params.experiments.items():
        for k in range(1, exp.stages.count + 1):
            path = root / P.metrics_path(name, k)
            records = load_json(path).get("provenance", {}) if path.exists() else {}
            out[f"{name}/stage{k}"] = {job: records.get(job) or {} for job in JOBS}
    return out


def readme_section(records: dict[str, dict[str, dict]], record: str) -> str:
    """Markdown: the common value of each deciding key, and the jobs that differ from it."""
    lines = ["## Provenance", "",
             "What decided the bytes of every number here (the `runtime` block of the params and the "
             "library versions), as recorded by each training, sampling and evaluation job. The same "
             "values on another x86-64 machine with AVX2 give the same bytes. Where and when this set was "
             f"made is kept out of results/, in the run record `{record}`.", "",
             "| setting | value |", "|---|---|"]
    departures = []
    for key in DECIDING_KEYS:
        values = Counter()
        where: dict[str, list[str]] = {}
        for stage, jobs in records.items():
            for job, record in jobs.items():
                if key in record:
                    values[record[key]] += 1
                    where.setdefault(record[key], []).append(f"{stage} {job}")
        if not values:
            lines.append(f"| {key} | (not recorded) |")
            continue
        common = values.most_common(1)[0][0]
        lines.append(f"| {key} | `{common}` |")
        for value, jobs in where.items():
            if value != common:
                departures.append(f"- `{key}` = `{value}` in: {', '.join(sorted(jobs))}")
    lines.append("")
    if departures:
        lines += ["Jobs that ran under other settings (their bytes need not match a rerun under the common "
                  "ones):", ""] + departures + [""]
    return "\n".join(lines)


def write_run_record(path: Path, params: Params, records: dict, commit: str,
                     now: _dt.datetime | None = None) -> Path:
    """Date, commit and machines of this report run, with every job's full record."""
    now = now or _dt.datetime.now(_dt.timezone.utc)
    save_json(path, {
        "results_set": params.base.report.name,
        "generated_utc": now.strftime("%Y-%m-%d %H:%M:%S"),
        "commit": commit,
        "report_host": {**provenance(params.base.runtime, "no"), "node": platform.node()},
        "jobs": records,
    })
    return path


__all__ = ["DECIDING_KEYS", "readme_section", "stage_records", "write_run_record"]
