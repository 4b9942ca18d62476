# Shared set-up: the validated configuration and the pipeline definition every rule reads.

from pathlib import Path

from dodlib import pipeline as P
from dodlib.config import load_params, parse_params
from snakemake.exceptions import WorkflowError


configfile: "params.yaml"


# Snakemake merges --configfile overlays into `config`; dodlib validates the merged result here,
# before any job starts, and the same overlays are passed on to every `dod` command.
PARAMS = parse_params({k: v for k, v in config.items() if k in P.CONFIG_BLOCKS})
OVERLAY_FILES = [f for f in workflow.overwrite_configfiles if Path(f).resolve() != Path("params.yaml").resolve()]
if PARAMS.raw != load_params("params.yaml", OVERLAY_FILES).raw:
    raise WorkflowError("values given with --config do not reach the `dod` commands, which read params.yaml "
                        "and overlay files: put them in a YAML file and pass it with --configfile")


class OverlayOptions:
    """The `--overlay` options of every `dod` command, as a rule param (`{params.overlays}`).

    Deliberately not a builtin type: Snakemake only compares params it can represent, and which
    overlay files carry the values must not trigger reruns (running with an overlay or with the
    same values merged into params.yaml plans the same jobs); the values themselves are tracked
    through `params.block`."""

    def __init__(self, files):
        self.files = list(files)

    def __str__(self):
        return "".join(f" --overlay {f}" for f in self.files)


OVERLAYS = OverlayOptions(OVERLAY_FILES)
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
