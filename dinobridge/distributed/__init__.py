"""Devices, process groups and collectives."""

from dinobridge.distributed.device import (
    COMPILE_SUPPORT,
    DIST_BACKENDS,
    DeviceInfo,
    DeviceProbe,
    TorchProbe,
    select_device,
)
from dinobridge.distributed.setup import (
    DistInfo,
    cleanup_distributed,
    init_distributed,
    seed_everything,
    set_deterministic,
)

__all__ = [
    "COMPILE_SUPPORT",
    "DIST_BACKENDS",
    "DeviceInfo",
    "DeviceProbe",
    "DistInfo",
    "TorchProbe",
    "cleanup_distributed",
    "init_distributed",
    "seed_everything",
    "select_device",
    "set_deterministic",
]
