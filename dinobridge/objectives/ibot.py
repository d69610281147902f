"""iBOT masked-patch cross-entropy (DINOv3 `forward_masked`)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from dinobridge.objectives.base import Objective, SSLStep
from dinobridge.objectives.soft_ce import soft_cross_entropy

__all__ = ["IBOTObjective", "IBOTPatchLoss", "masks_weight_from_masks"]


def masks_weight_from_masks(masks: Tensor) -> Tensor:
    """Per-masked-patch weight 1 / (#masked patches of its image).

    masks [n_images, N] bool -> weights [M] fp32 in the order of `masks.nonzero()` (row-major), M = masks.sum().
    """
    if masks.ndim != 2 or masks.dtype != torch.bool:
        raise ValueError(
            f"masks_weight_from_masks: masks must be a [n_images, N] bool tensor, "
            f"got {masks.dtype} {tuple(masks.shape)}"
        )
    per_image = 1.0 / masks.sum(dim=-1, keepdim=True).clamp_min(1).float()
    return per_image.expand(masks.shape)[masks]


class IBOTPatchLoss(nn.Module):
    """L = -(1/n_images) Σ_j w_j Σ_k t_{j,k} log_softmax(s_j / τ_s)_k over the M masked patches.

    With w_j = 1/M_img(j) this is the mean over masked patches inside each image, summed over images and divided by
    all `n_images` global images of the rank (unmasked images count in the denominator).

    Shapes: student_logits_masked [M, K], teacher_probs [M, K], masks_weight [M] -> scalar fp32.
    `n_prototypes` only registers the unused official `center` buffer [1, 1, K] for strict checkpoint loading.
    """

    def __init__(self, student_temp: float = 0.1, n_prototypes: Optional[int] = None) -> None:
        super().__init__()
        if student_temp <= 0:
            raise ValueError(f"IBOTPatchLoss: student_temp must be > 0, got {student_temp}")
        self.student_temp = student_temp
        if n_prototypes is not None:
            self.register_buffer("center", torch.zeros(1, 1, n_prototypes))

    def forward(
        self, student_logits_masked: Tensor, teacher_probs: Tensor, masks_weight: Tensor, n_images: int
    ) -> Tensor:
        if student_logits_masked.shape != teacher_probs.shape or student_logits_masked.ndim != 2:
            raise ValueError(
                "IBOTPatchLoss: expected student_logits_masked and teacher_probs of the same shape [M, K], got "
                f"{tuple(student_logits_masked.shape)} and {tuple(teacher_probs.shape)}"
            )
        if masks_weight.shape != student_logits_masked.shape[:1]:
            raise ValueError(
                f"IBOTPatchLoss: masks_weight must be [M={student_logits_masked.shape[0]}], "
                f"got {tuple(masks_weight.shape)}"
            )
        if n_images <= 0:
            raise ValueError(f"IBOTPatchLoss: n_images must be > 0, got {n_images}")
        ce = soft_cross_entropy(teacher_probs, student_logits_masked, self.student_temp)  # [M], chunked (soft_ce.py)
        return (ce * masks_weight.float()).sum() / n_images

    def extra_repr(self) -> str:
        return f"student_temp={self.student_temp}"


class IBOTObjective(Objective):
    """iBOT objective: masked global patches of the student vs balanced teacher targets; loss_weight * L_ibot."""

    name = "ibot"

    def __init__(self, loss_weight: float = 1.0, student_temp: float = 0.1) -> None:
        super().__init__()
        self.loss_weight = loss_weight
        self.loss = IBOTPatchLoss(student_temp)

    def forward(self, step: SSLStep) -> tuple[Tensor, dict[str, Tensor]]:
        s = step.student_ibot
        if s is None or s.shape[0] == 0:  # no masked patch this step: zero loss, graph kept
            zero = step.student_dino_global.sum() * 0.0
            return zero, {"ibot_loss": zero.detach()}
        loss = self.loss(s, step.ibot_targets, step.batch["masks_weight"], n_images=step.n_global * step.batch_size)
        return self.loss_weight * loss, {"ibot_loss": loss.detach()}
