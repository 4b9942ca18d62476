"""Throw-away copies of the repository in which the workflow tests run the real tools."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from dodlib.config import deep_merge

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ENV = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}


def run(cmd: list[str], cwd: Path, check: bool = True, timeout: float | None = 1800, env: dict | None = None) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env={**ENV, **(env or {})}, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc.stdout + proc.stderr


def copy_tracked(dest: Path, with_results: bool = False) -> Path:
    """The repository's tracked (and untracked, not ignored) files, as a clone would have them:
    fresh mtimes, and results/ only when asked (the committed report of a finished run)."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                           text=True, check=True).stdout.split()
    for rel in files:
        if (rel.startswith("results/") and not with_results) or not (REPO / rel).is_file():
            continue
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / rel, dest / rel)
    return dest


def make_workspace(dest: Path, extra: dict | None = None) -> Path:
    """The repository's tracked files, with the smoke overlay (and `extra`) merged into params.yaml."""
    copy_tracked(dest)
    raw = deep_merge(yaml.safe_load((dest / "params.yaml").read_text()),
                     yaml.safe_load((dest / "params" / "smoke.yaml").read_text()))
    raw = deep_merge(raw, extra or {})
    (dest / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    run(["dod", "dvc-yaml"], dest)
    run(["git", "init", "-q"], dest)
    return dest


def dod_workspace(dest: Path, prepared: Path, raw: dict) -> Path:
    """A bare workspace for `dod` commands run as subprocesses: params.yaml from `raw` and the
    prepared latents linked in (no repository files, no tools)."""
    from dodlib import pipeline as P

    (dest / "artifacts").mkdir(parents=True)
    os.symlink(prepared / "latents", dest / P.latents_dir())
    (dest / "params.yaml").write_text(yaml.safe_dump(raw))
    return dest


def planned_jobs(dry_run_output: str) -> set[str]:
    """Jobs of a Snakemake dry run, named like the DVC stages (rule-experiment)."""
    jobs, rule = set(), None
    for line in dry_run_output.splitlines():
        if m := re.match(r"^rule (\w+):", line):
            rule = m.group(1)
            if rule != "all":
                jobs.add(rule)
        elif rule and (m := re.match(r"^\s+wildcards: exp=([\w-]+)", line)):
            jobs.discard(rule)
            jobs.add(f"{rule}-{m.group(1)}")
    return jobs
