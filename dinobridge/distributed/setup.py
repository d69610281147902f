"""Process-group setup and teardown, seeding and determinism.

Process model: one process without a process group (CPU, MPS, one GPU/NPU), or N processes launched by torchrun
(``run/train_1node.sh``, ``run/train_multinode.sh``), which exports RANK, WORLD_SIZE, LOCAL_RANK,
LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT. `init_distributed` reads those variables, makes the device current
and creates the default process group with the device's backend (nccl / hccl / xccl / gloo). A torchrun launch
with WORLD_SIZE=1 creates no group either (unless ``always_group``): code paths only check
`dist.is_initialized()`.
"""

from __future__ import annotations

import logging
import os
import random
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Mapping, Optional

import numpy as np
import torch
import torch.distributed as dist

from dinobridge.distributed.device import DeviceInfo, env_int
from dinobridge.errors import UserError

__all__ = ["DistInfo", "init_distributed", "cleanup_distributed", "seed_everything", "set_deterministic"]

logger = logging.getLogger("dinobridge")

_LAUNCH_HINT = "launch with torchrun (run/train_1node.sh or run/train_multinode.sh) or unset it for a single process"


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job. `initialized`: this job has a default process group."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    is_main: bool = True
    initialized: bool = False


def read_launch_env(env: Optional[Mapping[str, str]] = None) -> Optional[DistInfo]:
    """The torchrun variables as a `DistInfo` (initialized=False), or None when this is not a launched job.

    Raises UserError for inconsistent or incomplete variables (e.g. WORLD_SIZE set but MASTER_ADDR missing).
    """
    env = os.environ if env is None else env
    world = env_int(env, "WORLD_SIZE")
    rank = env_int(env, "RANK")
    local_rank = env_int(env, "LOCAL_RANK")
    if world is None and rank is None:
        return None  # LOCAL_RANK alone only picks the device
    if world is None or rank is None:
        missing = "WORLD_SIZE" if world is None else "RANK"
        present = "RANK" if world is None else "WORLD_SIZE"
        raise UserError(f"{present} is set but {missing} is missing: {_LAUNCH_HINT}")
    if world < 1:
        raise UserError(f"WORLD_SIZE: expected >= 1, got {world}")
    if rank >= world:
        raise UserError(f"RANK={rank} is out of range for WORLD_SIZE={world} (expected 0..{world - 1})")
    if world > 1:
        for key in ("LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            if not env.get(key):
                raise UserError(f"WORLD_SIZE={world} is set but {key} is missing: {_LAUNCH_HINT}")
        port = env["MASTER_PORT"]
        if not port.isdigit() or not 0 < int(port) < 65536:
            raise UserError(f"MASTER_PORT: expected a TCP port number (1-65535), got {port!r}")
    local_rank = local_rank or 0
    local_world = env_int(env, "LOCAL_WORLD_SIZE")
    local_world = local_world if local_world is not None else local_rank + 1  # unknown: lower bound
    if local_rank >= local_world:
        raise UserError(f"LOCAL_RANK={local_rank} is out of range for LOCAL_WORLD_SIZE={local_world}")
    return DistInfo(rank, world, local_rank, local_world, rank == 0, False)


def _current_info() -> DistInfo:
    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", "0") or 0)
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)) or world)
    return DistInfo(rank, world, local_rank, local_world, rank == 0, True)


def _init_method(env: Optional[Mapping[str, str]]) -> str:
    """``env://`` for the real environment (keeps torchrun's agent store); ``tcp://`` for a given mapping; a free
    local port when no rendezvous address is set (single-process group)."""
    source = os.environ if env is None else env
    if not (source.get("MASTER_ADDR") and source.get("MASTER_PORT")):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return f"tcp://127.0.0.1:{s.getsockname()[1]}"
    return "env://" if env is None else f"tcp://{source['MASTER_ADDR']}:{source['MASTER_PORT']}"


def init_distributed(
    device: DeviceInfo,
    timeout_s: float = 1800,
    *,
    always_group: bool = False,
    env: Optional[Mapping[str, str]] = None,
) -> DistInfo:
    """Create the default process group when launched by torchrun with WORLD_SIZE > 1; otherwise do nothing.

    device: from `select_device` (its backend is used; its index must equal LOCAL_RANK).
    timeout_s: collective timeout of the group (seconds).
    always_group: also create a 1-rank group for a single process (for code that needs a group, e.g. FSDP2 on one
      device); without torchrun variables it rendezvous on a free local port.
    env: environment mapping (default ``os.environ``, read through torch's ``env://`` so torchrun's store is used).
    Returns the process's `DistInfo`; calling it again when a group exists returns the current one.
    Raises UserError for misconfigured launches (missing MASTER_ADDR/PORT, more local ranks than devices, MPS with
    several processes, a backend missing from this torch build).
    """
    if dist.is_available() and dist.is_initialized():
        return _current_info()
    launch = read_launch_env(env)
    if launch is None or launch.world_size == 1:
        if not always_group:
            return launch or DistInfo()
        launch = launch or DistInfo()
    if not dist.is_available():
        raise UserError("a process group was asked for but this torch build has no torch.distributed support")
    if device.type == "mps":
        raise UserError(
            "MPS has no collective backend: run one process on MPS, or set MODEL.DEVICE=cpu for a multi-process run"
        )
    if device.type in ("cuda", "npu", "xpu") and launch.local_world_size > device.count:
        raise UserError(
            f"LOCAL_WORLD_SIZE={launch.local_world_size} processes on this node but only {device.count} "
            f"{device.type} device(s) are visible: lower --nproc_per_node (NPROC) or make more devices visible"
        )
    if device.index is not None and device.index != launch.local_rank:
        raise UserError(
            f"device {device.device} does not match LOCAL_RANK={launch.local_rank}: "
            "call select_device after torchrun has set LOCAL_RANK"
        )
    backend = device.backend
    is_available = getattr(dist, "is_backend_available", None)
    if backend != "hccl" and is_available is not None and not is_available(backend):
        raise UserError(
            f"torch.distributed backend {backend!r} for {device.type} is not available in torch {torch.__version__}"
            + (" (xccl needs PyTorch >= 2.8 built with XCCL)" if backend == "xccl" else "")
        )

    device.set_current()  # before init, so NCCL/HCCL bind the right device
    kwargs = {}
    if device.type == "cuda":
        kwargs["device_id"] = device.device  # eager NCCL communicator on this GPU
    dist.init_process_group(
        backend=backend,
        init_method=_init_method(env),
        rank=launch.rank,
        world_size=launch.world_size,
        timeout=timedelta(seconds=float(timeout_s)),
        **kwargs,
    )
    # Warm-up collective: HCCL builds communicators lazily, and a broken setup fails here rather than mid-step.
    probe = torch.ones(1, dtype=torch.float32, device=device.device)
    dist.all_reduce(probe)
    if int(probe.item()) != launch.world_size:
        raise RuntimeError(f"process group warm-up all_reduce gave {probe.item()}, expected {launch.world_size}")
    info = DistInfo(launch.rank, launch.world_size, launch.local_rank, launch.local_world_size, launch.is_main, True)
    if info.is_main:
        logger.info("process group: backend=%s world_size=%d (%s)", backend, info.world_size, device.describe())
    return info


def cleanup_distributed() -> None:
    """Destroy the default process group if one exists (safe to call always, e.g. in a ``finally``)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def seed_everything(seed: int, rank: int = 0) -> int:
    """Seed python, numpy and torch (CPU and every accelerator) with ``seed + rank``; returns that seed.

    The data pipeline does not depend on these generators (its draws are functions of (train.seed, sample
    position)); this seeds model initialisation and anything else drawing from the global RNGs.
    """
    if seed < 0:
        raise UserError(f"train.seed: expected a non-negative integer, got {seed}")
    s = int(seed) + int(rank)
    random.seed(s)
    np.random.seed(s % (2**32))
    torch.manual_seed(s)  # also seeds cuda / xpu / mps and the privateuse1 backend (npu) when present
    return s


def set_deterministic(enabled: bool) -> None:
    """Prefer deterministic kernels (``torch.use_deterministic_algorithms(warn_only=True)``) or restore defaults.

    Enabled: non-deterministic ops warn instead of failing; cuDNN autotuning is off and cuDNN picks deterministic
    algorithms. cuBLAS needs ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` (or ``:16:8``) for deterministic matmuls on CUDA
    >= 10.2; it is set here when unset, which only takes effect if no cuBLAS handle exists yet, so call this
    before the first GPU matmul (or export it in the launch script). Bitwise reproducibility also needs the same
    device type, world size, torch version and ``torch.compile`` setting.
    """
    torch.use_deterministic_algorithms(bool(enabled), warn_only=True)
    torch.backends.cudnn.deterministic = bool(enabled)
    torch.backends.cudnn.benchmark = not enabled
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
