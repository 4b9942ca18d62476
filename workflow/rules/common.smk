# Shared set-up: the validated configuration and the pipeline definition every rule reads.

from pathlib import Path

from dodlib import pipeline as P
from dodlib.config import parse_params


configfile: "params.yaml"


# Snakemake merges --configfile overlays into `config`; dodlib validates the merged result here,
# before any job starts, and the same overlays are passed on to every `dod` command.
PARAMS = parse_params({k: v for k, v in config.items() if k in P.CONFIG_BLOCKS})
OVERLAYS = [f for f in workflow.overwrite_configfiles if Path(f).resolve() != Path("params.yaml").resolve()]
DOD_OPTS = "".join(f" --overlay {f}" for f in OVERLAYS)
EXPERIMENTS = list(PARAMS.experiments)
TRAINERS = PARAMS.trainers
MAX_STAGES = max(e.stages.count for e in PARAMS.experiments.values())


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
    """The job's `dod` command. Overlays (DOD_OPTS) are appended in the shell line, not here, so
    running with an overlay or with the same values merged into params.yaml plans the same jobs."""
    return lambda wc: job(rule, wc.get("exp")).cmd
