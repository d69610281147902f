"""Adapter giving Hugging Face DINOv2/DINOv3 models the official ``forward_features`` API."""

from __future__ import annotations

import json
import os

from torch import Tensor, nn

from .teacher import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["HFBackboneAdapter", "hf_image_stats"]


class HFBackboneAdapter(nn.Module):
    """Wraps a ``transformers`` ViT model (``DINOv3ViTModel``, ``Dinov2Model``, ...) whose output
    ``last_hidden_state`` is the final-normed token sequence ``[CLS, registers (R), patches (N)]``.

    forward_features: x [B, 3, H, W] -> {``x_norm_clstoken`` [B, D], ``x_storage_tokens`` [B, R, D],
    ``x_norm_patchtokens`` [B, N, D]}. ``R`` defaults to ``config.num_register_tokens`` (0 if absent).
    """

    def __init__(self, model: nn.Module, num_register_tokens: int | None = None) -> None:
        super().__init__()
        config = getattr(model, "config", None)
        if config is None:
            raise TypeError(f"model: expected a transformers model with a .config, got {type(model).__name__}")
        self.model = model
        r = num_register_tokens if num_register_tokens is not None else getattr(config, "num_register_tokens", 0)
        self.num_register_tokens = int(r or 0)
        self.embed_dim = int(config.hidden_size)
        self.patch_size = config.patch_size

    def forward_features(self, x: Tensor) -> dict[str, Tensor]:
        h = self.model(pixel_values=x).last_hidden_state  # [B, 1 + R + N, D]
        r = 1 + self.num_register_tokens
        return {"x_norm_clstoken": h[:, 0], "x_storage_tokens": h[:, 1:r], "x_norm_patchtokens": h[:, r:]}

    def forward(self, x: Tensor) -> Tensor:
        """x [B, 3, H, W] -> CLS features [B, D]."""
        return self.forward_features(x)["x_norm_clstoken"]


def hf_image_stats(name_or_path: str | os.PathLike) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``(image_mean, image_std)`` from a local ``preprocessor_config.json``, else the ImageNet statistics."""
    cfg = os.path.join(os.fspath(name_or_path), "preprocessor_config.json")
    if os.path.isfile(cfg):
        with open(cfg, encoding="utf-8") as f:
            data = json.load(f)
        if "image_mean" in data and "image_std" in data:
            return tuple(data["image_mean"]), tuple(data["image_std"])
    return IMAGENET_MEAN, IMAGENET_STD
