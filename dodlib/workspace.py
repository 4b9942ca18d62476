"""One tool at a time in a workspace: Snakemake and DVC must not run side by side.

Both write the same artifacts/, and DVC deletes a stage's outputs before it reruns the stage, so a
`dvc repro` started during a Snakemake run removes files that Snakemake's jobs are reading, and
afterwards each tool calls the mixed workspace up to date. Snakemake's own lock keeps out a second
Snakemake and DVC's keeps out a second DVC; this module joins the two:

- a Snakemake run (its `onstart` hook, workflow/rules/workspace.smk) refuses to start while DVC is
  running here, and then holds DVC's repository lock until it ends, so `dvc repro`, `dvc commit`
  and `dvc exp run` stop at once with DVC's own "Unable to acquire lock" before touching a file;
- DVC releases its repository lock while a stage's command runs, but lists itself in its
  `.dvc/tmp/rwlock` file then: a live process there also means "DVC is running".
"""

from __future__ import annotations

import json
import os
from pathlib import Path

DVC_LOCK = Path(".dvc") / "tmp" / "lock"
DVC_RWLOCK = Path(".dvc") / "tmp" / "rwlock"


class WorkspaceBusy(RuntimeError):
    """Another tool is running in this workspace."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def dvc_processes(root: str | Path = ".") -> list[str]:
    """Commands of the live DVC processes that hold read or write locks on this workspace's paths."""
    path = Path(root) / DVC_RWLOCK
    try:
        info = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return []
    entries = list(info.get("write", {}).values())
    for readers in info.get("read", {}).values():
        entries += readers
    return sorted({f"{e.get('cmd', 'dvc')} (pid {e['pid']})" for e in entries if "pid" in e and _alive(int(e["pid"]))})


def hold_dvc_lock(root: str | Path = "."):
    """Take DVC's repository lock for the caller's lifetime (None where there is no DVC project).
    Raises WorkspaceBusy, naming DVC's processes, if DVC is running here."""
    root = Path(root)
    if not (root / ".dvc").is_dir():
        return None
    running = dvc_processes(root)
    if running:
        raise WorkspaceBusy(f"DVC is running in this workspace: {'; '.join(running)}. Wait for it to finish "
                            "(both tools write artifacts/, and DVC deletes outputs before it reruns a stage)")
    import zc.lockfile  # DVC's own lock implementation (a dependency of dvc)

    (root / DVC_LOCK).parent.mkdir(parents=True, exist_ok=True)
    try:
        return zc.lockfile.LockFile(str(root / DVC_LOCK))
    except zc.lockfile.LockError:
        raise WorkspaceBusy(f"DVC holds its repository lock ({root / DVC_LOCK}): a `dvc` command is running in this "
                            "workspace. Wait for it to finish") from None


def release(lock) -> None:
    if lock is not None:
        lock.close()


__all__ = ["WorkspaceBusy", "dvc_processes", "hold_dvc_lock", "release"]
