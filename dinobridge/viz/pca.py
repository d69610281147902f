"""PCA of patch features: the three leading principal components of patch tokens as an RGB map (DINO picture).

The PCA is fitted over all patch tokens given (the patches of every image together, so one colour means the same
direction of feature space in every image), or per image with `per_image=True`. Each component is min-max scaled to
[0, 1] over the same set of patches the PCA was fitted on. Component signs are fixed so that the largest-magnitude
loading of each component is positive (PCA signs are otherwise arbitrary).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor


def fit_pca(tokens: Tensor, k: int = 3) -> tuple[Tensor, Tensor]:
    """tokens [M, D] -> (mean [D], components [k, D]) with orthonormal rows, by decreasing explained variance.

    The covariance [D, D] is accumulated in float32 and diagonalised in float64 on the CPU (small: D x D).
    """
    if tokens.dim() != 2:
        raise ValueError(f"tokens: expected [M, D], got shape {tuple(tokens.shape)}")
    m, d = tokens.shape
    if not 1 <= k <= d:
        raise ValueError(f"k: expected 1..{d} components, got {k}")
    if m < 2:
        raise ValueError(f"tokens: PCA needs at least 2 tokens, got {m}")
    x = tokens.detach().float().cpu()
    mean = x.mean(dim=0)
    xc = x - mean
    cov = (xc.T @ xc).double() / (m - 1)
    _, vecs = torch.linalg.eigh(cov)  # ascending eigenvalues
    comps = vecs[:, -k:].flip(-1).T  # [k, D], largest first
    idx = comps.abs().argmax(dim=1)
    signs = torch.sign(comps.gather(1, idx[:, None]))
    signs[signs == 0] = 1.0
    return mean, (comps * signs).float()


def project(tokens: Tensor, mean: Tensor, components: Tensor) -> Tensor:
    """tokens [..., D] -> projections [..., k] onto the fitted components (float32, CPU)."""
    return (tokens.detach().float().cpu() - mean) @ components.T


def pca_project(patch_tokens: Tensor | Sequence[Tensor], k: int = 3, per_image: bool = False,
                mask: Optional[Sequence[Tensor]] = None) -> list[Tensor]:
    """Pre-scaling PCA projections: per image [HW_i, k].

    `patch_tokens`: [N, HW, D] or a list of [HW_i, D] (images of different sizes). The PCA is fitted over the patches
    of all images (or each image alone with `per_image`); with `mask` (per image a bool [HW_i]) only the masked-in
    patches enter the fit (all patches are still projected).
    """
    feats = [t for t in patch_tokens] if isinstance(patch_tokens, Tensor) else list(patch_tokens)
    if not feats:
        raise ValueError("patch_tokens: got no images")
    for f in feats:
        if f.dim() != 2:
            raise ValueError(f"patch_tokens: expected [N, HW, D] or a list of [HW, D], got an item of {tuple(f.shape)}")
    masks = list(mask) if mask is not None else [None] * len(feats)

    def fit_set(fs: list[Tensor], ms: list[Optional[Tensor]]) -> tuple[Tensor, Tensor]:
        rows = [f if m is None else f[m.to(f.device)] for f, m in zip(fs, ms)]
        return fit_pca(torch.cat(rows), k)

    if per_image:
        return [project(f, *fit_set([f], [m])) for f, m in zip(feats, masks)]
    mean, comps = fit_set(feats, masks)
    return [project(f, mean, comps) for f in feats]


def minmax_scale(projs: list[Tensor], per_image: bool = False, mask: Optional[Sequence[Tensor]] = None) -> list[Tensor]:
    """Min-max scale each component (last dim) to [0, 1]: over all images, or per image; over masked-in patches.

    Values outside the fitted range (patches left out by the mask) are clamped to [0, 1].
    """
    masks = list(mask) if mask is not None else [None] * len(projs)
    sel = [p if m is None else p[m.cpu()] for p, m in zip(projs, masks)]

    def scale(p: Tensor, ref: Tensor) -> Tensor:
        lo, hi = ref.min(dim=0).values, ref.max(dim=0).values
        return ((p - lo) / (hi - lo).clamp_min(1e-12)).clamp(0.0, 1.0)

    if per_image:
        return [scale(p, s) for p, s in zip(projs, sel)]
    ref = torch.cat(sel)
    return [scale(p, ref) for p in projs]


def border_mask(h: int, w: int) -> Tensor:
    """bool [h * w]: True on the outermost ring of an h x w patch grid."""
    m = torch.zeros(h, w, dtype=torch.bool)
    m[0, :] = m[-1, :] = m[:, 0] = m[:, -1] = True
    return m.flatten()


def foreground_masks(patch_tokens: Sequence[Tensor], grids: Sequence[tuple[int, int]], threshold: float,
                     per_image: bool = False) -> list[Tensor]:
    """Foreground patches (bool [HW_i] per image) by thresholding the first principal component.

    The first component is min-max scaled to [0, 1]; its sign is chosen so that the patches on the border of the
    grids score lower on average than the interior (objects tend to sit in the middle, background on the border);
    patches scoring above `threshold` are foreground.
    """
    first = pca_project(patch_tokens, k=1, per_image=per_image)
    borders = [border_mask(h, w) for h, w in grids]
    if per_image:
        groups = [[i] for i in range(len(first))]
    else:
        groups = [list(range(len(first)))]
    out: list[Optional[Tensor]] = [None] * len(first)
    for g in groups:
        vals = torch.cat([first[i][:, 0] for i in g])
        brd = torch.cat([borders[i] for i in g])
        sign = -1.0 if (brd.any() and (~brd).any() and vals[brd].mean() > vals[~brd].mean()) else 1.0
        lo, hi = (sign * vals).min(), (sign * vals).max()
        for i in g:
            s = (sign * first[i][:, 0] - lo) / (hi - lo).clamp_min(1e-12)
            out[i] = s > threshold
    return out  # type: ignore[return-value]


def pca_rgb_list(patch_tokens: Sequence[Tensor], grids: Sequence[tuple[int, int]], per_image: bool = False,
                 fg_threshold: Optional[float] = None) -> list[Tensor]:
    """Per image [HW_i, D] -> RGB map [3, h_i, w_i] in [0, 1] (first three components as R, G, B).

    With `fg_threshold`, the foreground is found on the first component (see `foreground_masks`), the PCA is refitted
    on the foreground patches only and background patches are black.
    """
    feats = list(patch_tokens)
    if len(grids) != len(feats):
        raise ValueError(f"grids: expected one (h, w) per image ({len(feats)}), got {len(grids)}")
    for f, (h, w) in zip(feats, grids):
        if f.shape[0] != h * w:
            raise ValueError(f"grid {h}x{w} does not match {f.shape[0]} patch tokens")
    masks = None
    if fg_threshold is not None:
        masks = foreground_masks(feats, grids, fg_threshold, per_image)
        if sum(int(m.sum()) for m in masks) < 2:
            raise ValueError(f"fg_threshold {fg_threshold}: fewer than 2 foreground patches; lower the threshold")
        if per_image:  # an image with < 2 foreground patches keeps all of them for its own fit
            masks = [m if int(m.sum()) >= 2 else torch.ones_like(m) for m in masks]
    projs = pca_project(feats, k=3, per_image=per_image, mask=masks)
    scaled = minmax_scale(projs, per_image=per_image, mask=masks)
    out = []
    for i, (s, (h, w)) in enumerate(zip(scaled, grids)):
        if masks is not None:
            s = s * masks[i].to(s.dtype)[:, None]
        out.append(s.T.reshape(3, h, w).contiguous())
    return out


def pca_rgb(patch_tokens: Tensor, grid: tuple[int, int], per_image: bool = False,
            fg_threshold: Optional[float] = None) -> Tensor:
    """patch_tokens [N, HW, D] on an h x w grid -> float tensor [N, 3, h, w] in [0, 1] (see `pca_rgb_list`)."""
    if patch_tokens.dim() != 3:
        raise ValueError(f"patch_tokens: expected [N, HW, D], got shape {tuple(patch_tokens.shape)}")
    h, w = grid
    return torch.stack(pca_rgb_list(list(patch_tokens), [(h, w)] * patch_tokens.shape[0], per_image, fg_threshold))
