"""Crop-Resize ("resize-paste") view and its CLS invariance loss (reference addons_and_devices.md §2.2).

View RP(x) of one normalised global crop x [3, H, W]: with `crop_prob` take a sub-crop whose side fractions are
U[crop_scale] at a uniform position (else all of x); resize it (bicubic, antialiased) to (ph, pw) with one scale
a ~ U[scale] for both sides (probability `keep_aspect_prob`) or one per side, snapped to multiples of the patch grid
(>= one patch); paste it at a grid-aligned uniform position on a canvas of one constant colour. Resizing commutes
with the per-channel normalisation (both are linear per channel), so working on normalised crops equals resizing
before normalising; the background colour b in [0, 1] is given in normalised units (b - mean) / std.
Loss: L_rp = mean_rows CE(t_cls(source crop), s_cls(RP(x))), weighted by the `resize_paste_loss_weight` schedule.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from dinobridge.objectives.addon import AddonObjective, ViewContext, ViewRequest, soft_cross_entropy, view_generator
from dinobridge.objectives.base import SSLStep

__all__ = ["CropResizeObjective", "PasteParams", "crop_resize_paste", "draw_paste_params", "paste_background"]

BACKGROUNDS = ("random", "mean", "zero")
_N_UNIFORMS = 17  # fixed number of uniforms per row, so the stream does not depend on the options taken


@dataclass(frozen=True)
class PasteParams:
    """One row's view: sub-crop (top, left, ch, cw) of the source, pasted box (y0, x0, ph, pw) on the canvas,
    background colour rgb in [0, 1], roll (dy, dx) of the content inside the box (pixels, multiples of the grid),
    optional permutation `split` of the box's grid cells (row-major cell order)."""

    top: int
    left: int
    ch: int
    cw: int
    y0: int
    x0: int
    ph: int
    pw: int
    rgb: tuple[float, float, float]
    roll: tuple[int, int] = (0, 0)
    split: Optional[tuple[int, ...]] = None

    @property
    def box(self) -> tuple[int, int, int, int]:
        return self.y0, self.x0, self.ph, self.pw

    @property
    def scale(self) -> tuple[float, float]:
        """Size of the pasted content relative to the sub-crop (height, width)."""
        return self.ph / self.ch, self.pw / self.cw

    def uncovered_tokens(self, height: int, width: int, grid: int) -> Tensor:
        """Flat indices [n] of the tokens of the (height/grid x width/grid) grid that lie outside the box."""
        h, w = height // grid, width // grid
        inside = torch.zeros(h, w, dtype=torch.bool)
        inside[self.y0 // grid:(self.y0 + self.ph) // grid, self.x0 // grid:(self.x0 + self.pw) // grid] = True
        return (~inside).flatten().nonzero().flatten()


def _snap(v: float, grid: int, limit: int) -> int:
    """Round `v` pixels to a multiple of `grid` within [grid, limit rounded down to the grid]."""
    top = max(grid, (limit // grid) * grid)
    return int(min(max(round(v / grid) * grid, grid), top))


def draw_paste_params(
    n: int,
    height: int,
    width: int,
    gen: torch.Generator,
    grid: int,
    crop_prob: float = 0.7,
    crop_scale: Sequence[float] = (0.7, 1.0),
    keep_aspect_prob: float = 0.3,
    scale: Sequence[float] = (0.5, 0.9),
    roll_prob: float = 0.0,
    split_prob: float = 0.0,
) -> list[PasteParams]:
    """Random parameters of `n` views of (height x width) crops, drawn only from `gen` (CPU generator)."""
    if grid < 1 or height < grid or width < grid:
        raise ValueError(f"draw_paste_params: need 1 <= grid <= crop size, got grid={grid}, size={height}x{width}")
    u = torch.rand(n, _N_UNIFORMS, generator=gen, dtype=torch.float64).tolist()
    c_lo, c_hi = (float(v) for v in crop_scale)
    s_lo, s_hi = (float(v) for v in scale)
    out = []
    for r in u:
        if r[0] < crop_prob:
            ch = max(1, min(height, round((c_lo + (c_hi - c_lo) * r[1]) * height)))
            cw = max(1, min(width, round((c_lo + (c_hi - c_lo) * r[2]) * width)))
            top, left = int(r[3] * (height - ch + 1)), int(r[4] * (width - cw + 1))
        else:
            ch, cw, top, left = height, width, 0, 0
        a_h = s_lo + (s_hi - s_lo) * r[6]
        a_w = a_h if r[5] < keep_aspect_prob else s_lo + (s_hi - s_lo) * r[7]
        ph, pw = _snap(a_h * height, grid, height), _snap(a_w * width, grid, width)
        y0 = grid * int(r[8] * ((height - ph) // grid + 1))
        x0 = grid * int(r[9] * ((width - pw) // grid + 1))
        roll = (0, 0)
        if r[13] < roll_prob:
            roll = (grid * int(r[14] * (ph // grid)), grid * int(r[15] * (pw // grid)))
        split = None
        if r[10] < split_prob:
            n_cells = (ph // grid) * (pw // grid)
            split = tuple(torch.randperm(n_cells, generator=gen).tolist())
        out.append(PasteParams(top, left, ch, cw, y0, x0, ph, pw, (r[11], r[12], r[16]), roll, split))
    return out


def paste_background(params: Sequence[PasteParams], mode: str, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """Background colour of each row in normalised units [n, 3]: "random" = (rgb - mean) / std, "mean" = 0,
    "zero" (black) = -mean / std."""
    if mode not in BACKGROUNDS:
        raise ValueError(f"paste_background: mode must be one of {BACKGROUNDS}, got {mode!r}")
    m = torch.tensor(mean, dtype=torch.float32)
    s = torch.tensor(std, dtype=torch.float32)
    if mode == "mean":
        return torch.zeros(len(params), 3)
    if mode == "zero":
        return (-m / s).expand(len(params), 3).clone()
    rgb = torch.tensor([p.rgb for p in params], dtype=torch.float32).reshape(-1, 3)
    return (rgb - m) / s


def crop_resize_paste(x: Tensor, params: Sequence[PasteParams], background: Tensor, grid: int) -> Tensor:
    """x [n, C, H, W] (normalised), one PasteParams per row, background [n, C] -> views [n, C, H, W] (x's dtype).

    Resizing runs in fp32 (bicubic, antialias); an unchanged size is copied exactly.
    """
    n, c, height, width = x.shape
    if len(params) != n or background.shape != (n, c):
        raise ValueError(f"crop_resize_paste: expected {n} params and background [{n}, {c}], got {len(params)} and "
                         f"{tuple(background.shape)}")
    out = background.to(device=x.device, dtype=x.dtype)[:, :, None, None].expand(n, c, height, width).clone()
    for i, p in enumerate(params):
        src = x[i:i + 1, :, p.top:p.top + p.ch, p.left:p.left + p.cw]
        if (p.ch, p.cw) != (p.ph, p.pw):
            src = F.interpolate(src.float(), size=(p.ph, p.pw), mode="bicubic", antialias=True, align_corners=False)
        if p.roll != (0, 0):
            src = torch.roll(src, shifts=p.roll, dims=(-2, -1))
        if p.split is not None:
            gh, gw = p.ph // grid, p.pw // grid
            cells = src.reshape(1, c, gh, grid, gw, grid).permute(0, 2, 4, 1, 3, 5).reshape(1, gh * gw, c, grid, grid)
            cells = cells[:, torch.tensor(p.split, device=x.device)]
            src = cells.reshape(1, gh, gw, c, grid, grid).permute(0, 3, 1, 4, 2, 5).reshape(1, c, p.ph, p.pw)
        out[i, :, p.y0:p.y0 + p.ph, p.x0:p.x0 + p.pw] = src[0].to(x.dtype)
    return out


class CropResizeObjective(AddonObjective):
    """CLS invariance to crop, rescale and paste: w_rp(t) · mean_rows CE(t_cls, h_dino(student CLS of RP(x))).

    One view per sample from a random global crop (`n_views=1`) or from both (`n_views=2`); target = the same
    crop's teacher CLS target (`target="same"`) or the mean of both (`"both"`). No extra teacher forward.
    Logged: `resize_paste_loss` (unweighted) while the weight is > 0.
    """

    name = "resize_paste"
    KEY = "resize_paste_loss_weight"

    def __init__(self, rs_cfg: Any, schedule: Any, seed: int, patch_size: int, mean: Sequence[float],
                 std: Sequence[float], student_temp: float = 0.1) -> None:
        super().__init__({self.KEY: schedule}, student_temp)
        self.seed, self.grid = int(seed), int(patch_size)
        self.mean, self.std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
        self.crop_prob = float(rs_cfg.resize_paste_crop_prob)
        self.crop_scale = tuple(float(v) for v in rs_cfg.resize_paste_crop_scale)
        self.keep_aspect_prob = float(rs_cfg.resize_paste_keep_aspect_prob)
        self.scale = tuple(float(v) for v in rs_cfg.resize_paste_scale)
        self.background = str(rs_cfg.resize_paste_background)
        self.roll_prob = float(rs_cfg.resize_paste_roll_prob)
        self.split_prob = float(rs_cfg.resize_paste_split_prob)
        self.n_views = int(rs_cfg.resize_paste_n_views)
        self.target = str(rs_cfg.resize_paste_target)
        self.ibot_mask = bool(rs_cfg.resize_paste_ibot_mask)
        if self.background not in BACKGROUNDS:
            raise ValueError(f"resize_paste_background: expected one of {BACKGROUNDS}, got {self.background!r}")
        if self.n_views not in (1, 2) or self.target not in ("same", "both"):
            raise ValueError(f"resize_paste_n_views / resize_paste_target: expected 1|2 / same|both, got "
                             f"{self.n_views} / {self.target!r}")

    def make_view(self, ctx: ViewContext) -> Optional[ViewRequest]:
        if self.weight(self.KEY, ctx.extras, ctx.iteration) <= 0:
            return None
        gen = view_generator(self.seed, ctx.rank, ctx.iteration, self.name)
        B, n_g = ctx.batch_size, ctx.n_global
        if self.n_views == 1:  # one random global crop per sample
            src = torch.randint(0, n_g, (B,), generator=gen) * B + torch.arange(B)
        else:
            src = torch.arange(n_g * B)
        _, _, height, width = ctx.global_crops.shape
        params = draw_paste_params(len(src), height, width, gen, self.grid, self.crop_prob, self.crop_scale,
                                   self.keep_aspect_prob, self.scale, self.roll_prob, self.split_prob)
        src_dev = src.to(ctx.global_crops.device)
        x = ctx.global_crops.index_select(0, src_dev)
        views = crop_resize_paste(x, params, paste_background(params, self.background, self.mean, self.std), self.grid)
        masks = ctx.masks.index_select(0, src_dev) if self.ibot_mask else None
        return ViewRequest(images=views, masks=masks, dino_cls=True, meta={"src": src, "params": params})

    def forward(self, step: SSLStep) -> tuple[Any, dict[str, Any]]:
        view = step.views.get(self.name)
        w = self.weight(self.KEY, step.extras, step.iteration)
        if view is None or w <= 0:
            return self.zero(step), {}
        src = view["request"].meta["src"].to(step.dino_targets.device)
        n_g, B = step.n_global, step.batch_size
        if self.target == "same":
            targets = step.dino_targets.reshape(n_g * B, -1).index_select(0, src)
        else:
            targets = step.dino_targets.mean(dim=0).index_select(0, src % B)
        loss = soft_cross_entropy(targets, view["dino"], self.student_temp).mean()
        return w * loss, {"resize_paste_loss": loss.detach()}
