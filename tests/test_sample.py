"""Multi-stage sampling: per-sample seeds, shard resumption, prior chaining."""

import numpy as np
import pytest
import torch

from dodlib.config import deep_merge, parse_params
from dodlib.sample import PriorCache, RealPriors, sample_seed, sample_stage
from dodlib.tokenizers import PixelTokenizer
from dodlib.train import train
from tests.conftest import TINY_OVERRIDES, repo_params_raw


@pytest.fixture(scope="module")
def trained(prepared, tmp_path_factory):
    root = tmp_path_factory.mktemp("trained")
    params = parse_params(deep_merge(repo_params_raw(), TINY_OVERRIDES))
    exp = params.experiment("dod")
    train(exp, prepared / "latents" / "train", root / "out", root / "state")
    return params, root / "out" / "model.safetensors"


def _sample(params, weights, tmp, name, stage=1, prior=None, exp="dod", **kw):
    e = params.experiment(exp)
    tok = PixelTokenizer(e.tokenizer.space_to_depth)
    meta = sample_stage(e, stage, weights, tmp / name / "out", tmp / name / "state", tok, prior=prior, **kw)
    return meta, PriorCache(tmp / name / "out")


@pytest.mark.parametrize("sampler", ["euler", "euler_maruyama"])
def test_samples_identical_across_batch_sizes_and_resume(trained, tmp_path, sampler):
    params, weights = trained
    if sampler != "euler":
        raw = deep_merge(params.raw, {"sample": {"sampler": {"method": sampler}}})
        params = parse_params(raw)
    _, a = _sample(params, weights, tmp_path, "bs8", batch_size=8)
    _, b = _sample(params, weights, tmp_path, "bs5", batch_size=5)
    with pytest.raises(InterruptedError):
        _sample(params, weights, tmp_path, "resumed", batch_size=3, stop_after_shards=1)
    assert not (tmp_path / "resumed" / "out" / "meta.json").exists()
    _, c = _sample(params, weights, tmp_path, "resumed", batch_size=3)
    for what in ("latents", "labels", "seeds"):
        assert np.array_equal(a.load(what), b.load(what)), what
        assert np.array_equal(a.load(what), c.load(what)), what
    images_a = np.concatenate(list(a.image_batches()))
    images_c = np.concatenate(list(c.image_batches()))
    assert images_a.dtype == np.uint8 and np.array_equal(images_a, images_c)


def test_edited_sampler_code_does_not_reuse_finished_shards(trained, tmp_path, monkeypatch):
    from tests.test_train import edited_package

    params, weights = trained
    with pytest.raises(InterruptedError):
        _sample(params, weights, tmp_path, "run", batch_size=8, stop_after_shards=1)
    edited_package(tmp_path, monkeypatch, "samplers.py")
    with pytest.raises(InterruptedError):
        _sample(params, weights, tmp_path, "run", batch_size=8, stop_after_shards=1)
    assert len(list((tmp_path / "run" / "state").iterdir())) == 2


def test_three_stages_chain_priors(trained, tmp_path):
    params, weights = trained
    m1, s1 = _sample(params, weights, tmp_path, "s1", stage=1)
    m2, s2 = _sample(params, weights, tmp_path, "s2", stage=2, prior=s1)
    m3, s3 = _sample(params, weights, tmp_path, "s3", stage=3, prior=s2)
    n = params.experiment("dod").sample.num_samples
    assert len(s1.load("latents")) == len(s2.load("latents")) == len(s3.load("latents")) == n
    # same class per sample across stages, balanced classes at stage 1
    assert np.array_equal(s1.load("labels"), s2.load("labels"))
    assert np.array_equal(s1.load("labels"), np.arange(n) % 10)
    # each stage has its own seeds, derived from (index, stage)
    assert s2.load("seeds")[0] == sample_seed(0, 0, 2) != s1.load("seeds")[0]
    assert "msd_to_prior" in m2 and m2["msd_to_prior"] >= 0
    assert m1["nfe"] == params.experiment("dod").sample.sampler.num_steps


def test_stage_two_without_prior_is_an_error(trained, tmp_path):
    params, weights = trained
    with pytest.raises(ValueError, match="prior cache"):
        _sample(params, weights, tmp_path, "x", stage=2)


def test_real_priors_for_rfid(trained, prepared, tmp_path):
    params, weights = trained
    prior = RealPriors(prepared / "latents" / "val")
    meta, cache = _sample(params, weights, tmp_path, "rfid", stage=2, prior=prior)
    assert meta["prior_source"] == "real"
    labels = cache.load("labels")
    assert np.array_equal(labels, prior.take(len(cache))[1])
    assert np.array_equal(labels[:10], np.arange(10))  # class-interleaved, balanced prefix


def test_cfg_scale_changes_samples_and_counts_nfe(trained, tmp_path):
    params, weights = trained
    guided = parse_params(deep_merge(params.raw, {"sample": {"cfg": {"scale": 3.0}}}))
    _, plain = _sample(params, weights, tmp_path, "plain")
    meta, g = _sample(guided, weights, tmp_path, "guided")
    assert meta["cfg_doubles_batch"] is True
    assert not np.array_equal(plain.load("latents"), g.load("latents"))


def _finetuning(params, **stage2):
    raw = deep_merge(params.raw, {"stages": {"finetune": {"2": {"num_pairs": 40, **stage2}}}})
    return parse_params(raw).experiment("dod")


def test_pairs_regenerate_training_latents_from_t0(trained, prepared, tmp_path):
    from dodlib.sample import pair_priors

    params, weights = trained
    latents = prepared / "latents" / "train"
    runs = {}
    for t0 in (0.9, 0.3):
        exp = _finetuning(params, t0=t0)
        runs[t0] = pair_priors(exp, 2, weights, latents, tmp_path / f"t{t0}" / "out", tmp_path / f"t{t0}" / "state")
    cache = PriorCache(tmp_path / "t0.9" / "out")
    real = RealPriors(latents)
    # pair i belongs to training latent index[i]: the class-balanced prefix, with its real label
    assert np.array_equal(cache.load("index"), real.order[:40])
    assert np.array_equal(cache.load("labels"), real.take(40)[1])
    steps = params.experiment("dod").sample.sampler.num_steps
    assert runs[0.9]["nfe"] == max(1, round(steps * 0.1)) and runs[0.3]["nfe"] == round(steps * 0.7)
    # the less noise, the closer a regenerated prior stays to its clean latent
    assert runs[0.9]["msd_to_clean"] < runs[0.3]["msd_to_clean"]
    assert runs[0.9]["msd_to_clean"] < 0.5 * runs[0.9]["msd_within_class"]


def test_pairs_identical_across_batch_sizes_and_resume(trained, prepared, tmp_path):
    from dodlib.sample import pair_priors

    params, weights = trained
    exp = _finetuning(params, t0=0.5)
    latents = prepared / "latents" / "train"
    pair_priors(exp, 2, weights, latents, tmp_path / "a" / "out", tmp_path / "a" / "state", batch_size=7)
    with pytest.raises(InterruptedError):
        pair_priors(exp, 2, weights, latents, tmp_path / "b" / "out", tmp_path / "b" / "state", batch_size=3,
                    stop_after_shards=1)
    pair_priors(exp, 2, weights, latents, tmp_path / "b" / "out", tmp_path / "b" / "state", batch_size=3)
    a, b = PriorCache(tmp_path / "a" / "out"), PriorCache(tmp_path / "b" / "out")
    for what in ("latents", "labels", "seeds", "index"):
        assert np.array_equal(a.load(what), b.load(what)), what
    assert a.load("seeds")[0] != sample_seed(0, 0, 1)  # not the seeds of the stage-1 samples
