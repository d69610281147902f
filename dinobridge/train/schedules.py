"""Per-iteration schedules: learning rate, weight decay, EMA momentum, teacher temperature, loss weights.

Two systems, as in DINOv3 (see reference §1.9):

* v1 (no `schedules:` block): `cosine_schedule` = official `CosineScheduler`, driven by `optim.*` and `teacher.*`;
  the lr scaling rule multiplies `optim.lr` only (not `optim.min_lr`).
* v2 (`schedules:` block present and not null): `linear_warmup_cosine_decay` for `schedules.{lr, weight_decay,
  momentum, teacher_temp}`; the scaling rule multiplies `schedules.lr.peak` and `schedules.lr.end` (not `start`).

`build_schedules` applies the scaling rule itself and never modifies the config, so callers must NOT scale
`optim.lr` beforehand. Every schedule is a float64 numpy array of length `total_iters` wrapped in `ArraySchedule`,
whose lookup `s[it]` is O(1) and returns a Python float; indices past the end return the schedule's tail value
(v1: `final`, like the official scheduler; v2: `end`, where the official code would raise IndexError).
Memory: 8 bytes per iteration per schedule (8 MB for 1M iterations); constant loss weights store nothing.

Loss weights (`Schedules.weights`, `Schedules.extras(it)`): DINO local-crop weight, Gram weight and the add-on
weights of `resize_shuffle_augmentor`, which use the zero-epoch format of `weight_schedule`.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field, replace
from typing import Any, Mapping, Optional

import numpy as np

from dinobridge.errors import ConfigError

__all__ = [
    "ArraySchedule",
    "ScheduleValues",
    "Schedules",
    "build_schedules",
    "build_loss_weight_schedules",
    "build_weight_schedule",
    "cosine_schedule",
    "epochs_to_iters",
    "linear_warmup_cosine_decay",
    "scale_lr",
    "weight_schedule",
]

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------- containers
log = logging.getLogger("dinobridge")

@dataclass(frozen=True)
class ArraySchedule:
    """A schedule stored as `values` [total_iters] (float64); `s[it]` returns `tail` for `it >= len(values)`."""

    values: np.ndarray
    tail: float

    def __getitem__(self, it: int) -> float:
        if it < 0:
            raise IndexError(f"schedule index must be >= 0, got {it}")
        if it >= len(self.values):
            return float(self.tail)
        return float(self.values[it])

    def __len__(self) -> int:
        return len(self.values)

    @classmethod
    def constant(cls, value: float) -> "ArraySchedule":
        """A schedule that is `value` at every iteration (stores nothing)."""
        return cls(np.zeros(0, dtype=np.float64), float(value))

    def max(self) -> float:
        """Largest value ever taken (useful to skip work for add-on losses whose weight is always 0)."""
        return float(max(self.tail, self.values.max())) if len(self.values) else float(self.tail)


@dataclass(frozen=True)
class ScheduleValues:
    """The five scheduled scalars of one iteration (Python floats); `v.lr` and `v["lr"]` both work."""

    lr: float
    wd: float
    momentum: float
    teacher_temp: float
    last_layer_lr: float

    def __getitem__(self, key: str) -> float:
        if key not in self.__dataclass_fields__:
            raise KeyError(f"ScheduleValues: unknown key {key!r}; expected one of {list(self.__dataclass_fields__)}")
        return getattr(self, key)

    def as_dict(self) -> dict[str, float]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass(frozen=True)
class Schedules:
    """Optimisation schedules of a run; `at(it)` gives all values of iteration `it`."""

    lr: ArraySchedule
    wd: ArraySchedule
    momentum: ArraySchedule
    teacher_temp: ArraySchedule
    last_layer_lr: ArraySchedule
    total_iters: int
    epoch_length: int
    version: int  # 1 (optim.* / teacher.*) or 2 (schedules.*)
    weights: dict[str, ArraySchedule] = field(default_factory=dict)  # loss-weight schedules, see `build_schedules`

    def at(self, it: int) -> ScheduleValues:
        return ScheduleValues(
            self.lr[it], self.wd[it], self.momentum[it], self.teacher_temp[it], self.last_layer_lr[it]
        )

    def extras(self, it: int) -> dict[str, float]:
        """Loss weights of iteration `it`, {name: value} for every entry of `weights`."""
        return {name: sched[it] for name, sched in self.weights.items()}


# ---------------------------------------------------------------------------------------------- primitives
def cosine_schedule(
    base: float,
    final: float,
    total_iters: int,
    warmup_iters: int = 0,
    start_warmup: float = 0.0,
    trunc_extra: float = 0.0,
) -> ArraySchedule:
    """Official v1 `CosineScheduler`.

    values[:warmup] = linspace(start_warmup, base, warmup) (endpoint included, so values[warmup-1] == base);
    then with n = total - warmup and i = 0..n-1: final + ½(base - final)(1 + cos(π i / n)).
    With `trunc_extra` = e > 0 the cosine is computed over int((1+e)·n) points of [0, π], truncated to the first n
    and rescaled so that it goes from exactly `base` to exactly `final`. Index >= total_iters -> `final`.
    """
    total_iters, warmup_iters = int(total_iters), int(warmup_iters)
    if warmup_iters < 0 or total_iters < warmup_iters:
        raise ValueError(f"cosine_schedule: need 0 <= warmup_iters <= total_iters, got {warmup_iters}, {total_iters}")
    warmup = np.linspace(start_warmup, base, warmup_iters, dtype=np.float64)
    n = total_iters - warmup_iters
    trunc_extra = float(trunc_extra or 0.0)
    if n == 0:
        cosine = np.zeros(0, dtype=np.float64)
    elif trunc_extra == 0.0:
        i = np.arange(n, dtype=np.float64)
        cosine = final + 0.5 * (base - final) * (1.0 + np.cos(np.pi * i / n))
    else:
        if trunc_extra < 0:
            raise ValueError(f"cosine_schedule: trunc_extra must be >= 0, got {trunc_extra}")
        if n == 1:
            cosine = np.array([base], dtype=np.float64)
        else:
            s = (np.cos(np.linspace(0.0, np.pi, int((1.0 + trunc_extra) * n))[:n]) + 1.0) / 2.0
            s = (s - s[-1]) / (1.0 - s[-1])
            cosine = s * (base - final) + final
    return ArraySchedule(np.concatenate([warmup, cosine]).astype(np.float64), float(final))


def linear_warmup_cosine_decay(
    start: float,
    peak: float,
    end: float,
    warmup_iters: int,
    total_iters: int,
    cosine_iters: Optional[int] = None,
) -> ArraySchedule:
    """Official v2 schedule.

    linspace(start, peak, warmup, endpoint=False) ++ (peak - end)·½(1 + cos(linspace(0, π, n_cos))) + end
    ++ `end` repeated for the remaining iterations, with n_cos = cosine_iters (default total - warmup).
    So values[warmup] == peak and values[warmup + n_cos - 1] == end. Index >= total_iters -> `end`.
    """
    total_iters, warmup_iters = int(total_iters), int(warmup_iters)
    n_cos = total_iters - warmup_iters if cosine_iters is None else int(cosine_iters)
    if warmup_iters < 0 or n_cos < 0 or warmup_iters + n_cos > total_iters:
        raise ValueError(
            "linear_warmup_cosine_decay: need warmup_iters + cosine_iters <= total_iters (all >= 0), "
            f"got {warmup_iters} + {n_cos} > {total_iters}"
        )
    linear = np.linspace(start, peak, warmup_iters, endpoint=False, dtype=np.float64)
    cosine = (np.cos(np.linspace(0.0, np.pi, n_cos, dtype=np.float64)) + 1.0) / 2.0
    cosine = (peak - end) * cosine + end
    constant = np.full(total_iters - warmup_iters - n_cos, float(end), dtype=np.float64)
    return ArraySchedule(np.concatenate([linear, cosine, constant]).astype(np.float64), float(end))


def weight_schedule(
    start: float,
    peak: float,
    end: float,
    total_iters: int,
    zero_iters: int = 0,
    warmup_iters: int = 0,
    cosine_iters: Optional[int] = None,
) -> ArraySchedule:
    """Loss-weight schedule with a leading all-zero phase (format `{start, peak, end, zero_epochs, warmup_epochs,
    cosine_epochs}` of the add-on losses).

    Exactly: values[:zero] = 0; then `linear_warmup_cosine_decay(start, peak, end, warmup, total - zero, cosine)`
    shifted by `zero`, i.e. linear start -> peak over `warmup` iterations (endpoint excluded, so values[zero] = start
    and values[zero + warmup] = peak), then cosine peak -> end over `cosine` iterations (default: all remaining
    iterations; constant when peak == end), then constant `end`. With zero = 0 this is the v2 schedule.
    User config (resize_paste_loss_weight, 1000 ep): 0 for epochs [0, 50), linear 0 -> 0.5 over epochs [50, 100),
    then 0.5 to the end.
    """
    total_iters, zero_iters = int(total_iters), int(zero_iters)
    if zero_iters < 0 or zero_iters > total_iters:
        raise ValueError(f"weight_schedule: need 0 <= zero_iters <= total_iters, got {zero_iters}, {total_iters}")
    rest = linear_warmup_cosine_decay(start, peak, end, warmup_iters, total_iters - zero_iters, cosine_iters)
    values = np.concatenate([np.zeros(zero_iters, dtype=np.float64), rest.values])
    return ArraySchedule(values, float(end))


def scale_lr(lr: float, rule: Optional[str], global_batch: int) -> float:
    """`sqrt_wrt_1024`: lr·4·sqrt(B/1024); `linear_wrt_256`: lr·B/256; None / anything else: unchanged."""
    if rule == "sqrt_wrt_1024":
        return lr * 4.0 * math.sqrt(global_batch / 1024.0)
    if rule == "linear_wrt_256":
        return lr * global_batch / 256.0
    if rule not in (None, "", "none", "None"):
        logger.warning("optim.scaling_rule=%r is not a known rule; the learning rate is not scaled", rule)
    return lr


def epochs_to_iters(epochs: float, epoch_length: int) -> int:
    """Round `epochs · epoch_length` to an iteration count (fractional epochs allowed)."""
    return int(round(float(epochs) * epoch_length))


# ---------------------------------------------------------------------------------------------- config access
def _get(node: Any, key: str, default: Any = None) -> Any:
    """Read `key` from a DictConfig / mapping / dataclass; missing or None -> `default`."""
    if node is None:
        return default
    if hasattr(node, "get") and callable(node.get):
        value = node.get(key, default)
    else:
        value = getattr(node, key, default)
    return default if value is None else value


def _require(node: Any, key: str, path: str) -> Any:
    value = _get(node, key)
    if value is None:
        raise ConfigError(f"{path}.{key}: a value is required for this schedule, got null/missing")
    return value


def _as_float(node: Any, key: str, path: str) -> float:
    value = _require(node, key, path)
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{path}.{key}: expected a number, got {value!r}") from None


def _epochs(node: Any, key: str, path: str, epoch_length: int, default: Optional[float] = None) -> Optional[int]:
    value = _get(node, key, default)
    if value is None:
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{path}.{key}: expected a number of epochs, got {value!r}") from None
    if value < 0:
        raise ConfigError(f"{path}.{key}: expected a number of epochs >= 0, got {value}")
    return epochs_to_iters(value, epoch_length)


# ---------------------------------------------------------------------------------------------- builders
def build_weight_schedule(spec: Any, epoch_length: int, total_iters: int, name: str) -> ArraySchedule:
    """Loss weight from config: a number (constant) or a mapping `{start, peak, end, zero_epochs?, warmup_epochs?,
    cosine_epochs?}` (see `weight_schedule`; `start` defaults to 0, `peak` to `end`). `name` is the config path
    used in error messages (e.g. "resize_shuffle_augmentor.resize_paste_loss_weight")."""
    if spec is None:
        raise ConfigError(
            f"{name}: expected a number or a {{start, peak, end, zero_epochs, warmup_epochs}} mapping, got null"
        )
    if isinstance(spec, bool):
        raise ConfigError(f"{name}: expected a number or a schedule mapping, got {spec!r}")
    if isinstance(spec, (int, float)):
        return ArraySchedule.constant(float(spec))
    if not (isinstance(spec, Mapping) or hasattr(spec, "get") or hasattr(spec, "__dataclass_fields__")):
        raise ConfigError(f"{name}: expected a number or a schedule mapping, got {type(spec).__name__}")
    end = _as_float(spec, "end", name)
    peak = float(_get(spec, "peak", end))
    start = float(_get(spec, "start", 0.0))
    zero = _epochs(spec, "zero_epochs", name, epoch_length, 0)
    warmup = _epochs(spec, "warmup_epochs", name, epoch_length, 0)
    cosine = _epochs(spec, "cosine_epochs", name, epoch_length)
    if zero + warmup + (cosine or 0) > total_iters:
        raise ConfigError(
            f"{name}: zero_epochs + warmup_epochs + cosine_epochs ({zero + warmup + (cosine or 0)} iterations) "
            f"exceed the run length ({total_iters} iterations)"
        )
    if start == peak == end and (zero == 0 or end == 0.0):
        return ArraySchedule.constant(end)  # e.g. an add-on that is off: nothing stored
    return weight_schedule(start, peak, end, total_iters, zero, warmup, cosine)


ADDON_WEIGHT_KEYS = (
    "resize_paste_loss_weight", "patch_shuffle_loss_weight", "bridge_patchshuffle_weight", "bridge_global_weight"
)


def build_loss_weight_schedules(cfg: Any, epoch_length: int, total_iters: int) -> dict[str, ArraySchedule]:
    """Loss-weight schedules read from the full config (these names are the keys of `Schedules.extras`):

    * "dino_local_weight": `dino.local_loss_weight_schedule`, only if `dino.reweight_dino_local_loss`;
    * "gram_weight": `gram.loss_weight_schedule`, only if it is not null (else the loss uses `gram.loss_weight`);
    * "resize_paste_loss_weight", "patch_shuffle_loss_weight", "bridge_patchshuffle_weight",
      "bridge_global_weight": `resize_shuffle_augmentor.<key>` (number or zero-epoch schedule), when present.
    All are v2 schedules over `total_iters` (with the leading zero phase for the add-ons).
    """
    weights: dict[str, ArraySchedule] = {}
    dino = _get(cfg, "dino")
    if bool(_get(dino, "reweight_dino_local_loss", False)):
        spec = _get(dino, "local_loss_weight_schedule")
        weights["dino_local_weight"] = build_weight_schedule(
            spec, epoch_length, total_iters, "dino.local_loss_weight_schedule"
        )
    gram_spec = _get(_get(cfg, "gram"), "loss_weight_schedule")
    if gram_spec is not None:
        weights["gram_weight"] = build_weight_schedule(
            gram_spec, epoch_length, total_iters, "gram.loss_weight_schedule"
        )
    addons = _get(cfg, "resize_shuffle_augmentor")
    for key in ADDON_WEIGHT_KEYS:
        spec = _get(addons, key)
        if spec is not None:
            weights[key] = build_weight_schedule(spec, epoch_length, total_iters, f"resize_shuffle_augmentor.{key}")
    return weights


def _freeze(lr: ArraySchedule, freeze_iters: int) -> ArraySchedule:
    values = lr.values.copy()
    values[:freeze_iters] = 0.0
    tail = 0.0 if freeze_iters > len(values) else lr.tail
    return ArraySchedule(values, tail)


def _build_v1(cfg: Any, epoch_length: int, total_iters: int, global_batch: int) -> Schedules:
    optim, teacher = _get(cfg, "optim"), _get(cfg, "teacher")
    trunc = float(_get(optim, "schedule_trunc_extra", 0.0))
    warmup = _epochs(optim, "warmup_epochs", "optim", epoch_length, 0)
    if warmup > total_iters:  # a short debug run (train.max_iter): warm up over the whole run
        log.warning("optim.warmup_epochs: warm-up (%d iterations) is longer than the run (%d); using %d",
                    warmup, total_iters, total_iters)
        warmup = total_iters
    base_lr = scale_lr(_as_float(optim, "lr", "optim"), _get(optim, "scaling_rule"), global_batch)
    lr = cosine_schedule(base_lr, _as_float(optim, "min_lr", "optim"), total_iters, warmup, 0.0, trunc)
    wd = cosine_schedule(
        _as_float(optim, "weight_decay", "optim"), _as_float(optim, "weight_decay_end", "optim"),
        total_iters, 0, 0.0, trunc,
    )
    momentum = cosine_schedule(
        _as_float(teacher, "momentum_teacher", "teacher"), _as_float(teacher, "final_momentum_teacher", "teacher"),
        total_iters, 0, 0.0, trunc,
    )
    # Official: a CosineScheduler whose total == warmup, so linear warm-up then constant `teacher_temp` (tail).
    temp_iters = _epochs(teacher, "warmup_teacher_temp_epochs", "teacher", epoch_length, 0)
    teacher_temp = cosine_schedule(
        _as_float(teacher, "teacher_temp", "teacher"), _as_float(teacher, "teacher_temp", "teacher"),
        temp_iters, temp_iters, _as_float(teacher, "warmup_teacher_temp", "teacher"),
    )
    freeze = _epochs(optim, "freeze_last_layer_epochs", "optim", epoch_length, 0)
    return Schedules(lr, wd, momentum, teacher_temp, _freeze(lr, freeze), total_iters, epoch_length, 1)


def _v2(node: Any, path: str, epoch_length: int, total_iters: int, scale: Any = None) -> ArraySchedule:
    if node is None:
        raise ConfigError(f"{path}: missing; the schedules block needs lr, weight_decay, momentum and teacher_temp")
    start, peak, end = (_as_float(node, k, path) for k in ("start", "peak", "end"))
    if scale is not None:
        peak, end = scale(peak), scale(end)
    warmup = _epochs(node, "warmup_epochs", path, epoch_length, 0)
    cosine = _epochs(node, "cosine_epochs", path, epoch_length)
    if warmup + (cosine or 0) > total_iters:
        raise ConfigError(
            f"{path}: warmup_epochs + cosine_epochs ({warmup + (cosine or 0)} iterations) exceed the run "
            f"({total_iters} iterations)"
        )
    return linear_warmup_cosine_decay(start, peak, end, warmup, total_iters, cosine)


def _build_v2(cfg: Any, epoch_length: int, total_iters: int, global_batch: int) -> Schedules:
    sched = _get(cfg, "schedules")
    rule = _get(_get(cfg, "optim"), "scaling_rule")
    lr_node = _get(sched, "lr")
    lr = _v2(lr_node, "schedules.lr", epoch_length, total_iters, lambda v: scale_lr(v, rule, global_batch))
    wd = _v2(_get(sched, "weight_decay"), "schedules.weight_decay", epoch_length, total_iters)
    momentum = _v2(_get(sched, "momentum"), "schedules.momentum", epoch_length, total_iters)
    teacher_temp = _v2(_get(sched, "teacher_temp"), "schedules.teacher_temp", epoch_length, total_iters)
    freeze = _epochs(lr_node, "freeze_last_layer_epochs", "schedules.lr", epoch_length, 0)
    return Schedules(lr, wd, momentum, teacher_temp, _freeze(lr, freeze), total_iters, epoch_length, 2)


def build_schedules(cfg: Any, epoch_length: int, total_iters: int, global_batch: int) -> Schedules:
    """All optimisation schedules of a run from the full config (keys `optim`, `teacher`, `schedules`).

    v2 when `cfg.schedules` is present and not null, else v1. `epoch_length` = train.OFFICIAL_EPOCH_LENGTH,
    `total_iters` = optim.epochs · epoch_length normally, `global_batch` = batch_size_per_gpu · world_size (for the
    lr scaling rule, applied here and only here). `last_layer_lr` = lr with the first freeze_last_layer_epochs
    (v1: optim.*, v2: schedules.lr.*) zeroed. `weights` / `extras(it)`: see `build_loss_weight_schedules`.
    """
    if epoch_length <= 0 or total_iters < 0:
        raise ConfigError(
            f"train.OFFICIAL_EPOCH_LENGTH / optim.epochs: expected epoch_length > 0 and total_iters >= 0, "
            f"got {epoch_length}, {total_iters}"
        )
    if global_batch <= 0:
        raise ConfigError(f"train.batch_size_per_gpu: expected a global batch > 0, got {global_batch}")
    epoch_length, total_iters, global_batch = int(epoch_length), int(total_iters), int(global_batch)
    if _get(cfg, "schedules") is not None:
        schedules = _build_v2(cfg, epoch_length, total_iters, global_batch)
    else:
        schedules = _build_v1(cfg, epoch_length, total_iters, global_batch)
    return replace(schedules, weights=build_loss_weight_schedules(cfg, epoch_length, total_iters))
