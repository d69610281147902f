"""Graceful stop on SIGTERM / SIGUSR1: finish the current step, save a checkpoint, exit; the same command resumes.

Schedulers pre-empt jobs with a signal (SLURM: SIGTERM, or SIGUSR1 with ``--signal=USR1@90``; Kubernetes and
`timeout`: SIGTERM; torchrun forwards SIGTERM to every worker). `StopSignal` only records the signal; the train loop
asks `requested()` once per iteration and, if any rank got one, every rank saves and leaves the loop together.
The process then exits with 128 + signal number (143 for SIGTERM), the shell convention for "ended by a signal".
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Optional

import torch
import torch.distributed as dist

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1) if hasattr(signal, "SIGUSR1") else (signal.SIGTERM,)


class StopSignal:
    """Turns `signals` into a stop request between `install()` and `restore()` (or as a context manager).

    Outside the main thread (where Python cannot install handlers) it installs nothing and never requests a stop.
    """

    def __init__(self, signals: tuple[signal.Signals, ...] = STOP_SIGNALS):
        self.signals = signals
        self.received: Optional[int] = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: Optional[FrameType]) -> None:
        if self.received is None:
            self.received = int(signum)

    def install(self) -> "StopSignal":
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous.clear()

    def __enter__(self) -> "StopSignal":
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self.restore()

    def requested(self, device: torch.device) -> Optional[int]:
        """The signal number if this rank or any other got a stop signal, else None (a collective under torchrun)."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return self.received
        flag = torch.tensor([self.received or 0], dtype=torch.int32, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        value = int(flag.item())
        return value or None
