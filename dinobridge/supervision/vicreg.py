"""VICReg-style alignment to a frozen teacher, regularising the student side only."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from dinobridge.distributed.comm import gather_no_grad, gather_with_grad

__all__ = ["VICRegAlignLoss"]


class VICRegAlignLoss(nn.Module):
    """Invariance to the teacher + variance and covariance terms on the student only (seeds 000/001).

    student [..., D] (flattened to [M, D]), teacher [..., D] -> scalar. When a process group is initialised
    (and ``gather=True``) both are first gathered across ranks to [N = world * M, D], the student WITH
    gradient; every rank must pass the same M. With y the gathered student and g the gathered teacher:

    * ``inv = mean((y - g)^2)``                                 (over N x D elements)
    * ``std_j = sqrt(var_N(y_j) + eps)`` (biased var), ``var = mean_j relu(gamma - std_j)``
    * ``C = (y - mean(y))^T (y - mean(y)) / max(N - 1, 1)``, ``cov = sum_{i != j} C_ij^2 / D^2``
      (the seeds average over all D^2 entries; original VICReg divides by D)
    * ``loss = inv_weight * inv + var_weight * var + cov_weight * cov``

    Defaults are the seeds' coefficients (25 / 10 / 0.5, gamma 1, eps 1e-4), not VICReg's 25 / 25 / 1.
    Under DDP the gradient of the local rows is ``world_size`` times the global-loss gradient; DDP's averaging
    makes it exact (see :mod:`dinobridge.supervision.gather`).
    """

    def __init__(
        self,
        inv_weight: float = 25.0,
        var_weight: float = 10.0,
        cov_weight: float = 0.5,
        gamma: float = 1.0,
        eps: float = 1e-4,
        gather: bool = True,
        group: dist.ProcessGroup | None = None,
    ) -> None:
        super().__init__()
        self.inv_weight, self.var_weight, self.cov_weight = inv_weight, var_weight, cov_weight
        self.gamma, self.eps, self.gather, self.group = gamma, eps, gather, group

    def terms(self, student: Tensor, teacher: Tensor) -> dict[str, Tensor]:
        """The unweighted terms ``{"inv", "var", "cov"}`` (scalars, float32, with gradient to ``student``)."""
        if student.shape != teacher.shape:
            raise ValueError(
                "student/teacher: expected equal shapes [..., D], "
                f"got {tuple(student.shape)} and {tuple(teacher.shape)}"
            )
        d = student.shape[-1]
        y = student.float().reshape(-1, d)
        g = teacher.detach().float().reshape(-1, d)
        if self.gather:
            y = gather_with_grad(y, self.group)
            g = gather_no_grad(g, self.group)
        n = y.shape[0]
        inv = (y - g).pow(2).mean()
        std = torch.sqrt(y.var(dim=0, unbiased=False) + self.eps)
        var = F.relu(self.gamma - std).mean()
        yc = y - y.mean(dim=0, keepdim=True)
        c = (yc.T @ yc) / max(n - 1, 1)
        cov = (c.pow(2).sum() - c.diagonal().pow(2).sum()) / (d * d)
        return {"inv": inv, "var": var, "cov": cov}

    def combine(self, terms: dict[str, Tensor]) -> Tensor:
        """Weighted sum of the output of :meth:`terms`."""
        return self.inv_weight * terms["inv"] + self.var_weight * terms["var"] + self.cov_weight * terms["cov"]

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        return self.combine(self.terms(student, teacher))

    def extra_repr(self) -> str:
        return (
            f"inv_weight={self.inv_weight}, var_weight={self.var_weight}, cov_weight={self.cov_weight}, "
            f"gamma={self.gamma}, eps={self.eps}, gather={self.gather}"
        )
