"""Constructors named like the official torch.hub entrypoints of DINOv3 and DINOv2.

    model = dinov3_vitl16(weights="/path/dinov3_vitl16_pretrain_lvd1689m-8aa4cbdd.pth")
    model = dinov2_vitb14_reg(weights="/path/dinov2_vitb14_reg4_pretrain.pth")
    model = torch.hub.load("/path/to/dinobridge", "dinov2_vitl14", source="local", weights=...)

`weights=None` gives a randomly initialised model (official init). Nothing is downloaded: `weights` must be a local
file (`.pth` or `.safetensors`, official, teacher-export or HF layout). Every constructor works under
`with torch.device("meta"):`. Extra keyword arguments override the architecture (e.g. `drop_path_rate=0.1`).
"""

from __future__ import annotations

import os
from typing import Any, Callable, Optional

from dinobridge.models.checkpoint import extract_backbone_state_dict, load_pretrained, load_state_dict_file
from dinobridge.models.vision_transformer import VisionTransformer, ViTConfig

# Released DINOv3 ViTs: patch 16, 4 storage tokens, LayerScale 1e-5, LayerNorm eps 1e-5, masked K bias, RoPE base 100.
_DINOV3_COMMON = dict(
    patch_size=16, n_storage_tokens=4, layerscale=1e-5, norm_layer="layernormbf16", mask_k_bias=True,
    pos_embed_type="rope", pos_embed_rope_base=100.0, pos_embed_rope_normalize_coords="separate",
    pos_embed_rope_rescale_coords=2.0, pos_embed_rope_dtype="fp32", qkv_bias=True, proj_bias=True, ffn_bias=True,
)
DINOV3_ARCHS: dict[str, dict[str, Any]] = {
    "dinov3_vits16": dict(embed_dim=384, depth=12, num_heads=6, ffn_layer="mlp", ffn_ratio=4.0),
    "dinov3_vits16plus": dict(embed_dim=384, depth=12, num_heads=6, ffn_layer="swiglu", ffn_ratio=6.0),
    "dinov3_vitb16": dict(embed_dim=768, depth=12, num_heads=12, ffn_layer="mlp", ffn_ratio=4.0),
    "dinov3_vitl16": dict(embed_dim=1024, depth=24, num_heads=16, ffn_layer="mlp", ffn_ratio=4.0),
    "dinov3_vitl16plus": dict(embed_dim=1024, depth=24, num_heads=16, ffn_layer="swiglu", ffn_ratio=6.0),
    "dinov3_vith16plus": dict(embed_dim=1280, depth=32, num_heads=20, ffn_layer="swiglu", ffn_ratio=6.0),
    "dinov3_vit7b16": dict(embed_dim=4096, depth=40, num_heads=32, ffn_layer="swiglu64", ffn_ratio=3.0,
                           qkv_bias=False, untie_global_and_local_cls_norm=True),
}

# Released DINOv2 ViTs: patch 14, learned position embedding for 518 px (37 x 37), LayerScale 1e-5, LayerNorm 1e-6.
_DINOV2_COMMON = dict(
    patch_size=14, img_size=518, layerscale=1e-5, norm_layer="layernorm", pos_embed_type="learned",
    qkv_bias=True, proj_bias=True, ffn_bias=True, interpolate_offset=0.1, interpolate_antialias=False,
)
_DINOV2_SIZES = {
    "s": dict(embed_dim=384, depth=12, num_heads=6, ffn_layer="mlp"),
    "b": dict(embed_dim=768, depth=12, num_heads=12, ffn_layer="mlp"),
    "l": dict(embed_dim=1024, depth=24, num_heads=16, ffn_layer="mlp"),
    "g": dict(embed_dim=1536, depth=40, num_heads=24, ffn_layer="swiglufused"),
}
DINOV2_ARCHS: dict[str, dict[str, Any]] = {}
for _s, _a in _DINOV2_SIZES.items():
    DINOV2_ARCHS[f"dinov2_vit{_s}14"] = dict(_a, n_storage_tokens=0)
    # register variants interpolate with antialias and no offset (official hub settings)
    DINOV2_ARCHS[f"dinov2_vit{_s}14_reg"] = dict(_a, n_storage_tokens=4, interpolate_offset=0.0,
                                                  interpolate_antialias=True)


def hub_config(name: str, **overrides: Any) -> ViTConfig:
    """The ViTConfig of a hub entrypoint, with overrides."""
    if name in DINOV3_ARCHS:
        base = {**_DINOV3_COMMON, **DINOV3_ARCHS[name]}
    elif name in DINOV2_ARCHS:
        base = {**_DINOV2_COMMON, **DINOV2_ARCHS[name]}
    else:
        raise ValueError(f"unknown hub model {name!r}; expected one of {sorted(DINOV3_ARCHS) + sorted(DINOV2_ARCHS)}")
    return ViTConfig(**{**base, **overrides})


def build_hub_model(name: str, weights: Optional[str | os.PathLike] = None, **overrides: Any) -> VisionTransformer:
    """Build a hub model; with `weights`, load that local file strictly."""
    if weights is not None and not os.path.isfile(weights):
        raise FileNotFoundError(f"weights file not found: {weights} (nothing is downloaded; pass a local file)")
    if weights is not None and name == "dinov3_vitl16" and "untie_global_and_local_cls_norm" not in overrides:
        # LVD and SAT ViT-L/16 differ only by `local_cls_norm`; read it from the file instead of the file name.
        sd = extract_backbone_state_dict(load_state_dict_file(weights))
        overrides["untie_global_and_local_cls_norm"] = any(k.startswith("local_cls_norm.") for k in sd)
    model = VisionTransformer(hub_config(name, **overrides))
    if weights is not None:
        load_pretrained(model, weights, strict=True)
    return model


def _entrypoint(name: str) -> Callable[..., VisionTransformer]:
    def fn(weights: Optional[str | os.PathLike] = None, pretrained: bool = True, **kwargs: Any) -> VisionTransformer:
        kwargs.pop("check_hash", None)  # accepted for torch.hub compatibility
        return build_hub_model(name, weights if pretrained else None, **kwargs)

    fn.__name__ = name
    fn.__doc__ = f"{name}: official architecture; `weights` = local .pth/.safetensors file or None (random init)."
    return fn


dinov3_vits16 = _entrypoint("dinov3_vits16")
dinov3_vits16plus = _entrypoint("dinov3_vits16plus")
dinov3_vitb16 = _entrypoint("dinov3_vitb16")
dinov3_vitl16 = _entrypoint("dinov3_vitl16")
dinov3_vitl16plus = _entrypoint("dinov3_vitl16plus")
dinov3_vith16plus = _entrypoint("dinov3_vith16plus")
dinov3_vit7b16 = _entrypoint("dinov3_vit7b16")
dinov2_vits14 = _entrypoint("dinov2_vits14")
dinov2_vitb14 = _entrypoint("dinov2_vitb14")
dinov2_vitl14 = _entrypoint("dinov2_vitl14")
dinov2_vitg14 = _entrypoint("dinov2_vitg14")
dinov2_vits14_reg = _entrypoint("dinov2_vits14_reg")
dinov2_vitb14_reg = _entrypoint("dinov2_vitb14_reg")
dinov2_vitl14_reg = _entrypoint("dinov2_vitl14_reg")
dinov2_vitg14_reg = _entrypoint("dinov2_vitg14_reg")

ENTRYPOINTS = sorted(DINOV3_ARCHS) + sorted(DINOV2_ARCHS)
__all__ = ["ENTRYPOINTS", "build_hub_model", "hub_config", *ENTRYPOINTS]
