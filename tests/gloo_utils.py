"""Helpers for the multi-process gloo tests: a free local port, with a retry when another process took it first."""

from __future__ import annotations

import socket
from typing import Callable, TypeVar

T = TypeVar("T")
_IN_USE = ("address already in use", "eaddrinuse")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def with_free_port(launch: Callable[[int], T], attempts: int = 3) -> T:
    """launch(port) on a fresh free port; again on another port if the rendezvous found it taken in between."""
    for attempt in range(attempts):
        try:
            return launch(free_port())
        except Exception as e:  # torch.multiprocessing wraps the worker's error; match on its text
            if attempt + 1 == attempts or not any(s in str(e).lower() for s in _IN_USE):
                raise
    raise AssertionError("unreachable")
