"""Frozen DINO features: preprocessing, the `FeatureExtractor` wrapper and the `dinobridge extract` command."""

from dinobridge.features.extract_cli import main
from dinobridge.features.extractor import Features, FeatureExtractor, resolve_layers
from dinobridge.features.image_folder import IMAGE_EXTENSIONS, ImageFolderDataset, find_images
from dinobridge.features.preprocess import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    nearest_multiple,
    normalize,
    pil_to_uint8,
    preprocess,
    target_geometry,
    to_unit_range,
)

__all__ = [
    "IMAGE_EXTENSIONS", "IMAGENET_MEAN", "IMAGENET_STD", "Features", "FeatureExtractor", "ImageFolderDataset",
    "find_images", "main", "nearest_multiple", "normalize", "pil_to_uint8", "preprocess", "resolve_layers",
    "target_geometry", "to_unit_range",
]
