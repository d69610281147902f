"""DINO (CLS-token) cross-entropy between student crops and teacher targets."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dinobridge.objectives.base import Objective, SSLStep
from dinobridge.objectives.weighting import dino_pair_weights

__all__ = ["DINOLoss", "DINOObjective"]


class DINOLoss(nn.Module):
    """Mean cross-entropy over all (student crop s, teacher crop t, image b) triples.

    ℓ(s, t, b) = -Σ_k p^t_{b,k} · log_softmax(z^s_b / τ_s)_k
    L = Σ ℓ / (B·S·T), or with `ignore_diagonal` (pairs s == t dropped, for global-vs-global)
    L = Σ_{s≠t} ℓ / (B·S·T - B·min(S, T)).

    Shapes: student_logits [S, B, K], teacher_probs [T, B, K] -> scalar fp32. One [S, B·K] x [B·K, T] matmul.
    `n_prototypes` only registers the unused `center` buffer [1, K] of the official module so that official
    checkpoints load with strict key matching; leave it None otherwise.
    """

    def __init__(self, student_temp: float = 0.1, n_prototypes: Optional[int] = None) -> None:
        super().__init__()
        if student_temp <= 0:
            raise ValueError(f"DINOLoss: student_temp must be > 0, got {student_temp}")
        self.student_temp = student_temp
        if n_prototypes is not None:
            self.register_buffer("center", torch.zeros(1, n_prototypes))

    def forward(self, student_logits: Tensor, teacher_probs: Tensor, ignore_diagonal: bool = False) -> Tensor:
        if student_logits.ndim != 3 or teacher_probs.ndim != 3 or student_logits.shape[1:] != teacher_probs.shape[1:]:
            raise ValueError(
                "DINOLoss: expected student_logits [S, B, K] and teacher_probs [T, B, K], got "
                f"{tuple(student_logits.shape)} and {tuple(teacher_probs.shape)}"
            )
        s, b, _ = student_logits.shape
        t = teacher_probs.shape[0]
        log_p = F.log_softmax(student_logits.float() / self.student_temp, dim=-1)
        cross = torch.einsum("sbk,tbk->st", log_p, teacher_probs.float())  # [S, T], sums over b and k
        if not ignore_diagonal:
            return -cross.sum() / (b * s * t)
        n_diag = min(s, t)
        denom = b * s * t - b * n_diag
        if denom == 0:
            raise ValueError(f"DINOLoss: ignore_diagonal leaves no pairs for S={s}, T={t}")
        return -(cross.sum() - cross.diagonal().sum()) / denom

    def extra_repr(self) -> str:
        return f"student_temp={self.student_temp}"


class DINOObjective(Objective):
    """DINO CLS objective: local crops vs teacher global targets and global vs global (official pair weighting).

    loss = loss_weight * [ l/(g+l) * local_weight * L_local + g/(g+l) * L_global ], see `weighting.py`.
    `local_weight` comes from `step.extras["dino_local_weight"]` (the `dino.local_loss_weight_schedule`), default 1.
    """

    name = "dino"

    def __init__(self, loss_weight: float = 1.0, global_ignore_diagonal: bool = True, student_temp: float = 0.1) -> None:
        super().__init__()
        self.loss_weight = loss_weight
        self.ignore_diagonal = global_ignore_diagonal
        self.loss = DINOLoss(student_temp)

    def forward(self, step: SSLStep) -> tuple[Tensor, dict[str, Tensor]]:
        n_g, n_l = step.n_global, step.n_local
        w_local, w_global = dino_pair_weights(n_g, n_l, self.ignore_diagonal)
        logs: dict[str, Tensor] = {}
        total = step.student_dino_global.new_zeros(())
        if w_global > 0:
            glob = self.loss(step.student_dino_global, step.dino_targets, ignore_diagonal=self.ignore_diagonal)
            total = total + w_global * glob
            logs["dino_global_crops_loss"] = glob.detach()
        if n_l > 0 and step.student_dino_local is not None:
            local = self.loss(step.student_dino_local, step.dino_targets, ignore_diagonal=False)
            total = total + w_local * float(step.extras.get("dino_local_weight", 1.0)) * local
            logs["dino_local_crops_loss"] = local.detach()
        return self.loss_weight * total, logs
