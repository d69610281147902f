"""What the ResizeShuffle add-on objectives (Crop-Resize, PatchRoll, bridge) share with the meta-architecture.

An add-on may ask for one extra *student view* of global-crop size per step (`make_view` -> `ViewRequest`). The
meta-architecture concatenates every requested view with the global crops in the ONE student `forward_features`
call (no extra teacher forward), runs the student DINO head on the view CLS tokens and the student iBOT head on the
view patch tokens it asks for, runs the teacher iBOT head + balancer (read-only) on the teacher tokens it asks for,
and hands everything back in `SSLStep.views[name]` (keys listed in `SSLStep`). Views are made on the device from the
normalised global crops already in the batch; their random parameters come from a CPU generator that is a pure
function of (train.seed, rank, iteration, tag), so a resumed run makes exactly the same views and the data workers'
RNG is never touched. An add-on whose weights are 0 at an iteration makes no view and draws nothing that step.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

import numpy as np
import torch
from torch import Tensor, nn

from dinobridge.objectives.base import Objective, SSLStep
from dinobridge.objectives.soft_ce import soft_cross_entropy  # re-exported: the add-ons' per-row CE

__all__ = ["AddonObjective", "ViewContext", "ViewRequest", "soft_cross_entropy", "view_generator"]


def view_generator(seed: int, rank: int, iteration: int, tag: str) -> torch.Generator:
    """CPU generator seeded from (seed, rank, iteration, crc32(tag)) through numpy's SeedSequence."""
    key = [int(seed) & 0xFFFFFFFF, int(rank), int(iteration), zlib.crc32(tag.encode())]
    state = int(np.random.SeedSequence(key).generate_state(1, np.uint64)[0] >> np.uint64(1))
    return torch.Generator().manual_seed(state)


@dataclass
class ViewContext:
    """What an add-on sees when it makes its view (before any forward).

    global_crops [n_g*B, 3, H, W] normalised (crop-major: index = g*B + b); masks [n_g*B, N] bool iBOT masks of the
    student's global crops; grid (h, w) patches; mean/std [3] of the normalisation; extras: this step's schedule
    values (add-on weights by config key).
    """

    global_crops: Tensor
    masks: Tensor
    n_global: int
    batch_size: int
    patch_size: int
    iteration: int
    rank: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    extras: Mapping[str, Any] = field(default_factory=dict)

    @property
    def grid(self) -> tuple[int, int]:
        h, w = self.global_crops.shape[-2:]
        return h // self.patch_size, w // self.patch_size


@dataclass
class ViewRequest:
    """One extra student view and what to compute on it.

    images [n, 3, H, W] (global-crop size); masks [n, N] bool student input masks or None (= none masked);
    dino_cls: run the student DINO head on the view's CLS tokens; student_patches: LongTensor [m] flat indices into
    the view's [n*N] patch tokens for the student iBOT head; teacher_patches: LongTensor [m'] flat indices into the
    teacher's global patch tokens [n_g*B*N] for the teacher iBOT head, balanced read-only (no history update);
    meta: the add-on's own data (source crop of each row, permutations, ...). Index tensors may live on the CPU.
    """

    images: Tensor
    masks: Optional[Tensor] = None
    dino_cls: bool = True
    student_patches: Optional[Tensor] = None
    teacher_patches: Optional[Tensor] = None
    meta: dict[str, Any] = field(default_factory=dict)


class AddonObjective(Objective):
    """An objective whose loss weights follow schedules (config keys of `resize_shuffle_augmentor`).

    `weights` maps a config key (e.g. "resize_paste_loss_weight") to its ArraySchedule; the value of iteration t is
    `step.extras[key]` when the train loop provides it (`Schedules.extras`), else the schedule's own value at t.
    Subclasses may override `make_view` (one extra student view) and `student_forward` (work on student modules
    after the student forward, e.g. the bridge); `forward(step)` returns (weighted loss, logged terms).
    """

    def __init__(self, weights: Mapping[str, Any], student_temp: float = 0.1) -> None:
        super().__init__()
        self._schedules = dict(weights)
        self.student_temp = float(student_temp)

    def weight(self, key: str, extras: Mapping[str, Any], iteration: int) -> float:
        if key in extras:
            return float(extras[key])
        return float(self._schedules[key][iteration])

    def make_view(self, ctx: ViewContext) -> Optional[ViewRequest]:
        return None

    def student_forward(self, student: nn.ModuleDict, step: SSLStep) -> None:
        """Optional work with student modules once the student forward is done (results go to step.views)."""

    @staticmethod
    def zero(step: SSLStep) -> Tensor:
        """A zero loss that carries no graph (the add-on is off this step)."""
        return step.student_dino_global.new_zeros((), dtype=torch.float32)
