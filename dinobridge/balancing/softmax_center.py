"""Softmax with an EMA centre (DINOv1/v2 `softmax_center_teacher` / `update_center`)."""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from dinobridge.balancing.base import Balancer, all_reduce, register_balancer

__all__ = ["SoftmaxCenter"]


@register_balancer("softmax", "centering", "softmax_center")
class SoftmaxCenter(Balancer):
    """Targets softmax((z - center) / τ); `center` [1, K] is an EMA of the global batch mean of the logits.

    The centre used by a call is the one from the previous batches; with `update=True` (default) the centre is
    then moved: center <- momentum * center + (1 - momentum) * mean, the mean being all-reduced over the group.

    Shapes: teacher_logits [n, K] (DINO CLS; or masked patches [M, K]) or [B, N, K] (all patches of B images)
    -> probs of the same shape, fp32, summing to 1 over K.
    Batch mean: [n, K] -> mean over rows (global count = n * world_size, or all-reduced `n_samples` when given,
    so unequal masked-patch counts per rank give the true global mean); [B, N, K] -> mean over patches, then over
    images (official iBOT variant; each image weighs the same whatever N).
    """

    def __init__(
        self,
        n_prototypes: int,
        momentum: float = 0.9,
        group: Optional[Any] = None,
    ) -> None:
        super().__init__(group)
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"SoftmaxCenter: momentum must be in [0, 1], got {momentum}")
        self.n_prototypes = n_prototypes
        self.momentum = momentum
        self.register_buffer("center", torch.zeros(1, n_prototypes))

    def _check(self, logits: Tensor) -> None:
        if logits.ndim not in (2, 3) or logits.shape[-1] != self.n_prototypes:
            raise ValueError(
                f"SoftmaxCenter: teacher_logits must be [n, {self.n_prototypes}] or [B, N, {self.n_prototypes}], "
                f"got shape {tuple(logits.shape)}"
            )

    def _targets(self, logits: Tensor, teacher_temp: float, n_samples: Optional[Tensor]) -> Tensor:
        self._check(logits)
        return torch.softmax((logits - self.center) / teacher_temp, dim=-1)

    @torch.no_grad()
    def update(self, teacher_logits: Tensor, n_samples: Optional[Tensor] = None) -> None:
        self._check(teacher_logits)
        x = teacher_logits.float()
        if x.ndim == 3:
            x = x.mean(dim=1)  # mean over patches first
            n_samples = None
        total = all_reduce(x.sum(dim=0, keepdim=True), "sum", self.group)
        count = self.global_count(x.shape[0], n_samples, x.device).clamp_min(1.0)
        self.center.mul_(self.momentum).add_(total / count, alpha=1.0 - self.momentum)

    def extra_repr(self) -> str:
        return f"n_prototypes={self.n_prototypes}, momentum={self.momentum}"
