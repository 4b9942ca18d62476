"""Named backbone sizes.

S/B/L/XL follow SiT/DiT (patch size is a separate argument, 2 in the paper).  ``tiny`` and
``small`` are CPU sizes for the embedded default data set and for tests.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..choices import MODEL_SIZES, check_registry


@dataclass(frozen=True)
class ModelSize:
    depth: int  # number of transformer blocks
    width: int  # hidden size D
    heads: int  # attention heads (width must be divisible by heads)
    mlp_ratio: float = 4.0


SIZES: dict[str, ModelSize] = {
    "S": ModelSize(depth=12, width=384, heads=6),
    "B": ModelSize(depth=12, width=768, heads=12),
    "L": ModelSize(depth=24, width=1024, heads=16),
    "XL": ModelSize(depth=28, width=1152, heads=16),
    # CPU sizes
    "tiny": ModelSize(depth=4, width=128, heads=4),
    "small": ModelSize(depth=6, width=256, heads=4),
}
check_registry("model.size", MODEL_SIZES, SIZES)


def get_size(name: str, *, key: str = "size") -> ModelSize:
    """Look up a size by name; ``key`` is the config key named in the error message."""
    try:
        return SIZES[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"{key}: unknown model size {name!r}; choose one of {sorted(SIZES)}"
        ) from None
