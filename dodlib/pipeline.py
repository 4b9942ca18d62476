"""The pipeline, defined once: stage names, commands, dependencies, outputs and parameter keys.

Snakemake's rules (workflow/rules/*.smk) take their inputs, outputs, params and commands from
here, and `dod dvc-yaml` writes dvc.yaml from the same definition (a test fails when the committed
dvc.yaml is stale). Each stage instance depends on exactly the parameter blocks that shape it, as
dotted keys into params.yaml, so both tools rerun the same set of jobs after an edit.

Paths: every artifact lives under `artifacts/`; resumable state (checkpoints, unfinished sample
shards) under `state/`, outside the declared outputs that Snakemake deletes before a job runs.
Snakemake tracks one marker file per output directory, written last; DVC tracks the directory.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .config import Params

ARTIFACTS = "artifacts"
STATE = "state"
RESULTS = "results"
PARAMS_FILE = "params.yaml"
PACKAGE = Path(__file__).resolve().parent
# Top-level params.yaml keys (Snakemake's `config` may carry others from --config).
CONFIG_BLOCKS = ("data", "tokenizer", "model", "lem", "train", "sample", "stages", "eval", "report", "experiments")


# ---- artifact paths (the one place that spells them) -----------------------------------------


def data_dir() -> str:
    return f"{ARTIFACTS}/data"


def features_dir() -> str:
    return f"{ARTIFACTS}/features"


def reference_dir() -> str:
    return f"{ARTIFACTS}/reference"


def latents_dir() -> str:
    return f"{ARTIFACTS}/latents"


def train_dir(exp: str) -> str:
    return f"{ARTIFACTS}/exp/{exp}/train"


def weights_path(exp: str) -> str:
    return f"{train_dir(exp)}/model.safetensors"


def stage_dir(exp: str, stage: int) -> str:
    return f"{ARTIFACTS}/exp/{exp}/stage{stage}"


def metrics_path(exp: str, stage: int) -> str:
    return f"{ARTIFACTS}/exp/{exp}/metrics/stage{stage}.json"


def probe_path(exp: str) -> str:
    return f"{ARTIFACTS}/exp/{exp}/probe.json"


def snapshots_path(exp: str) -> str:
    return f"{ARTIFACTS}/exp/{exp}/snapshots.json"


def report_manifest_path() -> str:
    """What the last report run wrote, with hashes. It lives under artifacts/ (never committed),
    so a fresh clone, whose committed results/ look finished, still runs the pipeline."""
    return f"{ARTIFACTS}/report/manifest.json"


def state_dir(kind: str, exp: str = "", stage: int = 0) -> str:
    parts = [STATE, kind] + ([exp] if exp else []) + ([f"stage{stage}"] if stage else [])
    return "/".join(parts)


# ---- stage definition ------------------------------------------------------------------------


@dataclass
class StageInstance:
    """One job: a stage of the pipeline for one experiment (or shared)."""

    name: str  # unique, e.g. "train_stage1-dod" or "prepare_data" (DVC reserves "@")
    rule: str  # Snakemake rule name, e.g. "train_stage1"
    area: str  # data | training | sampling | evaluation | report (the .smk file)
    cmd: str
    deps: list[str]  # artifacts read (marker files for Snakemake, dirs for DVC via `dvc_path`)
    outs: list[str]  # directories or files written
    markers: list[str]  # what Snakemake tracks for each out (a file written last)
    code: list[str]  # source files whose edit must rerun this stage
    params: dict[str, object]  # dotted params.yaml key -> value
    wildcards: dict[str, str] = field(default_factory=dict)
    metrics: list[str] = field(default_factory=list)  # DVC metrics (subset of outs, not cached)
    plots: list[str] = field(default_factory=list)
    cache: bool = True


# Modules whose source shapes a stage's results. Besides being the stages' code dependencies, the
# two with resumable state fold a digest of them into their state key: after a code edit a rerun
# starts over instead of resuming (or reusing) checkpoints and shards made by the old code.
TRAIN_CODE = ("train", "transport", "models")
SAMPLE_CODE = ("sample", "samplers", "guidance")


def _code(*modules: str) -> list[str]:
    """Source files of the given dodlib modules or packages, relative to the repository."""
    files = []
    for module in modules:
        path = PACKAGE / module
        if path.is_dir():
            files += sorted(str(p.relative_to(PACKAGE.parent)) for p in path.glob("*.py"))
        else:
            files.append(str(path.with_suffix(".py").relative_to(PACKAGE.parent)))
    return files


def code_digest(modules: tuple[str, ...]) -> str:
    """sha256 over the source files of `modules` (their paths and bytes)."""
    h = hashlib.sha256()
    for rel in _code(*modules):
        h.update(rel.encode() + b"\0" + (PACKAGE.parent / rel).read_bytes() + b"\0")
    return h.hexdigest()[:16]


def _lookup(raw: dict, dotted: str):
    node = raw
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(dotted)
        node = node[part]
    return node


def _params(raw: dict, keys: list[str], optional: list[str] = ()) -> dict:
    """Values of `keys` (must exist) and of `optional` keys that exist, in that order."""
    out = {k: _lookup(raw, k) for k in keys}
    for k in optional:
        try:
            out[k] = _lookup(raw, k)
        except KeyError:
            pass
    return out


def marker(directory: str, name: str = "meta.json") -> str:
    return f"{directory}/{name}"


def stages(params: Params) -> list[StageInstance]:
    """Every job of the pipeline for this params file, in a valid execution order."""
    raw = params.raw
    base = params.base
    out: list[StageInstance] = []
    detector = base.eval.detector
    data_marker = marker(data_dir(), "summary.json")

    out.append(StageInstance(
        name="prepare_data", rule="prepare_data", area="data",
        cmd="dod prepare-data", deps=[], outs=[data_dir()], markers=[data_marker],
        code=_code("data"), params=_params(raw, ["data"]),
    ))
    ref_deps = [data_marker]
    if detector == "features":
        out.append(StageInstance(
            name="train_feature_net", rule="train_feature_net", area="evaluation",
            cmd="dod train-features", deps=[data_marker], outs=[features_dir()],
            markers=[marker(features_dir(), "model.safetensors")],
            code=_code("metrics/feature_net", "evaluation"), params=_params(raw, ["eval.feature_net"]),
        ))
        ref_deps.append(marker(features_dir(), "model.safetensors"))
    out.append(StageInstance(
        name="reference_stats", rule="reference_stats", area="evaluation",
        cmd="dod reference-stats", deps=ref_deps, outs=[reference_dir()],
        markers=[marker(reference_dir(), "reference.npz")],
        code=_code("metrics/stats", "metrics/detectors", "metrics/evaluate", "evaluation"),
        params=_params(raw, ["eval.detector", "eval.inception_weights", "eval.reference_npz", "eval.max_reference"]),
    ))
    out.append(StageInstance(
        name="extract_latents", rule="extract_latents", area="data",
        cmd="dod extract-latents", deps=[data_marker], outs=[latents_dir()],
        markers=[marker(latents_dir(), "summary.json")],
        code=_code("tokenizers", "latents"), params=_params(raw, ["tokenizer"]),
    ))
    lat_marker = marker(latents_dir(), "summary.json")

    for name, exp in params.experiments.items():
        x = f"experiments.{name}"
        if not exp.weights_from:
            out.append(StageInstance(
                name=f"train_stage1-{name}", rule="train_stage1", area="training",
                cmd=f"dod train --experiment {name}", deps=[lat_marker], outs=[train_dir(name)],
                markers=[weights_path(name)], code=_code(*TRAIN_CODE),
                params=_params(raw, ["model", "lem", "train"], [f"{x}.model", f"{x}.lem", f"{x}.train"]),
                wildcards={"exp": name}, plots=[f"{train_dir(name)}/train_log.csv"],
            ))
        for k in range(1, exp.stages.count + 1):
            deps = [weights_path(exp.trainer)]  # the trainer may be another experiment (weights_from)
            if k >= 2:
                deps.append(marker(stage_dir(name, k - 1)))
            if k == 2 and exp.sample.prior_source == "real":
                deps[-1] = lat_marker  # priors from real latents (rFID): no stage-1 dependency
            stage_keys = [f"stages.overrides.{k}", f"{x}.sample", f"{x}.stages.overrides.{k}"]
            out.append(StageInstance(
                name=f"sample_stage{k}-{name}", rule=f"sample_stage{k}", area="sampling",
                cmd=f"dod sample --experiment {name} --stage {k}", deps=deps, outs=[stage_dir(name, k)],
                markers=[marker(stage_dir(name, k))], code=_code(*SAMPLE_CODE),
                params=_params(raw, ["sample"], stage_keys), wildcards={"exp": name},
            ))
            out.append(StageInstance(
                name=f"evaluate_stage{k}-{name}", rule=f"evaluate_stage{k}", area="evaluation",
                cmd=f"dod evaluate --experiment {name} --stage {k}",
                deps=[marker(stage_dir(name, k)), marker(reference_dir(), "reference.npz")]
                + ([marker(features_dir(), "model.safetensors")] if detector == "features" else []),
                outs=[metrics_path(name, k)], markers=[metrics_path(name, k)],
                code=_code("metrics/evaluate", "metrics/prdc", "metrics/inception_score", "evaluation"),
                params=_params(raw, ["eval.batch_size", "eval.pr_k"]), wildcards={"exp": name},
                metrics=[metrics_path(name, k)], cache=False,
            ))
        if not exp.weights_from and exp.lem.enabled and exp.lem.kind == "lem":
            out.append(StageInstance(
                name=f"probe-{name}", rule="probe", area="evaluation", cmd=f"dod probe --experiment {name}",
                deps=[weights_path(name), lat_marker], outs=[probe_path(name)], markers=[probe_path(name)],
                code=_code("probe"), params={}, wildcards={"exp": name}, cache=False,
            ))
        # Snapshots are evaluated at stage 1, and at stage 2 when the model takes priors.
        snapshot_stages = [1, 2] if exp.lem.enabled and exp.stages.count >= 2 else [1]
        if not exp.weights_from and exp.train.snapshots:
            out.append(StageInstance(
                name=f"evaluate_snapshots-{name}", rule="evaluate_snapshots", area="evaluation",
                cmd=f"dod evaluate-snapshots --experiment {name}",
                deps=[weights_path(name), marker(reference_dir(), "reference.npz")]
                + ([marker(features_dir(), "model.safetensors")] if detector == "features" else []),
                outs=[snapshots_path(name)], markers=[snapshots_path(name)],
                code=_code("snapshots", *SAMPLE_CODE, "metrics/evaluate"),
                params=_params(raw, ["sample", "eval.batch_size", "eval.pr_k"], [
                    f"stages.overrides.{k}" for k in snapshot_stages] + [f"{x}.sample"] + [
                    f"{x}.stages.overrides.{k}" for k in snapshot_stages]),
                wildcards={"exp": name}, cache=False,
            ))
    report_deps = [s.markers[0] for s in out if s.rule.startswith(("evaluate_", "train_stage1", "probe"))]
    report_deps += [marker(stage_dir(n, k)) for n, e in params.experiments.items() for k in range(1, e.stages.count + 1)]
    out.append(StageInstance(
        name="report", rule="report", area="report", cmd="dod report", deps=report_deps,
        outs=[f"{RESULTS}/{d}" for d in ("README.md", "tables", "figures", "plots", "metrics.json")]
        + [report_manifest_path()],
        markers=[report_manifest_path(), f"{RESULTS}/README.md"] + [f"{RESULTS}/{f}" for f in report_figures(params)],
        code=_code("report"), params=_params(raw, ["report", "experiments"]),
        metrics=[f"{RESULTS}/metrics.json"], plots=[f"{RESULTS}/plots/metric_per_stage.csv"], cache=False,
    ))
    return out


def report_figures(params: Params) -> list[str]:
    """Figures the report stage writes (PNG; a PDF beside each), relative to results/."""
    figures = ["figures/metric_per_stage.png", "figures/training_loss.png"]
    figures += [f"figures/samples_{name}.png" for name in params.experiments]
    if any(e.group == "cfg_sweep" for e in params.experiments.values()):
        figures.append("figures/cfg_sweep.png")
    if any(e.train.snapshots and not e.weights_from for e in params.experiments.values()):
        figures.append("figures/training_efficiency.png")
    return figures


def by_name(params: Params) -> dict[str, StageInstance]:
    return {s.name: s for s in stages(params)}


def find(params: Params, rule: str, exp: str | None = None) -> StageInstance:
    name = rule if exp is None else f"{rule}-{exp}"
    table = by_name(params)
    if name not in table:
        raise KeyError(f"no pipeline stage {name!r}")
    return table[name]


# ---- dvc.yaml ---------------------------------------------------------------------------------


def dvc_dependency(jobs: list[StageInstance], path: str) -> str:
    """DVC tracks whole outputs: map a Snakemake marker file to the declared output holding it."""
    for job in jobs:
        for out in job.outs:
            if path == out or path.startswith(out + "/"):
                return out
    raise KeyError(f"{path}: no stage declares an output holding it")


def dvc_yaml(params: Params) -> str:
    header = (
        "# GENERATED by `dod dvc-yaml` from dodlib/pipeline.py - do not edit by hand.\n"
        "# Regenerate after adding experiments or stages; tests/test_pipeline.py fails when stale.\n"
    )
    doc: dict = {"stages": {}}
    jobs = stages(params)
    for s in jobs:
        entry: dict = {"cmd": s.cmd}
        deps = [dvc_dependency(jobs, d) for d in s.deps] + s.code
        if deps:
            entry["deps"] = list(dict.fromkeys(deps))
        if s.params:
            entry["params"] = list(s.params)
        outs = [o for o in s.outs if o not in s.metrics]
        if outs:
            entry["outs"] = [o if s.cache else {o: {"cache": False}} for o in outs]
        if s.metrics:
            entry["metrics"] = [{m: {"cache": False}} for m in s.metrics]
        doc["stages"][s.name] = entry
    doc["plots"] = [
        {f"{train_dir(n)}/train_log.csv": {"x": "images", "y": "loss", "title": f"training loss: {n}"}}
        for n in params.trainers
    ] + [{f"{RESULTS}/plots/metric_per_stage.csv": {"x": "stage", "y": "value", "title": "metric per stage"}}]
    return header + yaml.safe_dump(doc, sort_keys=False, width=120)
