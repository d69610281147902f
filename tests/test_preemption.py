"""StopSignal: a signal becomes a stop request, handlers are restored, and one rank's signal stops every rank."""

from __future__ import annotations

import os
import signal

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dinobridge.train.preemption import StopSignal
from tests.gloo_utils import with_free_port


def test_signal_is_recorded_and_handler_restored():
    previous = signal.getsignal(signal.SIGUSR1)
    with StopSignal() as stop:
        assert stop.requested(torch.device("cpu")) is None
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)  # the first signal wins
        assert stop.requested(torch.device("cpu")) == signal.SIGUSR1
    assert signal.getsignal(signal.SIGUSR1) is previous


def _worker(rank: int, port: int, results) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        stop = StopSignal()  # not installed: the test sets `received` as the handler would
        first = stop.requested(torch.device("cpu"))
        if rank == 1:
            stop.received = int(signal.SIGTERM)
        results[rank] = (first, stop.requested(torch.device("cpu")))
    finally:
        dist.destroy_process_group()


def test_one_ranks_signal_stops_every_rank():
    results = mp.Manager().dict()
    with_free_port(lambda port: mp.spawn(_worker, args=(port, results), nprocs=2))
    assert dict(results) == {0: (None, int(signal.SIGTERM)), 1: (None, int(signal.SIGTERM))}
