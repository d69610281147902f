"""A small viridis-like colormap and picture assembly with PIL (no matplotlib)."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor

# Anchor colours of matplotlib's viridis at 0, 1/6, ..., 1 (sRGB, 0..255); linear interpolation in between.
VIRIDIS_ANCHORS = np.array([
    [68, 1, 84], [68, 57, 131], [49, 104, 142], [33, 145, 140], [53, 183, 121], [144, 215, 67], [253, 231, 37],
], dtype=np.float64)


def colormap(values: np.ndarray | Tensor, anchors: np.ndarray = VIRIDIS_ANCHORS) -> np.ndarray:
    """values in [0, 1] (any shape S; clipped) -> uint8 colours [*S, 3], interpolated between the anchor colours."""
    v = np.clip(np.asarray(values.detach().cpu() if isinstance(values, Tensor) else values, dtype=np.float64), 0, 1)
    pos = v * (len(anchors) - 1)
    i0 = np.clip(np.floor(pos).astype(np.int64), 0, len(anchors) - 2)
    frac = (pos - i0)[..., None]
    rgb = anchors[i0] * (1 - frac) + anchors[i0 + 1] * frac
    return np.round(rgb).astype(np.uint8)


def to_pil(rgb: Tensor) -> Image.Image:
    """Float [3, H, W] in [0, 1] -> PIL RGB image."""
    arr = (rgb.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(np.ascontiguousarray(arr))


def upsample_nearest(img: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Resize a (small) map to `size` = (width, height) with nearest neighbour (one block of pixels per patch)."""
    return img.resize(size, resample=Image.NEAREST)


def heatmap(values: Tensor, size: tuple[int, int]) -> Image.Image:
    """A map [h, w] -> colour heat map, min-max scaled to [0, 1], upsampled (nearest) to `size` = (width, height)."""
    v = values.detach().float().cpu()
    v = (v - v.min()) / (v.max() - v.min()).clamp_min(1e-12)
    return upsample_nearest(Image.fromarray(colormap(v)), size)


def grid(tiles: Sequence[Image.Image], cols: int | None = None, gap: int = 2) -> Image.Image:
    """Equal-sized tiles -> one image, row-major, `cols` per row (default ceil(sqrt(n))), white gaps of `gap` px."""
    if not tiles:
        raise ValueError("grid: no tiles")
    w, h = tiles[0].size
    cols = cols or math.ceil(math.sqrt(len(tiles)))
    rows = math.ceil(len(tiles) / cols)
    out = Image.new("RGB", (cols * w + (cols - 1) * gap, rows * h + (rows - 1) * gap), (255, 255, 255))
    for i, tile in enumerate(tiles):
        r, c = divmod(i, cols)
        out.paste(tile, (c * (w + gap), r * (h + gap)))
    return out
