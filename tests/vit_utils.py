"""Test helpers shared by the parity and export tests."""

import numpy as np
import torch
from PIL import Image

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


def write_two_class_folders(root, n_per_class: int = 8, size: int = 32, classes=("black", "white")):
    """train/ and val/ with a dark and a bright class (small noise so images differ); returns (train, val) dirs."""
    rng = np.random.default_rng(0)
    for split, n in (("train", n_per_class), ("val", n_per_class // 2)):
        for cls, base in zip(classes, (10, 245)):
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                arr = np.clip(base + rng.integers(-10, 11, (size, size + 8, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(arr).save(d / f"{i}.png")
    return root / "train", root / "val"
