"""Tokenizers: images <-> the latent space the diffusion model works in.

- `PixelTokenizer`: identity to [-1, 1] with optional space-to-depth (the embedded default).
- `SDVAETokenizer`: diffusers' AutoencoderKL (SD-VAE), the latent space of DiT/SiT/DoD on ImageNet.

Both expose the same contract: `encode_moments(uint8 [B,H,W,3]) -> (mean, std)` in *model space*
(already multiplied by the latent scale), `decode(latents) -> uint8 [B,H,W,3]`, `latent_shape`.
A deterministic tokenizer returns std = None.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from .config import TokenizerConfig


def images_to_unit(images_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 [B,H,W,3] -> float [B,3,H,W] in [-1, 1]."""
    return images_uint8.permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def unit_to_images(x: torch.Tensor) -> torch.Tensor:
    """float [B,3,H,W] in [-1, 1] -> uint8 [B,H,W,3], rounding as ADM's sample writer does."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()


class PixelTokenizer:
    name = "pixels"

    def __init__(self, space_to_depth: int = 1):
        self.s = space_to_depth

    def latent_shape(self, resolution: int) -> tuple[int, int, int]:
        return (3 * self.s**2, resolution // self.s, resolution // self.s)

    @torch.no_grad()
    def encode_moments(self, images_uint8: torch.Tensor) -> tuple[torch.Tensor, None]:
        x = images_to_unit(images_uint8)
        return (F.pixel_unshuffle(x, self.s) if self.s > 1 else x), None

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        x = F.pixel_shuffle(latents.float(), self.s) if self.s > 1 else latents.float()
        return unit_to_images(x)


class SDVAETokenizer:
    """SD-VAE from a hub id (e.g. stabilityai/sd-vae-ft-ema) or a local directory."""

    name = "sd-vae"
    downsample = 8

    def __init__(self, source: str, scale: float, device: str | torch.device = "cpu", vae=None):
        self.scale = scale
        self.device = torch.device(device)
        if vae is None:
            vae = load_vae(source)
        self.vae = vae.to(self.device).eval().requires_grad_(False)

    def latent_shape(self, resolution: int) -> tuple[int, int, int]:
        return (self.vae.config.latent_channels, resolution // self.downsample, resolution // self.downsample)

    @torch.no_grad()
    def encode_moments(self, images_uint8: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        posterior = self.vae.encode(images_to_unit(images_uint8).to(self.device)).latent_dist
        return posterior.mean * self.scale, posterior.std * self.scale

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        x = self.vae.decode(latents.to(self.device).float() / self.scale).sample
        return unit_to_images(x.cpu())


def load_vae(source: str):
    """AutoencoderKL from a local directory (config.json + weights) or a hub id (cached or online)."""
    from diffusers import AutoencoderKL

    path = Path(source).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"tokenizer.vae: {path} has no config.json (expected a diffusers AutoencoderKL folder)")
        return AutoencoderKL.from_pretrained(path)
    if source.startswith((".", "/", "~")):
        raise FileNotFoundError(f"tokenizer.vae: no such directory {path}")
    try:
        return AutoencoderKL.from_pretrained(source)
    except OSError as err:
        raise FileNotFoundError(
            f"tokenizer.vae: could not load {source!r} from the Hugging Face hub or its cache ({err}). "
            f"On an offline node, download it on a login node first: "
            f"`huggingface-cli download {source} --local-dir /path/to/vae` and set tokenizer.vae to that path."
        ) from err


def build_tokenizer(cfg: TokenizerConfig, device: str | torch.device = "cpu"):
    if cfg.kind == "pixels":
        return PixelTokenizer(cfg.space_to_depth)
    return SDVAETokenizer(cfg.vae, cfg.scale, device=device)


def hflip(x: torch.Tensor) -> torch.Tensor:
    """Horizontal flip of uint8 HWC images or of CHW tensors: flip the width axis."""
    return x.flip(-2) if x.dtype == torch.uint8 and x.shape[-1] == 3 else x.flip(-1)
