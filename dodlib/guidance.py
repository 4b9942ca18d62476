"""Classifier-free guidance (CFG) on velocity predictions, and guidance-scale schedules.

Guided velocity: v = v_u + s(t) * (v_c - v_u), with v_c / v_u the conditional /
unconditional predictions. Both come from ONE batched forward on [cond; uncond], counted as
one function evaluation (as papers count NFE). At s == 1 the unconditional branch is skipped.

Schedules of s(t) in SiT time (t = 0 noise, t = 1 data), for a nominal `scale`:

  constant      s(t) = scale
  interval      s(t) = scale for lo <= t <= hi, else 1 (guidance interval, Kynkaanniemi
                et al. 2024, expressed in t instead of sigma)
  power_cosine  s(t) = 1 + (scale - 1) * (1 - cos(pi * t**power)) / 2
                (MDT's schedule; MDT writes it with (1 - t_ddpm/T), which is our t). It
                rises from 1 at t = 0 to `scale` at t = 1; power > 1 delays the rise.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import torch
from torch import Tensor

from .choices import CFG_CHANNELS, CFG_SCHEDULES

__all__ = ["guidance_scale", "guided_velocity", "make_guided_velocity_fn"]



def guidance_scale(
    t: Tensor | float,
    scale: float,
    schedule: str = "constant",
    interval: tuple[float, float] | list[float] = (0.0, 1.0),
    power: float = 1.0,
) -> Tensor | float:
    """Guidance scale at time t (a number or a tensor; the result has the same kind)."""
    if schedule == "constant":
        return torch.full_like(t, scale) if isinstance(t, Tensor) else float(scale)
    if schedule == "interval":
        lo, hi = interval
        if not lo <= hi:
            raise ValueError(f"interval: expected lo <= hi, got {tuple(interval)}")
        if isinstance(t, Tensor):
            inside = (t >= lo) & (t <= hi)
            return torch.where(inside, torch.full_like(t, scale), torch.ones_like(t))
        return float(scale) if lo <= t <= hi else 1.0
    if schedule == "power_cosine":
        if power <= 0:
            raise ValueError(f"power: must be positive, got {power}")
        if isinstance(t, Tensor):
            ramp = (1 - torch.cos(math.pi * t.clamp(0, 1) ** power)) / 2
        else:
            ramp = (1 - math.cos(math.pi * min(max(t, 0.0), 1.0) ** power)) / 2
        return 1 + (scale - 1) * ramp
    raise ValueError(f"schedule: unknown {schedule!r} (expected one of {CFG_SCHEDULES})")


def _is_one(scale: Tensor | float) -> bool:
    if isinstance(scale, Tensor):
        return bool((scale == 1).all())
    return scale == 1


def _cat_kwargs(cond: Mapping[str, Any], uncond: Mapping[str, Any]) -> dict[str, Any]:
    """Stack [cond; uncond] per key: tensors along dim 0, None stays None, other values must agree."""
    if set(cond) != set(uncond):
        raise ValueError(f"cond/uncond kwargs have different keys: {sorted(cond)} vs {sorted(uncond)}")
    out: dict[str, Any] = {}
    for k, c in cond.items():
        u = uncond[k]
        if c is None and u is None:
            out[k] = None
        elif isinstance(c, Tensor) and isinstance(u, Tensor):
            out[k] = torch.cat([c, u], dim=0)
        elif isinstance(c, Tensor) or isinstance(u, Tensor) or c is None or u is None:
            raise ValueError(f"{k}: cond and uncond must both be tensors or both None, got {type(c)} / {type(u)}")
        elif c == u:
            out[k] = c  # a shared non-tensor option, e.g. a flag
        else:
            raise ValueError(f"{k}: non-tensor values differ between cond ({c!r}) and uncond ({u!r})")
    return out


def guided_velocity(
    model_fn: Callable[..., Tensor],
    x: Tensor,
    t: Tensor | float,
    cond_kwargs: Mapping[str, Any],
    uncond_kwargs: Mapping[str, Any],
    scale: Tensor | float,
    channels: str = "all",
) -> Tensor:
    """CFG velocity v_u + scale * (v_c - v_u) from one batched call model_fn([x; x], [t; t], **[cond; uncond]).

    t: a number or shape [B]; the model always receives a [B] (or [2B]) tensor.
    scale: a number or a per-sample tensor [B].
    channels: "all" guides every channel (default); "first3" is SiT's legacy behaviour that
    guides channels 0..2 only, so channels >= 3 keep the conditional prediction.
    If scale == 1 everywhere, returns model_fn(x, t, **cond_kwargs) without the uncond branch.
    """
    if channels not in CFG_CHANNELS:
        raise ValueError(f"channels: unknown {channels!r} (expected one of {CFG_CHANNELS})")
    b = x.shape[0]
    t = torch.as_tensor(t, device=x.device)
    if not t.is_floating_point():
        t = t.to(x.dtype)
    if t.ndim == 0:
        t = t.expand(b)
    if _is_one(scale):
        return model_fn(x, t, **cond_kwargs)
    out = model_fn(torch.cat([x, x], dim=0), torch.cat([t, t], dim=0), **_cat_kwargs(cond_kwargs, uncond_kwargs))
    v_c, v_u = out[:b], out[b:]
    s = torch.as_tensor(scale, dtype=v_c.dtype, device=v_c.device)
    if s.ndim == 1:
        s = s.reshape(-1, *([1] * (v_c.ndim - 1)))
    if channels == "all":
        return v_u + s * (v_c - v_u)
    guided = v_u[:, :3] + s * (v_c[:, :3] - v_u[:, :3])
    return torch.cat([guided, v_c[:, 3:]], dim=1)


def make_guided_velocity_fn(
    model_fn: Callable[..., Tensor],
    cond_kwargs: Mapping[str, Any],
    uncond_kwargs: Mapping[str, Any],
    scale: float,
    schedule: str = "constant",
    interval: tuple[float, float] | list[float] = (0.0, 1.0),
    power: float = 1.0,
    channels: str = "all",
) -> Callable[[Tensor, Tensor], Tensor]:
    """velocity_fn(x, t) for the samplers: guided_velocity with the scheduled scale at each t.

    The scale is evaluated per sample from t [B]; where the schedule gives 1 for every sample
    (e.g. outside a guidance interval) the unconditional branch is skipped.
    """
    if schedule not in CFG_SCHEDULES:
        raise ValueError(f"schedule: unknown {schedule!r} (expected one of {CFG_SCHEDULES})")

    def velocity_fn(x: Tensor, t: Tensor) -> Tensor:
        s = guidance_scale(t.float(), scale, schedule, interval, power)  # float32: bf16 t is coarse
        return guided_velocity(model_fn, x, t, cond_kwargs, uncond_kwargs, s, channels)

    return velocity_fn
