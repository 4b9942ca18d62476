"""How the network runs on its device: the precision policy, TF32, and the optional torch.compile.

One policy for every job that runs a network:

- `train.mixed_precision` (training) and `sample.mixed_precision` (sampling and the regeneration
  of paired priors) take `auto | no | bf16 | fp16`. `auto` is bf16 on a GPU that supports it and
  `no` (float32) everywhere else, so the CPU embedded default runs exactly as before.
- Under bf16/fp16 only the network runs in autocast; its output is cast back to float32 before
  anything else sees it. The sampler state x, the time grid, the CFG combination and the SDE noise
  stay float32: an ODE accumulated in bf16 loses the samples' detail.
- On CUDA every float32 matmul and convolution may use TF32 (`allow_tf32`): evaluation, the probe,
  VAE decoding and fp32 training then run on the tensor cores too. CPU numerics are not touched.
- `train.compile` / `sample.compile` compile the network's forward (`nn.Module.compile`, in
  place: the module and its state-dict keys stay the same, so checkpoints, resumption and
  `init_from` never see `_orig_mod.` prefixes). Sampling feeds the network fixed-shape micro-batches
  (`sample.fixed_shape`), so one graph serves every step.

The resolved precision is part of the sampling state key (a bf16 run never resumes fp32 shards)
and of each job's runtime record, which evaluation copies into the stage's metrics JSON.
"""

from __future__ import annotations

import contextlib
import functools

# torch is imported inside the functions: config.py reads PRECISIONS before `runtime.pin`, which
# must run before torch is first imported.
PRECISIONS = ("auto", "no", "bf16", "fp16")
# torch.compile's backend; tests set "eager" to check the wiring without a C++ toolchain's compile time.
COMPILE_BACKEND = "inductor"


def resolve_precision(choice: str, device) -> str:
    """`no`, `bf16` or `fp16` for `choice` on `device` (`auto`: bf16 where the GPU supports it)."""
    if choice not in PRECISIONS:
        raise ValueError(f"mixed_precision: {choice!r} is not one of {', '.join(PRECISIONS)}")
    if choice != "auto":
        return choice
    import torch

    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16"
    return "no"


def allow_tf32() -> None:
    """Let float32 matmuls and cuDNN convolutions use TF32 on CUDA (a no-op without CUDA: CPU
    matmul precision settings would change the CPU's bytes)."""
    import torch

    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def autocast(precision: str, device):
    """The autocast context of `precision` on `device` (a null context for `no`)."""
    import torch

    if precision == "no":
        return contextlib.nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def in_precision(fn, precision: str, device):
    """`fn` run under `precision`'s autocast, its tensor output returned as float32."""
    if precision == "no":
        return fn

    @functools.wraps(fn)
    def call(*args, **kwargs):
        with autocast(precision, device):
            out = fn(*args, **kwargs)
        return out.float()

    return call


def compile_network(module, enabled: bool):
    """Compile `module`'s forward in place when `enabled` (fixed shapes: `dynamic=False`)."""
    if enabled:
        module.compile(backend=COMPILE_BACKEND, dynamic=False)
    return module


__all__ = ["COMPILE_BACKEND", "PRECISIONS", "allow_tf32", "autocast", "compile_network", "in_precision",
           "resolve_precision"]
