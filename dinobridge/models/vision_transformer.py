"""The DINOv3 / DINOv2 vision transformer, read top to bottom.

Token layout: [cls, storage_0 .. storage_{R-1}, patches (row-major)]. DINOv3 uses RoPE (no learned position embedding);
DINOv2 uses a learned absolute position embedding over [cls, patches], bicubically interpolated to any grid, and its
register tokens are inserted after the position embedding is added. State-dict keys equal the official checkpoints'
(`cls_token`, `storage_tokens` | `register_tokens`, `mask_token`, `pos_embed`, `patch_embed.proj`, `rope_embed.periods`,
`blocks.{i}.*`, `norm`, `cls_norm`, `local_cls_norm`).

Construction does no data-dependent work, so a model can be built under `with torch.device("meta"):` and
initialised later with `init_weights()` (after `to_empty`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dinobridge.models.layers import (
    FFN_LAYERS,
    LayerScale,
    LinearKMaskedBias,
    NORM_LAYERS,
    PatchEmbed,
    RMSNorm,
    SelfAttentionBlock,
    make_norm,
)
from dinobridge.models.rope import RopePositionEmbedding


@dataclass
class ViTConfig:
    """Every option of the backbone; field names follow the `student:` block of the DINOv3 config."""

    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    ffn_ratio: float = 4.0
    ffn_layer: str = "mlp"  # mlp | swiglu | swiglu32 | swiglu64 | swiglu128 | swiglufused (DINOv2 ViT-g)
    qkv_bias: bool = True
    proj_bias: bool = True
    ffn_bias: bool = True
    mask_k_bias: bool = False
    norm_layer: str = "layernorm"  # layernorm (eps 1e-6) | layernormbf16 (eps 1e-5) | rmsnorm
    layerscale: Optional[float] = None  # LayerScale init value; None/0 = no LayerScale
    drop_path_rate: float = 0.0  # uniform over blocks, batch-subset stochastic depth (train only)
    patch_drop: float = 0.0  # train-time share of patch tokens dropped, only for inputs without masks
    n_storage_tokens: int = 0
    untie_cls_and_patch_norms: bool = False
    untie_global_and_local_cls_norm: bool = False
    pos_embed_type: Literal["rope", "learned"] = "rope"
    # RoPE (pos_embed_type = rope)
    pos_embed_rope_base: Optional[float] = 100.0
    pos_embed_rope_min_period: Optional[float] = None
    pos_embed_rope_max_period: Optional[float] = None
    pos_embed_rope_normalize_coords: str = "separate"
    pos_embed_rope_shift_coords: Optional[float] = None
    pos_embed_rope_jitter_coords: Optional[float] = None
    pos_embed_rope_rescale_coords: Optional[float] = None
    pos_embed_rope_dtype: Optional[str] = "fp32"
    # learned position embedding (pos_embed_type = learned, DINOv2)
    img_size: int = 518  # grid of the learned table = img_size // patch_size
    interpolate_offset: float = 0.1  # official DINOv2 interpolation (scale factor (n + 0.1) / M); 0 = plain resize
    interpolate_antialias: bool = False

    def __post_init__(self) -> None:
        if self.ffn_layer not in FFN_LAYERS:
            raise ValueError(f"ffn_layer: expected one of {list(FFN_LAYERS)}, got {self.ffn_layer!r}")
        if self.norm_layer not in NORM_LAYERS:
            raise ValueError(f"norm_layer: expected one of {sorted(NORM_LAYERS)}, got {self.norm_layer!r}")
        if self.pos_embed_type not in ("rope", "learned"):
            raise ValueError(f"pos_embed_type: expected rope or learned, got {self.pos_embed_type!r}")
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate: expected a value in [0, 1), got {self.drop_path_rate}")
        if not 0.0 <= self.patch_drop < 1.0:
            raise ValueError(f"patch_drop: expected a value in [0, 1), got {self.patch_drop}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")


class VisionTransformer(nn.Module):
    """DINOv3 ViT (RoPE, storage tokens) or DINOv2 ViT (learned position embedding, registers).

    Input images [B, C, H, W] with H, W multiples of the patch size p. Outputs per input (see `forward_features`):
    `x_norm_clstoken` [B, D], `x_storage_tokens` [B, R, D], `x_norm_patchtokens` [B, H/p * W/p, D],
    `x_prenorm` [B, 1 + R + HW, D], `masks` [B, HW] or None.
    """

    def __init__(self, cfg: Optional[ViTConfig] = None, **kwargs: Any) -> None:
        super().__init__()
        cfg = ViTConfig(**{**(asdict(cfg) if cfg is not None else {}), **kwargs})
        self.cfg = cfg
        D = cfg.embed_dim
        self.embed_dim = self.num_features = D
        self.patch_size = cfg.patch_size
        self.n_storage_tokens = cfg.n_storage_tokens
        self.n_blocks = cfg.depth
        self.num_heads = cfg.num_heads

        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.in_chans, D)
        self.cls_token = nn.Parameter(torch.empty(1, 1, D))
        self.dinov2 = cfg.pos_embed_type == "learned"
        if cfg.n_storage_tokens > 0:
            # DINOv2 checkpoints call them register_tokens; DINOv3 checkpoints storage_tokens.
            name = "register_tokens" if self.dinov2 else "storage_tokens"
            setattr(self, name, nn.Parameter(torch.empty(1, cfg.n_storage_tokens, D)))
        if self.dinov2:
            grid = cfg.img_size // cfg.patch_size
            self.pos_embed = nn.Parameter(torch.empty(1, 1 + grid * grid, D))
            self.rope_embed = None
        else:
            self.rope_embed = RopePositionEmbedding(
                D, cfg.num_heads, base=cfg.pos_embed_rope_base, min_period=cfg.pos_embed_rope_min_period,
                max_period=cfg.pos_embed_rope_max_period, normalize_coords=cfg.pos_embed_rope_normalize_coords,
                shift_coords=cfg.pos_embed_rope_shift_coords, jitter_coords=cfg.pos_embed_rope_jitter_coords,
                rescale_coords=cfg.pos_embed_rope_rescale_coords, dtype=cfg.pos_embed_rope_dtype,
            )
        self.blocks = nn.ModuleList(
            SelfAttentionBlock(
                D, cfg.num_heads, ffn_ratio=cfg.ffn_ratio, ffn_layer=cfg.ffn_layer, qkv_bias=cfg.qkv_bias,
                proj_bias=cfg.proj_bias, ffn_bias=cfg.ffn_bias, mask_k_bias=cfg.mask_k_bias,
                norm_layer=cfg.norm_layer, layerscale_init=cfg.layerscale, drop_path=cfg.drop_path_rate,
            )
            for _ in range(cfg.depth)
        )
        self.norm = make_norm(cfg.norm_layer, D)
        self.cls_norm = make_norm(cfg.norm_layer, D) if cfg.untie_cls_and_patch_norms else None
        self.local_cls_norm = make_norm(cfg.norm_layer, D) if cfg.untie_global_and_local_cls_norm else None
        self.head = nn.Identity()
        # DINOv3 keeps mask_token [1, D]; DINOv2 checkpoints store it as [1, D] too.
        self.mask_token = nn.Parameter(torch.empty(1, D))
        self.init_weights()

    # ------------------------------------------------------------------ init
    @property
    def storage_tokens_param(self) -> Optional[nn.Parameter]:
        if self.n_storage_tokens == 0:
            return None
        return self.register_tokens if self.dinov2 else self.storage_tokens

    @torch.no_grad()
    def init_weights(self) -> None:
        """Official initialisation; safe to call after `to_empty` of a meta-device model."""
        if self.dinov2:
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
            nn.init.normal_(self.cls_token, std=1e-6)
            if self.n_storage_tokens:
                nn.init.normal_(self.register_tokens, std=1e-6)
        else:
            self.rope_embed.reset_parameters()
            nn.init.trunc_normal_(self.cls_token, std=0.02)
            if self.n_storage_tokens:
                nn.init.trunc_normal_(self.storage_tokens, std=0.02)
        nn.init.zeros_(self.mask_token)
        self.patch_embed.reset_parameters()
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
                if isinstance(m, LinearKMaskedBias):
                    m.reset_bias_mask()
            elif isinstance(m, (nn.LayerNorm, RMSNorm, LayerScale)):
                m.reset_parameters()

    # ------------------------------------------------------------------ embedding
    def interpolate_pos_encoding(self, h: int, w: int, dtype: torch.dtype) -> Tensor:
        """DINOv2 learned position embedding for an h x w patch grid: [1, 1 + h*w, D] (bicubic, in fp32)."""
        pos = self.pos_embed
        M = int(math.sqrt(pos.shape[1] - 1))
        if h == M and w == M:
            return pos.to(dtype)
        patch_pos = pos[:, 1:].float().reshape(1, M, M, -1).permute(0, 3, 1, 2)
        off = self.cfg.interpolate_offset
        kwargs = {"scale_factor": ((h + off) / M, (w + off) / M)} if off else {"size": (h, w)}
        patch_pos = F.interpolate(patch_pos, mode="bicubic", antialias=self.cfg.interpolate_antialias, **kwargs)
        if patch_pos.shape[-2:] != (h, w):
            raise RuntimeError(f"position-embedding interpolation gave {tuple(patch_pos.shape[-2:])}, wanted {(h, w)}")
        patch_pos = patch_pos.permute(0, 2, 3, 1).flatten(1, 2)
        return torch.cat((pos[:, :1].float(), patch_pos), dim=1).to(dtype)

    def prepare_tokens(self, x: Tensor, masks: Optional[Tensor] = None) -> tuple[Tensor, int, int]:
        """Image [B, C, H, W] -> tokens [B, 1 + R + HW, D]; masked patches become `mask_token`."""
        B = x.shape[0]
        x, h, w = self.patch_embed(x)
        mask_token = self.mask_token.to(x.dtype)[None]  # [1, 1, D]
        if masks is not None:
            if masks.shape != x.shape[:2]:
                raise ValueError(f"masks must have shape {tuple(x.shape[:2])} (batch, patches), got {tuple(masks.shape)}")
            x = torch.where(masks.unsqueeze(-1), mask_token, x)
            cls = self.cls_token.to(x.dtype).expand(B, -1, -1)
        else:
            # keep mask_token in the graph (FSDP / DDP expect every parameter to be used)
            cls = (self.cls_token.to(x.dtype) + 0 * mask_token).expand(B, -1, -1)
        if self.dinov2:
            pos = self.interpolate_pos_encoding(h, w, x.dtype)
            cls, x = cls + pos[:, :1], x + pos[:, 1:]
        parts = [cls]
        if self.n_storage_tokens:
            parts.append(self.storage_tokens_param.to(x.dtype).expand(B, -1, -1))
        return torch.cat(parts + [x], dim=1), h, w

    def _rope(self, h: int, w: int) -> Optional[tuple[Tensor, Tensor]]:
        """RoPE tables for the whole token sequence (identity rows for cls + storage), or None (DINOv2)."""
        return None if self.rope_embed is None else self.rope_embed(h, w, n_prefix=1 + self.n_storage_tokens)

    def _patch_drop(self, x: Tensor, rope: Optional[tuple[Tensor, Tensor]]) -> tuple[Tensor, Any, Tensor]:
        """Keep a random (1 - patch_drop) share of the patch tokens of each sample (prefix tokens always kept)."""
        B, N, D = x.shape
        prefix = 1 + self.n_storage_tokens
        n_patch = N - prefix
        keep = max(int(n_patch * (1 - self.cfg.patch_drop)), 1)
        idx = torch.rand(B, n_patch, device=x.device).argsort(dim=1)[:, :keep].sort(dim=1).values  # [B, keep]
        patches = x[:, prefix:].gather(1, idx[..., None].expand(-1, -1, D))
        x = torch.cat((x[:, :prefix], patches), dim=1)
        if rope is not None:  # per-sample tables [B, 1, prefix + keep, D_head]
            rows = torch.cat((torch.arange(prefix, device=x.device).expand(B, -1), idx + prefix), dim=1)
            rope = tuple(t[rows][:, None] for t in rope)
        return x, rope, idx

    # ------------------------------------------------------------------ forward
    def _norm_outputs(self, x: Tensor, masks: Optional[Tensor], local: bool) -> dict[str, Optional[Tensor]]:
        p = 1 + self.n_storage_tokens
        if self.local_cls_norm is not None and local and self.training:
            prefix = self.local_cls_norm(x[:, :p])
        elif self.cls_norm is not None:
            prefix = self.cls_norm(x[:, :p])
        else:
            prefix = None
        if prefix is None:
            x_norm = self.norm(x)
            prefix, patches = x_norm[:, :p], x_norm[:, p:]
        else:
            patches = self.norm(x[:, p:])
        return {
            "x_norm_clstoken": prefix[:, 0],
            "x_storage_tokens": prefix[:, 1:],
            "x_norm_patchtokens": patches,
            "x_prenorm": x,
            "masks": masks,
        }

    def forward_features(
        self, x: Tensor | Sequence[Tensor], masks: Optional[Tensor | Sequence[Optional[Tensor]]] = None
    ) -> dict[str, Any] | list[dict[str, Any]]:
        """One image batch -> one dict; a list of batches (crops of different sizes) -> a list of dicts.

        In a list, element 1 counts as the local crops for `untie_global_and_local_cls_norm` (official behaviour).
        """
        if isinstance(x, Tensor):
            return self._forward_list([x], [masks])[0]
        masks_list = list(masks) if masks is not None else [None] * len(x)
        if len(masks_list) != len(x):
            raise ValueError(f"got {len(x)} image batches but {len(masks_list)} masks")
        return self._forward_list(list(x), masks_list)

    def _forward_list(self, xs: list[Tensor], masks_list: list[Optional[Tensor]]) -> list[dict[str, Any]]:
        tokens, ropes, keeps = [], [], []
        for x, m in zip(xs, masks_list):
            t, h, w = self.prepare_tokens(x, m)
            rope = self._rope(h, w)
            keep = None
            if self.training and self.cfg.patch_drop > 0 and m is None:
                t, rope, keep = self._patch_drop(t, rope)
            tokens.append(t)
            ropes.append(rope)
            keeps.append(keep)
        tokens = self.run_blocks(tokens, ropes)
        outs = []
        for i, (t, m, keep) in enumerate(zip(tokens, masks_list, keeps)):
            out = self._norm_outputs(t, m, local=(i == 1))
            if keep is not None:
                out["patch_keep_indices"] = keep
            if self.dinov2:
                out["x_norm_regtokens"] = out["x_storage_tokens"]  # DINOv2's name for the same tokens
            outs.append(out)
        return outs

    def run_blocks(self, tokens: list[Tensor], ropes: list[Optional[tuple[Tensor, Tensor]]]) -> list[Tensor]:
        """Every block over the token batches [B_i, N_i, D] (one method, so that `train.compile_scope=stack` can
        compile the whole stack as one graph)."""
        for blk in self.blocks:
            tokens = blk(tokens, ropes)
        return tokens

    def forward(self, x: Tensor | Sequence[Tensor], masks: Any = None, is_training: bool = False) -> Any:
        """`is_training=False`: the normed CLS embedding [B, D]; `True`: the dict(s) of `forward_features`."""
        out = self.forward_features(x, masks)
        if is_training:
            return out
        return self.head(out["x_norm_clstoken"]) if isinstance(out, dict) else [self.head(o["x_norm_clstoken"]) for o in out]

    # ------------------------------------------------------------------ intermediate layers
    def get_intermediate_layers(
        self,
        x: Tensor,
        n: int | Sequence[int] = 1,
        reshape: bool = False,
        return_class_token: bool = False,
        return_extra_tokens: bool = False,
        norm: bool = True,
    ) -> tuple:
        """Outputs of the last `n` blocks (int) or of the blocks with the given indices (list), official semantics.

        Each entry is patch tokens [B, HW, D] (or [B, D, h, w] with `reshape`), or a tuple
        (patches[, cls [B, D]][, storage [B, R, D]]). With `norm`, the final norm (or cls_norm + norm) is applied.
        """
        t, h, w = self.prepare_tokens(x)
        rope = self._rope(h, w)
        wanted = set(range(len(self.blocks) - n, len(self.blocks))) if isinstance(n, int) else set(n)
        bad = [i for i in wanted if not 0 <= i < len(self.blocks)]
        if bad:
            raise ValueError(f"get_intermediate_layers: block indices {bad} out of range 0..{len(self.blocks) - 1}")
        collected = []
        for i, blk in enumerate(self.blocks):
            t = blk(t, rope)
            if i in wanted:
                collected.append(t)
            if i >= max(wanted):
                break
        p = 1 + self.n_storage_tokens
        results = []
        for t in collected:
            if norm:
                if self.cls_norm is not None:
                    t = torch.cat((self.cls_norm(t[:, :p]), self.norm(t[:, p:])), dim=1)
                else:
                    t = self.norm(t)
            cls, storage, patches = t[:, 0], t[:, 1:p], t[:, p:]
            if reshape:
                patches = patches.reshape(x.shape[0], h, w, -1).permute(0, 3, 1, 2).contiguous()
            entry: tuple = (patches,)
            if return_class_token:
                entry += (cls,)
            if return_extra_tokens:
                entry += (storage,)
            results.append(entry[0] if len(entry) == 1 else entry)
        return tuple(results)


# ---------------------------------------------------------------------- presets
# Training presets of DINOv3 (ffn_ratio is part of the preset).
ARCHS: dict[str, dict[str, Any]] = {
    "vit_test": dict(embed_dim=32, depth=2, num_heads=2, ffn_ratio=4.0),
    "vit_pico": dict(embed_dim=64, depth=4, num_heads=2, ffn_ratio=4.0),
    "vit_tiny": dict(embed_dim=192, depth=12, num_heads=3, ffn_ratio=4.0),
    "vit_small": dict(embed_dim=384, depth=12, num_heads=6, ffn_ratio=4.0),
    "vit_base": dict(embed_dim=768, depth=12, num_heads=12, ffn_ratio=4.0),
    "vit_large": dict(embed_dim=1024, depth=24, num_heads=16, ffn_ratio=4.0),
    "vit_so400m": dict(embed_dim=1152, depth=27, num_heads=18, ffn_ratio=3.777777778),
    "vit_huge2": dict(embed_dim=1280, depth=32, num_heads=20, ffn_ratio=4.0),
    "vit_giant2": dict(embed_dim=1536, depth=40, num_heads=24, ffn_ratio=4.0),
    "vit_7b": dict(embed_dim=4096, depth=40, num_heads=32, ffn_ratio=3.0),
}


def build_vit(arch: str, **kwargs: Any) -> VisionTransformer:
    """Build a preset (`vit_small` ... `vit_7b`, or the small `vit_test` / `vit_pico` / `vit_tiny`) with overrides."""
    if arch not in ARCHS:
        raise ValueError(f"student.arch: unknown architecture {arch!r}; expected one of {sorted(ARCHS)}")
    return VisionTransformer(ViTConfig(**{**ARCHS[arch], **kwargs}))
