"""Sample grids (paper Fig. 4/5): one row block per stage, the same sample indices in every block.

Sample i of every stage has the same class and seed index, so reading a column down the blocks
shows how one sample changes from stage to stage. The grid is composed as one uint8 array (exact
pixels: small images are upscaled by an integer nearest-neighbour factor, never blurred) and drawn
1:1 into the figure, so the PNG holds the input pixels unchanged.
"""

from __future__ import annotations

import logging
import math
import textwrap
from dataclasses import dataclass

import numpy as np
from matplotlib.figure import Figure
from PIL import Image

from .collect import ReportData, load_samples

log = logging.getLogger(__name__)

TARGET_CELL = 64  # upscale small samples (e.g. 16x16 digits) to about this many pixels
MAX_CELL = 128  # shrink large ones (ImageNet 256x256) so a 40-sample grid stays a few MB
DPI = 100  # the grid figure is drawn at exactly one array pixel per PNG pixel at this DPI
MARGIN_LEFT, MARGIN_TOP, MARGIN_RIGHT, MARGIN_BOTTOM = 150, 56, 10, 10  # pixels
MIN_WIDTH = 520  # pixels: room for the title when the grid is narrow


@dataclass(frozen=True)
class GridLayout:
    """Where each sample lands in the composed grid array."""

    cell_h: int
    cell_w: int
    columns: int
    rows_per_block: int
    blocks: int
    pad: int = 2  # between cells
    gap: int = 14  # between stage blocks

    @property
    def block_h(self) -> int:
        return self.rows_per_block * (self.cell_h + self.pad) - self.pad

    @property
    def height(self) -> int:
        return self.blocks * self.block_h + (self.blocks - 1) * self.gap

    @property
    def width(self) -> int:
        return self.columns * (self.cell_w + self.pad) - self.pad

    def block_top(self, block: int) -> int:
        return block * (self.block_h + self.gap)

    def cell_box(self, block: int, index: int) -> tuple[int, int, int, int]:
        """(top, left, bottom, right) of sample `index` in stage block `block` (0-based)."""
        r, c = divmod(index, self.columns)
        top = self.block_top(block) + r * (self.cell_h + self.pad)
        left = c * (self.cell_w + self.pad)
        return top, left, top + self.cell_h, left + self.cell_w


def cell_size(h: int) -> int:
    """Displayed size of an h-pixel sample: an integer multiple when upscaling (exact pixels)."""
    if h < TARGET_CELL:
        return h * max(1, round(TARGET_CELL / h))
    return min(h, MAX_CELL)


def resize(images: np.ndarray, size: int) -> np.ndarray:
    """[n, h, w, 3] uint8 -> [n, size, size*w/h, 3]: nearest-neighbour repeat up, Lanczos down."""
    n, h, w, _ = images.shape
    if size == h:
        return images
    if size % h == 0:
        f = size // h
        return images.repeat(f, axis=1).repeat(f, axis=2)
    new_w = round(w * size / h)
    return np.stack([np.asarray(Image.fromarray(im).resize((new_w, size), Image.LANCZOS)) for im in images])


def compose_grid(blocks: list[np.ndarray], columns: int, fill: int = 255) -> tuple[np.ndarray, GridLayout]:
    """Stack per-stage sample arrays (same n each) into one grid array; returns it and its layout."""
    if not blocks:
        raise ValueError("no stages to draw")
    n = len(blocks[0])
    if any(len(b) != n for b in blocks):
        raise ValueError(f"stages hold different sample counts: {[len(b) for b in blocks]}")
    size = cell_size(blocks[0].shape[1])
    blocks = [resize(np.ascontiguousarray(b), size) for b in blocks]
    columns = max(1, min(columns, n))
    layout = GridLayout(cell_h=blocks[0].shape[1], cell_w=blocks[0].shape[2], columns=columns,
                        rows_per_block=math.ceil(n / columns), blocks=len(blocks))
    grid = np.full((layout.height, layout.width, 3), fill, dtype=np.uint8)
    for b, images in enumerate(blocks):
        for i, im in enumerate(images):
            top, left, bottom, right = layout.cell_box(b, i)
            grid[top:bottom, left:right] = im
    return grid, layout


def grid_origin(layout: GridLayout) -> tuple[int, int]:
    """(top, left) pixel of the grid array inside the PNG that `samples_figure` draws."""
    return MARGIN_TOP, MARGIN_LEFT


def samples_figure(data: ReportData, exp_name: str) -> tuple[Figure, str]:
    """The grid figure of one experiment: stage blocks top to bottom, stage labels on the left."""
    params = data.params
    exp = params.experiment(exp_name)
    report = exp.report
    n = min(report.grid_samples, exp.sample.num_samples)
    stages = list(range(1, exp.stages.count + 1))
    images, labels = zip(*(load_samples(data.root, exp_name, k, n) for k in stages))
    n = min(len(x) for x in images)  # a stage holding fewer samples than asked limits every block
    images = [x[:n] for x in images]
    same_classes = all(np.array_equal(labels[0][:n], lab[:n]) for lab in labels)
    if not same_classes:
        log.warning("%s: sample classes differ across stages (priors from real latents?)", exp_name)

    grid, layout = compose_grid(images, report.grid_columns)
    width = max(MARGIN_LEFT + layout.width + MARGIN_RIGHT, MIN_WIDTH)
    height = MARGIN_TOP + layout.height + MARGIN_BOTTOM
    fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI)
    # Axes placed on whole pixels and exactly the grid's size: one array pixel per PNG pixel.
    ax = fig.add_axes((MARGIN_LEFT / width, MARGIN_BOTTOM / height, layout.width / width, layout.height / height))
    ax.imshow(grid, interpolation="nearest", aspect="auto")
    ax.set_axis_off()

    rows = data.metrics[data.metrics["experiment"] == exp_name].set_index("stage")
    for b, k in enumerate(stages):
        center = layout.block_top(b) + layout.block_h / 2
        ax.text(-10, center, f"Stage {k}", ha="right", va="bottom", fontsize=11, fontweight="bold", clip_on=False)
        if k in rows.index and not np.isnan(rows.loc[k, "metric"]):
            ax.text(-10, center + 4, f"{rows.loc[k, 'metric_name']} {rows.loc[k, 'metric']:.2f}",
                    ha="right", va="top", fontsize=9, color="0.25", clip_on=False)

    title = f"{exp_name}: {exp.description}" if exp.description else exp_name
    chars = max(40, int(width / 7))
    fig.text(6 / width, 1 - 6 / height, textwrap.shorten(title, chars, placeholder="…"),
             ha="left", va="top", fontsize=11, fontweight="bold")
    scale = layout.cell_h / images[0].shape[1]
    how = f"{scale:g}× nearest-neighbour" if scale >= 1 else f"shrunk to {layout.cell_h} px"
    sub = f"first {n} samples, same indices across stages ({how})"
    if not same_classes:
        sub += "; classes differ across stages"
    fig.text(6 / width, 1 - 26 / height, sub, ha="left", va="top", fontsize=9, color="0.3")

    caption = (f"Samples of `{exp_name}` ({exp.description or 'no description'}): the first {n} samples, "
               f"one row block per stage, the same sample indices (class and seed) in every block; {how}.")
    if not same_classes:
        caption += " Classes differ across stages (stage-2 priors from real latents)."
    return fig, caption
