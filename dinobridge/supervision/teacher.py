"""A frozen, stop-gradient DINO teacher for semantic supervision."""

from __future__ import annotations

import math
import os
import warnings
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from .pooling import pool_patch_tokens

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "SAT493M_MEAN", "SAT493M_STD", "TeacherOutput", "FrozenTeacher"]

# Input normalisation of the released DINOv2/DINOv3 web-image models (RGB, images scaled to [0, 1]).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# DINOv3 satellite (SAT-493M) models, per the official README.
SAT493M_MEAN = (0.430, 0.411, 0.296)
SAT493M_STD = (0.213, 0.156, 0.143)


class TeacherOutput(NamedTuple):
    """Teacher features: ``cls`` [B, D], ``patch`` [B, N, D] (row-major over ``grid`` = (h, w), N = h * w)."""

    cls: Tensor
    patch: Tensor
    grid: tuple[int, int]

    def pooled_patches(self, out_grid: int | tuple[int, int]) -> Tensor:
        """Patch tokens average-pooled to a ``gh x gw`` grid: [B, gh * gw, D]."""
        return pool_patch_tokens(self.patch, self.grid, out_grid)


def _infer_patch_size(backbone: nn.Module) -> int | tuple[int, int] | None:
    p = getattr(backbone, "patch_size", None)
    if p is None:
        p = getattr(getattr(backbone, "patch_embed", None), "patch_size", None)
    return p


def _infer_embed_dim(backbone: nn.Module) -> int | None:
    for name in ("embed_dim", "num_features"):
        v = getattr(backbone, name, None)
        if isinstance(v, int):
            return v
    return None


class FrozenTeacher(nn.Module):
    """Frozen DINO backbone used as a stop-gradient teacher.

    Wraps any module with ``forward_features(x) -> dict`` holding ``x_norm_clstoken`` [B, D] and
    ``x_norm_patchtokens`` [B, N, D] (the official DINOv2/DINOv3 API; see :class:`HFBackboneAdapter` for
    Hugging Face models). All parameters get ``requires_grad=False``, the module stays in eval mode whatever
    ``train()`` is called with, and ``forward`` runs under ``torch.no_grad()``.

    forward: x [B, 3, H, W] (already normalised with ``mean`` / ``std``) -> :class:`TeacherOutput`
    (``cls`` [B, D], ``patch`` [B, N, D], ``grid`` (H // p, W // p)). The input is cast to the backbone's
    parameter dtype; outputs keep the backbone's dtype.

    Attributes ``mean`` / ``std`` are the expected input normalisation (RGB, images in [0, 1]); preprocessing
    is the caller's job, :meth:`normalize` is a convenience.
    """

    def __init__(
        self,
        backbone: nn.Module,
        *,
        patch_size: int | None = None,
        embed_dim: int | None = None,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
    ) -> None:
        super().__init__()
        if not callable(getattr(backbone, "forward_features", None)):
            raise TypeError(
                f"backbone: expected a module with forward_features(x) -> dict, got {type(backbone).__name__}"
            )
        self.backbone = backbone
        p = patch_size if patch_size is not None else _infer_patch_size(backbone)
        if isinstance(p, (tuple, list)):
            if len(set(p)) != 1:
                raise ValueError(f"patch_size: only square patches are supported, got {p!r}")
            p = p[0]
        self.patch_size: int | None = int(p) if p is not None else None
        self.embed_dim: int | None = embed_dim if embed_dim is not None else _infer_embed_dim(backbone)
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"mean/std: expected 3 values each (RGB), got {mean!r} and {std!r}")
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)
        super().requires_grad_(False)
        super().train(False)

    @classmethod
    def from_hub(cls, name: str, weights: str | os.PathLike | None = None, **kwargs: Any) -> "FrozenTeacher":
        """Build the backbone with ``dinobridge.hub.<name>(weights=weights, **kwargs)`` and freeze it.

        ``name`` is a hub constructor such as ``"dinov3_vitl16"`` or ``"dinov2_vitl14"``. Weight files whose name
        contains ``sat493m`` select the satellite normalisation statistics.
        """
        try:
            from dinobridge import hub
        except ImportError as e:  # hub is optional for users who pass their own backbone
            raise ImportError(f"FrozenTeacher.from_hub needs dinobridge.hub, which failed to import: {e}") from e
        ctor = getattr(hub, name, None)
        if not callable(ctor) or name.startswith("_"):
            raise ValueError(f"name: no constructor {name!r} in dinobridge.hub")
        if weights is None:
            warnings.warn(
                f"FrozenTeacher.from_hub({name!r}): no weights given, the teacher is randomly initialised",
                stacklevel=2,
            )
        backbone = ctor(weights=weights, **kwargs)
        sat = weights is not None and "sat493m" in os.path.basename(os.fspath(weights)).lower()
        return cls(
            backbone,
            mean=SAT493M_MEAN if sat else IMAGENET_MEAN,
            std=SAT493M_STD if sat else IMAGENET_STD,
        )

    @classmethod
    def from_hf(cls, name_or_path: str | os.PathLike, **kwargs: Any) -> "FrozenTeacher":
        """Load a Hugging Face DINOv2/DINOv3 model (``transformers.AutoModel``) and freeze it.

        ``kwargs`` go to ``AutoModel.from_pretrained``. Mean/std come from ``preprocessor_config.json`` when
        present, ImageNet statistics otherwise.
        """
        from .hf_adapter import HFBackboneAdapter, hf_image_stats

        try:
            from transformers import AutoModel
        except ImportError as e:
            raise ImportError(f"FrozenTeacher.from_hf needs the transformers package: {e}") from e
        adapter = HFBackboneAdapter(AutoModel.from_pretrained(name_or_path, **kwargs))
        mean, std = hf_image_stats(name_or_path)
        return cls(adapter, mean=mean, std=std)

    # -- frozen behaviour -------------------------------------------------------------------------
    def train(self, mode: bool = True) -> "FrozenTeacher":
        """Ignores ``mode``: the teacher always stays in eval mode (no dropout / drop-path)."""
        return super().train(False)

    def requires_grad_(self, requires_grad: bool = True) -> "FrozenTeacher":
        """Ignores ``requires_grad``: the teacher's parameters stay frozen."""
        return super().requires_grad_(False)

    # -- features ---------------------------------------------------------------------------------
    def normalize(self, x: Tensor) -> Tensor:
        """Images in [0, 1], x [B, 3, H, W] -> ``(x - mean) / std`` (same shape and dtype)."""
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std

    def _grid(self, x: Tensor, n: int) -> tuple[int, int]:
        if self.patch_size is not None:
            h, w = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
            if h * w == n:
                return h, w
        s = math.isqrt(n)
        if s * s != n:
            raise ValueError(
                f"x: cannot infer the patch grid of {n} tokens for input {tuple(x.shape[-2:])}; "
                "pass patch_size= to FrozenTeacher"
            )
        return s, s

    @torch.no_grad()
    def forward(self, x: Tensor) -> TeacherOutput:
        if x.dim() != 4:
            raise ValueError(f"x: expected an image batch [B, C, H, W], got shape {tuple(x.shape)}")
        param = next(self.backbone.parameters(), None)
        if param is not None and x.is_floating_point():
            x = x.to(dtype=param.dtype)
        feats = self.backbone.forward_features(x)
        if not isinstance(feats, dict) or "x_norm_clstoken" not in feats or "x_norm_patchtokens" not in feats:
            raise TypeError("backbone.forward_features: expected a dict with x_norm_clstoken and x_norm_patchtokens")
        cls_tok = feats["x_norm_clstoken"].detach()
        patch = feats["x_norm_patchtokens"].detach()
        return TeacherOutput(cls_tok, patch, self._grid(x, patch.shape[1]))

    def extra_repr(self) -> str:
        return f"patch_size={self.patch_size}, embed_dim={self.embed_dim}, mean={self.mean}, std={self.std}"
