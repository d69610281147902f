"""Schedule blocks of the configuration (official v2 `schedules.*`, loss-weight schedules of the add-ons).

All `*_epochs` values are in "epochs" of `train.OFFICIAL_EPOCH_LENGTH` iterations and may be fractional (the official
code uses whole numbers; fractions are useful for short CPU runs). Wherever a schedule is expected, a plain number in
YAML or on the command line means a constant schedule (start = peak = end = the number, no warm-up).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from omegaconf import MISSING


@dataclass
class ScheduleConfig:
    """Official `linear_warmup_cosine_decay`: linear `start -> peak` over `warmup_epochs` (endpoint excluded), cosine
    `peak -> end` over `cosine_epochs` (None = the rest of training), then constant `end`.

    Used by `schedules.{weight_decay,teacher_temp,momentum}`, `dino.local_loss_weight_schedule` and
    `gram.loss_weight_schedule`. Inside `schedules`, start/peak/end are required (no defaults).
    """

    start: float = MISSING
    peak: float = MISSING
    end: float = MISSING
    warmup_epochs: float = 0.0
    cosine_epochs: Optional[float] = None


@dataclass
class LrScheduleConfig(ScheduleConfig):
    """`schedules.lr`: like ScheduleConfig; `peak` and `end` (not `start`) are scaled by `optim.scaling_rule` at build
    time. `freeze_last_layer_epochs` zeroes the lr of the heads' last (prototype) layer for that many epochs."""

    freeze_last_layer_epochs: float = 0.0


@dataclass
class SchedulesConfig:
    """Top-level `schedules:` block. Present (not null) = official v2 schedules, and then `optim.lr/min_lr/
    warmup_epochs/weight_decay/weight_decay_end/freeze_last_layer_epochs` and `teacher.*` are ignored (may be null).
    Absent/null = v1 schedules built from those `optim.*` / `teacher.*` keys."""

    lr: LrScheduleConfig = field(default_factory=LrScheduleConfig)
    weight_decay: ScheduleConfig = field(default_factory=ScheduleConfig)
    teacher_temp: ScheduleConfig = field(default_factory=ScheduleConfig)
    momentum: ScheduleConfig = field(default_factory=ScheduleConfig)


@dataclass
class WeightScheduleConfig:
    """Loss-weight schedule of an add-on (public dino_bridge format): 0 for `zero_epochs`, then linear `start -> peak`
    over `warmup_epochs`, then cosine `peak -> end` over `cosine_epochs` (None = the rest of training), then `end`.

    The default is a weight that is always 0, i.e. the add-on is off and costs nothing. A plain number is a constant
    weight. The add-on is built only if the schedule is ever > 0.
    """

    start: float = 0.0
    peak: float = 0.0
    end: float = 0.0
    zero_epochs: float = 0.0
    warmup_epochs: float = 0.0
    cosine_epochs: Optional[float] = None


SCHEDULE_TYPES = (ScheduleConfig, WeightScheduleConfig)


def constant_schedule(value: float) -> dict:
    """The mapping that makes any schedule constant at `value` (what a plain number in a config means)."""
    return {"start": value, "peak": value, "end": value, "warmup_epochs": 0.0}
