"""soft_cross_entropy: values and gradients against a float64 oracle, across chunk boundaries and dtypes."""

from __future__ import annotations

import pytest
import torch

import dinobridge.objectives.soft_ce as soft_ce
from dinobridge.objectives.soft_ce import soft_cross_entropy


def _oracle(targets: torch.Tensor, logits: torch.Tensor, temp: float) -> torch.Tensor:
    s = logits.double() / temp
    return -(targets.double() * (s - s.logsumexp(dim=-1, keepdim=True))).sum(dim=-1)


@pytest.mark.parametrize("chunk_elements", [1 << 24, 37])  # one chunk, and many uneven chunks of rows
def test_values_and_gradients_match_float64(monkeypatch, chunk_elements: int):
    monkeypatch.setattr(soft_ce, "_CHUNK_ELEMENTS", chunk_elements)
    g = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(23, 11, generator=g)).requires_grad_(True)
    targets = torch.softmax(torch.randn(23, 11, generator=g) / 0.3, dim=-1)
    targets[5] *= 0.5  # rows need not sum to 1 (e.g. a masked target)
    weights = torch.rand(23, generator=g)
    ce = soft_cross_entropy(targets, logits, 0.1)
    assert ce.dtype == torch.float32 and ce.shape == (23,)
    ref_logits = logits.detach().double().requires_grad_(True)
    ref = _oracle(targets, ref_logits, 0.1)
    torch.testing.assert_close(ce.double(), ref, rtol=1e-6, atol=1e-5)
    (ce * weights).sum().backward()
    (ref * weights.double()).sum().backward()
    torch.testing.assert_close(logits.grad.double(), ref_logits.grad, rtol=1e-5, atol=1e-6)


def test_bf16_logits_keep_their_dtype_and_targets_get_no_gradient():
    logits = torch.randn(4, 8).bfloat16().requires_grad_(True)
    targets = torch.softmax(torch.randn(4, 8), dim=-1).requires_grad_(True)
    soft_cross_entropy(targets, logits, 0.1).sum().backward()
    assert logits.grad.dtype == torch.bfloat16 and targets.grad is None
    torch.testing.assert_close(soft_cross_entropy(targets, logits, 0.1).double(), _oracle(targets, logits.float(), 0.1),
                               rtol=1e-6, atol=1e-5)


def test_bad_shapes_and_temperature_are_errors():
    with pytest.raises(ValueError, match="same shape"):
        soft_cross_entropy(torch.rand(3, 4), torch.rand(3, 5), 0.1)
    with pytest.raises(ValueError, match="student_temp"):
        soft_cross_entropy(torch.rand(3, 4), torch.rand(3, 4), 0.0)
