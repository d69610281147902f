"""Alignment losses between a student projection and frozen teacher features.

All losses take ``student`` [..., D] (with gradient) and ``teacher`` [..., D] (detached inside), compute in
float32 whatever the input dtype, and return a scalar. Leading dimensions are flattened into one batch
dimension M (e.g. [B, D] -> M = B, pooled patches [B, K, D] -> M = B * K).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from dinobridge.distributed.comm import dist_active
from .vicreg import VICRegAlignLoss

__all__ = ["CosineAlignLoss", "NormalizedMSELoss", "VICRegAlignLoss", "build_alignment_loss", "LOSSES"]


def _check_pair(student: Tensor, teacher: Tensor) -> None:
    if student.shape != teacher.shape:
        raise ValueError(
            f"student/teacher: expected equal shapes [..., D], got {tuple(student.shape)} and {tuple(teacher.shape)}"
        )


class CosineAlignLoss(nn.Module):
    """``mean(1 - cos(student, teacher))`` over all leading positions (the seeds' default).

    student [..., D], teacher [..., D] -> scalar in [0, 2].
    """

    def __init__(self, eps: float = 1e-8) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        _check_pair(student, teacher)
        s = F.normalize(student.float(), dim=-1, eps=self.eps)
        t = F.normalize(teacher.detach().float(), dim=-1, eps=self.eps)
        return (1.0 - (s * t).sum(dim=-1)).mean()


class NormalizedMSELoss(nn.Module):
    """MSE between L2-normalised features, optionally whitened per dimension.

    student [..., D], teacher [..., D] -> scalar (mean over all M x D elements).

    Steps: ``s, t = normalize(s), normalize(t)`` (unit L2 norm along D), then by ``whiten``:

    * ``None``: ``mean((s - t)^2)``.
    * ``"batch"`` (the seeds' option): each side standardised per dimension with its own batch statistics,
      ``x <- (x - mean_M(x)) / (std_M(x) + eps)`` (unbiased std, local batch), then MSE. Needs M >= 2.
    * ``"running"``: both sides standardised with running (EMA) per-dimension mean/std of the normalised
      *teacher* features, i.e. a per-dimension variance-weighted MSE ``mean(((s - t) / (std_t + eps))^2)``.
      Usable with any batch size. Buffers update in training mode only: ``stat <- (1 - momentum) * stat +
      momentum * batch_stat`` (first update copies); the batch statistics are summed over ranks when a process
      group is initialised (every rank must then call forward). Needs ``dim``.
    """

    def __init__(
        self,
        whiten: str | None = None,
        dim: int | None = None,
        momentum: float = 0.01,
        eps: float = 1e-5,
        group: dist.ProcessGroup | None = None,
    ) -> None:
        super().__init__()
        if whiten not in (None, "batch", "running"):
            raise ValueError(f"whiten: expected None, 'batch' or 'running', got {whiten!r}")
        if not 0.0 < momentum <= 1.0:
            raise ValueError(f"momentum: expected a value in (0, 1], got {momentum!r}")
        self.whiten, self.momentum, self.eps, self.group = whiten, momentum, eps, group
        if whiten == "running":
            if not (isinstance(dim, int) and dim > 0):
                raise ValueError(f"dim: whiten='running' needs the feature dimension as a positive int, got {dim!r}")
            self.register_buffer("running_mean", torch.zeros(dim))
            self.register_buffer("running_var", torch.ones(dim))
            self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def _update_running(self, t: Tensor) -> None:
        """t [M, D] (normalised teacher features, float32): EMA update of the running mean / unbiased var."""
        stats = torch.cat([t.sum(0), (t * t).sum(0), t.new_full((1,), float(t.shape[0]))])
        if dist_active(self.group):
            dist.all_reduce(stats, op=dist.ReduceOp.SUM, group=self.group)
        d = t.shape[1]
        count = stats[-1]
        valid = count >= 2  # no variance estimate from a single sample; tensor ops only (no host sync)
        mean = stats[:d] / count
        var = ((stats[d : 2 * d] / count - mean * mean) * (count / (count - 1).clamp_min(1.0))).clamp_min(0.0)
        first = self.num_updates == 0
        new_mean = torch.where(first, mean, torch.lerp(self.running_mean, mean, self.momentum))
        new_var = torch.where(first, var, torch.lerp(self.running_var, var, self.momentum))
        self.running_mean.copy_(torch.where(valid, new_mean, self.running_mean))
        self.running_var.copy_(torch.where(valid, new_var, self.running_var))
        self.num_updates += valid.long()

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        _check_pair(student, teacher)
        d = student.shape[-1]
        s = F.normalize(student.float().reshape(-1, d), dim=-1)
        t = F.normalize(teacher.detach().float().reshape(-1, d), dim=-1)
        if self.whiten == "batch":
            if s.shape[0] < 2:
                raise ValueError("student: whiten='batch' needs at least 2 samples per batch")
            s = (s - s.mean(0)) / (s.std(0) + self.eps)
            t = (t - t.mean(0)) / (t.std(0) + self.eps)
        elif self.whiten == "running":
            if d != self.running_mean.shape[0]:
                raise ValueError(f"student: feature dim {d} does not match dim={self.running_mean.shape[0]}")
            if self.training:
                self._update_running(t)
            std = self.running_var.sqrt() + self.eps
            s = (s - self.running_mean) / std
            t = (t - self.running_mean) / std
        return F.mse_loss(s, t)

    def extra_repr(self) -> str:
        return f"whiten={self.whiten!r}, momentum={self.momentum}, eps={self.eps}"


LOSSES: dict[str, type[nn.Module]] = {
    "cosine": CosineAlignLoss,
    "mse": NormalizedMSELoss,
    "vicreg": VICRegAlignLoss,
}


def build_alignment_loss(name: str, **kwargs: Any) -> nn.Module:
    """Build a loss by name: ``"cosine"`` | ``"mse"`` | ``"vicreg"``; ``kwargs`` go to its constructor."""
    if name not in LOSSES:
        raise ValueError(f"loss: expected one of {sorted(LOSSES)}, got {name!r}")
    return LOSSES[name](**kwargs)
