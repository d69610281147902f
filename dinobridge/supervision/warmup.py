"""Linear warm-up of a loss weight."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["LinearWarmup"]


class LinearWarmup:
    """``weight(step) = weight * min(1, step / warmup_steps)``; ``warmup_steps=0`` gives the full weight at once.

    Negative steps are treated as 0.
    """

    def __init__(self, weight: float, warmup_steps: int) -> None:
        if not (isinstance(warmup_steps, int) and warmup_steps >= 0):
            raise ValueError(f"warmup_steps: expected an int >= 0, got {warmup_steps!r}")
        if weight < 0:
            raise ValueError(f"weight: expected a value >= 0, got {weight!r}")
        self.weight = float(weight)
        self.warmup_steps = warmup_steps

    def __call__(self, step: int) -> float:
        if self.warmup_steps == 0:
            return self.weight
        return self.weight * min(1.0, max(int(step), 0) / self.warmup_steps)

    def at(self, step: Tensor) -> Tensor:
        """Same schedule for a step held in a tensor (no host synchronisation); returns a float32 tensor."""
        if self.warmup_steps == 0:
            return step.new_full((), self.weight, dtype=torch.float32)
        frac = (step.float() / self.warmup_steps).clamp(0.0, 1.0)
        return self.weight * frac

    def __repr__(self) -> str:
        return f"LinearWarmup(weight={self.weight}, warmup_steps={self.warmup_steps})"
