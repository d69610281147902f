"""Collectives used by losses and balancers; each is a no-op without a process group.

`dist_ready` / `world_size` / `all_reduce`: plain reductions (Sinkhorn sums, counts, centres).
`gather_with_grad` / `gather_no_grad`: cross-rank gathering of batch features.

The gradient of a gathered tensor flows back to the rank that owns each slice: the backward pass sums the
incoming gradients of all ranks (all-reduce) and keeps the local slice. When every rank computes the same
global loss, the local gradient is therefore ``world_size x dL/d(local rows)``; DDP's gradient averaging turns
that back into the exact gradient of the global loss.

A small autograd function is used instead of ``torch.distributed.nn.functional.all_gather`` (deprecated in
recent PyTorch, and its backward needs reduce-scatter or all-to-all, which some backends lack); forward is an
``all_gather``, backward an ``all_reduce``, both available on every backend (gloo, NCCL, HCCL, ...).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from typing import Optional

__all__ = ["dist_ready", "dist_active", "world_size", "all_reduce", "broadcast_module", "gather_with_grad", "gather_no_grad"]


def dist_ready() -> bool:
    """True when a default process group exists (collectives are needed)."""
    return dist.is_available() and dist.is_initialized()


def world_size(group: Optional[dist.ProcessGroup] = None) -> int:
    return dist.get_world_size(group) if dist_ready() else 1


def all_reduce(t: Tensor, op: str = "sum", group: Optional[dist.ProcessGroup] = None) -> Tensor:
    """In-place all-reduce (`op` in {"sum", "max"}) over `group`; a no-op without a process group."""
    if dist_ready():
        dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX, group=group)
    return t


def dist_active(group: dist.ProcessGroup | None = None) -> bool:
    """True when a process group is initialised and has more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


class _AllGatherWithGrad(torch.autograd.Function):
    """[n, ...] on each rank -> [world * n, ...] (rank order); backward: summed gradient of the local slice."""

    @staticmethod
    def forward(ctx, x: Tensor, group: dist.ProcessGroup | None) -> Tensor:  # type: ignore[override]
        x = x.contiguous()
        world = dist.get_world_size(group)
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x, group=group)
        ctx.group = group
        ctx.rank = dist.get_rank(group)
        ctx.n = x.shape[0]
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        lo = ctx.rank * ctx.n
        return grad[lo : lo + ctx.n], None


def gather_with_grad(x: Tensor, group: dist.ProcessGroup | None = None) -> Tensor:
    """Concatenate ``x`` [n, ...] of all ranks along dim 0 -> [world * n, ...], keeping the autograd graph.

    Every rank must pass the same shape. Without an initialised multi-rank group, returns ``x`` unchanged.
    """
    if not dist_active(group):
        return x
    return _AllGatherWithGrad.apply(x, group)


def gather_no_grad(x: Tensor, group: dist.ProcessGroup | None = None) -> Tensor:
    """Like :func:`gather_with_grad` for tensors that need no gradient (e.g. teacher features); detached."""
    x = x.detach()
    if not dist_active(group):
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=0)


@torch.no_grad()
def broadcast_module(module: torch.nn.Module, src: int = 0, group: Optional[dist.ProcessGroup] = None) -> None:
    """Copy rank `src`'s parameters and buffers to every rank (ranks seed differently, so their inits differ)."""
    if not dist_ready():
        return
    src = dist.get_global_rank(group, src) if group is not None else src
    for t in [*module.parameters(), *module.buffers()]:
        dist.broadcast(t.data, src=src, group=group)
