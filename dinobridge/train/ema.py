"""Teacher EMA: θ_t ← m·θ_t + (1 − m)·θ_s over all parameters, buffers untouched (reference §1.7).

Implemented as one `torch._foreach_lerp_(θ_t, θ_s, 1 − m)` per (device, dtype) bucket, which equals the official
`_foreach_mul_(θ_t, m); _foreach_add_(θ_t, θ_s, alpha=1 − m)` up to float rounding while reading/writing memory
once instead of twice. FSDP2 parameters (DTensor) are updated on their local shards, like the official code.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch import Tensor, nn

__all__ = ["ema_update", "paired_parameters"]


def _local(t: Tensor) -> Tensor:
    """The local shard of a DTensor (a view, so in-place updates reach the parameter); plain tensors as is."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


def paired_parameters(teacher: nn.Module, student: nn.Module) -> Iterator[tuple[str, Tensor, Tensor]]:
    """(name, teacher param, student param) paired by name; raises ValueError on any name/shape/dtype mismatch."""
    t_params = dict(teacher.named_parameters())
    s_params = dict(student.named_parameters())
    if t_params.keys() != s_params.keys():
        only_t = sorted(t_params.keys() - s_params.keys())[:5]
        only_s = sorted(s_params.keys() - t_params.keys())[:5]
        raise ValueError(
            f"ema_update: teacher and student parameter names differ (teacher only: {only_t}, student only: {only_s})"
        )
    for name, pt in t_params.items():
        ps = s_params[name]
        if pt.shape != ps.shape or pt.dtype != ps.dtype:
            raise ValueError(
                f"ema_update: parameter {name!r} is {tuple(pt.shape)}/{pt.dtype} in the teacher but "
                f"{tuple(ps.shape)}/{ps.dtype} in the student"
            )
        yield name, pt, ps


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """In place: every teacher parameter ← momentum · teacher + (1 − momentum) · student (same-named parameter).

    momentum in [0, 1]; 1 leaves the teacher unchanged, 0 copies the student. Buffers are not touched.
    """
    m = float(momentum)
    if not 0.0 <= m <= 1.0:
        raise ValueError(f"ema_update: momentum must be in [0, 1], got {momentum}")
    teacher_list, student_list = [], []
    for _, pt, ps in paired_parameters(teacher, student):
        teacher_list.append(_local(pt))
        student_list.append(_local(ps))
    if not teacher_list or m == 1.0:
        return
    torch._foreach_lerp_(teacher_list, student_list, 1.0 - m)
