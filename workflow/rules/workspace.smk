# The workspace around a run: one tool at a time (dodlib/workspace.py), and DVC told afterwards
# what Snakemake made. Hooks run in the main Snakemake process only (not for dry runs, not in
# cluster jobs).

import time

from dodlib.workspace import WorkspaceBusy, hold_dvc_lock, release

_RUN = {"start": 0.0, "dvc_lock": None}


onstart:
    _RUN["start"] = time.time()
    try:
        # DVC stops with its own "Unable to acquire lock" while this run holds its lock.
        _RUN["dvc_lock"] = hold_dvc_lock()
    except WorkspaceBusy as err:
        raise WorkflowError(str(err)) from None


onsuccess:
    release(_RUN["dvc_lock"])
    manifest = Path(P.report_manifest_path(PARAMS))
    if manifest.exists() and manifest.stat().st_mtime >= _RUN["start"]:
        # The report ran in this run, so every output of the DAG is fresh: record them in dvc.lock
        # (params.yaml runs only; dod dvc-adopt says why not otherwise), and DVC agrees with no hand step.
        shell(f"dod dvc-adopt{OVERLAYS} 2>&1 | tee logs/dvc_adopt.log")


onerror:
    release(_RUN["dvc_lock"])
