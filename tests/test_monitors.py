"""Collapse monitors against values worked out by hand."""

import math

import torch

from dinobridge.train.monitors import rankme, target_stats


def test_uniform_and_one_hot_targets():
    k = 16
    uniform = target_stats(torch.full((8, k), 1.0 / k), "t")
    assert abs(uniform["t_entropy"].item() - math.log(k)) < 1e-5
    assert abs(uniform["t_usage_kl"].item()) < 1e-6
    one_hot = torch.zeros(8, k)
    one_hot[torch.arange(8), torch.tensor([0, 0, 1, 1, 2, 3, 3, 3])] = 1.0
    stats = target_stats(one_hot, "t")
    assert stats["t_entropy"].item() < 1e-6
    assert stats["t_prototypes_in_use"].item() == 4
    q = torch.tensor([2, 2, 1, 3], dtype=torch.float64) / 8  # mean usage of the 4 used prototypes
    assert abs(stats["t_usage_kl"].item() - float((q * (q * k).log()).sum())) < 1e-5


def test_rankme_collapse_and_full_rank():
    v = torch.randn(1, 32)
    assert rankme(torch.randn(64, 1) @ v) < 1.01  # collinear embeddings
    q, _ = torch.linalg.qr(torch.randn(32, 32))
    assert abs(rankme(q[:, :8]) - 8.0) < 1e-3  # 8 orthonormal directions, equal singular values
