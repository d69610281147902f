"""Average pooling of patch features to a coarse g x g grid (for coarse patch alignment)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

__all__ = ["as_grid", "pool_patch_tokens", "pool_feature_map"]


def as_grid(g: int | tuple[int, int], name: str = "grid") -> tuple[int, int]:
    """Normalise ``g`` or ``(gh, gw)`` to a tuple of two positive ints."""
    gh, gw = (g, g) if isinstance(g, int) else tuple(g)
    if not (isinstance(gh, int) and isinstance(gw, int) and gh > 0 and gw > 0):
        raise ValueError(f"{name}: expected a positive int or a pair of positive ints, got {g!r}")
    return gh, gw


def pool_feature_map(fmap: Tensor, out_grid: int | tuple[int, int]) -> Tensor:
    """Adaptive average pooling of a feature map.

    fmap [B, C, H, W] -> [B, gh * gw, C]; cells in row-major order (row index first).
    """
    if fmap.dim() != 4:
        raise ValueError(f"fmap: expected a [B, C, H, W] tensor, got shape {tuple(fmap.shape)}")
    pooled = F.adaptive_avg_pool2d(fmap, as_grid(out_grid, "out_grid"))  # [B, C, gh, gw]
    return pooled.flatten(2).transpose(1, 2)


def pool_patch_tokens(tokens: Tensor, grid: tuple[int, int], out_grid: int | tuple[int, int]) -> Tensor:
    """Pool patch tokens laid out row-major on an ``h x w`` grid to a ``gh x gw`` grid.

    tokens [B, N = h * w, D] -> [B, gh * gw, D]; cells in row-major order.
    """
    if tokens.dim() != 3:
        raise ValueError(f"tokens: expected a [B, N, D] tensor, got shape {tuple(tokens.shape)}")
    h, w = as_grid(grid, "grid")
    b, n, d = tokens.shape
    if h * w != n:
        raise ValueError(f"grid: {h}x{w} does not match the {n} patch tokens")
    fmap = tokens.transpose(1, 2).reshape(b, d, h, w)
    return pool_feature_map(fmap, out_grid)
