"""A frozen DINO backbone as a feature extractor (teacher features for distillation, retrieval, probing, ...).

    fx = FeatureExtractor.from_hub("dinov3_vitl16", weights="/path/dinov3_vitl16_pretrain_lvd1689m.pth").cuda()
    f = fx.extract(images_in_minus1_1, input_range="-1_1")   # preprocess + forward
    f.cls [B, D], f.storage [B, R, D], f.patch_tokens [B, HW, D], f.feature_map [B, D, H/p, W/p]

    fx = FeatureExtractor(backbone, layers=[5, 11])   # intermediate blocks -> list of Features, one per block

Works with any backbone that has the official API (`forward_features` returning `x_norm_clstoken`,
`x_norm_patchtokens` and `x_storage_tokens` / `x_norm_regtokens`; `get_intermediate_layers`; `patch_size`): the
dinobridge ViT as well as the official DINOv2 / DINOv3 models.
"""

from __future__ import annotations

import contextlib
import inspect
import os
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from dinobridge.features.preprocess import ImageInput, SizeArg, preprocess

LayerSpec = Optional[Union[int, Sequence[int]]]


@dataclass
class Features:
    """Features of one block's output for a batch of B images on an h x w patch grid.

    cls [B, D] (normed CLS = the global embedding when `norm`), storage [B, R, D] (None when the backbone cannot
    return them), patch_tokens [B, h*w, D] (row-major), grid (h, w), layer: the 0-based block index.
    """

    cls: Tensor
    storage: Optional[Tensor]
    patch_tokens: Tensor
    grid: tuple[int, int]
    layer: int

    @property
    def feature_map(self) -> Tensor:
        """Patch tokens as a map [B, D, h, w]."""
        B, _, D = self.patch_tokens.shape
        return self.patch_tokens.transpose(1, 2).reshape(B, D, *self.grid)

    def as_dict(self) -> dict[str, Any]:
        """{"cls", "storage", "patch_tokens", "feature_map", "grid", "layer"}."""
        return {"cls": self.cls, "storage": self.storage, "patch_tokens": self.patch_tokens,
                "feature_map": self.feature_map, "grid": self.grid, "layer": self.layer}


def resolve_layers(layers: LayerSpec, depth: int) -> Optional[list[int]]:
    """None -> None (final output); int n -> the last n blocks; list -> those blocks (negatives count from the end).

    The result is sorted and without duplicates (blocks are visited in order).
    """
    if layers is None:
        return None
    if isinstance(layers, bool):
        raise ValueError(f"layers: expected an int or a list of block indices, got {layers!r}")
    if isinstance(layers, int):
        if not 1 <= layers <= depth:
            raise ValueError(f"layers: the last-n count must be in 1..{depth}, got {layers}")
        return list(range(depth - layers, depth))
    idx = [int(i) for i in layers]
    if not idx:
        raise ValueError("layers: got an empty list of block indices")
    bad = [i for i in idx if not -depth <= i < depth]
    if bad:
        raise ValueError(f"layers: block indices {bad} out of range for a {depth}-block backbone "
                         f"(valid: 0..{depth - 1} or -{depth}..-1)")
    return sorted({i % depth for i in idx})


class FeatureExtractor(nn.Module):
    """Frozen backbone wrapper: always in eval mode (also when a parent module calls `.train()`), no gradients.

    forward(x): x [B, 3, H, W], already normalised, H and W multiples of the patch size ->
      `Features` of the final output (layers=None), or a list of `Features`, one per chosen block (sorted).
    `norm`: apply the backbone's final norm to the chosen outputs (official default True; with layers=None and
    norm=False the raw output of the last block is returned). `autocast_dtype`: e.g. torch.bfloat16 to run the
    backbone under autocast; outputs are always float32.
    """

    def __init__(self, backbone: nn.Module, layers: LayerSpec = None, norm: bool = True,
                 autocast_dtype: Optional[torch.dtype] = None) -> None:
        super().__init__()
        for name in ("forward_features", "get_intermediate_layers", "patch_size"):
            if not hasattr(backbone, name):
                raise TypeError(f"backbone: expected the official DINO API, {type(backbone).__name__} lacks {name!r}")
        self.backbone = backbone
        backbone.requires_grad_(False)
        p = backbone.patch_size
        self.patch_size = int(p[0] if isinstance(p, (tuple, list)) else p)
        self.depth = int(getattr(backbone, "n_blocks", 0) or len(backbone.blocks))
        self.layer_indices = resolve_layers(layers, self.depth)
        self.norm = bool(norm)
        self.autocast_dtype = autocast_dtype
        params = inspect.signature(backbone.get_intermediate_layers).parameters
        self._has_extra_tokens = "return_extra_tokens" in params  # DINOv3 API; official DINOv2 lacks it
        self.model_name: Optional[str] = None
        self.weights: Optional[str] = None
        self.eval()

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_hub(cls, name: str, weights: Optional[Union[str, os.PathLike]] = None, *, random_init: bool = False,
                 layers: LayerSpec = None, norm: bool = True, autocast_dtype: Optional[torch.dtype] = None,
                 device: Optional[Union[str, torch.device]] = None, **overrides: Any) -> "FeatureExtractor":
        """Build hub model `name` (see `dinobridge.hub.ENTRYPOINTS`) from a local weights file.

        `weights=None` is refused unless `random_init=True`, so features never come from a random model by accident.
        `overrides` change the architecture (e.g. `ffn_layer="swiglu64"` for a checkpoint trained with it).
        """
        from dinobridge.hub import build_hub_model

        if weights is None and not random_init:
            raise ValueError(f"weights: {name} needs a local weights file; pass random_init=True for a random model")
        if weights is not None and random_init:
            raise ValueError("weights and random_init=True are exclusive: choose one")
        backbone = build_hub_model(name, weights, **overrides)
        if device is not None:
            backbone = backbone.to(device)
        fx = cls(backbone, layers=layers, norm=norm, autocast_dtype=autocast_dtype)
        fx.model_name, fx.weights = name, (None if weights is None else str(weights))
        return fx

    def train(self, mode: bool = True) -> "FeatureExtractor":
        """Stays in eval mode whatever `mode` is (a frozen teacher must not use drop-path / patch-drop)."""
        return super().train(False)

    @property
    def device(self) -> torch.device:
        return next(self.backbone.parameters()).device

    # ------------------------------------------------------------------ forward
    def _autocast(self, x: Tensor):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=x.device.type, dtype=self.autocast_dtype)

    def _check_input(self, x: Tensor) -> tuple[int, int]:
        if not isinstance(x, Tensor) or x.dim() != 4 or x.shape[1] != 3:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"x: expected a normalised batch [B, 3, H, W], got {shape}; see FeatureExtractor.extract")
        H, W = x.shape[-2:]
        p = self.patch_size
        if H % p or W % p:
            raise ValueError(f"x: height and width must be multiples of the patch size {p}, got {H}x{W}; "
                             f"use dinobridge.features.preprocess or FeatureExtractor.extract")
        return H // p, W // p

    @torch.no_grad()
    def forward(self, x: Tensor) -> Union[Features, list[Features]]:
        grid = self._check_input(x)
        with self._autocast(x):
            if self.layer_indices is None and self.norm:
                out = self.backbone.forward_features(x)
                storage = out.get("x_storage_tokens", out.get("x_norm_regtokens"))
                feats = [Features(out["x_norm_clstoken"], storage, out["x_norm_patchtokens"], grid, self.depth - 1)]
            else:
                indices = self.layer_indices if self.layer_indices is not None else [self.depth - 1]
                kwargs = {"return_extra_tokens": True} if self._has_extra_tokens else {}
                outs = self.backbone.get_intermediate_layers(x, n=indices, return_class_token=True,
                                                             norm=self.norm, **kwargs)
                feats = [Features(o[1], o[2] if len(o) > 2 else None, o[0], grid, i) for o, i in zip(outs, indices)]
        feats = [self._to_float(f) for f in feats]
        return feats[0] if self.layer_indices is None else feats

    @staticmethod
    def _to_float(f: Features) -> Features:
        def cast(t: Optional[Tensor]) -> Optional[Tensor]:
            return None if t is None else t.float()

        return Features(cast(f.cls), cast(f.storage), cast(f.patch_tokens), f.grid, f.layer)

    def extract(self, images: ImageInput, input_range: str = "0_1", size: SizeArg = None,
                mode: str = "resize") -> Union[Features, list[Features]]:
        """Preprocess (see `dinobridge.features.preprocess`) on the backbone's device, then `forward`."""
        x = preprocess(images, self.patch_size, input_range=input_range, size=size, mode=mode, device=self.device)
        return self(x)
