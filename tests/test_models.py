"""Tests of the SiT backbone, the LEM and the combined DoD model (CPU, fast)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from dodlib.models import SIZES, DoDModel, LatentEmbeddingModule, load_checkpoint_file, sincos_pos_embed_2d

# Small but non-trivial setting: 8x8x4 latents, patch 2 -> 16 tokens.
BASE = dict(input_size=8, in_channels=4, num_classes=10, size="tiny", patch_size=2)
LEM = {"kind": "lem", "width": 64, "depth_enc": 1, "depth_dec": 1, "heads": 4, "bottleneck_dim": 2,
       "token_pool": 1, "injection": "add_tokens"}


def make(lem=None, seed=0, **kw):
    torch.manual_seed(seed)
    return DoDModel(**{**BASE, **kw}, lem=None if lem is None else {**LEM, **lem}).eval()


def inputs(b=4, seed=1, model=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 4, 8, 8, generator=g)
    t = torch.rand(b, generator=g)
    y = torch.randint(0, 10, (b,), generator=g)
    prior_latent = torch.randn(b, 4, 8, 8, generator=g)
    return x, t, y, prior_latent


@torch.no_grad()
def perturb(module: torch.nn.Module, *names: str, std: float = 0.05, seed: int = 123) -> None:
    """Make zero-initialised layers non-zero (as after training) so outputs depend on everything."""
    g = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        if p.requires_grad and any(name.startswith(n) for n in names):
            p.add_(torch.randn(p.shape, generator=g) * std)


BACKBONE_ZERO_INIT = ("blocks.", "final_layer.")  # adaLN-Zero modulations and the output layer


# ---------------------------------------------------------------------------------------------
# SiT-XL/2 checkpoint layout
# ---------------------------------------------------------------------------------------------

XL2_NON_BLOCK = {
    "pos_embed": (1, 256, 1152),
    "x_embedder.proj.weight": (1152, 4, 2, 2),
    "x_embedder.proj.bias": (1152,),
    "t_embedder.mlp.0.weight": (1152, 256),
    "t_embedder.mlp.0.bias": (1152,),
    "t_embedder.mlp.2.weight": (1152, 1152),
    "t_embedder.mlp.2.bias": (1152,),
    "y_embedder.embedding_table.weight": (1001, 1152),
    "final_layer.linear.weight": (32, 1152),
    "final_layer.linear.bias": (32,),
    "final_layer.adaLN_modulation.1.weight": (2304, 1152),
    "final_layer.adaLN_modulation.1.bias": (2304,),
}
XL2_BLOCK = {  # per block; the LayerNorms have no parameters
    "attn.qkv.weight": (3456, 1152),
    "attn.qkv.bias": (3456,),
    "attn.proj.weight": (1152, 1152),
    "attn.proj.bias": (1152,),
    "mlp.fc1.weight": (4608, 1152),
    "mlp.fc1.bias": (4608,),
    "mlp.fc2.weight": (1152, 4608),
    "mlp.fc2.bias": (1152,),
    "adaLN_modulation.1.weight": (6912, 1152),
    "adaLN_modulation.1.bias": (6912,),
}
SIT_XL2_PARAMS = 675_129_632  # published SiT-XL/2 / DiT-XL/2 total, pos_embed included


def test_xl2_matches_official_checkpoint_layout():
    with torch.device("meta"):
        m = DoDModel(input_size=32, in_channels=4, num_classes=1000, size="XL", patch_size=2, learn_sigma=True)
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    expected = dict(XL2_NON_BLOCK)
    for i in range(28):
        expected.update({f"blocks.{i}.{k}": s for k, s in XL2_BLOCK.items()})
    assert shapes == expected  # exact key set and shapes
    assert len(m.blocks) == 28
    assert m.num_params() == SIT_XL2_PARAMS
    assert m.num_params("lem") == 0
    assert not m.pos_embed.requires_grad
    # DiT reports 118.6 "Gflops" for XL/2, which are multiply-accumulates; we report 2 x MACs.
    flops = m.flops_per_forward()
    assert flops["lem"] == 0
    assert flops["backbone"] == pytest.approx(2 * 118.6e9, rel=0.01)


def test_sizes_table():
    assert {k: (v.depth, v.width, v.heads) for k, v in SIZES.items()} == {
        "S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16),
        "tiny": (4, 128, 4), "small": (6, 256, 4),
    }
    assert all(v.mlp_ratio == 4 for v in SIZES.values())


def test_pos_embed_matches_dit_numpy_construction():
    # Reference: MAE/DiT construction with np.meshgrid(w, h) ('xy' indexing), emb = [emb(col), emb(row)].
    dim, gs = 32, 4

    def emb_1d(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    grid = np.stack(np.meshgrid(np.arange(gs, dtype=np.float32), np.arange(gs, dtype=np.float32)), axis=0)
    ref = np.concatenate([emb_1d(dim // 2, grid[0]), emb_1d(dim // 2, grid[1])], axis=1)
    np.testing.assert_allclose(sincos_pos_embed_2d(dim, gs).numpy(), ref, atol=1e-6)


def test_learn_sigma_returns_velocity_only_and_init_output_is_zero():
    m = make(learn_sigma=True)
    x, t, y, _ = inputs()
    out = m(x, t, y)
    assert out.shape == x.shape
    assert torch.count_nonzero(out) == 0  # adaLN-Zero: an untrained SiT predicts 0
    assert m.final_layer.linear.out_features == 2 * 2 * 8


# ---------------------------------------------------------------------------------------------
# Checkpoint round trips
# ---------------------------------------------------------------------------------------------


def test_safetensors_round_trip_reproduces_outputs(tmp_path):
    m = make(lem={})
    perturb(m, *BACKBONE_ZERO_INIT, "lem.")
    x, t, y, pl = inputs()
    with torch.no_grad():
        ref = m(x, t, y, prior_emb=m.encode_prior(pl))
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(path))

    fresh = make(lem={}, seed=99)
    fresh.load_state_dict(load_checkpoint_file(path))
    with torch.no_grad():
        out = fresh(x, t, y, prior_emb=fresh.encode_prior(pl))
    assert torch.equal(out, ref)
    # The config rebuilds the same architecture.
    assert DoDModel(**m.config).state_dict().keys() == m.state_dict().keys()


def test_load_plain_sit_into_dod_model_keeps_lem_silent(tmp_path):
    sit = make()
    perturb(sit, *BACKBONE_ZERO_INIT)
    path = tmp_path / "sit.pt"
    torch.save({"model": sit.state_dict(), "ema": sit.state_dict()}, path)  # DiT-style wrapper

    dod = make(lem={}, seed=7)
    lem_before = {k: v.clone() for k, v in dod.lem.state_dict().items()}
    report = dod.load_backbone_state_dict(path)
    assert report["missing"] == report["unexpected"] == report["mismatched"] == []
    assert all(torch.equal(v, dod.lem.state_dict()[k]) for k, v in lem_before.items())  # LEM untouched

    x, t, y, pl = inputs()
    with torch.no_grad():
        prior = dod.encode_prior(pl)
        assert torch.count_nonzero(prior) == 0
        assert torch.equal(dod(x, t, y, prior_emb=prior), sit(x, t, y))


def test_load_backbone_errors_and_sigma_adaptation(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        load_checkpoint_file(tmp_path / "nope.safetensors")

    dod = make(lem={})
    wrong = make(size="small").state_dict()
    with pytest.raises(RuntimeError, match="shape mismatches") as e:
        dod.load_backbone_state_dict(wrong)
    assert "blocks.4.attn.qkv.weight" in str(e.value)  # unexpected key (small has 6 blocks)

    partial = {k: v for k, v in make().state_dict().items() if k != "pos_embed"}
    partial["extra.weight"] = torch.zeros(1)
    with pytest.raises(RuntimeError, match="pos_embed") as e:
        dod.load_backbone_state_dict(partial)
    assert "extra.weight" in str(e.value)
    report = dod.load_backbone_state_dict(partial, strict_backbone=False)
    assert report["missing"] == ["pos_embed"] and report["unexpected"] == ["extra.weight"]

    # A learn_sigma checkpoint loads into a velocity-only model by keeping the velocity channels.
    sigma = make(learn_sigma=True)
    perturb(sigma, *BACKBONE_ZERO_INIT)
    vel = make(learn_sigma=False, seed=5)
    report = vel.load_backbone_state_dict(sigma.state_dict())
    assert report["adapted"] == ["final_layer.linear.bias", "final_layer.linear.weight"]
    x, t, y, _ = inputs()
    with torch.no_grad():
        torch.testing.assert_close(vel(x, t, y), sigma(x, t, y))


# ---------------------------------------------------------------------------------------------
# Zero init, prior dependence, prior dropout, injection modes
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["lem", "direct"])
@pytest.mark.parametrize("injection", ["add_tokens", "add_condition"])
def test_untrained_lem_adds_nothing_then_prior_matters(kind, injection):
    m = make(lem={"kind": kind, "injection": injection})
    perturb(m, *BACKBONE_ZERO_INIT)  # a "trained" backbone, LEM still at init
    x, t, y, pl = inputs()
    with torch.no_grad():
        base = m(x, t, y)
        assert torch.equal(m(x, t, y, prior_emb=m.encode_prior(pl)), base)

        last = "lem.out_proj" if kind == "lem" else "lem.proj"
        perturb(m, last, std=0.5)
        prior = m.encode_prior(pl)
        with_prior = m(x, t, y, prior_emb=prior)
        assert not torch.allclose(with_prior, base)
        # A different prior latent gives a different output.
        other = m(x, t, y, prior_emb=m.encode_prior(pl.flip(0)))
        assert not torch.allclose(other, with_prior)

        # prior_keep=False rows equal the no-prior output; True rows equal the full-prior output.
        keep = torch.tensor([True, False, True, False])
        mixed = m(x, t, y, prior_emb=prior, prior_keep=keep)
        torch.testing.assert_close(mixed[keep], with_prior[keep])
        torch.testing.assert_close(mixed[~keep], base[~keep])
        assert torch.equal(m(x, t, y, prior_emb=prior, prior_keep=torch.zeros(4, dtype=torch.bool)), base)


def test_concat_tokens_null_and_prior_dropout():
    m = make(lem={"injection": "concat_tokens"})
    perturb(m, *BACKBONE_ZERO_INIT)
    x, t, y, pl = inputs()
    with torch.no_grad():
        base = m(x, t, y)  # no prior: the (zero-initialised) null token set
        # Untrained LEM output == null tokens, so the prior has no effect yet.
        torch.testing.assert_close(m(x, t, y, prior_emb=m.encode_prior(pl)), base)
        perturb(m, "lem.out_proj", std=0.5)
        prior = m.encode_prior(pl)
        with_prior = m(x, t, y, prior_emb=prior)
        assert not torch.allclose(with_prior, base)
        keep = torch.tensor([False, True, True, False])
        mixed = m(x, t, y, prior_emb=prior, prior_keep=keep)
        torch.testing.assert_close(mixed[keep], with_prior[keep])
        torch.testing.assert_close(mixed[~keep], base[~keep])


@pytest.mark.parametrize("kind", ["lem", "direct"])
@pytest.mark.parametrize("injection", ["add_tokens", "add_condition", "concat_tokens"])
def test_injection_shapes_and_gradients_reach_lem(kind, injection):
    m = make(lem={"kind": kind, "injection": injection, "token_pool": 2}).train()
    # Away from init (zero layers would otherwise block gradients, as in any adaLN-Zero model).
    perturb(m, *BACKBONE_ZERO_INIT, "lem.")
    x, t, y, pl = inputs()
    out = m(x, t, y, prior_emb=m.encode_prior(pl), prior_keep=torch.tensor([True, True, False, True]))
    assert out.shape == x.shape
    out.square().mean().backward()
    lem_params = dict(m.lem.named_parameters())
    assert lem_params
    for name, p in lem_params.items():
        if name == "null_tokens":  # only the dropped row reaches it
            assert p.grad is not None and p.grad.abs().sum() > 0
            continue
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_plain_sit_has_no_lem_and_rejects_priors():
    m = make()
    assert m.lem is None and m.num_params("lem") == 0
    assert not any(k.startswith("lem.") for k in m.state_dict())
    x, t, y, pl = inputs()
    with pytest.raises(RuntimeError, match="no LEM"):
        m.encode_prior(pl)
    with pytest.raises(ValueError, match="no LEM"):
        m(x, t, y, prior_emb=torch.zeros(4, 16, 128))


def test_flops_and_params_accounting():
    plain, dod = make(), make(lem={})
    assert dod.num_params("backbone") == plain.num_params()
    assert dod.num_params() == plain.num_params() + dod.num_params("lem")
    f_plain, f_dod = plain.flops_per_forward(batch=2), dod.flops_per_forward(batch=2)
    assert f_plain["lem"] == 0 and f_dod["lem"] > 0
    assert f_dod["backbone"] == f_plain["backbone"] == 2 * plain.flops_per_forward()["backbone"]
    concat = make(lem={"injection": "concat_tokens"}).flops_per_forward()
    assert concat["backbone"] > f_plain["backbone"] / 2


# ---------------------------------------------------------------------------------------------
# Validation and bottleneck features
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, key",
    [
        ({"lem": {**LEM, "bottleneck_dim": 65}}, "lem.bottleneck_dim"),
        ({"lem": {**LEM, "bottleneck_dim": 0}}, "lem.bottleneck_dim"),
        ({"lem": {**LEM, "width": 66, "heads": 4}}, "lem.width"),
        ({"lem": {**LEM, "token_pool": 3}}, "lem.token_pool"),
        ({"lem": {**LEM, "injection": "cross_attn"}}, "lem.injection"),
        ({"lem": {**LEM, "kind": "vae"}}, "lem.kind"),
        ({"lem": {**LEM, "depht_enc": 2}}, "lem.depht_enc"),
        ({"lem": {**LEM, "width": 64.0}}, "lem.width"),
        ({"input_size": 9}, "input_size"),
        ({"size": "XXL"}, "size"),
    ],
)
def test_validation_errors_name_the_key(kwargs, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        DoDModel(**{**BASE, **kwargs})


@pytest.mark.parametrize("pool, tokens", [(1, 16), (2, 4)])
def test_bottleneck_features_shape(pool, tokens):
    m = make(lem={"token_pool": pool, "bottleneck_dim": 3})
    _, _, _, pl = inputs()
    feats = m.bottleneck_features(pl)
    assert feats.shape == (4, tokens, 3)
    assert m.encode_prior(pl).shape == (4, 16, 128)


def test_direct_kind_has_no_bottleneck():
    lem = LatentEmbeddingModule(input_size=8, in_channels=4, patch_size=2, out_dim=32, kind="direct")
    x = torch.randn(2, 4, 8, 8)
    assert torch.count_nonzero(lem(x)) == 0 and lem(x).shape == (2, 16, 32)
    with pytest.raises(ValueError, match="bottleneck"):
        lem.bottleneck_features(x)
