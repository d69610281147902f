"""Backbones (DINOv3 / DINOv2 ViT), heads and checkpoint loading."""

from dinobridge.models.vision_transformer import ARCHS, VisionTransformer, ViTConfig, build_vit
from dinobridge.models.checkpoint import load_pretrained, load_state_dict_file

__all__ = ["ARCHS", "VisionTransformer", "ViTConfig", "build_vit", "load_pretrained", "load_state_dict_file"]
