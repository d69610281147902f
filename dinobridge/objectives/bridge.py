"""Patch-to-CLS bridge ("inverse patch embedding", reference §2.4): patch tokens -> one vector -> the student DINO
head with detached weights -> cross-entropy to the teacher CLS targets.

  L_br_global = mean_{g,b} CE(t_cls(g)_b, h_dino^det(G(student patch tokens of x_g)))      w: bridge_global_weight
  L_br_roll   = mean_b CE(t_cls(g'_b)_b, h_dino^det(G(student patch tokens of y_b)))  w: bridge_patchshuffle_weight

The gradient reaches G and the backbone, never the DINO head (a functional call of the head with detached
parameters; nothing toggles requires_grad) and never the teacher. G's output layer is zero-initialised, so G outputs
0 at initialisation (with the head's zero biases the logits are 0 and L = log K).
G is a student-only submodule (`model.student["bridge"]`): the optimizer and gradient clipping see it, the EMA
teacher has no copy of it.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.stateless import _reparametrize_module  # what torch.func.functional_call uses

from dinobridge.objectives.addon import AddonObjective, soft_cross_entropy
from dinobridge.objectives.base import SSLStep

__all__ = ["BridgeObjective", "PatchBridge", "detached_head_forward"]

POOLS = ("attn", "conv_full")


class PatchBridge(nn.Module):
    """Aggregates patch tokens into one CLS-like vector.

    pool="attn" (default, any grid): two depthwise-separable conv3x3 blocks (dw3x3 D->D, pw1x1 -> H, GELU; then
    H -> H), attention pooling with one learned query q [H] (single head, softmax over the N tokens; q = 0 at init,
    i.e. mean pooling), Linear(H -> D, zero init), LayerNorm(D). H = hidden_dim or D (~3 M parameters at D = 1024).
    pool="conv_full" (public layout, fixed grid): conv3x3(D -> H) - GELU - conv3x3(H -> H) - GELU -
    conv(h x w, valid; H -> D, zero init) - LayerNorm(D); H = hidden_dim or D / 2; only the grid it was built for.

    Shapes: tokens [B, N, D] with N = h*w (row-major), grid (h, w) -> [B, D].
    """

    def __init__(self, dim: int, pool: str = "attn", hidden_dim: Optional[int] = None,
                 grid: Optional[tuple[int, int]] = None) -> None:
        super().__init__()
        if pool not in POOLS:
            raise ValueError(f"PatchBridge: pool must be one of {POOLS}, got {pool!r}")
        if hidden_dim is not None and hidden_dim < 1:
            raise ValueError(f"PatchBridge: hidden_dim must be >= 1 or None, got {hidden_dim}")
        self.dim, self.pool = int(dim), pool
        if pool == "attn":
            hid = int(hidden_dim or dim)
            self.dw1 = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
            self.pw1 = nn.Conv2d(dim, hid, 1)
            self.dw2 = nn.Conv2d(hid, hid, 3, padding=1, groups=hid)
            self.pw2 = nn.Conv2d(hid, hid, 1)
            self.query = nn.Parameter(torch.zeros(hid))
            self.proj = nn.Linear(hid, dim)
        else:
            if grid is None:
                raise ValueError("PatchBridge: pool='conv_full' needs the patch grid (h, w) it is built for")
            hid = int(hidden_dim or max(1, dim // 2))
            self.grid = (int(grid[0]), int(grid[1]))
            self.conv1 = nn.Conv2d(dim, hid, 3, padding=1)
            self.conv2 = nn.Conv2d(hid, hid, 3, padding=1)
            self.proj = nn.Conv2d(hid, dim, self.grid)
        self.hidden_dim = hid
        self.norm = nn.LayerNorm(dim)

    @torch.no_grad()
    def init_weights(self, generator: Optional[torch.Generator] = None) -> None:
        """Trunc-normal(0.02) weights and zero biases; the output layer (`proj`) and the query are zero.

        Values are drawn on the CPU from `generator` (None = the global CPU RNG) and copied to the parameters' device.
        """
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                w = torch.empty(m.weight.shape, dtype=torch.float32)
                nn.init.trunc_normal_(w, std=0.02, generator=generator)
                m.weight.copy_(w)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)
        if self.pool == "attn":
            nn.init.zeros_(self.query)
        self.norm.reset_parameters()

    reset_parameters = init_weights

    def forward(self, tokens: Tensor, grid: tuple[int, int]) -> Tensor:
        b, n, d = tokens.shape
        h, w = int(grid[0]), int(grid[1])
        if n != h * w or d != self.dim:
            raise ValueError(f"PatchBridge: tokens must be [B, {h * w}, {self.dim}] for grid {h}x{w}, got "
                             f"{tuple(tokens.shape)}")
        x = tokens.transpose(1, 2).reshape(b, d, h, w)
        if self.pool == "attn":
            x = F.gelu(self.pw1(self.dw1(x)))
            x = F.gelu(self.pw2(self.dw2(x)))
            x = x.flatten(2).transpose(1, 2)  # [B, N, H]
            attn = torch.softmax((x @ self.query.to(x.dtype)) / math.sqrt(self.hidden_dim), dim=-1)  # [B, N]
            pooled = (attn.unsqueeze(-1) * x).sum(dim=1)
            out = self.proj(pooled)
        else:
            if (h, w) != self.grid:
                raise ValueError(f"PatchBridge(conv_full): built for a {self.grid[0]}x{self.grid[1]} grid, got {h}x{w}")
            x = F.gelu(self.conv1(x))
            x = F.gelu(self.conv2(x))
            out = self.proj(x).flatten(1)
        return self.norm(out)

    def extra_repr(self) -> str:
        return f"pool={self.pool}, dim={self.dim}, hidden_dim={self.hidden_dim}"


def _plain(p: Tensor) -> Tensor:
    """Detached parameter as a plain tensor (a DTensor shard of FSDP2 is gathered whole)."""
    p = p.detach()
    full = getattr(p, "full_tensor", None)
    return full() if callable(full) else p


def detached_head_forward(head: nn.Module, x: Tensor) -> Tensor:
    """head(x) with every parameter of `head` detached: gradients reach x, never the head's parameters.

    The functional call of `torch.func.functional_call`, but running `head.forward` directly: under FSDP2 the
    head's pre-forward hook (run by `head(...)`) would put its own unsharded parameters back in place of the
    detached ones and the head would receive gradients (seen with reshard_after_forward=True).
    """
    params = {name: _plain(p) for name, p in head.named_parameters()}
    with _reparametrize_module(head, params):
        return head.forward(x)


class BridgeObjective(AddonObjective):
    """w_bg(t)·L_br_global + w_bp(t)·L_br_roll (the roll term needs the PatchRoll view, `step.views["patch_roll"]`).

    `student_forward` runs `student["bridge"]` once on the concatenated patch tokens (global crops, rolled view) and
    the detached DINO head; `forward` gives the losses. `gate_ibot_loss_below`: when set, the bridge loss counts
    only on steps whose iBOT loss is below it (a multiplicative 0/1, no host sync). Logged (unweighted, while the
    weight is > 0): `bridge_global_loss`, `bridge_patchshuffle_loss`.
    """

    name = "bridge"
    GLOBAL_KEY = "bridge_global_weight"
    ROLL_KEY = "bridge_patchshuffle_weight"
    ROLL_VIEW = "patch_roll"

    def __init__(self, schedules: dict[str, Any], patch_size: int, gate_ibot_loss_below: Optional[float] = None,
                 student_temp: float = 0.1) -> None:
        super().__init__(schedules, student_temp)
        self.patch_size = int(patch_size)
        self.gate = None if gate_ibot_loss_below is None else float(gate_ibot_loss_below)

    def _weights(self, extras: Any, iteration: int) -> tuple[float, float]:
        w_g = self.weight(self.GLOBAL_KEY, extras, iteration) if self.GLOBAL_KEY in self._schedules else 0.0
        w_r = self.weight(self.ROLL_KEY, extras, iteration) if self.ROLL_KEY in self._schedules else 0.0
        return w_g, w_r

    def student_forward(self, student: nn.ModuleDict, step: SSLStep) -> None:
        w_g, w_r = self._weights(step.extras, step.iteration)
        roll = step.views.get(self.ROLL_VIEW) if w_r > 0 else None
        if w_g <= 0 and roll is None:
            return
        pieces = []
        if w_g > 0:
            pieces.append(step.student_global["x_norm_patchtokens"])
        if roll is not None:
            pieces.append(roll["out"]["x_norm_patchtokens"])
        tokens = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
        height, width = step.batch["global_crops"].shape[-2:]
        pooled = student["bridge"](tokens, (height // self.patch_size, width // self.patch_size))
        logits = detached_head_forward(student["dino_head"], pooled)
        n_glob = pieces[0].shape[0] if w_g > 0 else 0
        step.views[self.name] = {"global": logits[:n_glob] if w_g > 0 else None,
                                 "roll": logits[n_glob:] if roll is not None else None}

    def forward(self, step: SSLStep) -> tuple[Tensor, dict[str, Tensor]]:
        out = step.views.get(self.name)
        if out is None:
            return self.zero(step), {}
        w_g, w_r = self._weights(step.extras, step.iteration)
        n_g, B = step.n_global, step.batch_size
        targets = step.dino_targets.reshape(n_g * B, -1)
        total = self.zero(step)
        logs: dict[str, Tensor] = {}
        if out["global"] is not None:
            l_g = soft_cross_entropy(targets, out["global"], self.student_temp).mean()
            total = total + w_g * l_g
            logs["bridge_global_loss"] = l_g.detach()
        if out["roll"] is not None:
            src = step.views[self.ROLL_VIEW]["request"].meta["src"].to(targets.device)
            l_r = soft_cross_entropy(targets.index_select(0, src), out["roll"], self.student_temp).mean()
            total = total + w_r * l_r
            logs["bridge_patchshuffle_loss"] = l_r.detach()
        if self.gate is not None and "ibot_loss" in step.terms:
            on = (step.terms["ibot_loss"].float() < self.gate).float()
            total = total * on
            logs["bridge_gate"] = on
        return total, logs
