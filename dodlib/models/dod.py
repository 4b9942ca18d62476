"""The DoD model: a SiT backbone plus an (optional) Latent Embedding Module for the visual prior.

Backbone parameters keep the SiT names at the top level of the state dict, so an official SiT/DiT
checkpoint loads directly (``load_backbone_state_dict``); everything DoD adds lives under ``lem.``.

Usage per stage of multi-stage sampling::

    prior = model.encode_prior(prev_stage_latent)          # once per stage, not per sampler step
    v = model(x_t, t, y, prior_emb=prior, prior_keep=keep)  # every step
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..choices import INJECTIONS, LEM_KINDS, check_registry
from .lem import LatentEmbeddingModule
from .sit import SiT
from .sizes import get_size


# Keys a `lem` config block may contain.  Missing keys take these defaults; `None` means "same as
# the backbone" (width, heads).
LEM_DEFAULTS: dict[str, Any] = {
    "kind": "lem",
    "width": None,
    "depth_enc": 2,
    "depth_dec": 2,
    "heads": None,
    "bottleneck_dim": 4,
    "token_pool": 1,
    "injection": "add_tokens",
}


def _check_int(key: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{key}: expected an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{key}: must be >= {minimum}, got {value}")
    return value


def normalize_lem_config(
    lem: Mapping[str, Any], *, backbone_width: int, backbone_heads: int, grid_size: int
) -> dict[str, Any]:
    """Fill defaults into a `lem` config block and validate it; errors name the key (``lem.<key>``)."""
    if not isinstance(lem, Mapping):
        raise ValueError(f"lem: expected a mapping or None, got {type(lem).__name__}")
    unknown = sorted(set(lem) - set(LEM_DEFAULTS))
    if unknown:
        raise ValueError(f"lem.{unknown[0]}: unknown key (allowed: {sorted(LEM_DEFAULTS)})")
    cfg = {**LEM_DEFAULTS, **lem}
    if cfg["width"] is None:
        cfg["width"] = backbone_width
    if cfg["heads"] is None:
        cfg["heads"] = backbone_heads
    if cfg["kind"] not in LEM_KINDS:
        raise ValueError(f"lem.kind: must be one of {LEM_KINDS}, got {cfg['kind']!r}")
    if cfg["injection"] not in INJECTIONS:
        raise ValueError(f"lem.injection: must be one of {INJECTIONS}, got {cfg['injection']!r}")
    _check_int("lem.width", cfg["width"], 1)
    _check_int("lem.heads", cfg["heads"], 1)
    _check_int("lem.depth_enc", cfg["depth_enc"], 0)
    _check_int("lem.depth_dec", cfg["depth_dec"], 0)
    _check_int("lem.bottleneck_dim", cfg["bottleneck_dim"], 1)
    _check_int("lem.token_pool", cfg["token_pool"], 1)
    if cfg["width"] % cfg["heads"]:
        raise ValueError(f"lem.width: {cfg['width']} is not divisible by lem.heads={cfg['heads']}")
    if cfg["width"] % 4:  # 2-D sin-cos position embedding
        raise ValueError(f"lem.width: must be divisible by 4, got {cfg['width']}")
    if cfg["bottleneck_dim"] > cfg["width"]:
        raise ValueError(
            f"lem.bottleneck_dim: {cfg['bottleneck_dim']} exceeds lem.width={cfg['width']} "
            "(the bottleneck must not be wider than the LEM)"
        )
    if grid_size % cfg["token_pool"]:
        raise ValueError(f"lem.token_pool: {cfg['token_pool']} does not divide the token grid size {grid_size}")
    return cfg


# --------------------------------------------------------------------------------------------
# Injections: where the prior enters the backbone, one function per `lem.injection`
# --------------------------------------------------------------------------------------------
# Each takes the model, the noisy tokens [B, T, D], the condition c [B, D], the prior tokens
# [B, T, D] (None: no prior in the batch) and which rows keep their prior (None: all), and
# returns the velocity.


def _add_tokens(model, tokens, c, prior_emb, keep):
    # Dropped rows: add nothing (the "learned null" of the additive injections is zero).
    prior = prior_emb.to(tokens.dtype)
    if keep is not None:
        prior = prior * keep[:, None, None].to(prior.dtype)
    return model.head(model.run_blocks(tokens + prior, c), c)


def _add_condition(model, tokens, c, prior_emb, keep):
    pooled = prior_emb.to(c.dtype).mean(dim=1)
    if keep is not None:
        pooled = pooled * keep[:, None].to(pooled.dtype)
    c = c + pooled
    return model.head(model.run_blocks(tokens, c), c)


def _concat_tokens(model, tokens, c, prior_emb, keep):
    # The sequence always has 2T tokens (so a batch can mix kept and dropped rows); rows without a
    # prior see the learned null token set. Prior tokens get the backbone's position embedding so
    # attention can match them to the noisy tokens at the same place.
    b, n, d = tokens.shape
    null = model.lem.null_tokens.to(tokens.dtype).expand(b, n, d)
    if prior_emb is None:
        prior = null
    else:
        prior = prior_emb.to(tokens.dtype)
        if keep is not None:
            prior = torch.where(keep[:, None, None], prior, null)
    prior = prior + model.pos_embed.to(tokens.dtype)
    h = model.run_blocks(torch.cat([tokens, prior], dim=1), c)
    return model.head(h[:, :n], c)


INJECT = {"add_tokens": _add_tokens, "add_condition": _add_condition, "concat_tokens": _concat_tokens}
check_registry("lem.injection", INJECTIONS, INJECT)


# --------------------------------------------------------------------------------------------
# Checkpoint helpers
# --------------------------------------------------------------------------------------------


def load_checkpoint_file(path: str | os.PathLike) -> dict[str, Any]:
    """Load a local checkpoint without unpickling code: safetensors, or ``torch.load(weights_only=True)``.

    Never downloads.  Returns whatever mapping the file holds (use `extract_state_dict` to get at the
    weights of training checkpoints that wrap them in {"model": ..., "ema": ...}).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # e.g. a DiT training checkpoint with a pickled argparse.Namespace
        raise RuntimeError(
            f"could not load {path} with weights_only=True ({e}); re-save the weights as a plain "
            "state dict or safetensors"
        ) from e
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path}: expected a state dict (mapping), got {type(obj).__name__}")
    return dict(obj)


def extract_state_dict(obj: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Unwrap common checkpoint layouts and strip DDP / torch.compile prefixes.

    Prefers EMA weights (what SiT/DiT sample with) when a training checkpoint holds both.
    """
    for wrapper in ("ema", "model", "state_dict"):
        if wrapper in obj and isinstance(obj[wrapper], Mapping):
            obj = obj[wrapper]
            break
    out = {}
    for k, v in obj.items():
        for prefix in ("module.", "_orig_mod."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------


class DoDModel(SiT):
    """SiT backbone + optional LEM prior.  See the module docstring.

    ``lem=None`` builds the plain SiT baseline (no LEM parameters at all).  ``self.config`` holds the
    constructor arguments (normalised), so ``DoDModel(**model.config)`` rebuilds the architecture.
    """

    def __init__(
        self,
        *,
        input_size: int,
        in_channels: int,
        num_classes: int,
        size: str = "tiny",
        patch_size: int = 2,
        learn_sigma: bool = False,
        lem: Mapping[str, Any] | None = None,
    ):
        s = get_size(size, key="size")
        _check_int("input_size", input_size, 1)
        _check_int("in_channels", in_channels, 1)
        _check_int("num_classes", num_classes, 1)
        _check_int("patch_size", patch_size, 1)
        if input_size % patch_size:
            raise ValueError(f"input_size: {input_size} is not divisible by patch_size={patch_size}")
        lem_cfg = None
        if lem is not None:
            lem_cfg = normalize_lem_config(
                lem, backbone_width=s.width, backbone_heads=s.heads, grid_size=input_size // patch_size
            )
        super().__init__(
            input_size=input_size,
            patch_size=patch_size,
            in_channels=in_channels,
            hidden_size=s.width,
            depth=s.depth,
            num_heads=s.heads,
            mlp_ratio=s.mlp_ratio,
            num_classes=num_classes,
            learn_sigma=bool(learn_sigma),
        )
        self.size = size
        self.lem_config = lem_cfg
        self.injection = lem_cfg["injection"] if lem_cfg else None
        self.config = dict(
            input_size=input_size,
            in_channels=in_channels,
            num_classes=num_classes,
            size=size,
            patch_size=patch_size,
            learn_sigma=bool(learn_sigma),
            lem=dict(lem_cfg) if lem_cfg else None,
        )
        if lem_cfg is None:
            self.lem = None
        else:
            self.lem = LatentEmbeddingModule(
                input_size=input_size,
                in_channels=in_channels,
                patch_size=patch_size,
                out_dim=s.width,
                **{k: v for k, v in lem_cfg.items() if k != "injection"},  # the LEM's own arguments
                mlp_ratio=s.mlp_ratio,
                null_tokens=lem_cfg["injection"] == "concat_tokens",
            )

    def initialize_weights(self) -> None:
        super().initialize_weights()  # DiT init (also touches LEM linears; re-initialised below)
        if getattr(self, "lem", None) is not None:
            self.lem.initialize_weights()

    # ---- prior ----------------------------------------------------------------------------

    def encode_prior(self, prior_latent: torch.Tensor) -> torch.Tensor:
        """Previous-stage latent [B, C, H, W] -> prior tokens [B, T, D].  Call once per stage."""
        if self.lem is None:
            raise RuntimeError("this model has no LEM (lem=None); it cannot take a prior")
        return self.lem(prior_latent)

    def bottleneck_features(self, latent: torch.Tensor) -> torch.Tensor:
        """LEM bottleneck features [B, T', d_b] (for the linear probe)."""
        if self.lem is None:
            raise RuntimeError("this model has no LEM (lem=None)")
        return self.lem.bottleneck_features(latent)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor,
        prior_emb: torch.Tensor | None = None,
        prior_keep: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Velocity at (x, t) for class y, optionally conditioned on prior tokens.

        x [B, C, H, W]; t [B] float in [0, 1] (0 = noise, 1 = data); y [B] long (num_classes = null);
        prior_emb [B, T, D] from `encode_prior`, or None for no prior in the whole batch;
        prior_keep [B] bool, False rows get no prior (prior dropout / unconditional CFG branch).
        """
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        tokens = self.embed_tokens(x)
        c = self.embed_condition(t, y)

        if prior_emb is None and self.injection != "concat_tokens":
            return self.head(self.run_blocks(tokens, c), c)
        if self.lem is None:
            raise ValueError("prior_emb given but the model has no LEM (lem=None)")

        b, n, d = tokens.shape
        if prior_emb is not None and tuple(prior_emb.shape) != (b, n, d):
            raise ValueError(f"prior_emb must be [{b}, {n}, {d}], got {tuple(prior_emb.shape)}")
        keep = None
        if prior_keep is not None:
            keep = prior_keep.to(device=tokens.device, dtype=torch.bool).reshape(b)

        return INJECT[self.injection](self, tokens, c, prior_emb, keep)

    # ---- checkpoints ----------------------------------------------------------------------

    def backbone_state_keys(self) -> list[str]:
        return [k for k in self.state_dict() if not k.startswith("lem.")]

    def load_backbone_state_dict(
        self, sd: Mapping[str, torch.Tensor] | str | os.PathLike, strict_backbone: bool = True
    ) -> dict[str, list[str]]:
        """Load SiT/DiT backbone weights, leaving LEM parameters as they are.

        ``sd`` is a state dict or a path to a local .pt/.pth/.safetensors file.  Training-checkpoint
        wrappers ({"ema"|"model"|"state_dict": ...}) and "module."/"_orig_mod." prefixes are handled;
        "lem.*" keys in ``sd`` are ignored.  If the checkpoint has learn_sigma output channels (2C) and
        this model does not (C), the velocity half of the final layer is taken ("adapted").

        With ``strict_backbone`` any missing, unexpected or shape-mismatched backbone key raises a
        RuntimeError listing them (nothing is loaded then).  Otherwise matching keys are loaded and the
        rest reported.  Returns {"loaded", "missing", "unexpected", "mismatched", "adapted", "ignored"}.
        """
        if isinstance(sd, (str, os.PathLike)):
            sd = load_checkpoint_file(sd)
        sd = extract_state_dict(sd)
        own = {k: v for k, v in self.state_dict().items() if not k.startswith("lem.")}
        ignored = sorted(k for k in sd if k.startswith("lem."))
        incoming = {k: v for k, v in sd.items() if not k.startswith("lem.")}

        missing = sorted(k for k in own if k not in incoming)
        unexpected = sorted(k for k in incoming if k not in own)
        mismatched, adapted, to_load = [], [], {}
        for k in own:
            if k not in incoming:
                continue
            v = incoming[k]
            if not isinstance(v, torch.Tensor):
                mismatched.append(f"{k} (not a tensor: {type(v).__name__})")
                continue
            if tuple(v.shape) != tuple(own[k].shape):
                v2 = self._adapt_sigma(k, v)
                if v2 is None:
                    mismatched.append(f"{k} (checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)})")
                    continue
                adapted.append(k)
                v = v2
            to_load[k] = v

        if strict_backbone and (missing or unexpected or mismatched):

            def _fmt(name: str, keys: list[str]) -> str:
                more = f" ... (+{len(keys) - 20} more)" if len(keys) > 20 else ""
                return f"\n  {name} ({len(keys)}): {keys[:20]}{more}"

            raise RuntimeError(
                "backbone checkpoint does not match the model (model: size="
                f"{self.size}, patch {self.patch_size}, input {self.input_size}, {self.in_channels} channels, "
                f"{self.num_classes} classes, learn_sigma={self.learn_sigma}):"
                + _fmt("missing keys", missing)
                + _fmt("unexpected keys", unexpected)
                + _fmt("shape mismatches", mismatched)
            )
        result = self.load_state_dict(to_load, strict=False)
        # Everything we pass is a backbone key of this model, so nothing can be unexpected here.
        assert not result.unexpected_keys, result.unexpected_keys
        return {
            "loaded": sorted(to_load),
            "missing": missing,
            "unexpected": unexpected,
            "mismatched": mismatched,
            "adapted": sorted(adapted),
            "ignored": ignored,
        }

    def _adapt_sigma(self, key: str, v: torch.Tensor) -> torch.Tensor | None:
        """Final-layer weights of a learn_sigma checkpoint -> velocity-only weights, else None."""
        if self.learn_sigma or key not in ("final_layer.linear.weight", "final_layer.linear.bias"):
            return None
        p2, c = self.patch_size**2, self.in_channels
        if v.shape[0] != p2 * 2 * c:
            return None
        # Output features are ordered (p_row, p_col, channel); keep channels [0, C) of each pixel.
        return v.reshape(p2, 2 * c, *v.shape[1:])[:, :c].reshape(p2 * c, *v.shape[1:]).clone()

    # ---- accounting -----------------------------------------------------------------------

    def num_params(self, component: str = "total", trainable_only: bool = False) -> int:
        """Parameter count of "total", "backbone" or "lem" (pos_embed counts, as in SiT's totals)."""
        if component not in ("total", "backbone", "lem"):
            raise ValueError(f"component must be 'total', 'backbone' or 'lem', got {component!r}")
        n = 0
        for name, p in self.named_parameters():
            if trainable_only and not p.requires_grad:
                continue
            is_lem = name.startswith("lem.")
            if component == "total" or (component == "lem") == is_lem:
                n += p.numel()
        return n

    def flops_per_forward(self, batch: int = 1) -> dict[str, int]:
        """Approximate FLOPs (2 x matmul MACs) of one backbone forward and of one `encode_prior`.

        "backbone" is per sampler step (it includes the extra tokens of concat injection); "lem" is
        per stage (the LEM runs once per stage), 0 without a LEM.  Sampling FLOPs of a k-stage run
        = sum over stages of (NFE x backbone [x2 with CFG]) + (k - 1) x lem.
        """
        extra = self.num_tokens if self.injection == "concat_tokens" else 0
        backbone = 2 * self.backbone_macs(batch, extra_tokens=extra)
        lem = 2 * self.lem.macs(batch) if self.lem is not None else 0
        return {"backbone": int(backbone), "lem": int(lem)}
