"""Frozen-feature extraction for evaluation: class-folder datasets, the eval transform, batched CLS extraction.

Eval transform (DINO protocol): resize the short side to `resize_size` (bicubic, antialiased), centre crop
`size` x `size`, ImageNet mean/std. `size` is rounded to the nearest multiple of the patch size. `resize_size`
defaults to round(size * 256 / 224) (the 256 -> 224 protocol); pass `resize_size=size` to keep the whole image of a
square dataset, e.g. CIFAR at its native 32 px: size=32, resize_size=32 (with a patch-4 or patch-8 model).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from dinobridge.errors import DataError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# torchvision's ImageFolder extensions (matched case-insensitively)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


# ---------------------------------------------------------------------- transform
def round_to_patch(size: int, patch_size: int) -> int:
    """Nearest multiple of `patch_size` to `size` (halves round up), at least `patch_size`."""
    return max(patch_size, int(size / patch_size + 0.5) * patch_size)


def default_resize_size(size: int) -> int:
    """Short side before the centre crop in the DINO protocol: 256 for a 224 crop."""
    return int(round(size * 256 / 224))


def make_eval_transform(size: int = 224, patch_size: int = 16, resize_size: Optional[int] = None) -> Callable:
    """PIL image -> float tensor [3, S, S], S = `size` rounded to a multiple of `patch_size` (see module docstring)."""
    from torchvision import transforms

    if size < 1 or patch_size < 1:
        raise ValueError(f"size and patch_size: expected positive ints, got {size} and {patch_size}")
    crop = round_to_patch(size, patch_size)
    resize = default_resize_size(crop) if resize_size is None else int(resize_size)
    if resize < crop:
        raise ValueError(f"resize_size: expected >= the crop size {crop}, got {resize}")
    return transforms.Compose([
        transforms.Resize(resize, interpolation=transforms.InterpolationMode.BICUBIC, antialias=True),
        transforms.CenterCrop(crop),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


# ---------------------------------------------------------------------- class-folder dataset
def _load_rgb(path: Path) -> Any:
    from PIL import Image

    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except Exception as e:  # unreadable, truncated or not an image
        raise DataError(f"cannot read image {path}: {type(e).__name__}: {e}".splitlines()[0]) from None


def _images_under(folder: Path) -> list[Path]:
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found += [Path(dirpath) / f for f in filenames
                  if not f.startswith(".") and os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS]
    return sorted(found)


class ClassFolderDataset(Dataset):
    """`root/<class>/**/<image>` -> items (image after `transform`, class index).

    Classes are the sorted sub-folder names (hidden ones skipped), or the given `classes` list (e.g. the train set's,
    so that a val set uses the same indices; a val folder for a class not in the list is an error).
    Raises DataError for a missing root, no class folders, an empty class folder, or an unknown class.
    """

    def __init__(self, root: Union[str, os.PathLike], transform: Optional[Callable] = None,
                 classes: Optional[list[str]] = None, name: str = "root") -> None:
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise DataError(f"{name}: {self.root} is not a directory; expected a folder with one sub-folder per class")
        found = sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not found:
            raise DataError(f"{name}: no class sub-folders in {self.root}; expected {self.root}/<class>/<image>")
        self.classes = list(classes) if classes is not None else found
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        unknown = [c for c in found if c not in self.class_to_idx]
        if unknown:
            raise DataError(f"{name}: class folder(s) {unknown[:5]} in {self.root} are not among the "
                            f"{len(self.classes)} train classes")
        self.samples: list[tuple[Path, int]] = []
        for c in found:
            images = _images_under(self.root / c)
            if not images:
                raise DataError(f"{name}: class folder {self.root / c} holds no images "
                                f"({'/'.join(e[1:] for e in IMAGE_EXTENSIONS)})")
            self.samples += [(p, self.class_to_idx[c]) for p in images]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        path, label = self.samples[i]
        img = _load_rgb(path)
        return (self.transform(img) if self.transform is not None else img), label


class _Transformed(Dataset):
    """Applies `transform` to the image of each (image, label) item of `base`."""

    def __init__(self, base: Dataset, transform: Callable) -> None:
        self.base, self.transform = base, transform

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple[Any, Any]:
        img, label = self.base[i]
        return self.transform(img), label


# ---------------------------------------------------------------------- extraction
def _embed(model: nn.Module, x: Tensor) -> Tensor:
    out = model(x)
    if isinstance(out, dict):  # models whose forward returns forward_features' dict
        out = out["x_norm_clstoken"]
    if not isinstance(out, Tensor) or out.dim() != 2 or out.shape[0] != x.shape[0]:
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(f"model: expected model(x) to return features [B, D], got {shape}")
    return out


def extract_features(
    model: nn.Module,
    data: Union[Dataset, DataLoader],
    device: Union[str, torch.device] = "cpu",
    batch_size: int = 128,
    num_workers: int = 0,
    transform: Optional[Callable] = None,
    autocast_dtype: Optional[torch.dtype] = None,
    progress: bool = True,
    desc: str = "features",
) -> tuple[Tensor, Tensor]:
    """Run `model` (in eval mode, under inference_mode) over `data` -> (features [N, D] float32, labels [N] int64),
    both on the CPU, in dataset order.

    `data`: a Dataset of (image, label) items (batched here with `batch_size` / `num_workers`; `transform`, if
    given, is applied to each image) or a ready DataLoader (then `transform` must be None). `model(x)` must return
    [B, D] (the dinobridge ViT returns the normed CLS token). `autocast_dtype`: e.g. torch.bfloat16 for mixed
    precision; None runs in float32. The model's train/eval mode is restored afterwards.
    """
    from tqdm.auto import tqdm

    device = torch.device(device)
    if isinstance(data, DataLoader):
        if transform is not None:
            raise ValueError("transform: give it to the dataset when passing a DataLoader")
        loader = data
    else:
        if batch_size < 1 or num_workers < 0:
            raise ValueError(f"batch_size/num_workers: expected >= 1 / >= 0, got {batch_size} / {num_workers}")
        dataset = _Transformed(data, transform) if transform is not None else data
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                            pin_memory=device.type == "cuda", persistent_workers=False)
    amp = (torch.autocast(device_type=device.type, dtype=autocast_dtype) if autocast_dtype is not None
           else contextlib.nullcontext())
    feats, labels = [], []
    was_training = model.training
    model.eval()
    try:
        total = len(loader.dataset) if hasattr(loader.dataset, "__len__") else None  # type: ignore[arg-type]
        with torch.inference_mode(), amp, tqdm(total=total, desc=desc, unit="img", disable=not progress,
                                               dynamic_ncols=True) as bar:
            for images, y in loader:
                f = _embed(model, images.to(device, non_blocking=True))
                feats.append(f.float().cpu())
                labels.append(torch.as_tensor(y, dtype=torch.long).reshape(-1))
                bar.update(images.shape[0])
    finally:
        model.train(was_training)
    if not feats:
        raise DataError(f"{desc}: the dataset is empty")
    return torch.cat(feats), torch.cat(labels)
