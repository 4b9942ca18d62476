#!/usr/bin/env python
"""This project's training step against a reference SiT training step, side by side in one process.

    python benchmarks/bench_sit_reference.py                  # SiT-S/2, 4x32x32, batch 16, 1000 classes
    python benchmarks/bench_sit_reference.py --size B --batch 32 --device cuda

Both networks are built from one state dict: ours (`DoDModel` with the LEM off, `learn_sigma` as
SiT's checkpoints) and a reference SiT network written here from SiT's published architecture
(DiT blocks with adaLN-Zero, timm's `Attention` and `Mlp`, label dropout inside the label
embedder). The forward outputs are compared first (they must agree), then the two training steps
are timed in alternating rounds:

- **this project**: what `dodlib.train.train` runs every step: `make_batch` (the step's generator,
  posterior draw, noise, t, class dropout) and `train_step` (loss through `velocity_loss`, backward,
  gradient-norm check, AdamW, foreach EMA with warm-up), under accelerate;
- **reference**: SiT's step as its paper and training script describe it: t ~ U(0, 1), x0 ~ N(0, I),
  x_t = t x1 + (1 - t) x0, loss = |v - (x1 - x0)|^2, AdamW, and an EMA updated parameter by parameter.

Settings as the issue's comparison: no gradient clipping, AdamW (lr 1e-4, no weight decay) + EMA
every step, LEM off. img/s per side is the median over rounds; the ratio is ours / reference.
A second table times the phases of one step on each side (batch, forward, backward, gradient
norm, optimizer, EMA), so that a gap shows where it comes from.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import sys
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.bench_dod import SyntheticLatents, base_experiment, log, parse_latent, sync  # noqa: E402
from dodlib.models.sit import sincos_pos_embed_2d  # noqa: E402
from dodlib.models.sizes import SIZES  # noqa: E402
from dodlib.models.weights import build_model, model_spec  # noqa: E402
from dodlib.train import SelfPriors  # noqa: E402
from dodlib.train_step import PriorConditionedLoss, make_batch, make_optimizer, train_step, update_ema  # noqa: E402


# --------------------------------------------------------------------------------------------
# The reference network (SiT's architecture; parameter names as in its checkpoints)
# --------------------------------------------------------------------------------------------


def _modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class _TimestepEmbedder(nn.Module):
    def __init__(self, width: int, freq: int = 256):
        super().__init__()
        self.freq = freq
        self.mlp = nn.Sequential(nn.Linear(freq, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t):
        half = self.freq // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t[:, None].float() * freqs[None]
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))


class _LabelEmbedder(nn.Module):
    """Labels -> vectors, dropping each label to the null class with probability `dropout` in training."""

    def __init__(self, num_classes: int, width: int, dropout: float):
        super().__init__()
        self.num_classes, self.dropout = num_classes, dropout
        self.embedding_table = nn.Embedding(num_classes + 1, width)

    def forward(self, y):
        if self.training and self.dropout > 0:
            y = torch.where(torch.rand(y.shape[0], device=y.device) < self.dropout, self.num_classes, y)
        return self.embedding_table(y)


class _Block(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        from timm.layers import Mlp
        from timm.models.vision_transformer import Attention

        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(width, num_heads=heads, qkv_bias=True)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(width, hidden_features=4 * width, act_layer=lambda: nn.GELU(approximate="tanh"))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))

    def forward(self, x, c):
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate1.unsqueeze(1) * self.attn(_modulate(self.norm1(x), shift1, scale1))
        return x + gate2.unsqueeze(1) * self.mlp(_modulate(self.norm2(x), shift2, scale2))


class _FinalLayer(nn.Module):
    def __init__(self, width: int, patch: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(width, patch * patch * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(_modulate(self.norm_final(x), shift, scale))


class _PatchEmbed(nn.Module):
    def __init__(self, patch: int, channels: int, width: int):
        super().__init__()
        self.proj = nn.Conv2d(channels, width, kernel_size=patch, stride=patch)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class ReferenceSiT(nn.Module):
    """SiT with learn_sigma (2C output channels, the sigma half dropped), label dropout inside."""

    def __init__(self, size: str, input_size: int, channels: int, patch: int, num_classes: int,
                 class_dropout: float):
        super().__init__()
        cfg = SIZES[size]
        self.patch, self.channels, self.grid = patch, channels, input_size // patch
        self.x_embedder = _PatchEmbed(patch, channels, cfg.width)
        self.t_embedder = _TimestepEmbedder(cfg.width)
        self.y_embedder = _LabelEmbedder(num_classes, cfg.width, class_dropout)
        self.pos_embed = nn.Parameter(sincos_pos_embed_2d(cfg.width, self.grid)[None], requires_grad=False)
        self.blocks = nn.ModuleList(_Block(cfg.width, cfg.heads) for _ in range(cfg.depth))
        self.final_layer = _FinalLayer(cfg.width, patch, 2 * channels)

    def forward(self, x, t, y):
        x = self.x_embedder(x) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y)
        for block in self.blocks:
            x = block(x, c)
        x = self.final_layer(x, c)
        g, p, co = self.grid, self.patch, 2 * self.channels
        x = torch.einsum("nhwpqc->nchpwq", x.reshape(x.shape[0], g, g, p, p, co)).reshape(x.shape[0], co, g * p, g * p)
        return x.chunk(2, dim=1)[0]


def reference_step(model, ema, optimizer, x1, y, decay: float) -> float:
    """SiT's training step: uniform t, Gaussian x0, the velocity target x1 - x0, AdamW, then the
    EMA parameter by parameter."""
    t = torch.rand(x1.shape[0], device=x1.device)
    x0 = torch.randn_like(x1)
    tt = t.view(-1, 1, 1, 1)
    x_t = tt * x1 + (1 - tt) * x0
    loss = ((model(x_t, t, y) - (x1 - x0)) ** 2).mean(dim=(1, 2, 3)).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    _reference_ema(ema, model, decay)
    return float(loss.detach())


def phase_breakdown(device, accelerator, loss_fn, ours, ema_ours, opt_ours, cfg, data, classes,
                    ref, ema_ref, opt_ref, latents, labels, rounds: int) -> dict[str, tuple]:
    """Median milliseconds of each phase of one step on each side, phase by phase (the sum is close
    to, not equal to, a step: phases timed apart lose their overlap)."""
    out: dict[str, list[list[float]]] = {}

    def timed(phase: str, side: int, fn):
        sync(device)
        t0 = time.perf_counter()
        result = fn()
        sync(device)
        out.setdefault(phase, [[], []])[side].append((time.perf_counter() - t0) * 1e3)
        return result

    for r in range(rounds):
        batch = timed("batch (draws, x_t inputs)", 0, lambda: make_batch(cfg, 0.0, data, r, classes, False))
        loss = timed("forward (loss)", 0, lambda: loss_fn(*batch.to(device)).mean())
        timed("backward", 0, lambda: accelerator.backward(loss))
        timed("gradient norm", 0, lambda: float(accelerator.clip_grad_norm_(ours.parameters(), math.inf)))
        timed("optimizer step + zero_grad", 0, lambda: (opt_ours.step(), opt_ours.zero_grad(set_to_none=True)))
        timed("EMA", 0, lambda: update_ema(ema_ours, ours, cfg.ema_decay))

        def ref_inputs():
            t = torch.rand(latents.shape[0], device=device)
            x0 = torch.randn_like(latents)
            tt = t.view(-1, 1, 1, 1)
            return t, x0, tt * latents + (1 - tt) * x0

        t, x0, x_t = timed("batch (draws, x_t inputs)", 1, ref_inputs)
        loss = timed("forward (loss)", 1, lambda: ((ref(x_t, t, labels) - (latents - x0)) ** 2).mean())
        timed("backward", 1, loss.backward)
        timed("optimizer step + zero_grad", 1, lambda: (opt_ref.step(), opt_ref.zero_grad()))
        timed("EMA", 1, lambda: _reference_ema(ema_ref, ref, cfg.ema_decay))
    return {phase: tuple(statistics.median(v) if v else None for v in sides) for phase, sides in out.items()}


def _reference_ema(ema, model, decay: float) -> None:
    with torch.no_grad():
        ema_params = OrderedDict(ema.named_parameters())
        for name, param in model.named_parameters():
            ema_params[name].mul_(decay).add_(param.data, alpha=1 - decay)


# --------------------------------------------------------------------------------------------
# The comparison
# --------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="S", choices=sorted(SIZES))
    p.add_argument("--latent", type=parse_latent, default=(4, 32, 32))
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=5, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=4, help="alternating rounds (median reported)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from accelerate import Accelerator

    device = torch.device(args.device)
    accelerator = Accelerator(cpu=device.type == "cpu")
    base = base_experiment(None)
    exp = dataclasses.replace(
        base, model=dataclasses.replace(base.model, size=args.size, learn_sigma=True),
        lem=dataclasses.replace(base.lem, enabled=False),
        train=dataclasses.replace(base.train, batch_size=args.batch, lr=1e-4, weight_decay=0.0, grad_clip=0.0,
                                  warmup_images=0, ema_decay=0.9999, t_sampling="uniform", class_dropout=0.1))
    cfg = exp.train
    c, h, _ = args.latent
    spec = model_spec(exp, args.latent, args.classes)
    torch.manual_seed(0)
    ours = build_model(spec).to(device).train()
    ref = ReferenceSiT(args.size, h, c, exp.model.patch_size, args.classes, cfg.class_dropout).to(device).train()
    with torch.no_grad():  # non-zero weights everywhere, so the forward check means something
        for param in ours.parameters():
            param.normal_(0, 0.02)
    ref.load_state_dict(ours.state_dict(), strict=True)

    # The same network: equal outputs on one input (label dropout off for the check).
    g = torch.Generator().manual_seed(1)
    x = torch.randn((4, c, h, h), generator=g).to(device)
    t, y = torch.rand(4, generator=g).to(device), torch.arange(4).to(device)
    ref.eval()
    with torch.no_grad():
        gap = float((ours(x, t, y) - ref(x, t, y)).abs().max())
    ref.train()
    log(f"forward outputs agree to {gap:.2e}")
    if gap > 1e-4:
        raise SystemExit(f"the two networks disagree (max |difference| {gap:.3g}): the comparison is void")

    ema_ours = build_model(spec).to(device).requires_grad_(False)
    ema_ours.load_state_dict(ours.state_dict())
    ema_ref = ReferenceSiT(args.size, h, c, exp.model.patch_size, args.classes, cfg.class_dropout).to(device)
    ema_ref.load_state_dict(ref.state_dict())
    ema_ref.requires_grad_(False)
    opt_ours = make_optimizer(ours, cfg, device)
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=cfg.lr, weight_decay=0.0)
    loss_fn, opt_ours = accelerator.prepare(PriorConditionedLoss(ours), opt_ours)
    data = SelfPriors(SyntheticLatents(args.latent, args.classes))
    latents = torch.randn((args.batch, c, h, h), generator=g).to(device)
    labels = torch.from_numpy(np.arange(args.batch) % args.classes).to(device)
    state = {"ours": 0, "ref": 0}

    def run_ours(n: int) -> None:
        for _ in range(n):
            s = state["ours"]
            batch = make_batch(cfg, 0.0, data, s, args.classes, False)  # built every step, as in training
            train_step(accelerator, loss_fn, ours, ema_ours, opt_ours, cfg, batch, s)
            state["ours"] += 1

    def run_ref(n: int) -> None:
        for _ in range(n):
            reference_step(ref, ema_ref, opt_ref, latents, labels, cfg.ema_decay)

    sides = {"this project": run_ours, "reference SiT step": run_ref}
    for fn in sides.values():
        fn(args.warmup)
    times = {name: [] for name in sides}
    for _ in range(args.rounds):
        for name, fn in sides.items():
            sync(device)
            t0 = time.perf_counter()
            fn(args.steps)
            sync(device)
            times[name].append(args.batch * args.steps / (time.perf_counter() - t0))
    ips = {name: statistics.median(v) for name, v in times.items()}
    phases = phase_breakdown(device, accelerator, loss_fn, ours, ema_ours, opt_ours, cfg, data, args.classes,
                             ref, ema_ref, opt_ref, latents, labels, args.rounds)
    print(f"SiT-{args.size}/{exp.model.patch_size} training step, latent {'x'.join(map(str, args.latent))}, "
          f"batch {args.batch}, {args.classes} classes, {device}, threads {torch.get_num_threads()}, "
          f"{args.rounds} rounds of {args.steps} steps")
    for name, v in ips.items():
        print(f"  {name:<20} {v:8.2f} img/s   (rounds: {', '.join(f'{x:.2f}' for x in times[name])})")
    print(f"  ratio this project / reference: {ips['this project'] / ips['reference SiT step']:.2f}")
    print("where a step's time goes, ms (median of rounds; the phases of one step, timed one by one):")
    print(f"  {'phase':<28}{'this project':>14}{'reference':>12}")
    for phase, (a, b) in phases.items():
        cell = lambda v: f"{v:12.2f}" if v is not None else f"{'-':>12}"  # noqa: E731
        print(f"  {phase:<28}  {cell(a)}{cell(b)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
