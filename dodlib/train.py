"""Training: one accelerate-driven loop for stage-1 (and every stage sharing its network).

Progress is counted in images. All randomness of step `s` (batch order, flips, posterior samples,
noise, t, class and prior dropout) comes from generators seeded by (train.seed, s), so a resumed
run replays exactly what an uninterrupted run would have done: resuming needs the model, EMA and
optimizer state plus the step counter, nothing else.

Resumable state lives in `state_dir` (outside the declared outputs, which Snakemake deletes before
a job runs), keyed by a fingerprint of everything that shapes training, the training code included: a changed
parameter or an edited module starts a fresh run instead of resuming a stale one. Declared outputs are written once at the end.
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import math
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from .config import ExperimentConfig, fingerprint
from .io import atomic_path, load_json, save_json
from .pipeline import TRAIN_CODE, code_digest
from .latents import LatentSet
from .models import DoDModel
from .transport import interpolate, sample_t

log = logging.getLogger(__name__)

# Exit code after a checkpoint written on one of CHECKPOINT_SIGNALS (EX_TEMPFAIL: "try again later").
EXIT_PREEMPTED = 75
# SIGTERM: preemption / scancel. SIGUSR1: the usual warning signal. SIGURG: the warning signal to use
# under Snakemake's Slurm executor (`--signal=URG@600`): its default action is "ignore", so the
# snakemake process that wraps the job survives it, while USR1 would kill that process first.
CHECKPOINT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGURG)


# --------------------------------------------------------------------------------------------
# Model construction from a config, and the spec saved beside the weights
# --------------------------------------------------------------------------------------------


def model_spec(exp: ExperimentConfig, latent_shape, num_classes: int) -> dict:
    """Everything needed to rebuild the network; stored as JSON next to its weights."""
    lem = None
    if exp.lem.enabled:
        lem = {
            k: getattr(exp.lem, k)
            for k in ("kind", "width", "depth_enc", "depth_dec", "heads", "bottleneck_dim", "token_pool", "injection")
        }
    return {
        "input_size": int(latent_shape[-1]),
        "in_channels": int(latent_shape[0]),
        "num_classes": int(num_classes),
        "size": exp.model.size,
        "patch_size": exp.model.patch_size,
        "learn_sigma": exp.model.learn_sigma,
        "lem": lem,
    }


def build_model(spec: dict) -> DoDModel:
    return DoDModel(**spec)


def cpu_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """A module's state dict as contiguous CPU tensors, the form safetensors writes."""
    return {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}


def save_weights(path: Path, model: nn.Module, spec: dict) -> None:
    """Weights as safetensors plus the model spec as JSON (loading never unpickles anything)."""
    with atomic_path(path) as tmp:
        save_file(cpu_state(model), str(tmp))
    save_json(path.with_suffix(".json"), spec)


def load_weights(path: str | Path, device="cpu") -> DoDModel:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model weights not found: {path}")
    spec_path = path.with_suffix(".json")
    if not spec_path.exists():
        raise FileNotFoundError(f"model spec not found beside the weights: {spec_path}")
    model = build_model(load_json(spec_path))
    model.load_state_dict(load_file(str(path), device=str(device)))
    return model.to(device).eval()


class PriorConditionedLoss(nn.Module):
    """Wraps the model so one forward computes the prior (LEM of the clean latent) and the
    velocity; distributed wrappers then see every parameter used inside a single forward."""

    def __init__(self, model: DoDModel):
        super().__init__()
        self.model = model

    def forward(self, x_t, t, y, target, x1, prior_keep):
        prior = self.model.encode_prior(x1) if prior_keep is not None else None
        v = self.model(x_t, t, y, prior_emb=prior, prior_keep=prior_keep)
        return (v.float() - target).pow(2).mean(dim=(1, 2, 3))


# --------------------------------------------------------------------------------------------
# Deterministic per-step data and noise
# --------------------------------------------------------------------------------------------


def step_generator(seed: int, step: int, stream: int = 0) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed((seed * 1_000_003 + step) * 7 + stream)
    return g


def batch_indices(seed: int, step: int, batch_size: int, dataset_size: int) -> np.ndarray:
    """Indices of the global batch of `step`: consecutive slices of per-epoch permutations."""
    start = step * batch_size
    out = []
    while len(out) < batch_size:
        epoch, offset = divmod(start + len(out), dataset_size)
        perm = np.random.default_rng([seed, epoch]).permutation(dataset_size)
        out.extend(perm[offset : offset + batch_size - len(out)].tolist())
    return np.asarray(out)


@dataclasses.dataclass
class Batch:
    x_t: torch.Tensor
    t: torch.Tensor
    y: torch.Tensor
    target: torch.Tensor
    x1: torch.Tensor
    prior_keep: torch.Tensor | None


def make_batch(exp: ExperimentConfig, latents: LatentSet, step: int, null_class: int, use_prior: bool) -> Batch:
    cfg = exp.train
    g = step_generator(cfg.seed, step)
    idx = batch_indices(cfg.seed, step, cfg.batch_size, len(latents))
    x1, y = latents.draw(idx, g)
    x0 = torch.randn(x1.shape, generator=g)
    t = sample_t(len(idx), g, kind=cfg.t_sampling, mean=cfg.t_mean, std=cfg.t_std)
    x_t, target = interpolate(x0, x1, t)
    drop_class = torch.rand(len(idx), generator=g) < cfg.class_dropout
    y = torch.where(drop_class, torch.full_like(y, null_class), y)
    prior_keep = (torch.rand(len(idx), generator=g) >= exp.lem.prior_dropout) if use_prior else None
    return Batch(x_t, t, y, target, x1, prior_keep)


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------


def list_checkpoints(state_dir: Path) -> list[Path]:
    """Finished checkpoints, oldest first (a checkpoint dir appears only once complete)."""
    return sorted(p for p in state_dir.glob("ckpt-*") if (p / "state.json").exists())


def save_checkpoint(state_dir: Path, step: int, images: int, model, ema, optimizer, log_rows, keep: int = 2):
    final = state_dir / f"ckpt-{images:012d}"
    tmp = state_dir / f".tmp-ckpt-{images:012d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(cpu_state(model), str(tmp / "model.safetensors"))
    save_file(cpu_state(ema), str(tmp / "ema.safetensors"))
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    save_json(tmp / "state.json", {"step": step, "images": images, "log": log_rows})
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)  # the directory becomes visible only when complete
    for old in list_checkpoints(state_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


# --------------------------------------------------------------------------------------------
# The training loop
# --------------------------------------------------------------------------------------------


class Preempted(Exception):
    pass


def train(
    exp: ExperimentConfig,
    latents_dir: str | Path,
    out_dir: str | Path,
    state_root: str | Path,
    *,
    stop_after_images: int | None = None,
    accelerator=None,
) -> dict:
    """Train `exp` to `exp.train.images` images; writes out_dir/{model.safetensors, model.json,
    train_log.csv, snapshots/}. Resumes from the latest checkpoint under state_root.
    `stop_after_images` stops early as if preempted (used by tests)."""
    from accelerate import Accelerator

    cfg = exp.train
    latents = LatentSet(latents_dir)
    spec = model_spec(exp, latents.latent_shape, latents.num_classes)
    run_key = fingerprint({"spec": spec, "train": dataclasses.asdict(cfg), "lem": dataclasses.asdict(exp.lem),
                           "init_from": exp.model.init_from, "latents": latents.meta,
                           "code": code_digest(TRAIN_CODE)})
    state_dir = Path(state_root) / run_key
    state_dir.mkdir(parents=True, exist_ok=True)
    out_dir = Path(out_dir)

    if accelerator is None:
        precision = cfg.mixed_precision
        if precision == "auto":
            precision = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
        accelerator = Accelerator(mixed_precision=precision)
    device = accelerator.device
    torch.manual_seed(cfg.seed)  # initial weights: same on every process
    model = build_model(spec)
    if exp.model.init_from:
        from .models import load_checkpoint_file

        model.load_backbone_state_dict(load_checkpoint_file(exp.model.init_from))
    ema = build_model(spec).requires_grad_(False)
    ema.load_state_dict(model.state_dict())
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=tuple(cfg.betas))

    total_steps = math.ceil(cfg.images / cfg.batch_size)
    step, log_rows = 0, []
    checkpoints = list_checkpoints(state_dir)
    if checkpoints:
        latest = checkpoints[-1]
        model.load_state_dict(load_file(str(latest / "model.safetensors")))
        ema.load_state_dict(load_file(str(latest / "ema.safetensors")))
        optimizer.load_state_dict(torch.load(latest / "optimizer.pt", weights_only=True))
        state = load_json(latest / "state.json")
        step, log_rows = state["step"], state["log"]
        accelerator.print(f"resuming {exp.name} from {latest.name} ({step * cfg.batch_size} images)")

    wrapped, optimizer = accelerator.prepare(PriorConditionedLoss(model), optimizer)
    ema.to(device)
    use_prior = spec["lem"] is not None
    world, rank = accelerator.num_processes, accelerator.process_index
    if cfg.batch_size % world:
        raise ValueError(f"train.batch_size={cfg.batch_size} is not divisible by the {world} processes")

    stop = {"signal": None}

    def on_signal(signum, _frame):
        stop["signal"] = signum  # finish the current step, checkpoint, exit

    previous = {s: signal.signal(s, on_signal) for s in CHECKPOINT_SIGNALS}
    every = lambda n: max(1, n // cfg.batch_size)  # noqa: E731  (images -> steps)
    snapshot_steps = {math.ceil(s / cfg.batch_size): s for s in cfg.snapshots}
    window_start, window_images = time.perf_counter(), 0
    try:
        from tqdm import tqdm

        bar = tqdm(total=total_steps * cfg.batch_size, initial=step * cfg.batch_size, unit="img",
                   disable=not accelerator.is_main_process, desc=f"train {exp.name}", mininterval=2)
        while step < total_steps:
            b = make_batch(exp, latents, step, spec["num_classes"], use_prior)
            mine = slice(rank, None, world)  # this process's share of the global batch
            lr = cfg.lr * min(1.0, (step + 1) * cfg.batch_size / cfg.warmup_images) if cfg.warmup_images else cfg.lr
            for group in optimizer.param_groups:
                group["lr"] = lr
            with accelerator.autocast():
                loss = wrapped(
                    b.x_t[mine].to(device), b.t[mine].to(device), b.y[mine].to(device), b.target[mine].to(device),
                    b.x1[mine].to(device), None if b.prior_keep is None else b.prior_keep[mine].to(device),
                ).mean()
            accelerator.backward(loss)
            if cfg.grad_clip > 0:
                accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            # EMA with a warm-up ramp (short runs would otherwise average in the random init).
            decay = min(cfg.ema_decay, (1 + step) / (10 + step))
            with torch.no_grad():
                for e, p in zip(ema.parameters(), accelerator.unwrap_model(wrapped).model.parameters()):
                    e.lerp_(p.detach().float(), 1 - decay)
            bar.update(cfg.batch_size)
            window_images += cfg.batch_size
            if step % every(cfg.log_every) == 0 or step == total_steps:
                elapsed = time.perf_counter() - window_start
                row = {"images": step * cfg.batch_size, "step": step, "loss": float(accelerator.gather(loss.detach()).mean()),
                       "lr": lr, "images_per_sec": window_images / max(elapsed, 1e-9)}
                log_rows.append(row)
                bar.set_postfix(loss=f"{row['loss']:.4f}", ips=f"{row['images_per_sec']:.0f}")
                window_start, window_images = time.perf_counter(), 0
            if step in snapshot_steps and accelerator.is_main_process:
                save_file(cpu_state(ema), str(_snapshot_path(state_dir, snapshot_steps[step])))
            preempt = stop["signal"] is not None or (
                stop_after_images is not None and step * cfg.batch_size >= stop_after_images and step < total_steps
            )
            if (step % every(cfg.checkpoint_every) == 0 or preempt or step == total_steps) and accelerator.is_main_process:
                save_checkpoint(state_dir, step, step * cfg.batch_size, accelerator.unwrap_model(wrapped).model,
                                ema, optimizer, log_rows)
            accelerator.wait_for_everyone()
            if preempt:
                raise Preempted(f"stopped at {step * cfg.batch_size} images; checkpoint in {state_dir}")
        bar.close()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)

    if accelerator.is_main_process:
        _write_outputs(out_dir, state_dir, ema, spec, log_rows, cfg.snapshots)
    return {"images": step * cfg.batch_size, "steps": step, "state_dir": str(state_dir)}


def _snapshot_path(state_dir: Path, images: int) -> Path:
    return state_dir / f"snapshot-{images:012d}.safetensors"


def _write_outputs(out_dir: Path, state_dir: Path, ema, spec, log_rows, snapshots) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "snapshots").mkdir(exist_ok=True)
    for images in snapshots:
        target = out_dir / "snapshots" / f"ema-{images:012d}.safetensors"
        with atomic_path(target) as tmp:
            shutil.copyfile(_snapshot_path(state_dir, images), tmp)
        save_json(target.with_suffix(".json"), spec)
    with atomic_path(out_dir / "train_log.csv") as tmp:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["images", "step", "loss", "lr", "images_per_sec"])
            writer.writeheader()
            writer.writerows(log_rows)
    save_weights(out_dir / "model.safetensors", ema, spec)  # written last: marks the run complete
