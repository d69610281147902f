"""What an objective sees and returns.

One training step produces an `SSLStep` (student and teacher outputs, balanced teacher targets, schedule values).
Each objective maps it to named loss terms; the meta-architecture sums `weight * term` over objectives. An objective
whose weight is zero for the whole run is not built, so it costs nothing and changes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from torch import Tensor, nn


@dataclass
class SSLStep:
    """Everything one step computed, for the objectives.

    Shapes (B images per rank, n_g global and n_l local crops, K prototypes, M masked patches):
      batch:            the collated batch (global_crops [n_g*B,3,H,W], masks [n_g*B,N], mask_indices [M], ...)
      student_global:   backbone dict for the global crops (x_norm_clstoken [n_g*B,D], x_norm_patchtokens [n_g*B,N,D])
      student_local:    backbone dict for the local crops, or None when n_l = 0
      student_dino_global [n_g,B,K], student_dino_local [n_l,B,K] or None: DINO-head logits
      student_ibot:     [M,K] iBOT-head logits of the masked global patches
      teacher_global:   teacher backbone dict for the global crops (no grad)
      dino_targets:     [n_g,B,K] balanced teacher probabilities;  ibot_targets: [M,K]
      teacher_temp, iteration, epoch: schedule position
      views:            outputs of the add-ons' extra student views, {add-on name: dict}:
                        "request" (its ViewRequest), "out" (student backbone dict of the view rows), "dino" [n,K]
                        student DINO logits of the view CLS (or None), "ibot" [m,K] student iBOT logits of the
                        requested view patches (or None), "ibot_targets" [m',K] read-only balanced teacher targets
                        of the requested teacher patches (or None); add-ons may add their own entries
      terms:            detached logged terms of the objectives that already ran this step (in registration order)
    """

    batch: dict[str, Any]
    n_global: int
    n_local: int
    batch_size: int
    student_global: dict[str, Any]
    student_local: Optional[dict[str, Any]]
    student_dino_global: Tensor
    student_dino_local: Optional[Tensor]
    student_ibot: Optional[Tensor]
    teacher_global: dict[str, Any]
    dino_targets: Tensor
    ibot_targets: Optional[Tensor]
    teacher_temp: float
    iteration: int
    epoch: float
    extras: dict[str, Any] = field(default_factory=dict)
    views: dict[str, dict[str, Any]] = field(default_factory=dict)
    terms: dict[str, Tensor] = field(default_factory=dict)


class Objective(nn.Module):
    """Base class: `forward(step) -> (weighted loss, {name: unweighted detached value})`."""

    name: str = "objective"

    def forward(self, step: SSLStep) -> tuple[Tensor, dict[str, Tensor]]:  # pragma: no cover - interface
        raise NotImplementedError
