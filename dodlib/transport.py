"""Linear-interpolant transport: the path, the training objective, and the conversions of v.

Conventions (as SiT): t = 0 is noise, t = 1 is data,

    x_t = t * x1 + (1 - t) * x0,   x0 ~ N(0, I) noise, x1 data,
    v   = d x_t / dt = x1 - x0     (the velocity the network predicts).

Conversions for a velocity prediction v(x, t) at the point x = x_t (exact for the
conditional expectations, hence for the Bayes-optimal network):

    x1_hat = x + (1 - t) * v          (data prediction)
    x0_hat = x - t * v                (noise prediction)
    score  = -x0_hat / (1 - t) = (t * v - x) / (1 - t)

The last line follows from x_t | x1 ~ N(t x1, (1 - t)^2 I), so
grad log p_t(x) = -E[x0 | x_t = x] / (1 - t).

Reverse-time SDE (sampling from t = 0 to 1). For any w(t) >= 0,

    dx = [v + w(t) * score] dt + sqrt(2 w(t)) dW

has the same marginals p_t as the ODE dx = v dt (Fokker-Planck: the extra drift
w * score cancels the extra diffusion term w * Laplacian). SiT's default diffusion
form is "sigma": w(t) = diffusion_scale * sigma_t = diffusion_scale * (1 - t). With it
the score's 1/(1 - t) cancels, so the drift is finite everywhere on [0, 1]:

    drift(x, t) = v + diffusion_scale * (t * v - x).

`sde_drift` and `sde_diffusion` live with the sampler that integrates them (dodlib/samplers.py), so
that an edit of the SDE reruns sampling but not training (the stages' code dependencies follow
imports: dodlib/code_deps.py).

The training objective, samplers and guidance are kept orthogonal: samplers only see a
velocity function, the loss only sees a model function.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from .choices import T_SAMPLINGS

__all__ = [
    "expand_t",
    "interpolate",
    "sample_t",
    "velocity_loss",
    "velocity_to_x1",
    "velocity_to_x0",
    "velocity_to_score",
    "score_to_velocity",
]



def expand_t(t: Tensor | float, x: Tensor) -> Tensor:
    """Broadcast t (a number, a 0-d tensor or shape [B]) against x of shape [B, ...]."""
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    if t.ndim == 0:
        return t
    if t.ndim != 1 or t.shape[0] != x.shape[0]:
        raise ValueError(f"t must be a scalar or have shape [{x.shape[0]}], got {tuple(t.shape)}")
    return t.reshape(-1, *([1] * (x.ndim - 1)))


def interpolate(x0: Tensor, x1: Tensor, t: Tensor | float) -> tuple[Tensor, Tensor]:
    """Point on the path and its velocity target: (x_t, v) with x_t = t x1 + (1-t) x0, v = x1 - x0."""
    if x0.shape != x1.shape:
        raise ValueError(f"noise and data shapes differ: {tuple(x0.shape)} vs {tuple(x1.shape)}")
    tb = expand_t(t, x1)
    return tb * x1 + (1 - tb) * x0, x1 - x0


def sample_t(
    batch: int,
    generator: torch.Generator | None = None,
    kind: str = "uniform",
    mean: float = 0.0,
    std: float = 1.0,
    eps: float = 1e-5,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Training times, shape [batch].

    kind="uniform": t ~ U(0, 1) (SiT's default).
    kind="logit_normal": t = sigmoid(z), z ~ N(mean, std^2) (SD3-style; median sigmoid(mean)).

    Both are clamped to [eps, 1 - eps]. The velocity loss itself is well posed at the
    endpoints, but conversions to score / x0 divide by t or 1 - t; keeping t strictly inside
    (0, 1) makes any such use finite at the cost of a negligible 2*eps probability mass.
    eps = 0 disables the clamp. With the default float32, 1 - 1e-5 is still < 1.
    """
    if kind not in T_SAMPLINGS:
        raise ValueError(f"t_kind: unknown {kind!r} (expected one of {T_SAMPLINGS})")
    if not 0 <= eps < 0.5:
        raise ValueError(f"eps: must be in [0, 0.5), got {eps}")
    if generator is not None and device is None:
        device = generator.device
    if kind == "uniform":
        t = torch.rand(batch, generator=generator, device=device, dtype=dtype)
    else:
        if std <= 0:
            raise ValueError(f"std: must be positive, got {std}")
        z = torch.randn(batch, generator=generator, device=device, dtype=dtype)
        t = torch.sigmoid(z * std + mean)
    return t.clamp(eps, 1 - eps) if eps > 0 else t


def velocity_loss(
    model_fn: Callable[..., Tensor],
    x1: Tensor,
    *,
    generator: torch.Generator | None = None,
    t_kind: str = "uniform",
    t_mean: float = 0.0,
    t_std: float = 1.0,
    t_eps: float = 1e-5,
    t: Tensor | None = None,
    noise: Tensor | None = None,
    **model_kwargs: Any,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Flow-matching loss ||model_fn(x_t, t, **model_kwargs) - (x1 - x0)||^2, mean over non-batch dims.

    Random draws, in this order from `generator` (global RNG if None): t (skipped if given),
    then the noise x0 (skipped if given). Passing both makes the loss deterministic (e.g. a
    fixed validation loss). Returns (loss per sample [B] in float32, aux) where aux holds
    "t" [B] so the caller can log the loss per noise level.
    """
    b = x1.shape[0]
    if t is None:
        t = sample_t(b, generator, t_kind, t_mean, t_std, t_eps, device=x1.device, dtype=x1.dtype)
    if noise is None:
        noise = torch.randn(x1.shape, generator=generator, device=x1.device, dtype=x1.dtype)
    x_t, v_target = interpolate(noise, x1, t)
    v_pred = model_fn(x_t, t, **model_kwargs)
    if v_pred.shape != v_target.shape:
        raise ValueError(f"model output shape {tuple(v_pred.shape)} != target shape {tuple(v_target.shape)}")
    # float32 so that a bf16/fp16 model output does not lose the loss's precision
    err = (v_pred.float() - v_target.float()).square()
    loss = err.mean(dim=tuple(range(1, err.ndim))) if err.ndim > 1 else err
    return loss, {"t": t.detach()}


def velocity_to_x1(v: Tensor, x: Tensor, t: Tensor | float) -> Tensor:
    """Data prediction x1_hat = x + (1 - t) v."""
    return x + (1 - expand_t(t, x)) * v


def velocity_to_x0(v: Tensor, x: Tensor, t: Tensor | float) -> Tensor:
    """Noise prediction x0_hat = x - t v."""
    return x - expand_t(t, x) * v


def velocity_to_score(v: Tensor, x: Tensor, t: Tensor | float) -> Tensor:
    """Score grad log p_t(x) = (t v - x) / (1 - t); singular at t = 1 (use sde_drift instead)."""
    tb = expand_t(t, x)
    return (tb * v - x) / (1 - tb)


def score_to_velocity(score: Tensor, x: Tensor, t: Tensor | float) -> Tensor:
    """Inverse of velocity_to_score: v = (x + (1 - t) score) / t; singular at t = 0."""
    tb = expand_t(t, x)
    return (x + (1 - tb) * score) / tb
