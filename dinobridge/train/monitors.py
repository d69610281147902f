"""Collapse monitors: statistics of the teacher targets and the effective rank of teacher embeddings.

- target entropy: mean over samples of -Σ_k p_k log p_k (ln K = uniform targets, 0 = one-hot);
- prototypes in use: how many prototypes are the argmax of at least one target (hard usage);
- usage KL: KL(mean target || uniform) = Σ_k q_k log(q_k K) over the mean target q (0 = balanced soft usage);
- RankMe (Garrido et al., 2023): exp(entropy of the normalised singular values) of an embedding matrix [n, D];
  1 = all embeddings collinear (collapse), up to min(n, D).
A target that stays at entropy ln K means the teacher gives no signal; RankMe near 1 means representation collapse.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


@torch.no_grad()
def target_stats(probs: Tensor, prefix: str) -> dict[str, Tensor]:
    """probs [n, K] (rows sum to 1) -> {prefix_entropy, prefix_prototypes_in_use, prefix_usage_kl} (0-dim tensors)."""
    p = probs.float().reshape(-1, probs.shape[-1])
    if p.shape[0] == 0:
        return {}
    k = p.shape[-1]
    entropy = -(p * p.clamp_min(1e-30).log()).sum(-1).mean()
    in_use = torch.zeros(k, device=p.device).index_fill_(0, p.argmax(-1), 1.0).sum()
    q = p.mean(0)
    kl = (q * (q.clamp_min(1e-30) * k).log()).sum()
    return {f"{prefix}_entropy": entropy, f"{prefix}_prototypes_in_use": in_use, f"{prefix}_usage_kl": kl}


@torch.no_grad()
def rankme(embeddings: Tensor, eps: float = 1e-7) -> float:
    """Effective rank of embeddings [n, D]: exp(-Σ p_i log p_i), p = singular values / their sum."""
    s = torch.linalg.svdvals(embeddings.float())
    p = s / s.sum().clamp_min(eps) + eps
    return float(math.exp(-(p * p.log()).sum().item()))
