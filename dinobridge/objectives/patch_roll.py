"""PatchRoll ("patch-shuffle") view, its patch-selection masks and its CLS + patch losses (reference §2.3).

View: y = torch.roll(x, (dr·P, dc·P), dims=(-2, -1)) of a normalised global crop x, with (dr, dc) uniform in
{-R..R}² (R = `patch_shuffle_max_shift`, the identity shift is redrawn unless allowed). Rolling by whole patches is
an exact token permutation: token i = (r, c) of x moves to position perm[i] = ((r+dr) mod h)·w + (c+dc) mod w of y,
so y's token j shows x's token inv[j] (inv[perm] = arange) and tokens(y)[perm] = tokens(x). Mode `local_shuffle`
permutes the patches inside a fraction of the c×c cells instead. It is computed as one gather of patches.

Student input mask of the view (`patch_shuffle_ibot_mask`, on by default as in the public code): the source crop's
iBOT mask moved with its content (masks[src][inv]), so the view is exactly a token permutation of the student's
masked global crop; `use_all_shift_mask: false` then drops the masked tokens from the selection.
Selection mask M [B, N]: floor(B·p) samples get block masks (iBOT generator) with exactly
int(N·linspace(min, max, n+1)[i+1]) patches, the others none, in random sample order; optionally rolled circularly.
Losses (targets from the teacher forward that already ran; no extra teacher forward):
  L_cls   = mean_b CE(t_cls(g'_b)_b, h_dino(student CLS of y_b))
  L_patch = Σ_b (1/|M_b|) Σ_{j∈M_b} CE(q_bj, h_ibot(student token j of y_b)) / B,
            q = iBOT balancer (read-only) of h_ibot(teacher token inv_b[j] of x_{g'_b})
  loss    = w_ps(t) · (patch_shuffle_cls_weight · L_cls + patch_shuffle_patch_weight · L_patch)
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from torch import Tensor

from dinobridge.data.collate import mask_counts
from dinobridge.data.masking import BlockMaskGenerator, as_numpy_rng
from dinobridge.objectives.addon import AddonObjective, ViewContext, ViewRequest, soft_cross_entropy, view_generator
from dinobridge.objectives.base import SSLStep

__all__ = [
    "PatchRollObjective", "draw_shifts", "inverse_permutation", "local_shuffle_permutation", "permute_patches",
    "roll_permutation", "selection_masks",
]

MODES = ("roll", "local_shuffle")


def roll_permutation(h: int, w: int, dr: int, dc: int) -> Tensor:
    """perm [h*w] (long): token i = (r, c) moves to ((r + dr) mod h)·w + (c + dc) mod w."""
    r = torch.arange(h)[:, None]
    c = torch.arange(w)[None, :]
    return (((r + dr) % h) * w + (c + dc) % w).flatten()


def inverse_permutation(perm: Tensor) -> Tensor:
    """inv [..., N] with inv[..., perm[..., i]] = i."""
    ar = torch.arange(perm.shape[-1], device=perm.device).expand_as(perm)
    return torch.empty_like(perm).scatter_(-1, perm, ar)


def draw_shifts(n: int, h: int, w: int, max_shift: int, gen: torch.Generator, allow_zero: bool = False) -> Tensor:
    """[n, 2] (dr, dc) uniform over {-R..R}²; without `allow_zero` the shifts that are the identity on an h×w grid
    (dr ≡ 0 mod h and dc ≡ 0 mod w) are excluded (unless nothing else is possible, e.g. a 1×1 grid)."""
    cand = [(dr, dc) for dr in range(-max_shift, max_shift + 1) for dc in range(-max_shift, max_shift + 1)
            if allow_zero or (dr % h, dc % w) != (0, 0)]
    table = torch.tensor(cand or [(0, 0)], dtype=torch.long)
    return table[torch.randint(0, len(table), (n,), generator=gen)]


def local_shuffle_permutation(h: int, w: int, cell: int, fraction: float, gen: torch.Generator) -> Tensor:
    """perm [h*w]: inside round(fraction · #cells) (>= 1 when fraction > 0) random full cell×cell cells, the
    patches are permuted at random; all other patches stay."""
    perm = torch.arange(h * w)
    gh, gw = h // cell, w // cell
    n_cells = gh * gw
    n_pick = min(n_cells, max(1, round(fraction * n_cells))) if fraction > 0 and n_cells else 0
    for k in torch.randperm(n_cells, generator=gen)[:n_pick].tolist():
        r0, c0 = (k // gw) * cell, (k % gw) * cell
        pos = torch.tensor([(r0 + i) * w + c0 + j for i in range(cell) for j in range(cell)])
        perm[pos] = pos[torch.randperm(len(pos), generator=gen)]
    return perm


def permute_patches(x: Tensor, inv: Tensor, patch_size: int) -> Tensor:
    """x [n, C, H, W], inv [n, N] -> y [n, C, H, W] whose patch j is x's patch inv[:, j] (H, W multiples of P).

    With inv of `roll_permutation(h, w, dr, dc)` this equals torch.roll(x, (dr·P, dc·P), dims=(-2, -1)).
    """
    n, c, height, width = x.shape
    p = patch_size
    if height % p or width % p:
        raise ValueError(f"permute_patches: crop size {height}x{width} must be a multiple of patch_size={p}")
    h, w = height // p, width // p
    if inv.shape != (n, h * w):
        raise ValueError(f"permute_patches: inv must be [{n}, {h * w}], got {tuple(inv.shape)}")
    t = x.reshape(n, c, h, p, w, p).permute(0, 2, 4, 1, 3, 5).reshape(n, h * w, c * p * p)
    t = t.gather(1, inv.to(x.device)[..., None].expand(-1, -1, c * p * p))
    return t.reshape(n, h, w, c, p, p).permute(0, 3, 1, 4, 2, 5).reshape(n, c, height, width)


def selection_masks(
    n: int, h: int, w: int, probability: float, ratio_min_max: Sequence[float], gen: torch.Generator,
    circular_shift: bool = False, generator: Optional[BlockMaskGenerator] = None,
) -> Tensor:
    """Patch-selection masks [n, h*w] bool: floor(n·probability) rows get block masks with exactly
    int(N·linspace(min, max, k+1)[i+1]) patches (BlockMaskGenerator, optional circular shift), in random rows."""
    gen_masks = generator or BlockMaskGenerator((h, w), max_num_patches=0.5 * h * w)
    counts = mask_counts(n, h * w, ratio_min_max, probability)
    masks = torch.zeros(n, h * w, dtype=torch.bool)
    if counts:
        rng = as_numpy_rng(gen)
        made = gen_masks.generate_many(counts, rng, circular_shift)
        masks[torch.from_numpy(rng.permutation(n)[: len(counts)])] = made
    return masks


class PatchRollObjective(AddonObjective):
    """PatchRoll CLS + sparse patch invariance; also makes the rolled view for the bridge
    (`bridge_patchshuffle_weight`).

    The view exists at iteration t when w_ps(t) > 0 or (bridge roll weight given and) w_bp(t) > 0; heads run on it
    only for the terms whose weights are > 0. Logged (unweighted, while w_ps > 0): `patch_shuffle_cls_loss`,
    `patch_shuffle_patch_loss`.
    """

    name = "patch_roll"
    KEY = "patch_shuffle_loss_weight"
    BRIDGE_KEY = "bridge_patchshuffle_weight"

    def __init__(self, rs_cfg: Any, schedules: dict[str, Any], seed: int, patch_size: int,
                 mask_circular_shift: bool = False, student_temp: float = 0.1) -> None:
        super().__init__(schedules, student_temp)
        self.seed, self.patch_size = int(seed), int(patch_size)
        self.cls_weight = float(rs_cfg.patch_shuffle_cls_weight)
        self.patch_weight = float(rs_cfg.patch_shuffle_patch_weight)
        self.probability = float(rs_cfg.patch_shuffle_patch_probability)
        self.ratio_min_max = tuple(float(v) for v in rs_cfg.patch_shuffle_patch_min_max)
        self.use_all_shift_mask = bool(rs_cfg.use_all_shift_mask)
        self.max_shift = int(rs_cfg.patch_shuffle_max_shift)
        self.allow_zero = bool(rs_cfg.patch_shuffle_allow_zero_shift)
        self.mode = str(rs_cfg.patch_shuffle_mode)
        self.cell_size = int(rs_cfg.patch_shuffle_cell_size)
        self.cell_fraction = float(rs_cfg.patch_shuffle_cell_fraction)
        self.ibot_mask = bool(rs_cfg.patch_shuffle_ibot_mask)
        self.circular_shift = bool(mask_circular_shift)
        if self.mode not in MODES:
            raise ValueError(f"patch_shuffle_mode: expected one of {MODES}, got {self.mode!r}")
        self._mask_gens: dict[tuple[int, int], BlockMaskGenerator] = {}

    def _weights(self, extras: Any, iteration: int) -> tuple[float, float]:
        w_ps = self.weight(self.KEY, extras, iteration) if self.KEY in self._schedules else 0.0
        w_bp = self.weight(self.BRIDGE_KEY, extras, iteration) if self.BRIDGE_KEY in self._schedules else 0.0
        return w_ps, w_bp

    def permutations(self, n: int, h: int, w: int, gen: torch.Generator) -> Tensor:
        """perm [n, h*w] of the n rows (roll shifts or local shuffles)."""
        if self.mode == "roll":
            shifts = draw_shifts(n, h, w, self.max_shift, gen, self.allow_zero)
            return torch.stack([roll_permutation(h, w, int(dr), int(dc)) for dr, dc in shifts.tolist()])
        return torch.stack([local_shuffle_permutation(h, w, self.cell_size, self.cell_fraction, gen)
                            for _ in range(n)])

    def make_view(self, ctx: ViewContext) -> Optional[ViewRequest]:
        w_ps, w_bp = self._weights(ctx.extras, ctx.iteration)
        if w_ps <= 0 and w_bp <= 0:
            return None
        gen = view_generator(self.seed, ctx.rank, ctx.iteration, self.name)
        B, n_g = ctx.batch_size, ctx.n_global
        h, w = ctx.grid
        N = h * w
        src = torch.randint(0, n_g, (B,), generator=gen) * B + torch.arange(B)  # one random global crop per sample
        perm = self.permutations(B, h, w, gen)
        inv = inverse_permutation(perm)
        dev = ctx.global_crops.device
        src_dev, inv_dev = src.to(dev), inv.to(dev)
        views = permute_patches(ctx.global_crops.index_select(0, src_dev), inv_dev, self.patch_size)
        in_masks = ctx.masks.index_select(0, src_dev).gather(1, inv_dev) if self.ibot_mask else None
        meta: dict[str, Any] = {"src": src, "perm": perm, "inv": inv}
        student_patches = teacher_patches = None
        if w_ps > 0 and self.patch_weight > 0:
            if (h, w) not in self._mask_gens:
                self._mask_gens[(h, w)] = BlockMaskGenerator((h, w), max_num_patches=0.5 * N)
            sel = selection_masks(B, h, w, self.probability, self.ratio_min_max, gen, self.circular_shift,
                                  self._mask_gens[(h, w)])
            if not self.use_all_shift_mask and in_masks is not None:  # supervise only tokens the student sees
                sel &= ~in_masks.cpu()
            flat = sel.flatten().nonzero().flatten()  # CPU: no device sync
            rows, cols = flat // N, flat % N
            student_patches = flat
            teacher_patches = src[rows] * N + inv[rows, cols]
            meta["selection"] = sel
            meta["patch_weights"] = (1.0 / sel.sum(dim=1).clamp_min(1).float())[rows]
        return ViewRequest(images=views, masks=in_masks, dino_cls=w_ps > 0 and self.cls_weight > 0,
                           student_patches=student_patches, teacher_patches=teacher_patches, meta=meta)

    def forward(self, step: SSLStep) -> tuple[Tensor, dict[str, Tensor]]:
        view = step.views.get(self.name)
        w_ps, _ = self._weights(step.extras, step.iteration)
        if view is None or w_ps <= 0:
            return self.zero(step), {}
        meta, B = view["request"].meta, step.batch_size
        total = self.zero(step)
        logs: dict[str, Tensor] = {}
        if view.get("dino") is not None:
            src = meta["src"].to(step.dino_targets.device)
            targets = step.dino_targets.reshape(step.n_global * B, -1).index_select(0, src)
            l_cls = soft_cross_entropy(targets, view["dino"], self.student_temp).mean()
            total = total + self.cls_weight * l_cls
            logs["patch_shuffle_cls_loss"] = l_cls.detach()
        if view.get("ibot") is not None:
            ce = soft_cross_entropy(view["ibot_targets"], view["ibot"], self.student_temp)
            weights = meta["patch_weights"].to(ce.device)
            l_patch = (ce * weights).sum() / B
            total = total + self.patch_weight * l_patch
            logs["patch_shuffle_patch_loss"] = l_patch.detach()
        return w_ps * total, logs

