"""Tokenizers: pixel space-to-depth round trip; the SD-VAE path on a small random AutoencoderKL."""

import numpy as np
import pytest
import torch

from dodlib.config import DataConfig, TokenizerConfig
from dodlib.latents import LatentSet, extract_latents
from dodlib.tokenizers import PixelTokenizer, SDVAETokenizer, load_vae


def test_pixel_tokenizer_round_trip():
    tok = PixelTokenizer(space_to_depth=2)
    images = torch.randint(0, 256, (3, 8, 8, 3), dtype=torch.uint8)
    mean, std = tok.encode_moments(images)
    assert mean.shape == (3, 12, 4, 4) == (3, *tok.latent_shape(8)) and std is None
    assert mean.min() >= -1 and mean.max() <= 1
    assert torch.equal(tok.decode(mean), images)


def _small_vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 8, 8),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1, norm_num_groups=4, sample_size=32,
    )


def test_sd_vae_shapes_scale_and_flips(tmp_path):
    vae = _small_vae()
    vae.save_pretrained(tmp_path / "vae")  # the local-directory loading path
    tok = SDVAETokenizer(str(tmp_path / "vae"), scale=0.18215)
    images = torch.randint(0, 256, (2, 32, 32, 3), dtype=torch.uint8)
    mean, std = tok.encode_moments(images)
    assert mean.shape == std.shape == (2, 4, 4, 4) == (2, *tok.latent_shape(32))
    with torch.no_grad():
        raw = vae.encode(images.permute(0, 3, 1, 2).float() / 127.5 - 1).latent_dist
    assert torch.allclose(mean, raw.mean * 0.18215, atol=1e-5)  # moments are in model space
    assert torch.allclose(std, raw.std * 0.18215, atol=1e-5)
    decoded = tok.decode(mean)
    assert decoded.shape == (2, 32, 32, 3) and decoded.dtype == torch.uint8

    # extraction caches both flips: the flipped view's mean is the encoding of the mirrored image
    from dodlib.data import write_image_shards

    write_image_shards(tmp_path / "data", [(images.numpy(), np.array([0, 1]))], classes=["a", "b"], shard_size=8)
    meta = extract_latents(tok, DataConfig(hflip=True), TokenizerConfig(kind="sd-vae", batch_size=2),
                           tmp_path / "data", tmp_path / "lat")
    assert meta["flips"] == 2 and meta["stochastic"] and meta["latent_shape"] == [4, 4, 4]
    lat = LatentSet(tmp_path / "lat")
    flipped_mean, _ = tok.encode_moments(images.flip(2))
    stored = np.load(tmp_path / "lat" / "mean-00000.npy")
    assert np.allclose(stored[:, 1], flipped_mean.numpy(), atol=1e-5)
    # training draws a fresh posterior sample each call
    g = torch.Generator().manual_seed(0)
    a, labels = lat.draw(np.array([0, 1]), g)
    b, _ = lat.draw(np.array([0, 1]), g)
    assert a.shape == (2, 4, 4, 4) and not torch.equal(a, b) and labels.tolist() == [0, 1]


def test_missing_vae_directory_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.vae"):
        load_vae(str(tmp_path / "nope"))
