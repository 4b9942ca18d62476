"""SiT / DiT style transformer backbone.

Module and parameter names mirror the official SiT and DiT code, so that their released checkpoints
(e.g. SiT-XL/2 at 256x256: 32x32x4 latents, patch 2, 1000 classes, learn_sigma=True) load with
``load_state_dict`` directly.  Layout of the state dict::

    x_embedder.proj.{weight,bias}               patch embedding (conv, kernel = stride = patch)
    pos_embed                                   [1, T, D] fixed 2-D sin-cos (requires_grad=False)
    t_embedder.mlp.{0,2}.{weight,bias}          timestep MLP on a 256-d sinusoidal embedding
    y_embedder.embedding_table.weight           [num_classes + 1, D]; last row = null class
    blocks.{i}.attn.qkv / attn.proj             attention (with biases)
    blocks.{i}.mlp.fc1 / mlp.fc2                MLP, GELU(tanh)
    blocks.{i}.adaLN_modulation.1               SiLU -> Linear(D, 6D)
    final_layer.linear / final_layer.adaLN_modulation.1

The LayerNorms (``norm1``, ``norm2``, ``final_layer.norm_final``) have no affine parameters, as in
DiT: scale and shift come from the adaLN modulation instead.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


# --------------------------------------------------------------------------------------------
# Position embeddings
# --------------------------------------------------------------------------------------------


def _sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    """[N] positions -> [N, dim] embedding: first half sin, second half cos."""
    if dim % 2:
        raise ValueError(f"sin-cos embedding dimension must be even, got {dim}")
    omega = torch.arange(dim // 2, dtype=torch.float64, device=pos.device) / (dim / 2.0)
    omega = 1.0 / (10000.0**omega)
    out = pos.to(torch.float64).reshape(-1, 1) * omega.reshape(1, -1)
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def sincos_pos_embed_2d(dim: int, grid_size: int, device=None) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding, [grid_size**2, dim] in float32, row-major tokens.

    Matches the DiT/MAE construction (which the official checkpoints store): the first half of
    the channels encodes the column index, the second half the row index.
    """
    if dim % 4:
        raise ValueError(f"2-D sin-cos embedding needs a dimension divisible by 4, got {dim}")
    coords = torch.arange(grid_size, dtype=torch.float64, device=device)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")  # token k = (row, col) row-major
    emb = torch.cat([_sincos_1d(dim // 2, cols.reshape(-1)), _sincos_1d(dim // 2, rows.reshape(-1))], dim=1)
    return emb.to(torch.float32)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation; shift/scale are per sample [B, D], x is [B, T, D]."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


# --------------------------------------------------------------------------------------------
# Building blocks (shared with the LEM)
# --------------------------------------------------------------------------------------------


class PatchEmbed(nn.Module):
    """[B, C, H, W] -> [B, (H/p)*(W/p), D] with a strided convolution (`proj`)."""

    def __init__(self, patch_size: int, in_channels: int, embed_dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention with fused qkv, using PyTorch's SDPA kernel."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, heads, N, head_dim]
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class TimestepEmbedder(nn.Module):
    """Scalar timesteps -> vectors: sinusoidal features followed by a 2-layer MLP."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size),
        )

    @staticmethod
    def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        """[B] (possibly fractional) timesteps -> [B, dim]: cos features first, then sin (as DiT)."""
        half = dim // 2
        freqs = torch.exp(
            -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
        )
        args = t.float()[:, None] * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
        return emb

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        freq = self.timestep_embedding(t, self.frequency_embedding_size)
        return self.mlp(freq.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class labels -> vectors.  Row ``num_classes`` is the null (unconditional) class.

    Unlike DiT there is no label dropout inside the module: training and CFG code pass the null
    index themselves, which keeps the forward pass deterministic.
    """

    def __init__(self, num_classes: int, hidden_size: int):
        super().__init__()
        self.num_classes = num_classes
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.embedding_table(y)


class SiTBlock(nn.Module):
    """Transformer block with adaLN-Zero conditioning."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


# --------------------------------------------------------------------------------------------
# The backbone
# --------------------------------------------------------------------------------------------


class SiT(nn.Module):
    """Class-conditional SiT backbone predicting the velocity of the linear interpolant.

    ``forward(x, t, y)``: x [B, C, H, W], t [B] float in [0, 1] (t=0 noise, t=1 data; fed to the
    timestep embedder as-is, as SiT does), y [B] long with ``num_classes`` = null class.
    Returns [B, C, H, W].  With ``learn_sigma`` the network has 2C output channels (to load the
    official checkpoints) but only the first C (the velocity) are returned.

    The forward pass is split into ``embed_tokens`` / ``embed_condition`` / ``run_blocks`` /
    ``head`` so that subclasses (DoDModel) can inject extra inputs between the pieces.
    """

    def __init__(
        self,
        *,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        num_classes: int = 1000,
        learn_sigma: bool = True,
    ):
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f"input_size: {input_size} is not divisible by patch_size {patch_size}")
        if hidden_size % num_heads:
            raise ValueError(f"width {hidden_size} is not divisible by heads {num_heads}")
        self.input_size = input_size
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.learn_sigma = learn_sigma
        self.hidden_size = hidden_size
        self.depth = depth
        self.num_heads = num_heads
        self.mlp_ratio = mlp_ratio
        self.num_classes = num_classes
        self.grid_size = input_size // patch_size
        self.num_tokens = self.grid_size**2
        # Trade compute for memory in training (large sizes on GPU); off by default.
        self.grad_checkpointing = False

        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size)
        # A (frozen) Parameter rather than a buffer so it is in the state dict under the same key
        # as in the official checkpoints and counted in their published parameter totals.
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_tokens, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList(SiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth))
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    # ---- init ---------------------------------------------------------------------------

    def initialize_weights(self) -> None:
        """DiT initialisation: xavier linears, adaLN-Zero, zero output layer."""

        def _basic_init(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

        self.apply(_basic_init)
        with torch.no_grad():
            self.pos_embed.copy_(
                sincos_pos_embed_2d(self.hidden_size, self.grid_size, device=self.pos_embed.device).unsqueeze(0)
            )
        # Patch embedding initialised like a linear layer on the flattened patch.
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        # adaLN-Zero: every block starts as the identity, the output starts at zero.
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    # ---- pieces of the forward pass -----------------------------------------------------

    def embed_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> [B, T, D] patch tokens with position embedding."""
        if x.shape[-2:] != (self.input_size, self.input_size):
            raise ValueError(
                f"expected inputs of spatial size {self.input_size}x{self.input_size}, got {tuple(x.shape)}"
            )
        return self.x_embedder(x) + self.pos_embed.to(x.dtype)

    def embed_condition(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """adaLN condition c = t_emb + y_emb, [B, D]."""
        return self.t_embedder(t) + self.y_embedder(y)

    def run_blocks(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, c, use_reentrant=False)
            else:
                x = block(x, c)
        return x

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T, p*p*C_out] -> [B, C_out, H, W] (token channels ordered (p_row, p_col, c) as in DiT)."""
        p, g, c = self.patch_size, self.grid_size, self.out_channels
        x = x.reshape(x.shape[0], g, g, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, g * p, g * p)

    def head(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """Final layer + unpatchify; returns only the velocity channels."""
        out = self.unpatchify(self.final_layer(x, c))
        if self.learn_sigma:
            out = out[:, : self.in_channels]
        return out

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        c = self.embed_condition(t, y)
        return self.head(self.run_blocks(self.embed_tokens(x), c), c)

    # ---- accounting ---------------------------------------------------------------------

    def backbone_macs(self, batch: int = 1, extra_tokens: int = 0) -> int:
        """Multiply-accumulates of the matmuls (incl. attention scores) of one forward pass.

        ``extra_tokens`` counts tokens appended to the sequence (concat injection).  Elementwise
        ops, norms and softmax are ignored.  Note DiT's published "Gflops" (118.6 for XL/2) are
        MACs in this sense.
        """
        d, t, p = self.hidden_size, self.num_tokens, self.patch_size
        n = t + extra_tokens
        hidden = int(d * self.mlp_ratio)
        per_sample = 0
        per_sample += t * (self.in_channels * p * p) * d  # patch embedding
        per_sample += self.t_embedder.frequency_embedding_size * d + d * d  # timestep MLP
        per_block = (
            d * 6 * d  # adaLN modulation (once per sample)
            + n * d * 3 * d  # qkv
            + 2 * n * n * d  # q k^T and attn @ v
            + n * d * d  # attention output projection
            + 2 * n * d * hidden  # MLP
        )
        per_sample += self.depth * per_block
        per_sample += d * 2 * d + t * d * (p * p * self.out_channels)  # final layer
        return batch * per_sample
