"""ADM's centre crop: the preprocessing every ImageNet diffusion baseline (ADM, DiT, SiT) uses."""

from __future__ import annotations

import numpy as np
from PIL import Image


def center_crop_arr(image: Image.Image, resolution: int) -> np.ndarray:
    """Downsample with BOX while the short side is at least twice the target (cheap and
    alias-free), finish with BICUBIC so the short side equals `resolution`, then crop the centre.
    Returns uint8 [resolution, resolution, 3]."""
    image = image.convert("RGB")
    while min(image.size) >= 2 * resolution:
        image = image.resize(tuple(s // 2 for s in image.size), resample=Image.BOX)
    scale = resolution / min(image.size)
    image = image.resize(tuple(round(s * scale) for s in image.size), resample=Image.BICUBIC)
    arr = np.asarray(image)
    top = (arr.shape[0] - resolution) // 2
    left = (arr.shape[1] - resolution) // 2
    return np.ascontiguousarray(arr[top : top + resolution, left : left + resolution])
