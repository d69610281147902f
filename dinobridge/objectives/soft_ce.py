"""Cross-entropy against soft targets, per row, without keeping [n, K] fp32 tensors for backward.

    CE_j = -Σ_k q_jk log_softmax(s_j / τ)_k = lse_j Σ_k q_jk - Σ_k q_jk s_jk / τ,   lse_j = logsumexp_k(s_jk / τ)
    dCE_j / ds_jk = (softmax(s_j / τ)_k Σ_k' q_jk' - q_jk) / τ

With K = 65536 prototypes and thousands of masked patches, `log_softmax(s.float() / τ)` kept for backward is the
largest tensor of the step (~2 GiB in the ViT-L recipes). Here forward and backward walk over row chunks in fp32 and
only the inputs are kept (the bf16 logits and the targets, which exist anyway), so the extra memory is one chunk.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["soft_cross_entropy"]

_CHUNK_ELEMENTS = 1 << 24  # fp32 elements per chunk (64 MiB)


def _rows(k: int) -> int:
    """Rows per chunk for K classes."""
    return max(1, _CHUNK_ELEMENTS // max(k, 1))


class _SoftCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, targets: Tensor, logits: Tensor, temperature: float) -> Tensor:  # type: ignore[override]
        n, k = logits.shape
        out = torch.empty(n, dtype=torch.float32, device=logits.device)
        step = _rows(k)
        for i in range(0, n, step):
            s = logits[i:i + step].float() / temperature
            q = targets[i:i + step].float()
            out[i:i + step] = torch.logsumexp(s, dim=-1) * q.sum(dim=-1) - (q * s).sum(dim=-1)
        ctx.save_for_backward(targets, logits)
        ctx.temperature = temperature
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[None, Tensor, None]:  # type: ignore[override]
        targets, logits = ctx.saved_tensors
        n, k = logits.shape
        grad = torch.empty_like(logits)
        step = _rows(k)
        for i in range(0, n, step):
            p = torch.softmax(logits[i:i + step].float() / ctx.temperature, dim=-1)
            q = targets[i:i + step].float()
            g = (p * q.sum(dim=-1, keepdim=True) - q) * (grad_out[i:i + step].float() / ctx.temperature)[:, None]
            grad[i:i + step] = g.to(grad.dtype)
        return None, grad, None


def soft_cross_entropy(targets: Tensor, logits: Tensor, student_temp: float) -> Tensor:
    """Per-row CE(q, s) = -Σ_k q_k log_softmax(s / τ_s)_k in fp32: targets [n, K], logits [n, K] -> [n].

    Gradients flow to `logits` only (targets are teacher outputs); the logits keep their dtype in backward.
    """
    if logits.ndim != 2 or targets.shape != logits.shape:
        raise ValueError(f"soft_cross_entropy: expected targets and logits of the same shape [n, K], got "
                         f"{tuple(targets.shape)} and {tuple(logits.shape)}")
    if student_temp <= 0:
        raise ValueError(f"soft_cross_entropy: student_temp must be > 0, got {student_temp}")
    return _SoftCrossEntropy.apply(targets.detach(), logits, float(student_temp))
