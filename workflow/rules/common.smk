# Shared set-up: the validated configuration and the pipeline definition every rule reads.

import shlex
from pathlib import Path

from dodlib import pipeline as P
from dodlib.config import ConfigError, load_params
from snakemake.exceptions import WorkflowError


configfile: "params.yaml"


# Snakemake merges --configfile overlays and --config values into `config`; dodlib validates the
# merged result here, before any job starts, and every `dod` command gets the same overlays and
# values (`--overlay FILE`, `--set key=value`), so a value given on the command line is tracked and
# reruns exactly what the same edit of params.yaml would.
OVERLAY_FILES = [f for f in workflow.overwrite_configfiles if Path(f).resolve() != Path("params.yaml").resolve()]
try:
    CONFIG_SETS = P.config_assignments(workflow.config_settings.overwrite_config)
    PARAMS = load_params("params.yaml", OVERLAY_FILES, sets=CONFIG_SETS)
except ConfigError as err:
    raise WorkflowError(f"invalid configuration: {err}") from None


class CommandOptions:
    """The `--overlay` / `--set` options of every `dod` command, as a rule param
    (`{params.overlays}`), each shell-quoted: a path with spaces or `$(...)` stays one argument.

    Deliberately not a builtin type: Snakemake only compares params it can represent, and which
    overlay files or `--config` values carry the values must not trigger reruns (running with an
    overlay or with the same values merged into params.yaml plans the same jobs); the values
    themselves are tracked through `params.block`."""

    def __init__(self, files, sets):
        self.options = [("--overlay", f) for f in files] + [("--set", s) for s in sets]

    def __str__(self):
        return "".join(f" {flag} {shlex.quote(str(value))}" for flag, value in self.options)


OVERLAYS = CommandOptions(OVERLAY_FILES, CONFIG_SETS)
# Snakemake schedules --cores by threads; dod runs each job on exactly runtime.threads threads.
THREADS = PARAMS.base.runtime.threads
# The software of every rule, for --software-deployment-method conda (see the file).
DOD_ENV = "../envs/dod.yaml"
EXPERIMENTS = list(PARAMS.experiments)
TRAINERS = PARAMS.trainers
MAX_STAGES = max(e.stages.count for e in PARAMS.experiments.values())
FINETUNED_STAGES = sorted({k for n in TRAINERS for k in PARAMS.experiments[n].stages.finetuned()})


wildcard_constraints:
    exp="|".join(EXPERIMENTS),


def job(rule, exp=None):
    """The pipeline's definition of one job (dodlib/pipeline.py)."""
    return P.find(PARAMS, rule, exp)


def job_inputs(rule):
    """Input function: the job's artifacts plus the source files whose edits must rerun it."""
    return lambda wc: job(rule, wc.get("exp")).deps + job(rule, wc.get("exp")).code


def job_params(rule):
    """Params function: the job's parameter blocks, keyed by their dotted params.yaml key."""
    return lambda wc: job(rule, wc.get("exp")).params


def job_cmd(rule):
    """The job's `dod` command (the rules append OVERLAYS in the shell line)."""
    return lambda wc: job(rule, wc.get("exp")).cmd
