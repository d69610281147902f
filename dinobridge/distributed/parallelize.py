"""Activation checkpointing, torch.compile and FSDP2 sharding of the meta-architecture (reference §6.1, §1.10).

`parallelize_meta_arch(model, cfg, device, world_size)` applies, in the official order:

1. Activation checkpointing (`train.checkpointing`) on every **student** backbone block: selective by default (the
   outputs of matmuls and SDPA are saved, everything else is recomputed in backward), full recompute with
   `train.checkpointing_full`. The block's `forward` is replaced in place, so parameter names, state-dict keys and
   the teacher/student name pairing of the EMA are unchanged (no `_checkpoint_wrapped_module.` prefix).
2. `torch.compile` per backbone block (`train.compile`, only where `device.compile_default`), student, teacher and
   Gram teacher, in place (`module.compile()`, names unchanged); with `train.compile_scope=stack` (the default
   where CUDA graphs apply) the whole block stack is one graph instead. Heads are not compiled: the iBOT head sees a
   different number of masked patches every step (one recompilation per count).
3. FSDP2 `fully_shard` over a 1-D "dp" mesh of the default group: every transformer block, then the backbone root,
   then each head (and any other student/teacher submodule with parameters), for the student, the teacher and the
   Gram teacher, with
   `MixedPrecisionPolicy(param_dtype, reduce_dtype)` from `compute_precision.*` and explicit prefetch
   (forward: block i -> i+1, backward: block i -> i-1). FSDP averages the gradients over ranks (reduce-scatter),
   so the train step all-reduces only the gradients of parameters left replicated (plain tensors, not DTensors).

`compute_precision.sharding_strategy` -> student `reshard_after_forward`:
  FULL_SHARD    True: parameters are freed after each block's forward and gathered again in backward (ZeRO-3).
  SHARD_GRAD_OP False: parameters stay gathered from forward to backward (ZeRO-2, more memory, fewer all-gathers).
                (The official code asserts SHARD_GRAD_OP but actually runs with True; set FULL_SHARD for that.)
  NO_SHARD      nothing is sharded: the model stays replicated and the loop keeps its manual gradient all-reduce.
The teacher and the Gram teacher only run forward, so they always reshard after forward, roots included (the
official code does the same with a hack on `post_forward_mesh_info`).

Before sharding, the full parameters and buffers are broadcast from rank 0, so every rank starts from the same model
even when ranks were seeded differently (also done for NO_SHARD, where replicas must agree).
"""

from __future__ import annotations

import contextlib
import functools
import logging
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from torch import nn

from dinobridge.config.schema import CHECKPOINTING_POLICIES, COMPILE_SCOPES
from dinobridge.distributed.comm import broadcast_module
from dinobridge.distributed.device import DeviceInfo
from dinobridge.errors import ConfigError

__all__ = [
    "STRATEGIES",
    "apply_activation_checkpointing",
    "compile_blocks",
    "compile_scope",
    "compile_stack",
    "eager_blocks",
    "fsdp_enabled",
    "parallelize_meta_arch",
    "parse_dtype",
    "selective_checkpoint_policy",
]

log = logging.getLogger("dinobridge")

_DTYPES = {
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
}
STRATEGIES = {"FULL_SHARD": True, "SHARD_GRAD_OP": False, "NO_SHARD": None}
_AC_ATTR = "_dinobridge_activation_checkpointing"


def parse_dtype(name: Any, key: str) -> torch.dtype:
    """'bf16' | 'fp16' | 'fp32' (or the torch names) -> torch dtype; `key` names the config key in errors."""
    if isinstance(name, torch.dtype):
        return name
    dtype = _DTYPES.get(str(name).lower())
    if dtype is None:
        raise ConfigError(f"{key}: expected one of bf16, fp16, fp32, got {name!r}")
    return dtype


# ---------------------------------------------------------------------------------------------- 1. checkpointing
def _save_ops(policy: str = "official") -> set:
    """ATen ops whose outputs the selective policy saves.

    "official" (DINOv3's list): `mm`, `_scaled_mm`, the SDPA kernels and the FSDP reduce-scatter. A biased Linear
    runs as `addmm`, so with the ViT's biased qkv / MLP layers mostly the attention outputs are kept.
    "matmuls": also `addmm` and `bmm`: every matmul output is kept (faster backward, ~3x the activation memory).
    """
    if policy not in CHECKPOINTING_POLICIES:
        raise ConfigError(f"train.checkpointing_policy: expected one of {', '.join(CHECKPOINTING_POLICIES)}, "
                          f"got {policy!r}")
    aten = torch.ops.aten
    names = [
        "mm", "_scaled_mm",
        "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu",
    ]
    if policy == "matmuls":
        names += ["addmm", "bmm"]
    ops = {getattr(aten, n).default for n in names if hasattr(aten, n)}
    c10d = getattr(torch.ops, "_c10d_functional", None)
    if c10d is not None and hasattr(c10d, "reduce_scatter_tensor"):
        ops.add(c10d.reduce_scatter_tensor.default)
    return ops


def selective_checkpoint_policy(policy: str = "official") -> Callable[..., Any]:
    """Policy for `create_selective_checkpoint_contexts`: save the outputs of `_save_ops(policy)`, recompute the
    rest."""
    from torch.utils.checkpoint import CheckpointPolicy

    save = _save_ops(policy)

    def policy_fn(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
        return CheckpointPolicy.MUST_SAVE if op in save else CheckpointPolicy.PREFER_RECOMPUTE

    return policy_fn


def _checkpointed(forward: Callable[..., Any], selective: bool, policy: str) -> Callable[..., Any]:
    from torch.utils.checkpoint import checkpoint, create_selective_checkpoint_contexts

    extra: dict[str, Any] = {}
    if selective:
        extra["context_fn"] = functools.partial(create_selective_checkpoint_contexts, selective_checkpoint_policy(policy))

    @functools.wraps(forward)
    def run(*args: Any, **kwargs: Any) -> Any:
        return checkpoint(forward, *args, use_reentrant=False, preserve_rng_state=True, **extra, **kwargs)

    return run


def apply_activation_checkpointing(blocks: nn.ModuleList, full: bool = False, policy: str = "official") -> None:
    """Make every block recompute its activations in backward (in place; parameter names unchanged).

    full=False: selective, saving the outputs of the ops of `policy` (see `_save_ops`); full=True: only the block
    input is kept.
    """
    _save_ops(policy)  # a bad policy name fails before any block is changed
    for i, blk in enumerate(blocks):
        if getattr(blk, _AC_ATTR, None):
            raise ValueError(f"apply_activation_checkpointing: block {i} is already checkpointed")
        blk.forward = _checkpointed(blk.forward, selective=not full, policy=policy)
        setattr(blk, _AC_ATTR, "full" if full else f"selective:{policy}")


# ---------------------------------------------------------------------------------------------- 2. compile
def _dynamo_static_shapes() -> None:
    """As the official code, shapes are static: every crop-size / batch combination compiles once
    (`automatic_dynamic_shapes=False`; cache limits raised so that the few combinations of a run all fit)."""
    import torch._dynamo

    torch._dynamo.config.automatic_dynamic_shapes = False
    torch._dynamo.config.accumulated_cache_size_limit = max(torch._dynamo.config.accumulated_cache_size_limit, 1024)
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 32)


def _compile_kwargs(cudagraphs: bool) -> dict[str, Any]:
    """cudagraphs: as the official `train.cudagraphs`, `fullgraph=True, dynamic=False` with inductor CUDA graphs
    (inductor itself leaves out the parts it cannot capture); the step must call
    `torch.compiler.cudagraph_mark_step_begin()` (`train_step` does)."""
    return {"fullgraph": True, "dynamic": False, "options": {"triton.cudagraphs": True}} if cudagraphs else {}


def compile_blocks(backbone: nn.Module, cudagraphs: bool = False) -> None:
    """`torch.compile` each transformer block in place (names and state-dict keys unchanged; static shapes; see
    `_compile_kwargs` for `cudagraphs`)."""
    _dynamo_static_shapes()
    for blk in backbone.blocks:
        blk.compile(**_compile_kwargs(cudagraphs))


def compile_stack(backbone: nn.Module, cudagraphs: bool = False) -> None:
    """`torch.compile` the whole block stack (`backbone.run_blocks`) as one graph, in place (state dict unchanged).

    One compiled call (with `cudagraphs`, one graph replay) per forward instead of one per block: the host launches
    ~12x fewer graphs per step, which matters when the device step is short; compilation takes longer."""
    _dynamo_static_shapes()
    backbone.run_blocks = torch.compile(backbone.run_blocks, **_compile_kwargs(cudagraphs))


def compile_scope(scope: str, *, cudagraphs: bool, sharded: bool) -> str:
    """`train.compile_scope` -> "blocks" or "stack": "auto" is "stack" where CUDA graphs apply; FSDP2 shards (and
    hooks) each block, so a sharded model compiles per block whatever the key says (with a log line)."""
    if scope not in COMPILE_SCOPES:
        raise ConfigError(f"train.compile_scope: expected one of {', '.join(COMPILE_SCOPES)}, got {scope!r}")
    if scope == "auto":
        return "stack" if cudagraphs else "blocks"
    if scope == "stack" and sharded:
        log.info("train.compile_scope=stack: compiled per block instead (FSDP2 shards each block)")
        return "blocks"
    return scope


def eager_blocks() -> contextlib.AbstractContextManager[Any]:
    """Context: compiled blocks (or stack) run eagerly inside it (`torch.compiler.set_stance("force_eager")`).

    For the forwards outside the train step (monitors, online kNN / probe / pictures, the final kNN): their batch
    sizes, dtypes and no-grad mode would otherwise compile (and, with `train.cudagraphs`, record) new variants of
    every block, and the guards they add slow the step's cache lookups. No-op where nothing is compiled."""
    set_stance = getattr(torch.compiler, "set_stance", None)  # torch >= 2.6
    return set_stance("force_eager") if set_stance is not None else contextlib.nullcontext()


# ---------------------------------------------------------------------------------------------- 3. FSDP2
def fsdp_enabled(model: nn.Module) -> bool:
    """True when any submodule of `model` is FSDP2-sharded (then FSDP reduces the gradients, not the loop)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch < 2.6
        from torch.distributed._composable.fsdp import FSDPModule
    return any(isinstance(m, FSDPModule) for m in model.modules())


def _fsdp_api() -> tuple[Any, Any, Any]:
    try:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
    except ImportError:  # torch 2.4/2.5
        from torch.distributed._composable.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
    return fully_shard, MixedPrecisionPolicy, register_fsdp_forward_method


def _shard_backbone(
    backbone: nn.Module, shard: Callable[..., Any], reshard: Optional[bool], root_reshard: Optional[bool],
    register: Callable[..., Any],
) -> None:
    blocks = list(backbone.blocks)
    for blk in blocks:
        shard(blk, reshard_after_forward=reshard)
    shard(backbone, reshard_after_forward=root_reshard)
    # the meta-arch calls these methods directly, not forward(): FSDP must gather the root's parameters for them
    for name in ("forward_features", "get_intermediate_layers"):
        if hasattr(backbone, name):
            register(backbone, name)
    for prev, nxt in zip(blocks[:-1], blocks[1:]):
        if hasattr(prev, "set_modules_to_forward_prefetch"):
            prev.set_modules_to_forward_prefetch([nxt])
            nxt.set_modules_to_backward_prefetch([prev])


def parallelize_meta_arch(
    model: nn.Module,
    cfg: Any,
    device: DeviceInfo,
    world_size: int,
    *,
    force_fsdp: bool = False,
    group: Optional[Any] = None,
) -> None:
    """Checkpointing -> compile -> FSDP2 on `model` (an `SSLMetaArch`) in place; call after `init_weights()` and
    before building the optimizer (FSDP replaces the parameters by sharded DTensors).

    cfg: the full config (train.checkpointing, train.checkpointing_full, train.compile, compute_precision.*).
    device: this process's device. world_size: ranks of the data-parallel group.
    force_fsdp: shard even with world_size == 1 (a 1-rank group must exist). group: the data-parallel process group
      (default: the default group).
    FSDP is applied only when a process group exists and (world_size > 1 or force_fsdp) and the strategy is not
    NO_SHARD; otherwise the model stays replicated (check with `fsdp_enabled`).
    """
    train = cfg.train
    prec = cfg.compute_precision
    strategy = str(prec.get("sharding_strategy", "SHARD_GRAD_OP")).upper()
    if strategy not in STRATEGIES:
        raise ConfigError(f"compute_precision.sharding_strategy: expected one of {sorted(STRATEGIES)}, got {strategy!r}")
    param_dtype = parse_dtype(prec.param_dtype, "compute_precision.param_dtype")
    reduce_dtype = parse_dtype(prec.reduce_dtype, "compute_precision.reduce_dtype")
    has_group = dist.is_available() and dist.is_initialized()

    # 1. activation checkpointing (student blocks only: the teacher runs without grad)
    if bool(train.get("checkpointing", False)):
        apply_activation_checkpointing(model.student.backbone.blocks, full=bool(train.get("checkpointing_full", False)),
                                       policy=str(train.get("checkpointing_policy", "official")))

    # 2. compile, per block
    backbones = [model.student.backbone, model.teacher.backbone]
    gram = getattr(model, "gram_teacher", None)
    if gram is not None:
        backbones.append(gram)
    sharded = (world_size > 1 or force_fsdp) and has_group and strategy != "NO_SHARD"
    cudagraphs = bool(train.get("cudagraphs", False))
    if cudagraphs:
        why = ("train.compile is off" if not train.get("compile", False) else
               f"{device.type} is not CUDA" if device.type != "cuda" else
               "FSDP2 hooks cannot be captured" if sharded else
               "activation checkpointing is on" if train.get("checkpointing", False) else "")
        if why:
            log.info("train.cudagraphs=true: CUDA graphs are skipped (%s)", why)
            cudagraphs = False
    if bool(train.get("compile", False)):
        if device.compile_default:
            # A job before this one in the process (a `-m` sweep, a benchmark's variants) must not lend its compiled
            # blocks: dynamo's guards do not cover the checkpointing policy, so a cached graph would keep the old one.
            torch._dynamo.reset()
            scope = compile_scope(str(train.get("compile_scope", "auto")), cudagraphs=cudagraphs, sharded=sharded)
            for bb in backbones:
                (compile_stack if scope == "stack" else compile_blocks)(bb, cudagraphs=cudagraphs)
        else:
            log.info("train.compile=true: torch.compile is skipped on %s", device.type)

    # 3. FSDP2
    want = world_size > 1 or force_fsdp
    if want and not has_group:
        raise ValueError("parallelize_meta_arch: sharding asked for (world_size > 1 or force_fsdp) but no process "
                         "group is initialised")
    if has_group:
        broadcast_module(model, group=group)  # every rank starts from rank 0's model
    if not want:
        return
    if strategy == "NO_SHARD":
        log.info("compute_precision.sharding_strategy=NO_SHARD: model replicated, gradients all-reduced by the loop")
        return
    if not (device.supports_fsdp or device.type == "cpu"):  # FSDP2 over gloo works on CPU (tests run it)
        log.info("FSDP2 is not supported on %s: model replicated, gradients all-reduced by the loop", device.type)
        return

    fully_shard, MixedPrecisionPolicy, register = _fsdp_api()
    if device.autocast_dtype is None and param_dtype != torch.float32:
        log.info("compute_precision.param_dtype=%s ignored: %s trains in fp32", prec.param_dtype, device.type)
        param_dtype = torch.float32
    from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

    if group is None:
        mesh = init_device_mesh(device.type, (dist.get_world_size(),), mesh_dim_names=("dp",))
    else:
        mesh = DeviceMesh.from_group(group, device.type, mesh_dim_names=("dp",))
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    shard = functools.partial(fully_shard, mesh=mesh, mp_policy=mp)

    # student: blocks reshard per the strategy; roots keep FSDP's default (gathered until their backward). Heads and
    # any other submodule with parameters (e.g. the add-on bridge) are one FSDP unit each, so no student parameter
    # stays replicated with an unreduced gradient.
    student_reshard = STRATEGIES[strategy]
    _shard_backbone(model.student.backbone, shard, student_reshard, None if student_reshard else False, register)
    for name, sub in model.student.items():
        if name != "backbone" and any(True for _ in sub.parameters()):
            shard(sub, reshard_after_forward=None if student_reshard else False)
    # teacher and Gram teacher: forward only -> always free the gathered parameters after forward, roots too
    _shard_backbone(model.teacher.backbone, shard, True, True, register)
    for name, sub in model.teacher.items():
        if name != "backbone" and any(True for _ in sub.parameters()):
            shard(sub, reshard_after_forward=True)
    if gram is not None:
        _shard_backbone(gram, shard, True, True, register)
    log.info("FSDP2: %d ranks, %s, param_dtype=%s, reduce_dtype=%s", dist.get_world_size(group), strategy,
             param_dtype, reduce_dtype)
