"""Axial rotary position embedding (RoPE) of DINOv3.

Recipe (official DINOv3, see README_dinov3.md):
  periods[j] = base ** (2j / (D_head/2)),  j = 0 .. D_head/4 - 1     (or geometric from min_period to max_period)
  patch-centre coordinates c = (i + 0.5) / H, normalised to [-1, 1] per axis ("separate"), by max(H, W) or min(H, W)
  train-time only (student): shift, jitter and rescale of the coordinates
  angles = 2*pi * coords / periods -> [HW, 2, D_head/4] -> [HW, D_head/2] (all h-angles, then all w-angles) -> tiled x2
  x' = x * cos + rotate_half(x) * sin, rotate_half([x1, x2]) = [-x2, x1]  (half split)

Without coordinate augmentation, (sin, cos) tables are built once per (H, W, device, dtype) and cached.
"""

from __future__ import annotations

import math
from typing import Literal, Optional

import torch
from torch import Tensor, nn

_DTYPES = {
    None: None, "fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
}


def rope_dtype(name: Optional[str | torch.dtype]) -> Optional[torch.dtype]:
    """Map a config name ('fp32', 'bf16', 'fp16' or None) to a torch dtype."""
    if isinstance(name, torch.dtype) or name is None:
        return name
    if name not in _DTYPES:
        raise ValueError(f"pos_embed_rope_dtype: expected one of fp32, bf16, fp16, got {name!r}")
    return _DTYPES[name]


def rotate_half(x: Tensor) -> Tensor:
    """[x1, x2] -> [-x2, x1] on the last dimension (half split)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: Tensor, sin: Tensor, cos: Tensor) -> Tensor:
    """Rotate `x` [..., N, D_head] with tables `sin`, `cos` [N, D_head] (or broadcastable). Computed in the table dtype."""
    dtype = x.dtype
    x = x.to(sin.dtype)
    return (x * cos + rotate_half(x) * sin).to(dtype)


class RopePositionEmbedding(nn.Module):
    """Produces (sin, cos) tables [H*W, D_head] for a patch grid of H x W.

    Args:
        embed_dim: model width D.   num_heads: number of heads (D_head = D / num_heads, a multiple of 4).
        base: period base (give either `base` or both `min_period` and `max_period`).
        normalize_coords: 'separate' | 'max' | 'min'.
        shift_coords, jitter_coords, rescale_coords: train-time coordinate augmentation (None = off).
        dtype: dtype of the tables ('fp32', 'bf16', 'fp16' or None = fp32).
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        base: Optional[float] = 100.0,
        min_period: Optional[float] = None,
        max_period: Optional[float] = None,
        normalize_coords: Literal["separate", "max", "min"] = "separate",
        shift_coords: Optional[float] = None,
        jitter_coords: Optional[float] = None,
        rescale_coords: Optional[float] = None,
        dtype: Optional[str | torch.dtype] = None,
    ) -> None:
        super().__init__()
        if embed_dim % (4 * num_heads) != 0:
            raise ValueError(f"RoPE needs head dim divisible by 4, got embed_dim={embed_dim}, num_heads={num_heads}")
        both = min_period is not None and max_period is not None
        if (base is None) == (not both) or (min_period is None) != (max_period is None):
            raise ValueError("RoPE: give either pos_embed_rope_base or both pos_embed_rope_min/max_period, not both")
        if normalize_coords not in ("separate", "max", "min"):
            raise ValueError(f"pos_embed_rope_normalize_coords: expected separate|max|min, got {normalize_coords!r}")
        self.head_dim = embed_dim // num_heads
        self.base, self.min_period, self.max_period = base, min_period, max_period
        self.normalize_coords = normalize_coords
        self.shift_coords, self.jitter_coords, self.rescale_coords = shift_coords, jitter_coords, rescale_coords
        self.dtype = rope_dtype(dtype) or torch.float32
        self.register_buffer("periods", torch.empty(self.head_dim // 4), persistent=True)
        self._cache: dict[tuple, tuple[Tensor, Tensor]] = {}
        self.reset_parameters()

    @property
    def augments(self) -> bool:
        return self.training and any(
            v is not None for v in (self.shift_coords, self.jitter_coords, self.rescale_coords)
        )

    @torch.no_grad()
    def reset_parameters(self) -> None:
        n = self.head_dim // 4
        device = self.periods.device
        if self.base is not None:
            exponent = 2 * torch.arange(n, device=device, dtype=torch.float32) / (self.head_dim // 2)
            periods = self.base ** exponent
        else:
            ratio = self.max_period / self.min_period
            exponent = torch.linspace(0, 1, n, device=device, dtype=torch.float32)
            periods = self.min_period * ratio ** exponent
        self.periods.copy_(periods)
        self._cache.clear()

    def _load_from_state_dict(self, *args, **kwargs):  # noqa: D401 - torch hook
        self._cache.clear()
        super()._load_from_state_dict(*args, **kwargs)

    def _apply(self, fn, recurse=True):
        self._cache.clear()
        return super()._apply(fn, recurse)

    def coords(self, H: int, W: int, device: torch.device) -> Tensor:
        """Normalised patch-centre coordinates [H*W, 2] in [-1, 1], row-major ('ij')."""
        if self.normalize_coords == "separate":
            dh, dw = H, W
        elif self.normalize_coords == "max":
            dh = dw = max(H, W)
        else:
            dh = dw = min(H, W)
        ch = (torch.arange(H, device=device, dtype=torch.float32) + 0.5) / dh
        cw = (torch.arange(W, device=device, dtype=torch.float32) + 0.5) / dw
        grid = torch.stack(torch.meshgrid(ch, cw, indexing="ij"), dim=-1).flatten(0, 1)
        return 2.0 * grid - 1.0

    def _augment(self, coords: Tensor) -> Tensor:
        dev = coords.device
        if self.shift_coords is not None:
            s = self.shift_coords
            coords = coords + torch.empty(2, device=dev).uniform_(-s, s)[None, :]
        if self.jitter_coords is not None:
            lj = math.log(self.jitter_coords)
            coords = coords * torch.empty(2, device=dev).uniform_(-lj, lj).exp()[None, :]
        if self.rescale_coords is not None:
            lr = math.log(self.rescale_coords)
            coords = coords * torch.empty(1, device=dev).uniform_(-lr, lr).exp()
        return coords

    def _tables(self, coords: Tensor) -> tuple[Tensor, Tensor]:
        angles = 2 * math.pi * coords[:, :, None] / self.periods.float()[None, None, :]  # [HW, 2, D/4]
        angles = angles.flatten(1, 2).tile(2)  # [HW, D_head]
        return angles.sin().to(self.dtype), angles.cos().to(self.dtype)

    def forward(self, H: int, W: int, n_prefix: int = 0) -> tuple[Tensor, Tensor]:
        """Returns (sin, cos), each [n_prefix + H*W, D_head] in the RoPE dtype.

        The first `n_prefix` rows are the identity rotation (sin 0, cos 1), so the tables apply to a whole token
        sequence [cls, storage, patches] at once and prefix tokens come out unchanged.
        """
        device = self.periods.device
        if self.augments:
            return self._pad(self._tables(self._augment(self.coords(H, W, device))), n_prefix)
        key = (H, W, n_prefix, device, self.dtype, torch.is_inference_mode_enabled())
        tables = self._cache.get(key)
        if tables is None or torch.compiler.is_compiling():
            tables = self._pad(self._tables(self.coords(H, W, device)), n_prefix)
            if not torch.compiler.is_compiling():
                self._cache[key] = tables
        return tables

    @staticmethod
    def _pad(tables: tuple[Tensor, Tensor], n_prefix: int) -> tuple[Tensor, Tensor]:
        if n_prefix == 0:
            return tables
        sin, cos = tables
        pad = sin.new_zeros(n_prefix, sin.shape[-1])
        return torch.cat((pad, sin)), torch.cat((pad + 1, cos))
