"""One step of training: the batch of step `s`, the loss, and the update (optimizer, EMA, schedule).

`train.train` runs these in its loop (with checkpoints, logging and signals around them) and
`benchmarks/bench_dod.py` times the very same functions, so the benchmark cannot drift from what
training does.

All randomness of step `s` (batch order, flips, posterior samples, noise, t, class and prior
dropout) comes from one generator seeded by (train.seed, s): a resumed run replays exactly what an
uninterrupted one would have done.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch
import torch.nn as nn

from .compute import autocast
from .config import TrainConfig
from .transport import sample_t, velocity_loss


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
    """What the loss needs for each row: the clean latent x1, its noise x0 and time t (the
    interpolant x_t is made by the loss, on the device), the class (null class where dropped), the
    latent the LEM encodes into the prior, and which rows keep their prior (None: no LEM)."""

    x1: torch.Tensor
    x0: torch.Tensor
    t: torch.Tensor
    y: torch.Tensor
    prior_latent: torch.Tensor
    prior_keep: torch.Tensor | None

    def rows(self, which) -> "Batch":
        """The rows `which` (an index or a slice) of every field."""
        return Batch(*(None if v is None else v[which] for v in dataclasses.astuple(self)))

    def to(self, device) -> tuple[torch.Tensor | None, ...]:
        """The loss's arguments, in its order, on `device`."""
        return tuple(None if v is None else v.to(device) for v in dataclasses.astuple(self))


def make_batch(cfg: TrainConfig, prior_dropout: float, data, step: int, null_class: int, use_prior: bool,
               rank: int = 0, world: int = 1) -> Batch:
    """Process `rank`'s rows (rank, rank + world, ...) of the global batch of `step` from `data`
    (`train.SelfPriors` or `train.PairedPriors`).

    The step's generator draws the random numbers of the whole global batch, always in the same
    order (cheap), while the latents are gathered only for this process's rows: every process count
    trains on bit-identical global batches (tests/test_distributed.py)."""
    g = step_generator(cfg.seed, step)
    idx = batch_indices(cfg.seed, step, cfg.batch_size, len(data))
    mine = slice(rank, None, world)
    x1, y, prior_latent = data.draw(idx, g, rows=mine)
    x0 = torch.randn((len(idx), *x1.shape[1:]), generator=g)[mine]
    t = sample_t(len(idx), g, kind=cfg.t_sampling, mean=cfg.t_mean, std=cfg.t_std)[mine]
    drop_class = (torch.rand(len(idx), generator=g) < cfg.class_dropout)[mine]
    y = torch.where(drop_class, torch.full_like(y, null_class), y)
    prior_keep = (torch.rand(len(idx), generator=g) >= prior_dropout)[mine] if use_prior else None
    return Batch(x1, x0, t, y, prior_latent, prior_keep)


class PriorConditionedLoss(nn.Module):
    """Wraps the model so one forward computes the prior (LEM of `prior_latent`) and the
    flow-matching loss per row; distributed wrappers then see every parameter used inside a
    single forward."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x1, x0, t, y, prior_latent, prior_keep):
        prior = self.model.encode_prior(prior_latent) if prior_keep is not None else None

        def velocity(x_t, t):
            return self.model(x_t, t, y, prior_emb=prior, prior_keep=prior_keep)

        loss, _ = velocity_loss(velocity, x1, t=t, noise=x0)
        return loss


def learning_rate(cfg: TrainConfig, step: int) -> float:
    """Linear warm-up over `warmup_images`, then constant."""
    if not cfg.warmup_images:
        return cfg.lr
    return cfg.lr * min(1.0, (step + 1) * cfg.batch_size / cfg.warmup_images)


def ema_decay(cfg: TrainConfig, steps_done: int) -> float:
    """EMA decay after `steps_done` steps: a warm-up ramp, so that a short run does not average
    in the random initialisation."""
    return min(cfg.ema_decay, (1 + steps_done) / (10 + steps_done))


def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema <- ema + (1 - decay) (model - ema), every parameter in one multi-tensor call (the
    parameters stay float32 under autocast, so no cast is needed)."""
    with torch.no_grad():
        torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - decay)


def make_optimizer(model: nn.Module, cfg: TrainConfig, device) -> torch.optim.Optimizer:
    """AdamW; on CUDA its fused kernel (one launch for every parameter). The CPU keeps torch's
    default implementation, whose bytes the committed results were made with."""
    fused = True if torch.device(device).type == "cuda" else None
    return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=tuple(cfg.betas),
                             fused=fused)


class NonFiniteStep(RuntimeError):
    """The loss or the gradient norm of a step is NaN or infinite; raised before the optimizer
    applies the step, so model, optimizer and EMA still hold the last good state."""

    def __init__(self, what: str, loss: float, grad_norm: float):
        super().__init__(f"non-finite {what} (loss {loss}, gradient norm {grad_norm})")
        self.what, self.loss, self.grad_norm = what, loss, grad_norm


@dataclasses.dataclass
class StepResult:
    loss: torch.Tensor  # this process's mean loss, detached (gather it across processes to log)
    loss_value: float
    grad_norm: float
    lr: float


def train_step(accelerator, loss_fn: nn.Module, model: nn.Module, ema: nn.Module, optimizer, cfg: TrainConfig,
               batch: Batch, step: int, precision: str | None = None) -> StepResult:
    """Step `step` (0-based) on `batch`: loss, backward, clipping, optimizer and EMA update.

    `loss_fn` is the prepared `PriorConditionedLoss` around `model` (the bare network, whose
    parameters are clipped and averaged into `ema`). The forward runs under `precision`'s
    autocast (default: the accelerator's mixed precision)."""
    lr = learning_rate(cfg, step)
    for group in optimizer.param_groups:
        group["lr"] = lr
    device = accelerator.device
    with autocast(precision or accelerator.mixed_precision, device):
        loss = loss_fn(*batch.to(device)).mean()
    accelerator.backward(loss)
    # The gradient norm is the same on every process (gradients are all-reduced), so all of them
    # stop together; max_norm=inf measures without changing a gradient.
    grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
    loss_value, norm_value = float(loss.detach()), float(grad_norm)
    if not (math.isfinite(loss_value) and math.isfinite(norm_value)):
        raise NonFiniteStep("loss" if not math.isfinite(loss_value) else "gradient norm", loss_value, norm_value)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    update_ema(ema, model, ema_decay(cfg, step + 1))
    return StepResult(loss.detach(), loss_value, norm_value, lr)
