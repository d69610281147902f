"""Device selection: which accelerator this process trains on, and what that device can do.

`select_device(requested, local_rank, probe)` returns a frozen `DeviceInfo`. Everything else in the code asks
`DeviceInfo` (backend, autocast dtype, compile, fp64, fused AdamW, memory stats) instead of testing
``device.type == "cuda"``.

Rules
- Auto detection order: cuda -> npu -> xpu -> mps -> cpu.
- ``requested="cpu"`` forces the CPU. A named accelerator that is present is used. A named accelerator that is
  absent logs one warning on the ``dinobridge`` logger and the detected device is used (the seed behaviour: a
  config saying ``DEVICE: cuda`` still trains on the NPU it runs on).
- Device index = ``local_rank`` argument, else env ``LOCAL_RANK``, else the index in ``"cuda:N"``, else 0.
- Visibility lists (``CUDA_VISIBLE_DEVICES``, ``ASCEND_RT_VISIBLE_DEVICES``, ``ZE_AFFINITY_MASK``) are applied by
  the vendor runtime before torch sees the devices: with ``ASCEND_RT_VISIBLE_DEVICES=4,5,6,7`` torch sees
  ``npu:0..3``, so ``LOCAL_RANK=1`` selects ``npu:1``, which is physical NPU 5. `DeviceInfo.physical_id` records
  the physical id for logs; a ``LOCAL_RANK`` beyond the visible count is a `UserError`.
- NPU support comes from the optional ``torch_npu`` package (``import torch`` autoloads it from PyTorch 2.5). It is
  probed only when installed, and any ImportError/OSError/RuntimeError while probing means "no NPU".

Testing: `DeviceProbe` is the only way this module asks the machine anything, so logic tests pass an injected
probe (a plain object with booleans and counts). `TorchProbe` is the real one.

``python -m dinobridge.distributed.device`` prints the selection; ``--nproc`` prints how many processes a
single-node launch should start (the accelerator count, 1 on MPS/CPU), used by ``run/train_1node.sh``.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import logging
import os
import sys
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Optional, Protocol

import torch

from dinobridge.errors import ConfigError, UserError

__all__ = [
    "ACCELERATORS",
    "DEVICE_TYPES",
    "DIST_BACKENDS",
    "COMPILE_SUPPORT",
    "DeviceInfo",
    "DeviceProbe",
    "TorchProbe",
    "select_device",
]

logger = logging.getLogger("dinobridge")

ACCELERATORS: tuple[str, ...] = ("cuda", "npu", "xpu", "mps")  # auto-detection order
DEVICE_TYPES: tuple[str, ...] = ACCELERATORS + ("cpu",)
_ALIASES = {"gpu": "cuda", "ascend": "npu"}

# torch.distributed backend per device type. MPS has no collective backend: gloo is listed for a world size of 1
# only; `init_distributed` refuses MPS with more than one process.
DIST_BACKENDS: dict[str, str] = {"cuda": "nccl", "npu": "hccl", "xpu": "xccl", "mps": "gloo", "cpu": "gloo"}

# Can torch.compile be used at all (capability) ...
COMPILE_SUPPORT: dict[str, bool] = {
    "cuda": True,  # Inductor + Triton, as DINOv3
    "npu": False,  # Inductor does not target NPU; TorchAir is inference-oriented; the dino_bridge fork skips it
    "xpu": True,  # Inductor + Triton on XPU (Intel: production-ready); not validated by this project
    "mps": False,  # experimental
    "cpu": True,  # works, compiles slowly
}
# ... and should it be on when the config does not say (cuda only, as DINOv3).
COMPILE_DEFAULT: dict[str, bool] = {t: t == "cuda" for t in DEVICE_TYPES}

# fp64 tensors and collectives: NPU ops and HCCL have limited fp64, MPS has none.
FP64_SUPPORT: dict[str, bool] = {"cuda": True, "npu": False, "xpu": True, "mps": False, "cpu": True}

# torch.optim.AdamW(fused=True): torch ships fused kernels for cuda/xpu/mps/cpu; on NPU support depends on the
# torch_npu/CANN release (several projects disable it), so it stays off there and the foreach path is used.
FUSED_ADAMW: dict[str, bool] = {"cuda": True, "npu": False, "xpu": True, "mps": True, "cpu": True}

# FSDP2 works on these (README of the reference: cuda yes, npu yes (verify version), xpu >= 2.8); MPS/CPU: no.
FSDP_SUPPORT: dict[str, bool] = {"cuda": True, "npu": True, "xpu": True, "mps": False, "cpu": False}

_VISIBLE_ENV: dict[str, str] = {
    "cuda": "CUDA_VISIBLE_DEVICES",
    "npu": "ASCEND_RT_VISIBLE_DEVICES",
    "xpu": "ZE_AFFINITY_MASK",
}


class DeviceProbe(Protocol):
    """What `select_device` may ask the machine. Tests inject a fake; `TorchProbe` asks torch."""

    def import_ok(self, module: str) -> bool:
        """True when `module` imports without error (used for the optional ``torch_npu``)."""

    def is_available(self, device_type: str) -> bool:
        """True when at least one device of `device_type` (an entry of ACCELERATORS) is usable."""

    def device_count(self, device_type: str) -> int:
        """Number of visible devices of `device_type` (after the runtime applied its visibility list)."""

    def bf16_supported(self, device_type: str) -> bool:
        """True when bf16 compute (and autocast) works natively on `device_type`."""

    def fused_adamw_ok(self, device_type: str) -> bool:
        """True when this torch build has fused AdamW kernels for `device_type`."""

    def device_name(self, device_type: str, index: int) -> str:
        """Marketing name of the device for logs (e.g. "NVIDIA H100 80GB HBM3")."""


def _backend_module(device_type: str) -> Any:
    """torch.cuda / torch.npu / torch.xpu / torch.mps (torch.npu exists only once torch_npu is loaded)."""
    return getattr(torch, device_type)


class TorchProbe:
    """The real probe: asks torch (and ``torch_npu`` when it is installed). Never raises."""

    def import_ok(self, module: str) -> bool:
        if module in sys.modules:
            return True
        try:
            if importlib.util.find_spec(module) is None:
                return False
            importlib.import_module(module)
            return True
        except (ImportError, OSError, RuntimeError, ValueError):
            return False

    def is_available(self, device_type: str) -> bool:
        try:
            if device_type == "mps":
                return bool(torch.backends.mps.is_available())
            if device_type == "npu" and not self.import_ok("torch_npu"):
                return False
            mod = getattr(torch, device_type, None)
            return bool(mod is not None and mod.is_available())
        except (ImportError, OSError, RuntimeError, AttributeError):
            return False

    def device_count(self, device_type: str) -> int:
        if device_type == "cpu":
            return 1
        if device_type == "mps":
            return 1 if self.is_available("mps") else 0
        try:
            return int(_backend_module(device_type).device_count()) if self.is_available(device_type) else 0
        except (OSError, RuntimeError, AttributeError):
            return 0

    def bf16_supported(self, device_type: str) -> bool:
        if device_type == "cpu":
            return True
        try:
            if device_type == "cuda":
                # Without emulation: pre-Ampere GPUs report bf16 only as emulated (slow); fp16 is used there.
                try:
                    return bool(torch.cuda.is_bf16_supported(including_emulation=False))
                except TypeError:  # torch without the argument
                    return bool(torch.cuda.is_bf16_supported())
            mod = getattr(torch, device_type, None)
            if mod is not None and hasattr(mod, "is_bf16_supported"):
                return bool(mod.is_bf16_supported())
            # MPS (bf16 from PyTorch 2.3 on macOS 14+): try a tiny matmul.
            x = torch.ones(2, 2, dtype=torch.bfloat16, device=device_type)
            return bool(torch.isfinite((x @ x).float()).all().item())
        except (RuntimeError, TypeError, AttributeError, OSError):
            return False

    def fused_adamw_ok(self, device_type: str) -> bool:
        try:
            from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

            return device_type in _get_fused_kernels_supported_devices()
        except (ImportError, AttributeError):
            return device_type == "cuda"

    def device_name(self, device_type: str, index: int) -> str:
        if device_type == "cpu":
            import platform

            return platform.processor() or platform.machine() or "cpu"
        if device_type == "mps":
            return "Apple MPS"
        try:
            return str(_backend_module(device_type).get_device_name(index))
        except (AttributeError, RuntimeError, OSError, AssertionError):
            return device_type


@dataclass(frozen=True)
class DeviceInfo:
    """The device of this process and what it supports.

    type: "cuda" | "npu" | "xpu" | "mps" | "cpu"; index: device ordinal (None for mps/cpu).
    `device` / `device_str`: the torch.device / its string ("npu:1"; torch.device("npu") needs torch_npu loaded).
    backend: torch.distributed backend (nccl/hccl/xccl/gloo).
    autocast_dtype: mixed-precision dtype to use; None = fp32 (the CPU unless bf16 was asked for).
    count: visible devices of this type on the node (1 for mps/cpu).
    physical_id: the physical id after the visibility list (for logs); reason: the decision trail (one line).
    """

    type: str
    index: Optional[int]
    backend: str
    autocast_dtype: Optional[torch.dtype]
    has_bf16: bool
    supports_fp64: bool
    supports_compile: bool
    compile_default: bool
    supports_fused_adamw: bool
    supports_fsdp: bool
    count: int
    name: str
    physical_id: Optional[str] = None
    reason: str = field(default="", compare=False)

    # ---- properties ------------------------------------------------------------------------------------------
    @property
    def device_str(self) -> str:
        return self.type if self.index is None else f"{self.type}:{self.index}"

    @property
    def device(self) -> torch.device:
        return torch.device(self.device_str)

    @property
    def is_accelerator(self) -> bool:
        return self.type != "cpu"

    @property
    def needs_grad_scaler(self) -> bool:
        """fp16 autocast needs a GradScaler (bf16 and fp32 do not)."""
        return self.autocast_dtype == torch.float16

    def describe(self) -> str:
        """One line for logs, e.g. ``npu:1 (Ascend910B, physical 5) backend=hccl amp=bfloat16 compile=off``."""
        where = self.device_str
        extra = [self.name]
        if self.physical_id not in (None, str(self.index)):
            extra.append(f"physical {self.physical_id}")
        amp = str(self.autocast_dtype).replace("torch.", "") if self.autocast_dtype is not None else "fp32"
        return (
            f"{where} ({', '.join(extra)}) backend={self.backend} amp={amp} "
            f"compile={'ok' if self.supports_compile else 'off'} fp64={'ok' if self.supports_fp64 else 'avoid'}"
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain-typed dict for config dumps and metrics files."""
        d = asdict(self)
        d["device"] = self.device_str
        d["autocast_dtype"] = None if self.autocast_dtype is None else str(self.autocast_dtype).replace("torch.", "")
        return d

    # ---- runtime helpers (safe on every type) ------------------------------------------------------------------
    def set_current(self) -> None:
        """Make this the current device of the process (cuda/npu/xpu); no-op on mps/cpu."""
        if self.type in ("cuda", "npu", "xpu") and self.index is not None:
            _backend_module(self.type).set_device(self.index)

    def synchronize(self) -> None:
        """Wait for queued kernels (for timings); no-op on CPU."""
        if self.type == "cpu":
            return
        if self.type == "mps":
            torch.mps.synchronize()
        else:
            _backend_module(self.type).synchronize(self.device)

    def memory_allocated(self) -> Optional[int]:
        """Bytes currently held by tensors on this device; None on CPU."""
        if self.type == "cpu":
            return None
        if self.type == "mps":
            return int(torch.mps.current_allocated_memory())
        return int(_backend_module(self.type).memory_allocated(self.device))

    def peak_memory_allocated(self) -> Optional[int]:
        """Peak bytes held by tensors since the last `reset_peak_memory_stats`; None on CPU.

        MPS has no peak counter: the current allocation is returned there.
        """
        if self.type == "cpu":
            return None
        if self.type == "mps":
            return int(torch.mps.current_allocated_memory())
        return int(_backend_module(self.type).max_memory_allocated(self.device))

    def reset_peak_memory_stats(self) -> None:
        """Restart the peak counter (cuda/npu/xpu); no-op on mps/cpu."""
        if self.type in ("cuda", "npu", "xpu"):
            _backend_module(self.type).reset_peak_memory_stats(self.device)

    def empty_cache(self) -> None:
        """Release cached, unused memory back to the driver; no-op on CPU."""
        if self.type != "cpu":
            _backend_module(self.type).empty_cache()

    def autocast(self, dtype: Optional[torch.dtype] = None, enabled: bool = True) -> contextlib.AbstractContextManager:
        """``torch.autocast`` for this device with `dtype` (default: `autocast_dtype`); a null context when the
        dtype is None (fp32) or `enabled` is False."""
        dtype = self.autocast_dtype if dtype is None else dtype
        if not enabled or dtype is None or dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.type, dtype=dtype)


# ---- selection -------------------------------------------------------------------------------------------------
def _parse_requested(requested: str) -> tuple[str, Optional[int]]:
    """"auto" / "cuda" / "cuda:1" / "GPU" -> (type or "auto", explicit index or None)."""
    text = str(requested if requested is not None else "auto").strip().lower() or "auto"
    kind, _, idx = text.partition(":")
    kind = _ALIASES.get(kind, kind)
    if kind not in DEVICE_TYPES + ("auto",):
        raise ConfigError(
            f"MODEL.DEVICE: expected one of auto, {', '.join(DEVICE_TYPES)} (optionally 'type:N'), got {requested!r}"
        )
    if not idx:
        return kind, None
    if not idx.isdigit():
        raise ConfigError(f"MODEL.DEVICE: device index must be a non-negative integer, got {requested!r}")
    return kind, int(idx)


def _accelerator_present(kind: str, probe: DeviceProbe) -> bool:
    if kind == "npu" and not probe.import_ok("torch_npu"):
        return False
    return probe.is_available(kind)


def _detect(probe: DeviceProbe) -> str:
    for kind in ACCELERATORS:
        if _accelerator_present(kind, probe):
            return kind
    return "cpu"


def env_int(env: Mapping[str, str], key: str) -> Optional[int]:
    """The non-negative integer in environment variable `key` (None when unset or empty); a UserError otherwise."""
    raw = env.get(key)
    if raw is None or raw.strip() == "":
        return None
    try:
        value = int(raw)
    except ValueError:
        raise UserError(f"{key}: expected an integer, got {raw!r}") from None
    if value < 0:
        raise UserError(f"{key}: expected a non-negative integer, got {raw!r}")
    return value


def _physical_id(kind: str, index: int, env: Mapping[str, str]) -> Optional[str]:
    var = _VISIBLE_ENV.get(kind)
    raw = env.get(var, "") if var else ""
    ids = [s.strip() for s in raw.split(",") if s.strip()]
    if ids and index < len(ids):
        return ids[index]
    return str(index)


def select_device(
    requested: str = "auto",
    local_rank: Optional[int] = None,
    probe: Optional[DeviceProbe] = None,
    *,
    cpu_bf16: bool = False,
    env: Optional[Mapping[str, str]] = None,
) -> DeviceInfo:
    """Pick the device of this process (see the module docstring for the rules).

    requested: "auto" | "cuda" | "npu" | "xpu" | "mps" | "cpu", optionally "type:N" (config ``MODEL.DEVICE``).
    local_rank: device ordinal; default env ``LOCAL_RANK`` (set by torchrun), else the "type:N" index, else 0.
    probe: where availability comes from; default `TorchProbe()`. Tests pass an injected fake.
    cpu_bf16: use bf16 autocast on the CPU (off by default: CPU runs in fp32 unless asked).
    env: environment mapping (default ``os.environ``).
    Raises ConfigError for an unknown device string, UserError when LOCAL_RANK exceeds the visible devices.
    """
    probe = TorchProbe() if probe is None else probe
    env = os.environ if env is None else env
    kind, explicit_index = _parse_requested(requested)
    detected = _detect(probe)

    if kind == "auto":
        chosen, reason = detected, f"auto-detected {detected}"
    elif kind == "cpu":
        chosen, reason = "cpu", "cpu requested"
    elif _accelerator_present(kind, probe):
        chosen, reason = kind, f"{kind} requested and available"
    else:
        chosen, reason = detected, f"{kind} requested but not available; using detected {detected}"
        logger.warning("device %r requested but not available on this machine; using detected %r", kind, detected)

    env_rank = env_int(env, "LOCAL_RANK")
    if local_rank is not None and local_rank < 0:
        raise UserError(f"local_rank: expected a non-negative integer, got {local_rank}")
    index = local_rank if local_rank is not None else env_rank
    if index is None:
        index = explicit_index if (explicit_index is not None and chosen == kind) else 0
    elif explicit_index is not None and explicit_index != index and chosen == kind:
        logger.warning(
            "device index %d in %r ignored: LOCAL_RANK selects %s:%d", explicit_index, requested, chosen, index
        )

    if chosen in ("cuda", "npu", "xpu"):
        count = int(probe.device_count(chosen))
        if index >= count:
            var = _VISIBLE_ENV[chosen]
            vis = f" ({var}={env[var]})" if env.get(var) else ""
            raise UserError(
                f"LOCAL_RANK={index} but only {count} {chosen} device(s) are visible{vis}: "
                f"start at most {count} processes per node (torchrun --nproc_per_node / NPROC)"
            )
        dev_index: Optional[int] = index
        physical = _physical_id(chosen, index, env)
        name = probe.device_name(chosen, index)
    else:
        count, dev_index, physical = 1, None, None
        name = probe.device_name(chosen, 0)

    has_bf16 = bool(probe.bf16_supported(chosen))
    if chosen == "cpu":
        amp: Optional[torch.dtype] = torch.bfloat16 if cpu_bf16 else None
    else:
        amp = torch.bfloat16 if has_bf16 else torch.float16

    return DeviceInfo(
        type=chosen,
        index=dev_index,
        backend=DIST_BACKENDS[chosen],
        autocast_dtype=amp,
        has_bf16=has_bf16,
        supports_fp64=FP64_SUPPORT[chosen],
        supports_compile=COMPILE_SUPPORT[chosen],
        compile_default=COMPILE_DEFAULT[chosen],
        supports_fused_adamw=FUSED_ADAMW[chosen] and bool(probe.fused_adamw_ok(chosen)),
        supports_fsdp=FSDP_SUPPORT[chosen],
        count=count,
        name=name,
        physical_id=physical,
        reason=reason,
    )


def _main(argv: Optional[list[str]] = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m dinobridge.distributed.device", description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="auto", help="auto | cuda | npu | xpu | mps | cpu")
    parser.add_argument("--nproc", action="store_true", help="print the number of processes for one node and exit")
    args = parser.parse_args(argv)
    env = {k: v for k, v in os.environ.items() if k != "LOCAL_RANK"}
    try:
        info = select_device(args.device, local_rank=0, env=env)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.nproc:
        print(info.count if info.type in ("cuda", "npu", "xpu") else 1)
    else:
        print(info.describe())
        print(f"reason: {info.reason}; visible {info.type} devices: {info.count}")
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    sys.exit(_main())
