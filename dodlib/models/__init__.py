"""Models: the SiT backbone, the Latent Embedding Module and the combined DoD model."""

from ..choices import INJECTIONS, LEM_KINDS
from .dod import (
    LEM_DEFAULTS,
    DoDModel,
    extract_state_dict,
    load_checkpoint_file,
    normalize_lem_config,
)
from .lem import LatentEmbeddingModule
from .sit import SiT, sincos_pos_embed_2d
from .sizes import SIZES, ModelSize, get_size

__all__ = [
    "DoDModel",
    "SiT",
    "LatentEmbeddingModule",
    "SIZES",
    "ModelSize",
    "get_size",
    "INJECTIONS",
    "LEM_KINDS",
    "LEM_DEFAULTS",
    "normalize_lem_config",
    "load_checkpoint_file",
    "extract_state_dict",
    "sincos_pos_embed_2d",
]
