"""Test helpers shared by the parity and export tests."""

import torch

from dinobridge.models import VisionTransformer


def randomise_vit(model: VisionTransformer, seed: int = 0) -> VisionTransformer:
    """Non-trivial values everywhere: norm weights near 1, LayerScale 0.5..0.8, every other tensor (K bias too) random."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("norm1.weight", "norm2.weight", "norm.weight")):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith("gamma"):
                p.copy_(0.5 + 0.3 * torch.rand(p.shape, generator=g))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model
