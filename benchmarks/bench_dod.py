#!/usr/bin/env python
"""Throughput benchmark of DoD: training and per-stage sampling speed against the machine's matmul peak.

    python benchmarks/bench_dod.py                        # tiny and small, embedded-default geometry
    python benchmarks/bench_dod.py --size S --tokens 64   # one size, 8x8 token grid
    python benchmarks/bench_dod.py --json bench.json      # also save every figure

Sections (one column per model size in the final table; see benchmarks/README.md):

1. matmul peak: best achieved GFLOP/s of a large fp32 ``torch.mm``, measured at the start and at the
   end of the run (the machine's measured peak = the better of the two; a large change flags load).
2. training: one step = forward of ``PriorConditionedLoss`` (LEM of the clean latent + backbone),
   backward, gradient clipping, AdamW step and EMA update - the body of ``dodlib.train.train`` -
   on batches from ``make_batch`` (synthetic latents, built outside the timed region).  Also with
   the LEM disabled (plain SiT), so the LEM's training overhead is visible.
3. sampling: stage 1 (no prior) and stage k >= 2 (prior through the LEM once per batch) with the
   real code path of ``dodlib.sample.sample_stage``: per-sample seeded noise, ``fixed_shape``
   micro-batches, ``_velocity_fn`` (CFG) and ``run_sampler``, under ``torch.inference_mode``.
   Tokenizer decoding and file writing are not included.
4. peak RSS of the process after each section (a high-water mark: it never goes down).

The model and training/sampling settings come from the base experiment of ``--params``
(params.yaml: LEM width/depth/bottleneck, prior and class dropout, micro_batch, ...); the command
line sets the size, geometry, batch and sampler steps.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import gc
import json
import math
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(REPO))

from dodlib.compute import allow_tf32, compile_network  # noqa: E402
from dodlib.config import CFGConfig, ExperimentConfig, load_params, parse_params  # noqa: E402
from dodlib.models.sizes import SIZES  # noqa: E402
from dodlib.sample import sample_batch, sample_seed  # noqa: E402
from dodlib.samplers import SamplerSpec  # noqa: E402
from dodlib.models.weights import build_model, model_spec  # noqa: E402
from dodlib.train import SelfPriors  # noqa: E402
from dodlib.train_step import PriorConditionedLoss, make_batch, make_optimizer, train_step  # noqa: E402


# The network's precision and whether it is compiled (dodlib/compute.py), one table section each.
VARIANTS = {"fp32": ("no", False), "bf16": ("bf16", False), "bf16+compile": ("bf16", True)}


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, MiB (ru_maxrss is KiB on Linux, bytes on macOS)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / (1024 * 1024) if sys.platform == "darwin" else r / 1024


def busy_cpus(seconds: float = 1.0) -> float | None:
    """CPUs kept busy by other processes, measured from /proc/stat while this one sleeps (None off Linux)."""

    def read() -> tuple[int, int]:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        idle = v[3] + (v[4] if len(v) > 4 else 0)  # idle + iowait
        return sum(v[:8]) - idle, sum(v[:8])

    try:
        b0, t0 = read()
        time.sleep(seconds)
        b1, t1 = read()
    except (OSError, ValueError, IndexError):
        return None
    return (os.cpu_count() or 1) * (b1 - b0) / max(t1 - t0, 1)


class SyntheticLatents:
    """Stands in for `dodlib.latents.LatentSet` in `make_batch`: Gaussian latents, balanced labels."""

    def __init__(self, shape: tuple[int, int, int], num_classes: int, size: int = 4096):
        self.latent_shape, self.num_classes, self.size = tuple(shape), num_classes, size
        self.meta: dict = {}

    def __len__(self) -> int:
        return self.size

    def draw(self, index, generator, rows=slice(None)):
        index = np.asarray(index)
        x = torch.randn((len(index),) + self.latent_shape, generator=generator)[rows]
        return x, torch.from_numpy(index[rows] % self.num_classes).long()


def parse_latent(text: str) -> tuple[int, int, int]:
    try:
        c, h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--latent: expected CxHxW (e.g. 12x8x8), got {text!r}") from None
    if h != w or min(c, h, w) < 1:
        raise argparse.ArgumentTypeError(f"--latent: need C, H = W >= 1, got {text!r}")
    return c, h, w


def base_experiment(params: str | None) -> ExperimentConfig:
    if params:
        return load_params(params).base
    default = REPO / "params.yaml"
    return load_params(default).base if default.exists() else parse_params({}).base


# --------------------------------------------------------------------------------------------
# 1. matmul peak
# --------------------------------------------------------------------------------------------


def bench_matmul(n: int, repeats: int, device: torch.device, dtype=torch.float32) -> dict:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device, dtype)
    b = torch.randn(n, n, generator=g).to(device, dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    for _ in range(2):  # warm-up
        torch.mm(a, b, out=out)
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b, out=out)
        sync(device)
        times.append(time.perf_counter() - t0)
    flops = 2 * n**3
    return {
        "n": n,
        "repeats": repeats,
        "gflops_peak": flops / min(times) / 1e9,  # best repeat = the peak
        "gflops_median": flops / statistics.median(times) / 1e9,
    }


# --------------------------------------------------------------------------------------------
# 2. training
# --------------------------------------------------------------------------------------------


def bench_train(exp: ExperimentConfig, latent_shape, num_classes: int, warmup: int, steps: int,
                accelerator, precision: str = "no", compiled: bool = False) -> dict:
    """Images/s of `dodlib.train_step.train_step`, the step `dodlib.train.train` runs (one process),
    with the network in `precision` and optionally compiled."""
    cfg = exp.train
    device = accelerator.device
    spec = model_spec(exp, latent_shape, num_classes)
    use_prior = spec["lem"] is not None
    torch.manual_seed(cfg.seed)
    model = build_model(spec).to(device).train()
    ema = build_model(spec).requires_grad_(False).to(device)
    ema.load_state_dict(model.state_dict())
    optimizer = make_optimizer(model, cfg, device)
    compile_network(model, compiled)
    wrapped, optimizer = accelerator.prepare(PriorConditionedLoss(model), optimizer)
    latents = SyntheticLatents(latent_shape, num_classes)
    # A few distinct batches, made before timing (the synthetic data path is not what we measure).
    data = SelfPriors(latents)  # stage-1 training: the LEM sees each clean latent
    batches = [make_batch(cfg, exp.lem.prior_dropout, data, s, num_classes, use_prior)
               for s in range(min(4, warmup + steps))]

    def one_step(i: int) -> None:
        train_step(accelerator, wrapped, model, ema, optimizer, cfg, batches[i % len(batches)], i, precision)

    for i in range(warmup):
        one_step(i)
    sync(device)
    t0 = time.perf_counter()
    for i in range(warmup, warmup + steps):
        one_step(i)
    sync(device)
    seconds = time.perf_counter() - t0
    flops = model.flops_per_forward(1)
    fwd = flops["backbone"] + flops["lem"]  # the LEM runs on every row in training (dropout masks it)
    ips = cfg.batch_size * steps / seconds
    out = {
        "lem": use_prior,
        "batch": cfg.batch_size,
        "steps": steps,
        "seconds_per_step": seconds / steps,
        "images_per_sec": ips,
        "fwd_flops_per_image": fwd,
        "gflops": 3 * fwd * ips / 1e9,  # forward + backward ~ 3 x forward
        "params": model.num_params("total"),
    }
    del model, ema, optimizer, wrapped, batches
    accelerator.free_memory()
    gc.collect()
    return out


# --------------------------------------------------------------------------------------------
# 3. sampling
# --------------------------------------------------------------------------------------------


def sample_once(model, exp: ExperimentConfig, stage: int, rows: int, spec: SamplerSpec, cfg: CFGConfig,
                prior_latents: torch.Tensor | None, device: torch.device,
                precision: str = "no") -> tuple[torch.Tensor, float, float]:
    """One batch of `sample_stage` (`dodlib.sample.sample_batch`, without decoding); returns
    (x, seconds, lem seconds)."""
    num_classes = model.config["num_classes"]
    index = np.arange(rows)
    sync(device)
    t0 = time.perf_counter()
    seeds = [sample_seed(exp.sample.seed, int(i), stage) for i in index]
    labels = torch.from_numpy(index % num_classes).long()
    with torch.inference_mode():
        x, _nfe, lem_seconds = sample_batch(model, spec, cfg, seeds, labels, micro_batch=exp.sample.micro_batch,
                                            device=device, priors=prior_latents, precision=precision)
    sync(device)
    return x, time.perf_counter() - t0, lem_seconds


def bench_sample(exp: ExperimentConfig, latent_shape, num_classes: int, rows: int, steps: int,
                 cfg_scale: float, repeats: int, device: torch.device, precision: str = "no",
                 compiled: bool = False) -> dict:
    spec_m = model_spec(exp, latent_shape, num_classes)
    torch.manual_seed(exp.train.seed)
    model = compile_network(build_model(spec_m).to(device).eval(), compiled)
    run = lambda *a: sample_once(model, exp, *a, device, precision)  # noqa: E731
    sampler = SamplerSpec(method="euler", num_steps=steps)
    flops = model.flops_per_forward(1)
    # Warm-up (allocator, kernels) with a short sampler: stage 1 and stage 2, CFG on and off.
    warm = SamplerSpec(method="euler", num_steps=2)
    x1, _, _ = run(1, rows, warm, CFGConfig(scale=cfg_scale), None)
    run(2, rows, warm, CFGConfig(scale=1.0), x1)
    run(1, rows, warm, CFGConfig(scale=1.0), None)

    out = {"rows": rows, "micro_batch": exp.sample.micro_batch, "steps": steps, "cfg_scale": cfg_scale,
           "precision": precision, "compile": compiled}
    prior = None
    for stage in (1, 2):
        for scale in (1.0, cfg_scale):
            cfg = CFGConfig(scale=scale)
            runs = []
            for _ in range(repeats):
                x, sec, lem_sec = run(stage, rows, sampler, cfg, prior)
                runs.append((sec, lem_sec))
            runs_seconds = [r[0] for r in runs]
            if stage == 1 and scale == 1.0:
                prior = x  # stage k's prior is a stage-1 output, as in the pipeline
            sec = statistics.median(r[0] for r in runs)
            lem_sec = statistics.median(r[1] for r in runs)
            ips = rows / sec
            useful = steps * flops["backbone"] * (2 if scale != 1 else 1) + (flops["lem"] if stage > 1 else 0)
            key = f"stage{'1' if stage == 1 else 'k'}_cfg{'1' if scale == 1 else 'x'}"
            out[key] = {
                "stage": stage,
                "cfg_scale": scale,
                "seconds": sec,
                "seconds_runs": runs_seconds,
                "images_per_sec": ips,
                "lem_seconds": lem_sec,
                "lem_share": lem_sec / sec,
                "lem_flops_share": (flops["lem"] / useful) if stage > 1 else 0.0,
                "gflops": useful * ips / 1e9,
            }
            log(f"  sample {key}: {ips:.1f} img/s ({sec:.2f} s for {rows} images)")
    del model
    gc.collect()
    return out


# --------------------------------------------------------------------------------------------
# the run and the table
# --------------------------------------------------------------------------------------------


def bench_size(size: str, base: ExperimentConfig, args, accelerator) -> dict:
    device = accelerator.device
    exp = dataclasses.replace(
        base,
        model=dataclasses.replace(base.model, size=size),
        train=dataclasses.replace(base.train, batch_size=args.batch),
        sample=dataclasses.replace(base.sample, micro_batch=args.micro_batch or base.sample.micro_batch),
    )
    sit = dataclasses.replace(exp, lem=dataclasses.replace(exp.lem, enabled=False))
    latent = args.latent
    res: dict = {"size": size}
    probe = build_model(model_spec(exp, latent, args.classes))
    res["model"] = {
        "depth": SIZES[size].depth, "width": SIZES[size].width, "tokens": probe.num_tokens,
        "params_backbone": probe.num_params("backbone"), "params_lem": probe.num_params("lem"),
        "flops_per_forward": probe.flops_per_forward(1), "lem_config": probe.config["lem"],
    }
    del probe

    res["variants"] = {}
    for variant in args.variants:
        precision, compiled = VARIANTS[variant]
        v = res["variants"][variant] = {}
        log(f"{size} [{variant}]: training, LEM on (batch {args.batch}, {args.train_steps} steps after "
            f"{args.train_warmup})")
        v["train_dod"] = bench_train(exp, latent, args.classes, args.train_warmup, args.train_steps, accelerator,
                                     precision, compiled)
        log(f"  {v['train_dod']['images_per_sec']:.1f} img/s")
        log(f"{size} [{variant}]: training, LEM off (plain SiT)")
        v["train_sit"] = bench_train(sit, latent, args.classes, args.train_warmup, args.train_steps, accelerator,
                                     precision, compiled)
        log(f"  {v['train_sit']['images_per_sec']:.1f} img/s")
        v["rss_after_train_mb"] = peak_rss_mb()
        rows = args.sample_batch or exp.sample.micro_batch
        log(f"{size} [{variant}]: sampling ({rows} images, Euler {args.steps} steps, CFG 1 and {args.cfg_scale})")
        v["sample"] = bench_sample(exp, latent, args.classes, rows, args.steps, args.cfg_scale,
                                   args.sample_repeats, device, precision, compiled)
        v["rss_after_sample_mb"] = peak_rss_mb()
    res.update(res["variants"][args.variants[0]])  # the first variant's figures at the top level
    return res


def _f(v: float, digits: int = 1) -> str:
    return f"{v:,.{digits}f}"


def table(results: list[dict], meta: dict) -> str:
    peak = meta.get("matmul_peak_gflops", meta["matmul"]["gflops_peak"])
    s = results[0]["sample"]
    scale = s["cfg_scale"]
    rows: list[tuple[str, list[str]]] = []

    def row(label: str, fn) -> None:
        rows.append((label, [fn(r) for r in results]))

    def section(label: str) -> None:
        rows.append((label, None))

    section("machine")
    row(f"matmul peak GFLOP/s (fp32 mm {meta['matmul']['n']}^2)", lambda r: _f(peak))
    row("  at start / at end", lambda r: f"{_f(meta['matmul']['gflops_peak'])} / "
        + (_f(meta["matmul_end"]["gflops_peak"]) if "matmul_end" in meta else "-"))
    if "matmul_bf16" in meta:
        row(f"matmul peak GFLOP/s (bf16 mm {meta['matmul_bf16']['n']}^2)",
            lambda r: _f(meta["matmul_bf16"]["gflops_peak"]))
    row("peak RSS after matmul, MiB", lambda r: _f(meta["rss_after_matmul_mb"], 0))
    section("model")
    row("depth x width / tokens", lambda r: f"{r['model']['depth']}x{r['model']['width']} / {r['model']['tokens']}")
    row("params backbone / LEM, M", lambda r: f"{r['model']['params_backbone'] / 1e6:.2f} / {r['model']['params_lem'] / 1e6:.2f}")
    row("fwd MFLOP/img backbone / LEM",
        lambda r: f"{r['model']['flops_per_forward']['backbone'] / 1e6:.1f} / {r['model']['flops_per_forward']['lem'] / 1e6:.1f}")
    for variant in meta["variants"]:
        precision, _ = VARIANTS[variant]
        vpeak = meta["matmul_bf16"]["gflops_peak"] if precision == "bf16" else peak
        vname = "bf16" if precision == "bf16" else "fp32"
        section(f"training [{variant}] (batch {results[0]['train_dod']['batch']}, fwd+bwd+AdamW+EMA)")
        for key, name in (("train_dod", "DoD (LEM prior)"), ("train_sit", "SiT (LEM off)")):
            row(f"{name} img/s", lambda r, k=key, v=variant: _f(r["variants"][v][k]["images_per_sec"]))
            row(f"{name} ms/step", lambda r, k=key, v=variant: _f(1e3 * r["variants"][v][k]["seconds_per_step"]))
            row(f"{name} GFLOP/s (3 x fwd) / % {vname} peak",
                lambda r, k=key, v=variant, pk=vpeak: f"{_f(r['variants'][v][k]['gflops'])} / "
                f"{100 * r['variants'][v][k]['gflops'] / pk:.1f}%")
        row("LEM training overhead (time)",
            lambda r, v=variant: f"+{100 * (r['variants'][v]['train_sit']['images_per_sec'] / r['variants'][v]['train_dod']['images_per_sec'] - 1):.1f}%")
        row("peak RSS after training, MiB", lambda r, v=variant: _f(r["variants"][v]["rss_after_train_mb"], 0))
        section(f"sampling [{variant}] (Euler {s['steps']} steps, {s['rows']} images, micro-batch {s['micro_batch']})")
        for key, name in (("stage1_cfg1", "stage 1, CFG 1"), ("stage1_cfgx", f"stage 1, CFG {scale:g}"),
                          ("stagek_cfg1", "stage k, CFG 1"), ("stagek_cfgx", f"stage k, CFG {scale:g}")):
            row(f"{name} img/s", lambda r, k=key, v=variant: _f(r["variants"][v]["sample"][k]["images_per_sec"]))
            row(f"{name} GFLOP/s / % {vname} peak",
                lambda r, k=key, v=variant, pk=vpeak: f"{_f(r['variants'][v]['sample'][k]['gflops'])} / "
                f"{100 * r['variants'][v]['sample'][k]['gflops'] / pk:.1f}%")
            if key.startswith("stagek"):
                row(f"{name} LEM share time / FLOPs",
                    lambda r, k=key, v=variant: f"{100 * r['variants'][v]['sample'][k]['lem_share']:.2f}% / "
                    f"{100 * r['variants'][v]['sample'][k]['lem_flops_share']:.2f}%")
        row("peak RSS after sampling, MiB", lambda r, v=variant: _f(r["variants"][v]["rss_after_sample_mb"], 0))
    row("LEM FLOPs / backbone FLOPs",
        lambda r: f"+{100 * r['model']['flops_per_forward']['lem'] / r['model']['flops_per_forward']['backbone']:.1f}%")

    headers = [r["size"] for r in results]
    w0 = max(len(label) for label, _ in rows) + 2
    widths = [max(len(h), *(len(v[i]) for _, v in rows if v)) for i, h in enumerate(headers)]
    lines = [
        f"DoD benchmark  {meta['date']}  torch {meta['torch']}  {meta['device']}  threads {meta['threads']}"
        f"  cpus {meta['cpu_count']}  latent {'x'.join(map(str, meta['latent']))}"
        f"  busy cpus at start {meta['busy_cpus_start'] if meta['busy_cpus_start'] is None else round(meta['busy_cpus_start'], 2)}"
        f"  ({meta.get('seconds', 0):.0f} s)",
        "".ljust(w0) + "  ".join(h.rjust(w) for h, w in zip(headers, widths)),
    ]
    lines.append("-" * len(lines[-1]))
    for label, values in rows:
        if values is None:
            lines.append(f"[{label}]")
        else:
            lines.append(("  " + label).ljust(w0) + "  ".join(v.rjust(w) for v, w in zip(values, widths)))
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--size", nargs="+", default=["tiny", "small"], choices=sorted(SIZES),
                   help="model sizes, one table column each")
    p.add_argument("--latent", type=parse_latent, default=(12, 8, 8),
                   help="latent geometry CxHxW (12x8x8 = the embedded default: 16x16 RGB, space-to-depth 2)")
    p.add_argument("--tokens", type=int, default=None,
                   help="token count (a square number); overrides H = W of --latent as patch x sqrt(tokens)")
    p.add_argument("--classes", type=int, default=10, help="number of classes (10 = digits, 1000 = ImageNet)")
    p.add_argument("--batch", type=int, default=None, help="training batch size (default: params train.batch_size)")
    p.add_argument("--train-steps", type=int, default=40, help="timed training steps")
    p.add_argument("--train-warmup", type=int, default=2, help="untimed training steps first")
    p.add_argument("--steps", type=int, default=50, help="Euler sampler steps (NFE)")
    p.add_argument("--cfg-scale", type=float, default=5.5, help="the CFG > 1 column's scale (paper: 5.5)")
    p.add_argument("--sample-batch", type=int, default=None, help="images per sampling run (default: micro_batch)")
    p.add_argument("--micro-batch", type=int, default=None, help="network micro-batch (default: params sample.micro_batch)")
    p.add_argument("--sample-repeats", type=int, default=3, help="timed runs per sampling setting (median)")
    p.add_argument("--matmul-n", type=int, default=2048)
    p.add_argument("--matmul-repeats", type=int, default=10)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--params", default=None, help="params file whose base experiment sets LEM/train/sample options "
                                                  "(default: the repository's params.yaml)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--variants", default=None,
                   help=f"comma-separated, of {', '.join(VARIANTS)} (default: fp32 on a CPU, all three on CUDA)")
    p.add_argument("--json", default=None, help="save all figures to this JSON file")
    args = p.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    from accelerate import Accelerator

    device = torch.device(args.device)
    args.variants = (args.variants or ("fp32" if device.type == "cpu" else ",".join(VARIANTS))).split(",")
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        p.error(f"--variants: unknown {unknown[0]!r} (choose from {', '.join(VARIANTS)})")
    allow_tf32()  # as in every dod job: float32 matmuls on CUDA may use TF32 ("fp32" rows = TF32 there)
    # The training step runs under accelerate as in `dodlib.train.train` (one process here).
    accelerator = Accelerator(cpu=device.type == "cpu")
    base = base_experiment(args.params)
    args.batch = args.batch or base.train.batch_size
    patch = base.model.patch_size
    c, h, _ = args.latent
    if args.tokens is not None:
        side = math.isqrt(args.tokens)
        if side * side != args.tokens:
            p.error(f"--tokens: {args.tokens} is not a square number")
        h = side * patch
    if h % patch:
        p.error(f"latent size {h} is not divisible by the patch size {patch}")
    args.latent = (c, h, h)

    meta = {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "device": str(device),
        "latent": list(args.latent),
        "variants": args.variants,
        "args": {k: v for k, v in vars(args).items() if k != "latent"},
    }
    meta["loadavg_start"] = list(os.getloadavg())
    meta["busy_cpus_start"] = busy_cpus()
    if meta["busy_cpus_start"] is not None and meta["busy_cpus_start"] > 0.2:
        log(f"WARNING: other processes keep {meta['busy_cpus_start']:.1f} CPUs busy; with every core running "
            "an OpenMP thread the figures can be many times too low (try --threads 1, or wait)")
    log(f"matmul peak: fp32 mm {args.matmul_n}^2 x {args.matmul_repeats}")
    meta["matmul"] = bench_matmul(args.matmul_n, args.matmul_repeats, device)
    if any(VARIANTS[v][0] == "bf16" for v in args.variants):
        meta["matmul_bf16"] = bench_matmul(args.matmul_n, args.matmul_repeats, device, torch.bfloat16)
        log(f"  bf16: {meta['matmul_bf16']['gflops_peak']:.1f} GFLOP/s")
    meta["rss_after_matmul_mb"] = peak_rss_mb()
    log(f"  {meta['matmul']['gflops_peak']:.1f} GFLOP/s")

    t_start = time.perf_counter()
    results = [bench_size(size, base, args, accelerator) for size in args.size]
    meta["seconds"] = time.perf_counter() - t_start
    # Measured again at the end: a changed peak means the machine's load changed during the run.
    meta["matmul_end"] = bench_matmul(args.matmul_n, args.matmul_repeats, device)
    meta["loadavg_end"] = list(os.getloadavg())
    drift = meta["matmul_end"]["gflops_peak"] / meta["matmul"]["gflops_peak"] - 1
    meta["matmul_peak_gflops"] = max(meta["matmul"]["gflops_peak"], meta["matmul_end"]["gflops_peak"])
    text = table(results, meta)
    if abs(drift) > 0.15:
        text += (f"\nWARNING: the matmul peak changed by {100 * drift:+.0f}% during the run "
                 "(other load?); the figures are not reliable")
    print(text)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"meta": meta, "results": results, "table": text}, indent=2, default=str) + "\n")
        log(f"figures saved to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
