"""Latent Embedding Module (LEM): turns the previous stage's latent into prior tokens.

``kind="lem"`` (the DoD module), a compression-reconstruction ViT on the latent::

    latent [B,C,H,W] -> patchify (backbone patch size) -> + sin-cos pos -> encoder blocks -> norm
        -> [optional p x p average pool of the token grid]
        -> Linear(width, d_b)              # the bottleneck: d_b channels per (pooled) token
        -> Linear(d_b, width) -> [nearest upsample back to the full grid] -> + sin-cos pos
        -> decoder blocks -> LayerNorm -> Linear(width, D_backbone)   # zero-initialised
    => [B, T, D_backbone], one token per backbone token.

The small bottleneck is what discards detail so that stage k cannot simply copy stage k-1.  The
output projection starts at zero so an untrained LEM adds nothing to the backbone (a pretrained SiT
is unchanged by attaching it).

``kind="direct"`` (the "no LEM" ablation): the latent is patch-embedded by a zero-initialised
convolution straight to the backbone width, no bottleneck.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..choices import LEM_KINDS
from .sit import Attention, Mlp, sincos_pos_embed_2d



class ViTBlock(nn.Module):
    """Plain pre-norm transformer block (no conditioning)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class LatentEmbeddingModule(nn.Module):
    """See the module docstring.  All sizes are validated by the caller (DoDModel) with config
    key names; the checks here are a safety net."""

    def __init__(
        self,
        *,
        input_size: int,
        in_channels: int,
        patch_size: int,
        out_dim: int,
        kind: str = "lem",
        width: int = 128,
        depth_enc: int = 2,
        depth_dec: int = 2,
        heads: int = 4,
        bottleneck_dim: int = 4,
        token_pool: int = 1,
        mlp_ratio: float = 4.0,
        null_tokens: bool = False,
    ):
        super().__init__()
        if kind not in LEM_KINDS:
            raise ValueError(f"lem.kind: must be one of {LEM_KINDS}, got {kind!r}")
        self.kind = kind
        self.input_size = input_size
        self.in_channels = in_channels
        self.patch_size = patch_size
        self.out_dim = out_dim
        self.grid_size = input_size // patch_size
        self.num_tokens = self.grid_size**2
        self.width = width
        self.depth_enc = depth_enc
        self.depth_dec = depth_dec
        self.heads = heads
        self.bottleneck_dim = bottleneck_dim
        self.token_pool = token_pool
        self.mlp_ratio = mlp_ratio

        if kind == "direct":
            self.proj = nn.Conv2d(in_channels, out_dim, kernel_size=patch_size, stride=patch_size)
        else:
            if self.grid_size % token_pool:
                raise ValueError(f"lem.token_pool: {token_pool} does not divide the token grid {self.grid_size}")
            self.patch_embed = nn.Conv2d(in_channels, width, kernel_size=patch_size, stride=patch_size)
            # Fixed sin-cos table.  A persistent buffer (in the state dict) so that a model built on the
            # meta device, materialised with `to_empty` and then loaded from a checkpoint is complete.
            self.register_buffer("pos_embed", sincos_pos_embed_2d(width, self.grid_size).unsqueeze(0))
            self.encoder = nn.ModuleList(ViTBlock(width, heads, mlp_ratio) for _ in range(depth_enc))
            self.encoder_norm = nn.LayerNorm(width, eps=1e-6)
            self.to_bottleneck = nn.Linear(width, bottleneck_dim)
            self.from_bottleneck = nn.Linear(bottleneck_dim, width)
            self.decoder = nn.ModuleList(ViTBlock(width, heads, mlp_ratio) for _ in range(depth_dec))
            self.out_norm = nn.LayerNorm(width, eps=1e-6)
            self.out_proj = nn.Linear(width, out_dim)
        # Learned stand-in for dropped priors, used only by the concat_tokens injection (the additive
        # injections drop a prior by adding nothing).  Zero init = same as an untrained LEM output.
        self.null_tokens = nn.Parameter(torch.zeros(1, self.num_tokens, out_dim)) if null_tokens else None
        self.initialize_weights()

    def initialize_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm) and m.elementwise_affine:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if self.kind == "direct":
            # Zero so that an untrained "direct" prior adds nothing either.
            nn.init.zeros_(self.proj.weight)
            nn.init.zeros_(self.proj.bias)
        else:
            w = self.patch_embed.weight
            nn.init.xavier_uniform_(w.view(w.shape[0], -1))
            nn.init.zeros_(self.patch_embed.bias)
            nn.init.zeros_(self.out_proj.weight)
            nn.init.zeros_(self.out_proj.bias)
            with torch.no_grad():
                self.pos_embed.copy_(sincos_pos_embed_2d(self.width, self.grid_size, self.pos_embed.device)[None])
        if self.null_tokens is not None:
            nn.init.zeros_(self.null_tokens)

    # ---- pieces -------------------------------------------------------------------------

    def _check_input(self, latent: torch.Tensor) -> None:
        expected = (self.in_channels, self.input_size, self.input_size)
        if latent.ndim != 4 or tuple(latent.shape[1:]) != expected:
            raise ValueError(f"prior latent must be [B, {expected[0]}, {expected[1]}, {expected[2]}], got {tuple(latent.shape)}")

    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T, W] -> [B, T/p^2, W] average over p x p cells of the token grid."""
        p = self.token_pool
        if p == 1:
            return x
        b, _, w = x.shape
        g = self.grid_size
        grid = x.transpose(1, 2).reshape(b, w, g, g)
        return F.avg_pool2d(grid, p).flatten(2).transpose(1, 2)

    def _unpool(self, x: torch.Tensor) -> torch.Tensor:
        """Inverse of `_pool` by nearest-neighbour upsampling."""
        p = self.token_pool
        if p == 1:
            return x
        b, _, w = x.shape
        gp = self.grid_size // p
        grid = x.transpose(1, 2).reshape(b, w, gp, gp)
        return F.interpolate(grid, scale_factor=p, mode="nearest").flatten(2).transpose(1, 2)

    def bottleneck_features(self, latent: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> [B, T', d_b] with T' = T / token_pool**2 (features for a linear probe)."""
        if self.kind != "lem":
            raise ValueError(f"lem.kind={self.kind!r} has no bottleneck (bottleneck_features needs kind='lem')")
        self._check_input(latent)
        x = self.patch_embed(latent).flatten(2).transpose(1, 2) + self.pos_embed.to(latent.dtype)
        for block in self.encoder:
            x = block(x)
        return self.to_bottleneck(self._pool(self.encoder_norm(x)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Bottleneck features [B, T', d_b] -> prior tokens [B, T, out_dim]."""
        # Linear up before the upsample: nearest-upsampling commutes with a per-token linear map,
        # so this is the same function at 1/p^2 of the cost.
        x = self._unpool(self.from_bottleneck(z)) + self.pos_embed.to(z.dtype)
        for block in self.decoder:
            x = block(x)
        return self.out_proj(self.out_norm(x))

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] latent of the previous stage -> [B, T, out_dim] prior tokens."""
        if self.kind == "direct":
            self._check_input(latent)
            return self.proj(latent).flatten(2).transpose(1, 2)
        return self.decode(self.bottleneck_features(latent))

    # ---- accounting ---------------------------------------------------------------------

    def macs(self, batch: int = 1) -> int:
        """Multiply-accumulates of the matmuls of one call (see SiT.backbone_macs)."""
        t, p, c = self.num_tokens, self.patch_size, self.in_channels
        if self.kind == "direct":
            return batch * t * c * p * p * self.out_dim
        w, hidden = self.width, int(self.width * self.mlp_ratio)
        tp = t // self.token_pool**2
        block = t * w * 3 * w + 2 * t * t * w + t * w * w + 2 * t * w * hidden
        per_sample = (
            t * c * p * p * w  # patchify
            + (self.depth_enc + self.depth_dec) * block
            + tp * w * self.bottleneck_dim * 2  # down to d_b and back up (at pooled resolution)
            + t * w * self.out_dim  # output projection
        )
        return batch * per_sample
