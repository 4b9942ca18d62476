"""Typed configuration: `params.yaml` -> validated dataclasses, per experiment.

`params.yaml` holds one base configuration plus named experiments, each a small set of
overrides of the base. `load_params` validates the whole file (every experiment) before any
work starts: an unknown key, a wrong type or an impossible value raises `ConfigError`
naming the dotted key.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from . import choices
from .compute import PRECISIONS
from .runtime import ISAS


class ConfigError(ValueError):
    """A parameter is unknown, of the wrong type, or impossible. The message names the key."""


# --------------------------------------------------------------------------------------------
# Schema. Defaults are the embedded default (MNIST digits on CPU); overlays scale it up.
# --------------------------------------------------------------------------------------------


@dataclass
class DataConfig:
    source: str = "mnist-embedded"  # "mnist-embedded" | "imagefolder"
    root: str = ""  # imagefolder: directory holding train/<class>/* (and optionally val/<class>/*)
    resolution: int = 16
    val_per_class: int = 50  # held-out real images per class when no val/ split exists
    max_per_class: int = 0  # 0 = all images; >0 caps each class (quick trials)
    shard_size: int = 4096  # images per uint8 shard
    hflip: bool = False  # horizontal-flip augmentation (on for photos, off for digits)
    seed: int = 0  # split seed

    def validate(self, key: str) -> None:
        _choice(self.source, choices.DATA_SOURCES, f"{key}.source")
        if self.source == "imagefolder" and not self.root:
            raise ConfigError(f"{key}.root: required when {key}.source is 'imagefolder'")
        _positive(self.resolution, f"{key}.resolution")
        _at_least(self.val_per_class, 0, f"{key}.val_per_class")
        _at_least(self.max_per_class, 0, f"{key}.max_per_class")
        _positive(self.shard_size, f"{key}.shard_size")


@dataclass
class TokenizerConfig:
    kind: str = "pixels"  # "pixels" (identity to [-1,1]) | "sd-vae"
    space_to_depth: int = 2  # pixels: fold s x s pixel blocks into channels
    vae: str = "stabilityai/sd-vae-ft-ema"  # sd-vae: hub id or local directory
    scale: float = 0.18215  # sd-vae latent scaling factor
    batch_size: int = 32
    shard_size: int = 8192  # latents per shard

    def validate(self, key: str) -> None:
        _choice(self.kind, choices.TOKENIZERS, f"{key}.kind")
        _positive(self.space_to_depth, f"{key}.space_to_depth")
        _positive(self.scale, f"{key}.scale")
        _positive(self.batch_size, f"{key}.batch_size")
        _positive(self.shard_size, f"{key}.shard_size")


@dataclass
class ModelConfig:
    size: str = "tiny"  # tiny | small | S | B | L | XL
    patch_size: int = 2
    learn_sigma: bool = False  # True to load official SiT/DiT checkpoints (8 output channels)
    init_from: str = ""  # optional SiT/DiT checkpoint (.pt/.safetensors) to inherit weights from

    def validate(self, key: str) -> None:
        _choice(self.size, choices.MODEL_SIZES, f"{key}.size")
        _positive(self.patch_size, f"{key}.patch_size")


@dataclass
class LEMConfig:
    enabled: bool = True  # False = the plain SiT baseline
    kind: str = "lem"  # "lem" | "direct" (no LEM: previous latent patch-embedded directly)
    width: int = 128
    depth_enc: int = 2
    depth_dec: int = 2
    heads: int = 4
    bottleneck_dim: int = 1  # d_b: channels per token kept by the bottleneck
    token_pool: int = 1  # average-pool the token grid by p x p inside the bottleneck
    injection: str = "add_tokens"  # add_tokens | add_condition | concat_tokens
    prior_dropout: float = 0.5  # probability that a training sample sees no prior

    def validate(self, key: str) -> None:
        _choice(self.kind, choices.LEM_KINDS, f"{key}.kind")
        _choice(self.injection, choices.INJECTIONS, f"{key}.injection")
        for name in ("width", "heads", "bottleneck_dim", "token_pool"):
            _positive(getattr(self, name), f"{key}.{name}")
        _at_least(self.depth_enc, 0, f"{key}.depth_enc")
        _at_least(self.depth_dec, 0, f"{key}.depth_dec")
        if self.bottleneck_dim > self.width:
            raise ConfigError(
                f"{key}.bottleneck_dim: {self.bottleneck_dim} is larger than {key}.width={self.width}"
            )
        if self.width % self.heads:
            raise ConfigError(f"{key}.heads: {key}.width={self.width} is not divisible by {self.heads}")
        _probability(self.prior_dropout, f"{key}.prior_dropout")


@dataclass
class TrainConfig:
    images: int = 256_000  # training length, counted in images seen
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_images: int = 0
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    t_sampling: str = "uniform"  # uniform | logit_normal
    t_mean: float = 0.0  # logit-normal location
    t_std: float = 1.0  # logit-normal scale
    class_dropout: float = 0.1
    seed: int = 0
    checkpoint_every: int = 64_000  # images between resumable checkpoints
    log_every: int = 12_800  # images between log lines
    snapshots: list[int] = field(default_factory=list)  # images at which to keep EMA weights
    mixed_precision: str = "auto"  # auto (bf16 on capable GPUs) | no | bf16 | fp16 (dodlib/compute.py)
    compile: bool = False  # torch.compile the network's forward (GPU runs; the first steps compile)

    def validate(self, key: str) -> None:
        for name in ("images", "batch_size", "checkpoint_every", "log_every"):
            _positive(getattr(self, name), f"{key}.{name}")
        _positive(self.lr, f"{key}.lr")
        _at_least(self.weight_decay, 0, f"{key}.weight_decay")
        _at_least(self.warmup_images, 0, f"{key}.warmup_images")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"{key}.betas: expected two numbers in [0, 1), got {self.betas}")
        _probability(self.ema_decay, f"{key}.ema_decay")
        _at_least(self.grad_clip, 0, f"{key}.grad_clip")
        _choice(self.t_sampling, choices.T_SAMPLINGS, f"{key}.t_sampling")
        _positive(self.t_std, f"{key}.t_std")
        _probability(self.class_dropout, f"{key}.class_dropout")
        _choice(self.mixed_precision, PRECISIONS, f"{key}.mixed_precision")
        for i, s in enumerate(self.snapshots):
            if not 0 < s <= self.images:
                raise ConfigError(f"{key}.snapshots[{i}]: {s} is outside (0, {key}.images={self.images}]")


@dataclass
class SamplerConfig:
    method: str = "euler"  # euler | heun | euler_maruyama
    num_steps: int = 50
    diffusion_scale: float = 1.0  # SDE only
    last_step_size: float = 0.04  # SDE only: final deterministic "mean" step

    def validate(self, key: str) -> None:
        _choice(self.method, choices.SAMPLERS, f"{key}.method")
        _positive(self.num_steps, f"{key}.num_steps")
        _at_least(self.diffusion_scale, 0, f"{key}.diffusion_scale")
        if not 0 < self.last_step_size < 1:
            raise ConfigError(f"{key}.last_step_size: must be in (0, 1), got {self.last_step_size}")


@dataclass
class CFGConfig:
    scale: float = 1.0
    channels: str = "all"  # all | first3 (SiT's legacy behaviour)
    uncond: str = "class"  # unconditional branch drops: class | class_prior
    schedule: str = "constant"  # constant | interval | power_cosine
    interval: list[float] = field(default_factory=lambda: [0.0, 1.0])
    power: float = 1.0

    def validate(self, key: str) -> None:
        _at_least(self.scale, 0, f"{key}.scale")
        _choice(self.channels, choices.CFG_CHANNELS, f"{key}.channels")
        _choice(self.uncond, choices.CFG_UNCOND, f"{key}.uncond")
        _choice(self.schedule, choices.CFG_SCHEDULES, f"{key}.schedule")
        if len(self.interval) != 2 or not 0 <= self.interval[0] <= self.interval[1] <= 1:
            raise ConfigError(f"{key}.interval: expected [lo, hi] with 0 <= lo <= hi <= 1, got {self.interval}")
        _positive(self.power, f"{key}.power")


@dataclass
class StageSampling:
    """Sampling settings of one stage (every stage starts from `sample` and applies its own block)."""

    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    cfg: CFGConfig = field(default_factory=CFGConfig)

    def validate(self, key: str) -> None:
        self.sampler.validate(f"{key}.sampler")
        self.cfg.validate(f"{key}.cfg")


@dataclass
class SampleConfig:
    num_samples: int = 1000
    batch_size: int = 250  # samples per loop iteration (memory); results do not depend on it
    # The network always runs on padded chunks of exactly this many rows: matrix kernels pick
    # their blocking by shape, so a fixed shape makes every sample bit-identical across batch
    # sizes, processes and resumptions. Part of the sampling fingerprint.
    micro_batch: int = 50
    shard_size: int = 500  # samples per written shard (the unit of resumption)
    seed: int = 0
    prior_source: str = "generated"  # generated (stage k-1 samples) | real (real latents: rFID)
    # The network's precision while sampling and regenerating pairs; x, the time grid, CFG and the
    # SDE noise stay float32 (dodlib/compute.py). Part of the sampling fingerprint, as is compile.
    mixed_precision: str = "auto"  # auto (bf16 on capable GPUs) | no | bf16 | fp16
    compile: bool = False
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    cfg: CFGConfig = field(default_factory=CFGConfig)

    def validate(self, key: str) -> None:
        for name in ("num_samples", "batch_size", "shard_size", "micro_batch"):
            _positive(getattr(self, name), f"{key}.{name}")
        _choice(self.prior_source, choices.PRIOR_SOURCES, f"{key}.prior_source")
        _choice(self.mixed_precision, PRECISIONS, f"{key}.mixed_precision")
        self.sampler.validate(f"{key}.sampler")
        self.cfg.validate(f"{key}.cfg")


@dataclass
class FinetuneConfig:
    """Stage-k fine-tuning on a paired prior cache (docs/method.md section 3): stage k starts from stage
    k-1's weights and trains on pairs (prior, clean latent) where the prior is the training latent
    noised to `t0` and regenerated by the stage k-1 sampler, so that at training time the prior
    looks like a generated sample."""

    t0: float = 0.5  # noise level of the regeneration, SiT time (0 = pure noise, 1 = the latent itself)
    num_pairs: int = 0  # training latents regenerated into pairs (0 = all)
    prior_dropout: float = 0.1  # replaces lem.prior_dropout while fine-tuning
    seed: int = 0  # seeds of the regeneration noise
    # Overrides of the experiment's `train` block (images, lr, batch_size, ...). Snapshots are not
    # inherited: the fine-tuning run is shorter than stage 1's.
    train: dict = field(default_factory=dict)

    def validate(self, key: str) -> None:
        if not 0 <= self.t0 < 1:
            raise ConfigError(f"{key}.t0: must be in [0, 1), got {self.t0}")
        _at_least(self.num_pairs, 0, f"{key}.num_pairs")
        _probability(self.prior_dropout, f"{key}.prior_dropout")


@dataclass
class StagesConfig:
    count: int = 3
    # Per-stage overrides of `sample.sampler` / `sample.cfg`, e.g. {"2": {"cfg": {"scale": 2.0}}}.
    overrides: dict[str, dict] = field(default_factory=dict)
    # Stages k >= 2 that get their own fine-tuned network, e.g. {"2": {"t0": 0.5, "train": {...}}}.
    # Absent (the default): every stage samples the stage-1 network, the paper's reading.
    finetune: dict[str, dict] = field(default_factory=dict)

    def validate(self, key: str) -> None:
        _positive(self.count, f"{key}.count")
        for name, block in self.overrides.items():
            # Stages beyond `count` may keep their blocks (an experiment can cut the count).
            if not str(name).isdigit() or int(name) < 1:
                raise ConfigError(f"{key}.overrides.{name}: not a stage number (1, 2, ...)")
            if not isinstance(block, dict):
                raise ConfigError(f"{key}.overrides.{name}: expected a mapping")
            unknown = set(block) - {"sampler", "cfg"}
            if unknown:
                raise ConfigError(f"{key}.overrides.{name}.{sorted(unknown)[0]}: unknown key (allowed: sampler, cfg)")
        for name, block in self.finetune.items():
            if not str(name).isdigit() or int(name) < 2:
                raise ConfigError(f"{key}.finetune.{name}: not a stage number of 2 or more (stage 1 is `train`)")
            _build(FinetuneConfig, block or {}, f"{key}.finetune.{name}")
            k = int(name)
            if k > 2 and k <= self.count and str(k - 1) not in self.finetune:
                raise ConfigError(f"{key}.finetune.{name}: needs {key}.finetune.{k - 1} (stage {k}'s pairs are "
                                  f"regenerated by stage {k - 1} from stage {k - 1}'s own pairs)")

    def finetuned(self) -> list[int]:
        """Stages (2..count) that train their own network, in order."""
        return sorted(int(k) for k in self.finetune if int(k) <= self.count)


@dataclass
class FeatureNetConfig:
    epochs: int = 4
    batch_size: int = 128
    lr: float = 2e-3
    seed: int = 0

    def validate(self, key: str) -> None:
        _positive(self.epochs, f"{key}.epochs")
        _positive(self.batch_size, f"{key}.batch_size")
        _positive(self.lr, f"{key}.lr")


@dataclass
class EvalConfig:
    detector: str = "features"  # features (data-set feature net) | inception
    inception_weights: str = ""  # local path of clean-fid's inception-2015-12-05.pt
    reference_npz: str = ""  # optional ADM reference batch (.npz with mu, sigma)
    batch_size: int = 250
    max_reference: int = 10_000  # real features kept for precision/recall
    pr_k: int = 3  # neighbours for improved precision/recall (Kynkaanniemi et al. use 3)
    # Also write each stage's samples as an ADM-format .npz (OpenAI's evaluator) in the pipeline.
    export_npz: bool = False
    feature_net: FeatureNetConfig = field(default_factory=FeatureNetConfig)

    def validate(self, key: str) -> None:
        _choice(self.detector, choices.DETECTORS, f"{key}.detector")
        if self.detector == "inception" and not self.inception_weights:
            raise ConfigError(f"{key}.inception_weights: required when {key}.detector is 'inception'")
        _positive(self.batch_size, f"{key}.batch_size")
        _positive(self.max_reference, f"{key}.max_reference")
        _positive(self.pr_k, f"{key}.pr_k")
        self.feature_net.validate(f"{key}.feature_net")


@dataclass
class ReportConfig:
    # The results set this params file regenerates: results/<name>/ (the main job "main", the
    # ablation overlay "ablations"); a report only ever writes or deletes files of its own set.
    name: str = "main"
    grid_samples: int = 40  # samples per grid (same seeds across stages)
    grid_columns: int = 10
    main_table: list[str] = field(default_factory=list)  # experiments in the main table (all if empty)

    def validate(self, key: str) -> None:
        if not self.name or not self.name.replace("_", "").replace("-", "").isalnum():
            raise ConfigError(f"{key}.name: {self.name!r}: a results set name uses letters, digits, '_' and '-' only")
        _positive(self.grid_samples, f"{key}.grid_samples")
        _positive(self.grid_columns, f"{key}.grid_columns")


@dataclass
class RuntimeConfig:
    """How every job computes on a CPU (dodlib/runtime.py): both decide the bytes of the results."""

    threads: int = 1  # intra-op threads per job (a reduction over 2 threads adds in another order)
    cpu_isa: str = "avx2"  # avx2: the same bytes on every x86-64 CPU with AVX2 | native: fastest here

    def validate(self, key: str) -> None:
        _positive(self.threads, f"{key}.threads")
        _choice(self.cpu_isa, ISAS, f"{key}.cpu_isa")


@dataclass
class ExperimentConfig:
    """One experiment, fully resolved: the base configuration with the experiment's overrides."""

    name: str
    description: str
    weights_from: str  # experiment whose trained weights this one samples from ("" = its own)
    group: str  # report table the experiment belongs to ("main", "cfg_sweep", ...)
    label: str  # its row label there; experiments sharing a label are seeds of one setting
    data: DataConfig
    tokenizer: TokenizerConfig
    model: ModelConfig
    lem: LEMConfig
    train: TrainConfig
    sample: SampleConfig
    stages: StagesConfig
    eval: EvalConfig
    report: ReportConfig
    runtime: RuntimeConfig

    @property
    def trainer(self) -> str:
        """Name of the experiment that owns the weights this experiment samples from."""
        return self.weights_from or self.name

    def stage_sampling(self, stage: int) -> StageSampling:
        """Sampler and CFG settings of one stage: `sample.*` with `stages.overrides.<k>` applied."""
        base = {"sampler": dataclasses.asdict(self.sample.sampler), "cfg": dataclasses.asdict(self.sample.cfg)}
        merged = deep_merge(base, self.stages.overrides.get(str(stage), {}))
        return _build(StageSampling, merged, f"experiments.{self.name}.stages.overrides.{stage}")

    def block(self, name: str) -> dict:
        return dataclasses.asdict(getattr(self, name))

    def finetune(self, stage: int) -> FinetuneConfig:
        """The fine-tuning settings of stage `stage` (>= 2); ConfigError if it has none."""
        where = f"experiments.{self.name}.stages.finetune.{stage}"
        if stage not in self.stages.finetuned():
            raise ConfigError(f"{where}: stage {stage} of {self.name} is not fine-tuned")
        return _build(FinetuneConfig, self.stages.finetune[str(stage)] or {}, where)

    def finetune_train(self, stage: int) -> "TrainConfig":
        """The `train` block of stage `stage`'s fine-tuning run: the experiment's with the
        stage's overrides (snapshots are not inherited)."""
        base = {**dataclasses.asdict(self.train), "snapshots": []}
        merged = deep_merge(base, self.finetune(stage).train)
        return _build(TrainConfig, merged, f"experiments.{self.name}.stages.finetune.{stage}.train")

    def train_images(self, stage: int) -> int:
        """Training images behind the network that samples stage `stage` (stage 1 plus the
        fine-tuning runs of stages 2..stage). Only meaningful for an experiment that trains."""
        return self.train.images + sum(self.finetune_train(k).images for k in self.stages.finetuned() if k <= stage)

    def weights_stage(self, stage: int) -> int:
        """Which stage's network samples stage `stage`: the last fine-tuned stage <= it, else 1."""
        return max([1] + [k for k in self.stages.finetuned() if k <= stage])


# Blocks every experiment shares: shared stages (data, latents, reference statistics) run once.
SHARED_BLOCKS = ("data", "tokenizer", "eval", "report", "runtime")
# Blocks an experiment may override.
EXPERIMENT_BLOCKS = ("model", "lem", "train", "sample", "stages")
TRAINING_BLOCKS = ("model", "lem", "train")
_BLOCK_TYPES = {
    "data": DataConfig,
    "tokenizer": TokenizerConfig,
    "model": ModelConfig,
    "lem": LEMConfig,
    "train": TrainConfig,
    "sample": SampleConfig,
    "stages": StagesConfig,
    "eval": EvalConfig,
    "report": ReportConfig,
    "runtime": RuntimeConfig,
}


@dataclass
class Params:
    """The whole `params.yaml`: the raw mapping plus every experiment resolved and validated."""

    raw: dict
    experiments: dict[str, ExperimentConfig]

    def experiment(self, name: str) -> ExperimentConfig:
        try:
            return self.experiments[name]
        except KeyError:
            raise ConfigError(f"experiments.{name}: no such experiment (have: {', '.join(self.experiments)})") from None

    @property
    def base(self) -> ExperimentConfig:
        return next(iter(self.experiments.values()))

    @property
    def trainers(self) -> list[str]:
        """Experiments that train their own weights."""
        return [name for name, exp in self.experiments.items() if not exp.weights_from]


def load_params(path: str | Path = "params.yaml", overlays: typing.Sequence[str | Path] = (),
                sets: typing.Sequence[str] = ()) -> Params:
    """Read, overlay, resolve and validate a params file. Raises ConfigError naming the key.
    `sets`: "dotted.key=value" strings (YAML values) applied last, like `snakemake --config`
    and `dvc exp run -S`."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"params file not found: {path}")
    raw = _read_yaml(path)
    for overlay in overlays:
        raw = deep_merge(raw, _read_yaml(Path(overlay)))
    for assignment in sets:
        key, value = parse_assignment(assignment)
        raw = deep_merge(raw, nest(key, value))
    return parse_params(raw)


def parse_assignment(text: str) -> tuple[str, Any]:
    """"train.lr=0.001" -> ("train.lr", 0.001): the value is read as YAML, as both tools do."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"{text!r}: expected KEY=VALUE with a dotted key, e.g. train.lr=0.001")
    try:
        return key.strip(), yaml.safe_load(value)
    except yaml.YAMLError as err:
        raise ConfigError(f"{key}: value {value!r} is not valid YAML: {err}") from err


def nest(dotted: str, value: Any) -> dict:
    """("a.b.c", v) -> {"a": {"b": {"c": v}}}."""
    parts = dotted.split(".")
    if not all(parts):
        raise ConfigError(f"{dotted}: empty part in a dotted key")
    out: Any = value
    for part in reversed(parts):
        out = {part: out}
    return out


# Every top-level key of a params file: the blocks, then the experiments.
TOP_LEVEL_KEYS = tuple(_BLOCK_TYPES) + ("experiments",)


def parse_params(raw: dict) -> Params:
    raw = copy.deepcopy(raw)
    allowed = set(TOP_LEVEL_KEYS)
    for key in raw:
        if key not in allowed:
            raise ConfigError(f"{key}: unknown top-level key (allowed: {', '.join(sorted(allowed))})")
    # The base blocks first, so an error in them is reported under its own key (e.g. train.images)
    # rather than under the first experiment that overrides part of that block.
    for block, cls in _BLOCK_TYPES.items():
        _build(cls, raw.get(block) or {}, block)
    experiments_raw = raw.get("experiments") or {"main": {}}
    if not isinstance(experiments_raw, dict):
        raise ConfigError("experiments: expected a mapping of experiment name -> overrides")
    experiments = {}
    for name, overrides in experiments_raw.items():
        experiments[name] = _resolve_experiment(raw, str(name), overrides or {})
    for exp in experiments.values():
        if exp.weights_from:
            owner = experiments.get(exp.weights_from)
            if owner is None:
                raise ConfigError(f"experiments.{exp.name}.weights_from: no experiment named {exp.weights_from!r}")
            if owner.weights_from:
                raise ConfigError(
                    f"experiments.{exp.name}.weights_from: {exp.weights_from!r} itself borrows weights; name the owner"
                )
            # A borrower samples with the owner's networks, its fine-tuned stages included.
            exp.stages.finetune = {str(k): owner.stages.finetune[str(k)] for k in owner.stages.finetuned()}
    unknown = [n for n in next(iter(experiments.values())).report.main_table if n not in experiments]
    if unknown:
        raise ConfigError(f"report.main_table: no experiment named {', '.join(map(repr, unknown))} "
                          f"(have: {', '.join(experiments)})")
    return Params(raw=raw, experiments=experiments)


def _resolve_experiment(raw: dict, name: str, overrides: dict) -> ExperimentConfig:
    key = f"experiments.{name}"
    if not name.replace("_", "").replace("-", "").isalnum():
        raise ConfigError(f"{key}: experiment names may use letters, digits, '_' and '-' only")
    if not isinstance(overrides, dict):
        raise ConfigError(f"{key}: expected a mapping of overrides")
    meta = {"description", "weights_from", "group", "label"}
    for block in overrides:
        if block in SHARED_BLOCKS:
            raise ConfigError(f"{key}.{block}: shared by all experiments; it cannot be overridden per experiment")
        if block not in EXPERIMENT_BLOCKS and block not in meta:
            raise ConfigError(f"{key}.{block}: unknown key (allowed: {', '.join(EXPERIMENT_BLOCKS + tuple(sorted(meta)))})")
    weights_from = overrides.get("weights_from", "") or ""
    if weights_from:
        for block in TRAINING_BLOCKS:
            if block in overrides:
                raise ConfigError(
                    f"{key}.{block}: an experiment with weights_from samples {weights_from!r}'s weights; "
                    "it cannot change training"
                )
        if "finetune" in (overrides.get("stages") or {}):
            raise ConfigError(f"{key}.stages.finetune: an experiment with weights_from samples "
                              f"{weights_from!r}'s networks, fine-tuned stages included; it cannot change them")
    blocks = {}
    for block, cls in _BLOCK_TYPES.items():
        merged = deep_merge(raw.get(block) or {}, overrides.get(block) or {})
        # Errors in base values are reported under the base key, overrides under the experiment's.
        where = f"{key}.{block}" if block in overrides else block
        blocks[block] = _build(cls, merged, where)
    _check_geometry(blocks, key)
    if blocks["stages"].finetuned() and not blocks["lem"].enabled:
        raise ConfigError(f"{key}.stages.finetune: fine-tuned stages take a prior, but lem.enabled is false")
    exp = ExperimentConfig(
        name=name,
        description=str(overrides.get("description", "")),
        group=str(overrides.get("group", "main")),
        label=str(overrides.get("label", name)),
        weights_from=str(weights_from),
        **blocks,
    )
    for k in exp.stages.finetuned():
        exp.finetune_train(k)  # validates the stage's `train` overrides now, not when the job runs
    for k in exp.stages.overrides:
        exp.stage_sampling(int(k))  # and each stage's sampler/CFG block, before any job runs
    if exp.eval.pr_k >= min(exp.sample.num_samples, exp.eval.max_reference):
        raise ConfigError(f"eval.pr_k: {exp.eval.pr_k} neighbours need more samples than that: {key}.sample.num_samples="
                          f"{exp.sample.num_samples}, eval.max_reference={exp.eval.max_reference}")
    return exp


def _check_geometry(blocks: dict, key: str) -> None:
    data, tok, model = blocks["data"], blocks["tokenizer"], blocks["model"]
    factor = tok.space_to_depth if tok.kind == "pixels" else 8  # SD-VAE downsamples by 8
    if data.resolution % factor:
        raise ConfigError(f"tokenizer: data.resolution={data.resolution} is not divisible by the tokenizer's {factor}")
    latent = data.resolution // factor
    if latent % model.patch_size:
        raise ConfigError(f"model.patch_size: latent size {latent} is not divisible by {model.patch_size}")
    if blocks["lem"].enabled and (latent // model.patch_size) % blocks["lem"].token_pool:
        raise ConfigError(f"lem.token_pool: token grid {latent // model.patch_size} is not divisible by it")


def deep_merge(base: dict, overrides: dict) -> dict:
    """Recursively merge `overrides` into a copy of `base` (mappings merge, everything else replaces)."""
    out = copy.deepcopy(base)
    for k, v in overrides.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def fingerprint(obj: Any) -> str:
    """Short stable hash of a JSON-serialisable object (dataclasses allowed)."""
    if dataclasses.is_dataclass(obj):
        obj = dataclasses.asdict(obj)
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# Building dataclasses from mappings with type checks.
# --------------------------------------------------------------------------------------------


def _build(cls, values: dict, key: str):
    if not isinstance(values, dict):
        raise ConfigError(f"{key}: expected a mapping, got {type(values).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for k in values:
        if k not in names:
            raise ConfigError(f"{key}.{k}: unknown key (allowed: {', '.join(sorted(names))})")
    kwargs = {k: _coerce(v, hints[k], f"{key}.{k}") for k, v in values.items()}
    obj = cls(**kwargs)
    obj.validate(key)
    return obj


def _coerce(value: Any, hint: Any, key: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return _build(hint, value or {}, key)
    origin = typing.get_origin(hint)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        (item,) = typing.get_args(hint)
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
        return {str(k): v for k, v in value.items()}
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(value):  # YAML's .nan / .inf parse as floats; no parameter may be one
            raise ConfigError(f"{key}: must be a finite number, got {value!r}")
        return float(value)
    if hint is str:
        if value is None:
            return ""
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    return value


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data


def _choice(value, allowed, key):
    if value not in allowed:
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(str, allowed))}")


def _positive(value, key):
    if value <= 0:
        raise ConfigError(f"{key}: must be > 0, got {value}")


def _at_least(value, low, key):
    if value < low:
        raise ConfigError(f"{key}: must be >= {low}, got {value}")


def _probability(value, key):
    if not 0 <= value <= 1:
        raise ConfigError(f"{key}: must be in [0, 1], got {value}")
