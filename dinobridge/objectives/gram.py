"""Gram anchoring loss: match the patch-similarity structure of a (frozen) Gram teacher."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dinobridge.objectives.base import Objective, SSLStep

__all__ = ["GramLoss", "GramObjective"]


class GramLoss(nn.Module):
    """L = MSE(X̂_s X̂_sᵀ, X̂_t X̂_tᵀ), mean over all Gram entries.

    apply_norm: L2-normalise features along D first (cosine similarities).
    img_level: one [P, P] Gram per image; otherwise one Gram over all B·P tokens ([BP, BP], memory-heavy).
    remove_neg: clamp negative similarities to 0 in both Grams.
    remove_only_teacher_neg: where the teacher similarity is negative, set the teacher entry to 0 and, if the
        student entry is also negative, the student entry to 0 as well (a hinge: the student is only pushed down
        to 0, never up from below 0, on pairs the teacher finds dissimilar). The mask is taken from the teacher
        *before* clamping; the official code tests the already-clamped teacher, so its student mask never fires and
        it reduces to "clamp the teacher only" (a latent bug, not reproduced here).

    Shapes: student_feats, teacher_feats [B, P, D] -> scalar fp32. The teacher side carries no gradient.
    """

    def __init__(
        self,
        apply_norm: bool = True,
        img_level: bool = True,
        remove_neg: bool = False,
        remove_only_teacher_neg: bool = False,
    ) -> None:
        super().__init__()
        if remove_neg and remove_only_teacher_neg:
            raise ValueError("GramLoss: remove_neg and remove_only_teacher_neg are exclusive, set at most one")
        self.apply_norm = apply_norm
        self.img_level = img_level
        self.remove_neg = remove_neg
        self.remove_only_teacher_neg = remove_only_teacher_neg

    def _gram(self, x: Tensor) -> Tensor:
        x = x.float()
        if self.apply_norm:
            x = F.normalize(x, p=2, dim=-1)
        if not self.img_level:
            x = x.flatten(0, 1)  # [B·P, D]
        return x @ x.transpose(-1, -2)

    def forward(self, student_feats: Tensor, teacher_feats: Tensor) -> Tensor:
        if student_feats.ndim != 3 or student_feats.shape != teacher_feats.shape:
            raise ValueError(
                "GramLoss: expected student_feats and teacher_feats of the same shape [B, P, D], got "
                f"{tuple(student_feats.shape)} and {tuple(teacher_feats.shape)}"
            )
        g_s = self._gram(student_feats)
        with torch.no_grad():
            g_t = self._gram(teacher_feats.detach())
        if self.remove_neg:
            g_s = g_s.clamp_min(0.0)
            g_t = g_t.clamp_min(0.0)
        elif self.remove_only_teacher_neg:
            teacher_neg = g_t < 0
            g_t = g_t.clamp_min(0.0)
            g_s = torch.where(teacher_neg & (g_s < 0), torch.zeros_like(g_s), g_s)
        return F.mse_loss(g_s, g_t)

    def extra_repr(self) -> str:
        return (
            f"apply_norm={self.apply_norm}, img_level={self.img_level}, remove_neg={self.remove_neg}, "
            f"remove_only_teacher_neg={self.remove_only_teacher_neg}"
        )


class GramObjective(Objective):
    """Gram anchoring: the student's (masked) global patch tokens vs the Gram teacher's patch features.

    The Gram teacher's features come in `step.extras["gram_teacher_patches"]` [n_g*B, N, D] (already on the student
    grid); `tokens_used` = all | masked | unmasked (the last two need img_level = False). Weight: `loss_weight`, or
    `step.extras["gram_weight"]` when a schedule is configured.
    """

    name = "gram"

    def __init__(self, loss_weight: float = 1.0, tokens_used: str = "all", **loss_kwargs) -> None:
        super().__init__()
        if tokens_used not in ("all", "masked", "unmasked"):
            raise ValueError(f"gram.tokens_used: expected all|masked|unmasked, got {tokens_used!r}")
        if tokens_used != "all" and loss_kwargs.get("img_level", True):
            raise ValueError("gram.tokens_used masked/unmasked needs gram.img_level = false")
        self.loss_weight, self.tokens_used = loss_weight, tokens_used
        self.loss = GramLoss(**loss_kwargs)

    def forward(self, step: SSLStep) -> tuple[Tensor, dict[str, Tensor]]:
        student = step.student_global["x_norm_patchtokens"]
        teacher = step.extras["gram_teacher_patches"]
        if self.tokens_used != "all":
            keep = step.batch["masks"] if self.tokens_used == "masked" else ~step.batch["masks"]
            student, teacher = student[keep][None], teacher[keep][None]
        loss = self.loss(student, teacher)
        weight = float(step.extras.get("gram_weight", self.loss_weight))
        return weight * loss, {"gram_loss": loss.detach()}
