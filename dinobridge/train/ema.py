"""Teacher EMA: θ_t ← m·θ_t + (1 − m)·θ_s over all parameters, buffers untouched (reference §1.7).

Implemented as one `torch._foreach_lerp_(θ_t, θ_s, 1 − m)` over all parameters, which equals the official
`_foreach_mul_(θ_t, m); _foreach_add_(θ_t, θ_s, alpha=1 − m)` up to float rounding while reading/writing memory
once instead of twice. FSDP2 parameters (DTensor) are updated on their local shards, like the official code.
"""

from __future__ import annotations

from typing import Iterator, Optional

import torch
from torch import Tensor, nn

__all__ = ["ema_lerp_", "ema_pairs", "ema_update", "paired_parameters"]


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


def ema_pairs(teacher: nn.Module, student: nn.Module) -> tuple[list[Tensor], list[Tensor]]:
    """(teacher parameters, student parameters), paired by name and checked (`paired_parameters`); build once and
    call `ema_lerp_` every step to skip the walk over both modules."""
    pairs = [(pt, ps) for _, pt, ps in paired_parameters(teacher, student)]
    return [pt for pt, _ in pairs], [ps for _, ps in pairs]


@torch.no_grad()
def ema_lerp_(pairs: tuple[list[Tensor], list[Tensor]], momentum: float, apply: Optional[Tensor] = None) -> None:
    """In place on `ema_pairs` output: teacher ← momentum · teacher + (1 − momentum) · student.

    momentum in [0, 1]; 1 leaves the teacher unchanged, 0 copies the student. apply: a 0-dim bool tensor on the
    device; where False the teacher is left unchanged, decided on the device (a skipped step, without the host
    reading the flag).
    """
    m = float(momentum)
    if not 0.0 <= m <= 1.0:
        raise ValueError(f"ema_update: momentum must be in [0, 1], got {momentum}")
    t_params, s_params = pairs
    if not t_params or m == 1.0:
        return
    teacher_list, student_list = [_local(p) for p in t_params], [_local(p) for p in s_params]
    if apply is None:
        torch._foreach_lerp_(teacher_list, student_list, 1.0 - m)
        return
    weight = apply.to(torch.float32) * (1.0 - m)  # 0 where not applied: t + 0 * (s - t) = t
    weights = {dtype: weight.to(dtype) for dtype in {t.dtype for t in teacher_list}}
    torch._foreach_lerp_(teacher_list, student_list, [weights[t.dtype] for t in teacher_list])


def ema_update(teacher: nn.Module, student: nn.Module, momentum: float, apply: Optional[Tensor] = None) -> None:
    """In place: every teacher parameter ← momentum · teacher + (1 − momentum) · student (same-named parameter);
    buffers are not touched. `ema_lerp_(ema_pairs(teacher, student), momentum, apply)`."""
    ema_lerp_(ema_pairs(teacher, student), momentum, apply)
