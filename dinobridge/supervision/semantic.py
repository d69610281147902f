"""Teacher + projection(s) + alignment loss(es) + warm-up, as one module for any training loop."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from .losses import CosineAlignLoss, build_alignment_loss
from .pooling import as_grid, pool_feature_map
from .projection import StudentProjection
from .teacher import FrozenTeacher, TeacherOutput
from .vicreg import VICRegAlignLoss
from .warmup import LinearWarmup

__all__ = ["SemanticSupervision"]


class SemanticSupervision(nn.Module):
    """Semantic supervision of a student by a frozen DINO teacher (seeds 000/001).

    * global term: ``loss(projection(student) [B, D], teacher CLS [B, D])`` with ``loss`` = ``"cosine"``
      (default), ``"mse"`` (normalised MSE) or ``"vicreg"`` (or any module ``(student, teacher) -> scalar``);
    * optional coarse patch term (``patch_grid`` = g or (gh, gw)): the student feature map and the teacher patch
      tokens are both average-pooled to gh x gw cells, the student cells go through ``patch_projection``, and
      the term is ``mean(1 - cos)`` over B x gh*gw cells (cosine, as in the seeds);
    * ``loss = weight(step) * (cls_weight * cls + patch_weight * patch)`` with the linear warm-up
      ``weight(step) = weight * min(1, step / warmup_steps)``.

    Defaults follow the seeds: cosine, weight 0.2, 5000 warm-up steps, cls_weight 1, patch_weight 0.2, and an
    MLP projection ``student_dim -> D -> D`` (Linear, GELU, LayerNorm, Linear).

    forward(student [B, C], images [B, 3, H, W] | None, step=None, student_patch=None, teacher_out=None)
    -> dict of scalars: ``"loss"`` (weighted total, with gradient: add it to your objective), and for logging
    (detached) ``"cls"``, ``"patch"`` (if enabled), ``"weight"``, and ``"inv"``/``"var"``/``"cov"`` for VICReg.
    ``student_patch`` is a map [B, C', h, w] or square tokens [B, h*h, C']. ``images`` must already be normalised
    for the teacher (``teacher.mean`` / ``teacher.std``); alternatively pass precomputed ``teacher_out``.
    ``step=None`` uses an internal counter (saved in the state dict) that advances by one per training-mode call,
    starting at 1.
    """

    def __init__(
        self,
        teacher: FrozenTeacher,
        student_dim: int | None = None,
        *,
        loss: str | nn.Module = "cosine",
        loss_kwargs: dict[str, Any] | None = None,
        weight: float = 0.2,
        warmup_steps: int = 5000,
        cls_weight: float = 1.0,
        patch_grid: int | tuple[int, int] | None = None,
        patch_weight: float = 0.2,
        student_patch_dim: int | None = None,
        projection: nn.Module | None = None,
        patch_projection: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(teacher, FrozenTeacher):
            raise TypeError(f"teacher: expected a FrozenTeacher, got {type(teacher).__name__}")
        self.teacher = teacher
        dim = teacher.embed_dim
        needs_dim = projection is None or (patch_grid is not None and patch_projection is None)
        if needs_dim and not isinstance(dim, int):
            raise ValueError("teacher: embed_dim is unknown; pass embed_dim= to FrozenTeacher")
        if projection is None:
            if not (isinstance(student_dim, int) and student_dim > 0):
                raise ValueError(f"student_dim: expected a positive int when projection is None, got {student_dim!r}")
            projection = StudentProjection(student_dim, dim, hidden_dim=dim)
        self.projection = projection
        if isinstance(loss, str):
            loss = build_alignment_loss(loss, **(loss_kwargs or {}))
        elif loss_kwargs:
            raise ValueError("loss_kwargs: only valid when loss is given by name")
        self.loss = loss
        self.cls_weight = float(cls_weight)
        self.warmup = LinearWarmup(weight, warmup_steps)
        self.patch_grid = as_grid(patch_grid, "patch_grid") if patch_grid is not None else None
        self.patch_weight = float(patch_weight)
        if self.patch_grid is not None:
            if patch_projection is None:
                if not (isinstance(student_patch_dim, int) and student_patch_dim > 0):
                    raise ValueError(
                        f"student_patch_dim: expected a positive int when patch_grid is set, got {student_patch_dim!r}"
                    )
                patch_projection = StudentProjection(student_patch_dim, dim, hidden_dim=dim)
            self.patch_projection = patch_projection
            self.patch_loss = CosineAlignLoss()
        self.register_buffer("num_steps", torch.zeros((), dtype=torch.long))

    def weight_at(self, step: int) -> float:
        """The warmed-up loss weight at ``step``."""
        return self.warmup(step)

    def _student_cells(self, student_patch: Tensor) -> Tensor:
        """[B, C', h, w] or [B, h*h, C'] -> pooled [B, gh*gw, C']."""
        if student_patch.dim() == 3:
            b, n, c = student_patch.shape
            s = math.isqrt(n)
            if s * s != n:
                raise ValueError(f"student_patch: {n} tokens are not a square grid; pass a [B, C, h, w] map")
            student_patch = student_patch.transpose(1, 2).reshape(b, c, s, s)
        elif student_patch.dim() != 4:
            raise ValueError(f"student_patch: expected [B, C, h, w] or [B, N, C], got {tuple(student_patch.shape)}")
        return pool_feature_map(student_patch, self.patch_grid)

    def forward(
        self,
        student: Tensor,
        images: Tensor | None = None,
        *,
        step: int | None = None,
        student_patch: Tensor | None = None,
        teacher_out: TeacherOutput | None = None,
    ) -> dict[str, Tensor]:
        if teacher_out is None:
            if images is None:
                raise ValueError("images: required when teacher_out is not given")
            teacher_out = self.teacher(images)
        out: dict[str, Tensor] = {}
        y = self.projection(student)
        if isinstance(self.loss, VICRegAlignLoss):
            terms = self.loss.terms(y, teacher_out.cls)
            cls_loss = self.loss.combine(terms)
            out.update({k: v.detach() for k, v in terms.items()})
        else:
            cls_loss = self.loss(y, teacher_out.cls)
        total = self.cls_weight * cls_loss
        out["cls"] = cls_loss.detach()
        if self.patch_grid is not None:
            if student_patch is None:
                raise ValueError("student_patch: required when patch_grid is set")
            y_loc = self.patch_projection(self._student_cells(student_patch))  # [B, K, D]
            t_loc = teacher_out.pooled_patches(self.patch_grid)  # [B, K, D]
            patch_loss = self.patch_loss(y_loc, t_loc)
            total = total + self.patch_weight * patch_loss
            out["patch"] = patch_loss.detach()
        if step is None:
            if self.training:
                self.num_steps += 1
            w = self.warmup.at(self.num_steps).to(total.device)
        else:
            w = torch.tensor(self.warmup(step), dtype=torch.float32, device=total.device)
        out["weight"] = w.detach()
        out["loss"] = w * total
        return out

    def extra_repr(self) -> str:
        return (
            f"{self.warmup}, cls_weight={self.cls_weight}, "
            f"patch_grid={self.patch_grid}, patch_weight={self.patch_weight}"
        )
