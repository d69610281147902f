"""The `Balancer` interface (teacher logits -> target probabilities) and its registry."""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from dinobridge.distributed.comm import all_reduce, dist_ready, world_size

__all__ = ["Balancer", "register_balancer", "build_balancer", "available_balancers", "dist_ready", "all_reduce"]


class Balancer(nn.Module):
    """Turns teacher logits into target probabilities that are balanced over prototypes.

    Subclasses implement `_targets` (and `update` when they keep state). Everything runs under no_grad in fp32
    whatever the input dtype; state lives in buffers so it goes into `state_dict`. `group` is the process group
    used for reductions (None = default group when one exists).

    forward(teacher_logits [n, K], teacher_temp, n_samples=None, update=True) -> probs [n, K], rows sum to 1.
    `n_samples` (0-dim tensor) is the number of valid rows on this rank (iBOT: masked-patch count); when given, the
    global count is its all-reduce rather than n * world_size. `update=False` reads the state without changing it.
    """

    def __init__(self, group: Optional[Any] = None) -> None:
        super().__init__()
        self.group = group

    @torch.no_grad()
    def forward(
        self,
        teacher_logits: Tensor,
        teacher_temp: float,
        n_samples: Optional[Tensor] = None,
        update: bool = True,
    ) -> Tensor:
        if teacher_temp <= 0:
            raise ValueError(f"{type(self).__name__}: teacher_temp must be > 0, got {teacher_temp}")
        probs = self._targets(teacher_logits.float(), float(teacher_temp), n_samples)
        if update:
            self.update(teacher_logits, n_samples)
        return probs

    def _targets(self, logits: Tensor, teacher_temp: float, n_samples: Optional[Tensor]) -> Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def update(self, teacher_logits: Tensor, n_samples: Optional[Tensor] = None) -> None:
        """Update the internal state from this batch (stateless balancers: nothing to do)."""

    def global_count(self, n_local: int, n_samples: Optional[Tensor], device: torch.device) -> Tensor:
        """Total number of rows over the group as a 0-dim fp32 tensor."""
        if n_samples is None:
            return torch.full((), float(n_local * world_size(self.group)), device=device)
        if n_samples.device.type == "cpu":  # the collator's count: a fill on the device, not a copy that waits for it
            count = torch.full((), float(n_samples), device=device)
        else:
            count = n_samples.detach().to(dtype=torch.float32).clone().reshape(())
        return all_reduce(count, "sum", self.group)


_REGISTRY: dict[str, Callable[..., Balancer]] = {}


def register_balancer(*names: str) -> Callable[[type], type]:
    """Class decorator: make a Balancer buildable by `build_balancer(name)` (e.g. `train.centering` values)."""

    def deco(cls: type) -> type:
        for name in names:
            if name in _REGISTRY:
                raise ValueError(f"register_balancer: name {name!r} is already registered")
            _REGISTRY[name] = cls
        return cls

    return deco


def available_balancers() -> list[str]:
    return sorted(_REGISTRY)


def build_balancer(name: str, **kwargs: Any) -> Balancer:
    """Build the balancer registered as `name` (the `train.centering` value) with constructor `kwargs`."""
    if name not in _REGISTRY:
        raise ValueError(f"build_balancer: unknown balancer {name!r}, expected one of {available_balancers()}")
    return _REGISTRY[name](**kwargs)
