"""The precision policy and the compile option (dodlib/compute.py), checked on the CPU: bf16
autocast reaches the network only, the sampler's state stays float32, the resolved precision keys
the sampling state and is recorded, and a compiled network saves the same weights as an eager one."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import dodlib.sample as S
from dodlib import compute
from dodlib.config import ConfigError, deep_merge, parse_params
from dodlib.io import load_json
from dodlib.samplers import SamplerSpec
from dodlib.tokenizers import PixelTokenizer
from dodlib.models.weights import build_model, model_spec
from dodlib.train import train
from tests.conftest import TINY_OVERRIDES, repo_params_raw


@pytest.fixture
def exp():
    return parse_params(deep_merge(repo_params_raw(), TINY_OVERRIDES)).experiment("dod")


def test_auto_is_float32_on_the_cpu_and_choices_are_validated():
    assert compute.resolve_precision("auto", "cpu") == "no"
    assert compute.resolve_precision("bf16", "cpu") == "bf16"
    with pytest.raises(ValueError, match="mixed_precision: 'fp8'"):
        compute.resolve_precision("fp8", "cpu")
    with pytest.raises(ConfigError, match="sample.mixed_precision"):
        parse_params(deep_merge(repo_params_raw(), {"sample": {"mixed_precision": "half"}}))


def test_bf16_sampling_runs_the_network_in_bf16_and_keeps_the_sampler_state_float32(exp, monkeypatch):
    model = build_model(model_spec(exp, (12, 8, 8), 10)).eval()
    torch.manual_seed(0)
    with torch.no_grad():  # DiT's zero-initialised output layers would make every velocity 0
        for p in model.parameters():
            p.normal_(0, 0.05)
    seen = {"net": set(), "x": set(), "v": set()}
    first_linear = next(m for m in model.blocks[0].modules() if isinstance(m, torch.nn.Linear))
    first_linear.register_forward_hook(lambda _m, _i, out: seen["net"].add(out.dtype))
    real_run_sampler = S.run_sampler

    def spy(spec, velocity_fn, x, noise_fn, **kw):
        def watched(x, t):
            seen["x"].add(x.dtype)
            v = velocity_fn(x, t)
            seen["v"].add(v.dtype)
            return v
        return real_run_sampler(spec, watched, x, noise_fn, **kw)

    monkeypatch.setattr(S, "run_sampler", spy)
    seeds, labels = list(range(6)), torch.arange(6) % 10
    priors = torch.randn(6, 12, 8, 8)
    with torch.inference_mode():
        x, _, _ = S.sample_batch(model, SamplerSpec(method="euler_maruyama", num_steps=4), exp.sample.cfg, seeds,
                                 labels, micro_batch=4, device="cpu", priors=priors, precision="bf16")
        x32, _, _ = S.sample_batch(model, SamplerSpec(method="euler_maruyama", num_steps=4), exp.sample.cfg, seeds,
                                   labels, micro_batch=4, device="cpu", priors=priors)
    assert seen["net"] == {torch.bfloat16, torch.float32}  # the bf16 run, then the float32 one
    assert seen["x"] == {torch.float32} and seen["v"] == {torch.float32}
    assert x.dtype == torch.float32 and torch.isfinite(x).all()
    assert not torch.equal(x, x32)  # bf16 really ran: the numbers differ, a little
    assert (x - x32).abs().max() < 0.5


def test_the_resolved_precision_keys_the_sampling_state_and_is_recorded(exp, prepared, tmp_path):
    weights = tmp_path / "train"
    train(exp, prepared / "latents" / "train", weights, tmp_path / "tstate")
    runs = {}
    for precision in ("no", "bf16"):
        e = dataclasses.replace(exp, sample=dataclasses.replace(exp.sample, mixed_precision=precision))
        out = tmp_path / precision
        meta = S.sample_stage(e, 1, weights / "model.safetensors", out, tmp_path / "state",
                              PixelTokenizer(exp.tokenizer.space_to_depth), num_samples=20)
        runs[precision] = (meta, np.load(out / "latents-00000.npy"))
        assert meta["precision"] == precision
        assert load_json(out / "provenance.json")["precision"] == precision  # what evaluation records
    assert runs["no"][0]["fingerprint"] != runs["bf16"][0]["fingerprint"]
    assert len(list((tmp_path / "state").iterdir())) == 2  # no resumption across precisions
    assert not np.array_equal(runs["no"][1], runs["bf16"][1])


def test_a_compiled_network_trains_and_saves_the_same_keys_as_an_eager_one(exp, prepared, tmp_path, monkeypatch):
    # The "eager" backend runs the graphs Dynamo captures without code generation: the wiring is
    # what is tested here, not Inductor.
    monkeypatch.setattr(compute, "COMPILE_BACKEND", "eager")
    torch._dynamo.reset()
    short = dataclasses.replace(exp.train, images=64, checkpoint_every=32, snapshots=[])
    eager = dataclasses.replace(exp, train=short)
    compiled = dataclasses.replace(exp, train=dataclasses.replace(short, compile=True))
    from torch._dynamo.utils import counters

    graphs = {}
    for name, e in (("eager", eager), ("compiled", compiled)):
        counters.clear()
        train(e, prepared / "latents" / "train", tmp_path / name, tmp_path / f"{name}-state")
        graphs[name] = counters["stats"]["unique_graphs"]
    assert graphs["eager"] == 0 and graphs["compiled"] >= 1  # Dynamo captured the network only when asked
    a = load_file(str(tmp_path / "eager" / "model.safetensors"))
    b = load_file(str(tmp_path / "compiled" / "model.safetensors"))
    assert list(a) == list(b) and not any("_orig_mod" in k for k in b)
    # same math: the eager backend replays the same kernels
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    (ckpt,) = [p for p in (tmp_path / "compiled-state").rglob("ckpt-*")][-1:]
    assert list(load_file(str(ckpt / "model.safetensors"))) == list(a)
