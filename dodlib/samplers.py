"""ODE / SDE samplers for the linear interpolant, integrating from t = 0 (noise) to t = 1 (data).

Every sampler only sees `velocity_fn(x, t) -> v`, where t is a tensor of shape [B] (one
time per sample, all equal, dtype of x), so guidance and conditioning live in the closure.
Every sampler returns (x, nfe): nfe counts calls of velocity_fn, i.e. network evaluations
as papers count them (a batched cond+uncond CFG call counts once).

Time grids are uniform (torch.linspace semantics, computed in float64):

  euler           num_steps steps on [0, 1]                                 NFE = num_steps
  heun            num_steps steps on [0, 1], 2nd-order correction on every
                  step including the last (v is finite at t = 1 for a
                  velocity model, so no Euler fallback is needed)           NFE = 2 * num_steps
  euler_maruyama  last_step="mean"/"euler": num_steps stochastic steps on
                  [0, 1 - last_step_size], then one deterministic step of
                  size last_step_size to t = 1                              NFE = num_steps + 1
                  last_step=None: num_steps stochastic steps on [0, 1]      NFE = num_steps

SiT's "250-step" SDE is 249 stochastic steps + the mean step, i.e. num_steps=249 here.
`t_start` > 0 starts the integration from a partly noised latent x_t (SDEdit-style
regeneration, used to build the paired prior caches of fine-tuned stages); the grid then
covers [t_start, 1] with num_steps steps.
Samplers do not disable autograd; wrap calls in torch.inference_mode() when sampling.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from . import choices
from .choices import check_registry
from .transport import expand_t

__all__ = ["SAMPLERS", "Sampler", "SamplerSpec", "sde_diffusion", "sde_drift", "euler", "heun", "euler_maruyama", "run_sampler", "time_grid"]

VelocityFn = Callable[[Tensor, Tensor], Tensor]
NoiseFn = Callable[[int], Tensor]

LAST_STEPS = ("mean", "euler", None)


# The SDE of the linear interpolant (SiT's "sigma" form), which euler_maruyama integrates.


def sde_diffusion(t: Tensor | float, diffusion_scale: float = 1.0) -> Tensor | float:
    """SiT's "sigma" diffusion form w(t) = diffusion_scale * (1 - t); the noise std per unit time is sqrt(2 w)."""
    return diffusion_scale * (1 - t)


def sde_drift(v: Tensor, x: Tensor, t: Tensor | float, diffusion_scale: float = 1.0) -> Tensor:
    """Drift v + w(t) * score with w(t) = diffusion_scale * (1 - t), simplified to v + scale * (t v - x).

    The simplified form is exact and finite at t = 1, unlike going through velocity_to_score.
    """
    tb = expand_t(t, x)
    return v + diffusion_scale * (tb * v - x)


def time_grid(num_steps: int, t_end: float = 1.0, t_start: float = 0.0) -> list[float]:
    """num_steps + 1 uniform times from t_start to t_end, as Python floats (float64 step sizes)."""
    if num_steps < 1:
        raise ValueError(f"num_steps: must be >= 1, got {num_steps}")
    if not 0 <= t_start < t_end:
        raise ValueError(f"t_start: must be in [0, {t_end}), got {t_start}")
    return torch.linspace(t_start, t_end, num_steps + 1, dtype=torch.float64).tolist()


def _t_batch(t: float, x: Tensor) -> Tensor:
    return torch.full((x.shape[0],), t, dtype=x.dtype, device=x.device)


def euler(velocity_fn: VelocityFn, x0: Tensor, num_steps: int, t_start: float = 0.0) -> tuple[Tensor, int]:
    """Explicit Euler on the probability-flow ODE dx = v dt. NFE = num_steps."""
    ts = time_grid(num_steps, t_start=t_start)
    x = x0
    for t_cur, t_next in zip(ts[:-1], ts[1:]):
        x = x + (t_next - t_cur) * velocity_fn(x, _t_batch(t_cur, x))
    return x, num_steps


def heun(velocity_fn: VelocityFn, x0: Tensor, num_steps: int, t_start: float = 0.0) -> tuple[Tensor, int]:
    """Heun's method (explicit trapezoid) on dx = v dt. NFE = 2 * num_steps."""
    ts = time_grid(num_steps, t_start=t_start)
    x = x0
    for t_cur, t_next in zip(ts[:-1], ts[1:]):
        h = t_next - t_cur
        v_cur = velocity_fn(x, _t_batch(t_cur, x))
        x_pred = x + h * v_cur
        v_next = velocity_fn(x_pred, _t_batch(t_next, x))
        x = x + 0.5 * h * (v_cur + v_next)
    return x, 2 * num_steps


def euler_maruyama(
    velocity_fn: VelocityFn,
    x0: Tensor,
    num_steps: int,
    noise_fn: NoiseFn,
    diffusion_scale: float = 1.0,
    last_step: str | None = "mean",
    last_step_size: float = 0.04,
    t_start: float = 0.0,
) -> tuple[Tensor, int]:
    """Euler-Maruyama on dx = [v + w score] dt + sqrt(2 w) dW, w(t) = diffusion_scale (1 - t) (SiT "sigma").

    noise_fn(i) returns the standard normal draw (shape of x0) for stochastic step i in
    0..num_steps-1; deriving it from per-sample seeds makes results batch-size independent.
    last_step: "mean" (SiT default) takes a final noise-free step with the SDE drift from
    t = 1 - last_step_size to 1; "euler" the same with the plain velocity; None puts the
    stochastic grid on all of [0, 1]. NFE = num_steps (+ 1 for a last step).
    """
    if last_step not in LAST_STEPS:
        raise ValueError(f"last_step: unknown {last_step!r} (expected one of {LAST_STEPS})")
    if last_step is not None and not 0 < last_step_size < 1:
        raise ValueError(f"last_step_size: must be in (0, 1), got {last_step_size}")
    if diffusion_scale < 0:
        raise ValueError(f"diffusion_scale: must be >= 0, got {diffusion_scale}")
    t_end = 1.0 if last_step is None else 1.0 - last_step_size
    ts = time_grid(num_steps, t_end, t_start)
    x = x0
    for i, (t_cur, t_next) in enumerate(zip(ts[:-1], ts[1:])):
        h = t_next - t_cur
        v = velocity_fn(x, _t_batch(t_cur, x))
        z = noise_fn(i)
        if z.shape != x.shape:
            raise ValueError(f"noise_fn({i}) returned shape {tuple(z.shape)}, expected {tuple(x.shape)}")
        g = math.sqrt(2.0 * sde_diffusion(t_cur, diffusion_scale) * h)
        x = x + h * sde_drift(v, x, t_cur, diffusion_scale) + g * z.to(dtype=x.dtype, device=x.device)
    if last_step is None:
        return x, num_steps
    v = velocity_fn(x, _t_batch(t_end, x))
    drift = sde_drift(v, x, t_end, diffusion_scale) if last_step == "mean" else v
    return x + last_step_size * drift, num_steps + 1


@dataclass(frozen=True)
class SamplerSpec:
    """A sampler and its settings; field names match config.SamplerConfig (plus last_step)."""

    method: str = "euler"
    num_steps: int = 50
    diffusion_scale: float = 1.0  # SDE only
    last_step_size: float = 0.04  # SDE only
    last_step: str | None = "mean"  # SDE only: mean | euler | None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if self.method not in SAMPLERS:
            raise ValueError(f"method: unknown sampler {self.method!r} (expected one of {tuple(SAMPLERS)})")
        if isinstance(self.num_steps, bool) or not isinstance(self.num_steps, int) or self.num_steps < 1:
            raise ValueError(f"num_steps: must be an integer >= 1, got {self.num_steps!r}")
        if self.method == "euler_maruyama":
            if self.diffusion_scale < 0:
                raise ValueError(f"diffusion_scale: must be >= 0, got {self.diffusion_scale}")
            if self.last_step not in LAST_STEPS:
                raise ValueError(f"last_step: unknown {self.last_step!r} (expected one of {LAST_STEPS})")
            if self.last_step is not None and not 0 < self.last_step_size < 1:
                raise ValueError(f"last_step_size: must be in (0, 1), got {self.last_step_size}")

    @property
    def nfe(self) -> int:
        """Network evaluations one run of this sampler uses (known before running)."""
        return SAMPLERS[self.method].nfe(self)


@dataclass(frozen=True)
class Sampler:
    """One entry of the registry: how to run a spec, and its NFE (known before running)."""

    run: Callable[[SamplerSpec, VelocityFn, Tensor, NoiseFn | None, float], tuple[Tensor, int]]
    nfe: Callable[[SamplerSpec], int]


def _run_euler_maruyama(spec: SamplerSpec, velocity_fn: VelocityFn, x0: Tensor, noise_fn: NoiseFn | None,
                        t_start: float) -> tuple[Tensor, int]:
    if noise_fn is None:
        raise ValueError("noise_fn: required for method 'euler_maruyama' (derive it from per-sample seeds)")
    return euler_maruyama(velocity_fn, x0, spec.num_steps, noise_fn, diffusion_scale=spec.diffusion_scale,
                          last_step=spec.last_step, last_step_size=spec.last_step_size, t_start=t_start)


# The samplers by name (config validation, `SamplerSpec.nfe` and `run_sampler` all read this table):
# adding a sampler is one function, one entry here and its name in dodlib/choices.py.
SAMPLERS: dict[str, Sampler] = {
    "euler": Sampler(run=lambda spec, v, x0, noise_fn, t_start: euler(v, x0, spec.num_steps, t_start),
                     nfe=lambda spec: spec.num_steps),
    "heun": Sampler(run=lambda spec, v, x0, noise_fn, t_start: heun(v, x0, spec.num_steps, t_start),
                    nfe=lambda spec: 2 * spec.num_steps),
    "euler_maruyama": Sampler(run=_run_euler_maruyama,
                              nfe=lambda spec: spec.num_steps + (0 if spec.last_step is None else 1)),
}
check_registry("samplers", choices.SAMPLERS, SAMPLERS)


def run_sampler(
    spec: SamplerSpec, velocity_fn: VelocityFn, x0: Tensor, noise_fn: NoiseFn | None = None, t_start: float = 0.0
) -> tuple[Tensor, int]:
    """Run `spec` from x0, the state at t_start; returns (x at t = 1, NFE used)."""
    spec.validate()  # cheap; rejects specs mutated after construction (object.__setattr__)
    return SAMPLERS[spec.method].run(spec, velocity_fn, x0, noise_fn, t_start)
