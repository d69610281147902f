"""A folder of images for feature extraction: recursive listing, tolerant loading, a collate that drops failures."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import Tensor
from torch.utils.data import Dataset

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def find_images(root: str | os.PathLike, extensions: tuple[str, ...] = IMAGE_EXTENSIONS) -> list[Path]:
    """Every file under `root` (recursively, following no symlinked dirs) whose suffix is in `extensions` (any
    case), sorted by path relative to `root`."""
    root = Path(root)
    found = []
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            if os.path.splitext(name)[1].lower() in extensions:
                found.append(Path(dirpath) / name)
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def load_rgb(path: str | os.PathLike):
    """Open an image file fully (so truncated files fail here, not later) and convert it to RGB."""
    from PIL import Image

    with Image.open(path) as img:
        img.load()
        return img.convert("RGB")


class ImageFolderDataset(Dataset):
    """Item i -> (image tensor [3, H, W] or None when the file cannot be read, i, error message or None).

    `transform` maps a PIL RGB image to a tensor (e.g. pil -> uint8 -> `preprocess`). Errors are caught here so a
    corrupt file costs one skipped item, not the run.
    """

    def __init__(self, paths: list[Path], transform: Callable[[object], Tensor]) -> None:
        self.paths = list(paths)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[Optional[Tensor], int, Optional[str]]:
        try:
            return self.transform(load_rgb(self.paths[i])), i, None
        except Exception as e:  # any decoder error: unreadable, truncated, not an image, decompression bomb
            return None, i, f"{type(e).__name__}: {e}".splitlines()[0]


@dataclass
class FolderBatch:
    """Images [B, 3, H, W] that loaded (None when none did), their dataset indices, and the failures (index, error)."""

    images: Optional[Tensor]
    indices: list[int]
    failed: list[tuple[int, str]]


def collate_skipping_failures(items: list[tuple[Optional[Tensor], int, Optional[str]]]) -> FolderBatch:
    """Stack the images that loaded; keep the failures for reporting."""
    ok = [(x, i) for x, i, err in items if err is None]
    failed = [(i, err) for _, i, err in items if err is not None]
    images = torch.stack([x for x, _ in ok]) if ok else None
    return FolderBatch(images, [i for _, i in ok], failed)
