"""The training step, shared by the train loop and the benchmark, and the build of everything it needs.

`build_training(cfg, device, distinfo)` -> `Training` (model, optimizer, schedules, ...), in this order:

  build the meta-architecture on the meta device -> `to_empty` on the training device -> `init_weights()` (official
  init, pretrained weights, teacher = student) -> `parallelize_meta_arch` (broadcast rank 0's weights, activation
  checkpointing, per-block compile, FSDP2 `fully_shard` when a process group with > 1 rank exists, or `force_fsdp`,
  and `compute_precision.sharding_strategy` != NO_SHARD) -> AdamW over the (possibly sharded) student parameters.

The weights are initialised on the full model before sharding, so a sharded run starts from exactly the
single-process initialisation (the cost: each rank briefly holds the whole fp32 model, fine up to ViT-g).

`train_step(...)` is one iteration, in the official order:

  schedules -> zero grads -> forward (student + teacher + objectives, under autocast) -> backward
  -> gradient all-reduce (replicated parameters only; FSDP2 reduce-scatters in backward) -> per-submodule clipping
  (global norms, DTensor-aware) -> loss averaged over ranks -> skip when not finite -> AdamW -> EMA -> Gram teacher

The skip is decided on the device where the optimizer can (fused AdamW, no FSDP2 shards: `skips_on_device`), so a
step never waits for the device and the host can launch step k+1 while step k computes; `NonFiniteGuard` reads the
verdicts a step late. Elsewhere the host reads the loss before the optimizer step, as the official code.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Optional, Union

import torch
import torch.distributed as dist
from torch import Tensor, nn

from dinobridge.distributed.parallelize import fsdp_enabled, parallelize_meta_arch, parse_dtype
from dinobridge.errors import UserError
from dinobridge.train.meta_arch import build_meta_arch
from dinobridge.train.optim import apply_schedule, build_optimizer, build_param_groups, clip_grad_norms
from dinobridge.train.schedules import Schedules, ScheduleValues, build_schedules

__all__ = [
    "NonFiniteGuard", "StepResult", "Training", "all_reduce_grads", "build_training", "replicated_params",
    "skips_on_device", "train_step",
]

log = logging.getLogger("dinobridge")


def _dist_world(group: Optional[Any] = None) -> int:
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


def all_reduce_grads(params: list[nn.Parameter], group: Optional[Any] = None) -> None:
    """Average the gradients of `params` over the ranks of `group` in one flat all-reduce (replicated data
    parallelism); a no-op without a process group or with one rank."""
    world = _dist_world(group)
    if world == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=group)
    flat /= world
    offset = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[offset: offset + n].view_as(g))
        offset += n


def replicated_params(module: nn.Module) -> list[nn.Parameter]:
    """Trainable parameters of `module` that are plain tensors (not FSDP2 DTensor shards)."""
    return [p for p in module.parameters() if p.requires_grad and not hasattr(p, "to_local")]


@dataclass
class StepResult:
    """What one step produced. loss: 0-dim fp32 tensor, the weighted loss averaged over ranks; terms: the logged
    loss terms of this rank (0-dim tensors); grad_norms: {submodule: global L2 norm before clipping} (0-dim);
    ok: False when the loss was NaN/Inf and the optimizer step and EMA were skipped: a bool, or a 0-dim bool tensor
    on the device when the skip was decided there (reading `stepped` then waits for the step to finish)."""

    loss: Tensor
    terms: dict[str, Tensor]
    grad_norms: dict[str, Tensor]
    ok: Union[bool, Tensor]

    @property
    def stepped(self) -> bool:
        return bool(self.ok)


def skips_on_device(optimizer: torch.optim.Optimizer) -> bool:
    """True when a non-finite step can be skipped without the host reading the loss: a fused Adam(W) leaves the
    parameters and its state unchanged where its `found_inf` is 1 (the GradScaler mechanism), and no parameter is
    an FSDP2 shard (the host check stays there)."""
    groups = optimizer.param_groups
    return (isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)) and all(g.get("fused") for g in groups)
            and not any(hasattr(p, "to_local") for g in groups for p in g["params"]))


class NonFiniteGuard:
    """Counts consecutive non-finite steps (`train.nan_max_consecutive`) and stops the run with a message.

    A step's verdict is read as late as possible, so that the host keeps launching work while the device computes:
    `push(it, step)` reads the previous step's verdict (that step has finished, or nearly, by the time the next one
    is launched) and keeps this one pending; `settle()` reads the pending one at once and says whether it stepped
    (call it before logging or saving)."""

    def __init__(self, max_consecutive: int, write: Callable[[str], None], checkpoint_dir: Any) -> None:
        self.max_consecutive, self.write, self.checkpoint_dir = int(max_consecutive), write, checkpoint_dir
        self.consecutive = 0
        self._pending: Optional[tuple[int, StepResult]] = None

    def push(self, it: int, step: StepResult) -> None:
        self.settle()
        self._pending = (it, step)

    def settle(self) -> bool:
        if self._pending is None:
            return True
        it, step = self._pending
        self._pending = None
        if step.stepped:
            self.consecutive = 0
            return True
        self.consecutive += 1
        self.write(f"iteration {it}: non-finite loss ({step.loss.item()}), step skipped "
                   f"({self.consecutive}/{self.max_consecutive} consecutive)")
        if self.consecutive >= self.max_consecutive:
            raise UserError(
                f"loss was NaN/Inf for {self.consecutive} consecutive iterations (last: {it}); the last good "
                f"checkpoint in {self.checkpoint_dir} is intact. Lower optim.lr or check the data.")
        return False


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: dict[str, Any],
    sched: ScheduleValues,
    it: int,
    *,
    epoch: float = 0.0,
    extras: Optional[dict[str, Any]] = None,
    autocast: Optional[ContextManager] = None,
    clip_grad: Optional[float] = None,
    monitors: bool = False,
    params: Optional[list[nn.Parameter]] = None,
    group: Optional[Any] = None,
    cudagraphs: bool = False,
    device_skip: Optional[bool] = None,
) -> StepResult:
    """One training iteration of `model` (an `SSLMetaArch`, possibly FSDP2-sharded) on this rank's `batch`.

    sched: the schedule values of iteration `it`; epoch: it / epoch length; extras: loss weights of `it`
    (`Schedules.extras`); autocast: the device's autocast context (None: fp32); clip_grad: `optim.clip_grad`
    (0/None: no clipping, no norms); monitors: also compute the target statistics (logging steps); params: the
    trainable student parameters that are replicated, whose gradients are all-reduced here (default:
    `replicated_params(model.student)`: all of them without FSDP, none when fully sharded); group: the
    data-parallel group (default: the default group); cudagraphs: the blocks run as CUDA graphs (`train.cudagraphs`);
    device_skip: skip a non-finite step on the device (default: `skips_on_device(optimizer)`).
    Collective on every rank of a distributed run.
    """
    apply_schedule(optimizer, sched.lr, sched.wd, sched.last_layer_lr)
    optimizer.zero_grad(set_to_none=True)
    if cudagraphs:
        torch.compiler.cudagraph_mark_step_begin()  # a new step: CUDA-graph outputs of the last one may be reused
    with autocast if autocast is not None else contextlib.nullcontext():
        loss, terms = model(batch, teacher_temp=sched.teacher_temp, iteration=it, epoch=epoch, extras=extras or {},
                            monitors=monitors)
    loss.backward()
    if params is None:
        params = replicated_params(model.student)
    all_reduce_grads(params, group)  # FSDP2 reduced the sharded ones in backward
    norms = clip_grad_norms(model.student, clip_grad)

    mean_loss = loss.detach().float().clone()
    world = _dist_world(group)
    if world > 1:
        dist.all_reduce(mean_loss, group=group)
        mean_loss /= world
    # every rank sees the same reduced value, so all skip together
    if skips_on_device(optimizer) if device_skip is None else device_skip:
        finite = torch.isfinite(mean_loss)
        optimizer.found_inf = (~finite).float()  # type: ignore[attr-defined]  # read by fused Adam(W)
        optimizer.step()
        model.update_teacher(sched.momentum, apply=finite)
        model.maybe_update_gram_teacher(it)
        return StepResult(mean_loss, terms, norms, ok=finite)
    if getattr(optimizer, "found_inf", None) is not None:
        optimizer.found_inf = None  # type: ignore[attr-defined]  # left by a device-skipped step: not this one's
    if not bool(torch.isfinite(mean_loss)):
        optimizer.zero_grad(set_to_none=True)
        return StepResult(mean_loss, terms, norms, ok=False)
    optimizer.step()
    model.update_teacher(sched.momentum)
    model.maybe_update_gram_teacher(it)
    return StepResult(mean_loss, terms, norms, ok=True)


@dataclass
class Training:
    """Everything `train_step` needs for a run; `step(batch, it)` runs iteration `it` with the run's settings.

    epoch_len: train.OFFICIAL_EPOCH_LENGTH; total_iter: optim.epochs x epoch_len (the schedules' span);
    global_batch: batch_size_per_gpu x world size; fsdp: the model is FSDP2-sharded; replicated: the trainable
    parameters that are not sharded (all of them without FSDP), whose gradients the step all-reduces; device_skip:
    a non-finite step is skipped on the device (`skips_on_device`)."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    schedules: Schedules
    epoch_len: int
    total_iter: int
    global_batch: int
    fsdp: bool
    autocast: ContextManager
    clip_grad: Optional[float]
    replicated: list[nn.Parameter] = field(default_factory=list)
    cudagraphs: bool = False
    device_skip: bool = False

    def step(self, batch: dict[str, Any], it: int, monitors: bool = False) -> StepResult:
        return train_step(
            self.model, self.optimizer, batch, self.schedules.at(it), it, epoch=it / self.epoch_len,
            extras=self.schedules.extras(it), autocast=self.autocast, clip_grad=self.clip_grad, monitors=monitors,
            params=self.replicated, cudagraphs=self.cudagraphs, device_skip=self.device_skip,
        )


def build_training(cfg: Any, device: Any, distinfo: Any, *, force_fsdp: bool = False) -> Training:
    """The model ready to train, its optimizer and schedules (see the module docstring for the order).

    cfg: the full config; device: `select_device(...)`; distinfo: `init_distributed(...)` (rank, world size).
    force_fsdp: shard even on one rank (needs a process group: `init_distributed(device, always_group=True)`).
    Seed the global RNGs before calling (the init draws from them); rank 0's initialisation is broadcast.
    """
    world = int(distinfo.world_size)
    epoch_len = int(cfg.train.OFFICIAL_EPOCH_LENGTH)
    total_iter = int(cfg.optim.epochs) * epoch_len
    global_batch = int(cfg.train.batch_size_per_gpu) * world

    with torch.device("meta"):
        model = build_meta_arch(cfg)
    model.to_empty(device=device.device)
    model.init_weights()
    parallelize_meta_arch(model, cfg, device, world, force_fsdp=force_fsdp)
    model.student.train()
    model.teacher.eval()
    optimizer = build_optimizer(build_param_groups(model.student, cfg), cfg, device.type)
    schedules = build_schedules(cfg, epoch_len, total_iter, global_batch)
    clip = cfg.optim.get("clip_grad")
    # compute_precision.param_dtype=fp32 trains in fp32; otherwise the device's mixed-precision dtype (bf16 where
    # supported; the CPU stays fp32 unless MODEL.DEVICE asks for bf16)
    mixed = parse_dtype(cfg.compute_precision.param_dtype, "compute_precision.param_dtype") != torch.float32
    return Training(
        model=model, optimizer=optimizer, schedules=schedules, epoch_len=epoch_len, total_iter=total_iter,
        global_batch=global_batch, fsdp=fsdp_enabled(model), autocast=device.autocast(enabled=mixed),
        clip_grad=None if clip is None else float(clip),
        replicated=replicated_params(model.student),
        cudagraphs=bool(cfg.train.get("cudagraphs", False)) and bool(cfg.train.get("compile", False))
        and device.type == "cuda",
        device_skip=skips_on_device(optimizer),
    )
