"""Several processes (`--processes N` re-launches through `accelerate launch`; on this CPU-only
machine the processes form a gloo group): sampling splits the shards and gives the same bytes as
one process; data-parallel training gives the same network as one process up to rounding."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from dodlib import pipeline as P
from dodlib.config import deep_merge, parse_params
from dodlib.priors import PriorCache
from dodlib.sample import sample_stage
from dodlib.tokenizers import PixelTokenizer
from dodlib.train import train
from tests.conftest import TINY_OVERRIDES, repo_params_raw
from tests.workspace import dod_workspace

pytestmark = pytest.mark.slow


def dod(ws: Path, *args: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "dodlib.cli", *args], cwd=ws, env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]


@pytest.fixture(scope="module")
def raw():
    return deep_merge(repo_params_raw(), TINY_OVERRIDES)


def test_sampling_with_two_processes_equals_one(raw, prepared, tmp_path):
    params = parse_params(raw)
    exp = params.experiment("dod")
    weights = tmp_path / "one" / "train"
    train(exp, prepared / "latents" / "train", weights, tmp_path / "one" / "state")
    sample_stage(exp, 1, weights / "model.safetensors", tmp_path / "one" / "s1", tmp_path / "one" / "ss1",
                 PixelTokenizer(exp.tokenizer.space_to_depth))

    ws = dod_workspace(tmp_path / "ws", prepared, raw)
    shutil.copytree(weights, ws / P.train_dir("dod"))
    dod(ws, "sample", "--experiment", "dod", "--stage", "1", "--processes", "2")
    one, two = PriorCache(tmp_path / "one" / "s1"), PriorCache(ws / P.stage_dir("dod", 1))
    assert two.meta["num_shards"] >= 2  # both processes had shards to write
    for what in ("latents", "labels", "seeds"):
        assert np.array_equal(one.load(what), two.load(what)), what
    assert np.array_equal(np.concatenate(list(one.image_batches())), np.concatenate(list(two.image_batches())))


def test_training_with_two_processes_matches_one(raw, prepared, tmp_path):
    raw = deep_merge(raw, {"train": {"images": 512}})
    exp = parse_params(raw).experiment("sit")
    train(exp, prepared / "latents" / "train", tmp_path / "one" / "out", tmp_path / "one" / "state")
    ws = dod_workspace(tmp_path / "ws", prepared, raw)
    dod(ws, "train", "--experiment", "sit", "--processes", "2")
    a = load_file(str(tmp_path / "one" / "out" / "model.safetensors"))
    b = load_file(str(ws / P.weights_path("sit")))
    # Each process takes every other row of the global batch and DDP averages the gradients:
    # the same updates as one process, summed in another order.
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-3, atol=1e-4, msg=k)


@pytest.mark.parametrize("world", [2, 4])
def test_each_process_draws_its_rows_of_the_same_global_batch(raw, prepared, world):
    """The rows process r draws (r, r + world, ...) are bit for bit the rows of the one-process
    batch, for every field: the global batch does not depend on the process count."""
    from dodlib.latents import LatentSet
    from dodlib.train import SelfPriors
    from dodlib.train_step import make_batch

    exp = parse_params(raw).experiment("dod")
    data = SelfPriors(LatentSet(prepared / "latents" / "train"))
    for step in (0, 7):
        whole = make_batch(exp.train, 0.5, data, step, 10, True)
        shares = [make_batch(exp.train, 0.5, data, step, 10, True, rank, world) for rank in range(world)]
        for field in ("x1", "x0", "t", "y", "prior_latent", "prior_keep"):
            rebuilt = torch.empty_like(getattr(whole, field))
            for rank, share in enumerate(shares):
                rebuilt[rank::world] = getattr(share, field)
            assert torch.equal(rebuilt, getattr(whole, field)), (step, field)
