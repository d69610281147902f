"""Sinkhorn-Knopp teacher targets (DINOv2/DINOv3 `sinkhorn_knopp_teacher`)."""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from dinobridge.balancing.base import Balancer, all_reduce, register_balancer

__all__ = ["SinkhornKnopp"]

_TINY = torch.finfo(torch.float32).tiny  # only guards 0/0 (fully underflowed rows); normal sums are never touched


@register_balancer("sinkhorn_knopp", "sinkhorn")
class SinkhornKnopp(Balancer):
    """Equipartition targets by a few Sinkhorn-Knopp iterations over the whole (global) batch.

    Algorithm (official order): Q = exp(z/τ)^T [K, n]; Q /= ΣQ (global); repeat n_iterations times:
    Q /= rowsum(Q) (all-reduced), Q /= K, Q /= colsum(Q), Q /= B_tot; finally return (Q * B_tot)^T [n, K].
    B_tot = n * world_size, or the all-reduced `n_samples` (iBOT: masked patches differ per rank).

    `subtract_max=True` (default) subtracts the global max of z/τ before exp. SK is invariant to a constant
    factor on Q (the first normalisation removes it), so the result is identical in exact arithmetic, but exp
    cannot overflow. `subtract_max=False` is the literal official computation.

    Shapes: teacher_logits [n, K] (any float dtype) -> probs [n, K] fp32, each row sums to 1.
    Every rank must call it (it runs collectives even with n = 0 rows).
    """

    def __init__(
        self,
        n_prototypes: Optional[int] = None,
        n_iterations: int = 3,
        subtract_max: bool = True,
        group: Optional[Any] = None,
    ) -> None:
        super().__init__(group)
        if n_iterations < 1:
            raise ValueError(f"SinkhornKnopp: n_iterations must be >= 1, got {n_iterations}")
        self.n_prototypes = n_prototypes
        self.n_iterations = n_iterations
        self.subtract_max = subtract_max

    def _targets(self, logits: Tensor, teacher_temp: float, n_samples: Optional[Tensor]) -> Tensor:
        if logits.ndim != 2:
            raise ValueError(f"SinkhornKnopp: teacher_logits must be [n, K], got shape {tuple(logits.shape)}")
        n, k = logits.shape
        if self.n_prototypes is not None and k != self.n_prototypes:
            raise ValueError(f"SinkhornKnopp: expected K={self.n_prototypes} prototypes, got {k}")
        z = logits / teacher_temp
        if self.subtract_max:
            m = z.max() if n > 0 else z.new_tensor(float("-inf"))
            m = all_reduce(m.clone(), "max", self.group)
            z = z - torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        q = torch.exp(z).t()  # [K, n]
        b_tot = self.global_count(n, n_samples, q.device)

        q /= all_reduce(q.sum(), "sum", self.group).clamp_min(_TINY)
        for _ in range(self.n_iterations):
            rows = all_reduce(q.sum(dim=1, keepdim=True), "sum", self.group)
            q /= rows.clamp_min(_TINY)
            q /= k
            q /= q.sum(dim=0, keepdim=True).clamp_min(_TINY)
            q /= b_tot
        q *= b_tot
        return q.t().contiguous()

    def extra_repr(self) -> str:
        return f"n_iterations={self.n_iterations}, subtract_max={self.subtract_max}"
