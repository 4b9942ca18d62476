"""Data: raw sources (ImageFolder, the embedded MNIST digits) -> uint8 image shards."""

from .shards import ImageShards, write_image_shards
from .prepare import prepare_data

__all__ = ["ImageShards", "write_image_shards", "prepare_data"]
