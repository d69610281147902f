"""Images -> normalised model input: value range, ImageNet mean/std, patch-aligned size.

Accepted inputs: a float tensor [B, 3, H, W] or [3, H, W] whose value range is declared with `input_range`
("0_1", the torchvision `ToTensor` convention and the default, or "-1_1", the usual diffusion/VAE convention); a uint8
tensor (0..255, `input_range` is ignored); a PIL image; or a list of any of these. The range is never guessed: values
outside the declared range raise a `ValueError` that says which range they look like.

Sizing (`mode`, `size`; p = patch size; "nearest multiple" = floor(s / p + 0.5) * p, at least p):
  * mode="resize" (default), size=None: each side is resized to its nearest multiple of p (no-op when already one).
  * mode="resize", size=S: the short side goes to S keeping the aspect ratio, then each side to its nearest multiple.
  * mode="resize", size=(H, W): stretched to exactly (H, W), each rounded to its nearest multiple.
  * mode="crop", size=None: centre crop of each side down to a multiple of p (no resampling; loses < p pixels).
  * mode="crop", size=S or (H, W): resized (aspect kept) so that it covers the target, then centre cropped to it
    (the classic eval transform; size=S gives S x S, so images of any aspect ratio stack into one batch).
Resampling is bicubic with antialias, done in [0, 1] float32 and clamped to [0, 1] before normalising.
"""

from __future__ import annotations

from typing import Literal, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INPUT_RANGES = ("0_1", "-1_1")
RESIZE_MODES = ("resize", "crop")
_RANGE_TOL = 1e-3  # slack for float rounding at the range ends

ImageInput = Union[Tensor, "PIL.Image.Image", Sequence[Union[Tensor, "PIL.Image.Image"]]]  # noqa: F821
SizeArg = Optional[Union[int, Sequence[int]]]


def nearest_multiple(s: int, p: int) -> int:
    """Nearest multiple of `p` to `s` (halves round up), never below `p`."""
    return max(p, int(s / p + 0.5) * p)


def pil_to_uint8(img) -> Tensor:
    """PIL image (any mode) -> RGB uint8 tensor [3, H, W]."""
    arr = np.array(img.convert("RGB"), dtype=np.uint8, copy=True)  # [H, W, 3]
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def to_unit_range(x: Tensor, input_range: str = "0_1") -> Tensor:
    """Pixels [B, 3, H, W] -> float32 in [0, 1]. uint8 is divided by 255; floats are checked against `input_range`."""
    if input_range not in INPUT_RANGES:
        raise ValueError(f"input_range: expected one of {list(INPUT_RANGES)}, got {input_range!r}")
    if x.dtype == torch.uint8:
        return x.float() / 255.0
    if not x.is_floating_point():
        raise ValueError(f"images: expected a float or uint8 tensor, got dtype {x.dtype}")
    x = x.float()
    if x.numel() == 0:
        return x
    lo, hi = x.min().item(), x.max().item()
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise ValueError("images: tensor contains NaN or Inf values")
    want_lo, want_hi = (0.0, 1.0) if input_range == "0_1" else (-1.0, 1.0)
    if lo < want_lo - _RANGE_TOL or hi > want_hi + _RANGE_TOL:
        if hi > 1.0 + _RANGE_TOL and lo >= -_RANGE_TOL:
            hint = "they look like 0..255 pixels: pass a uint8 tensor or divide by 255"
        elif lo < -_RANGE_TOL and lo >= -1.0 - _RANGE_TOL and hi <= 1.0 + _RANGE_TOL:
            hint = "they look like [-1, 1] images: pass input_range='-1_1'"
        else:
            hint = "rescale the images to the declared range"
        raise ValueError(
            f"images: input_range={input_range!r} expects values in [{want_lo:g}, {want_hi:g}], "
            f"got min {lo:.4g} max {hi:.4g}; {hint}"
        )
    if input_range == "-1_1":
        x = (x + 1.0) * 0.5
    return x.clamp(0.0, 1.0)  # not in place: x may be the caller's tensor


def _as_pair(size: Union[int, Sequence[int]]) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    pair = tuple(int(s) for s in size)
    if len(pair) != 2:
        raise ValueError(f"size: expected an int or (height, width), got {size!r}")
    return pair  # type: ignore[return-value]


def target_geometry(h: int, w: int, patch_size: int, size: SizeArg = None,
                    mode: str = "resize") -> tuple[tuple[int, int], tuple[int, int]]:
    """(resize_to, crop_to) for an h x w image; see the module docstring. crop_to equals resize_to when not cropping."""
    p = patch_size
    if mode not in RESIZE_MODES:
        raise ValueError(f"mode: expected one of {list(RESIZE_MODES)}, got {mode!r}")
    if size is not None and min(_as_pair(size)) <= 0:
        raise ValueError(f"size: expected positive sizes, got {size!r}")
    if mode == "resize":
        if size is None:
            rh, rw = h, w
        elif isinstance(size, int):
            scale = size / min(h, w)
            rh, rw = round(h * scale), round(w * scale)
        else:
            rh, rw = _as_pair(size)
        out = (nearest_multiple(rh, p), nearest_multiple(rw, p))
        return out, out
    if size is None:
        if min(h, w) < p:
            raise ValueError(f"mode='crop': image {h}x{w} is smaller than the patch size {p}; use mode='resize'")
        out = (h // p * p, w // p * p)
        return (h, w), out
    th, tw = (nearest_multiple(s, p) for s in _as_pair(size))
    scale = max(th / h, tw / w)
    resize_to = (max(th, round(h * scale)), max(tw, round(w * scale)))
    return resize_to, (th, tw)


def resize_and_crop(x: Tensor, resize_to: tuple[int, int], crop_to: tuple[int, int]) -> Tensor:
    """[B, C, H, W] float -> bicubic-antialias resize to `resize_to`, then centre crop to `crop_to`."""
    if tuple(x.shape[-2:]) != tuple(resize_to):
        x = F.interpolate(x, size=resize_to, mode="bicubic", antialias=True, align_corners=False).clamp_(0.0, 1.0)
    top = (x.shape[-2] - crop_to[0]) // 2
    left = (x.shape[-1] - crop_to[1]) // 2
    return x[..., top:top + crop_to[0], left:left + crop_to[1]]


def normalize(x: Tensor, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> Tensor:
    """[B, 3, H, W] in [0, 1] -> (x - mean) / std per channel."""
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s


def _one_batch(x: Tensor) -> Tensor:
    """Any accepted single tensor -> [B, 3, H, W]."""
    if x.dim() == 3:
        x = x.unsqueeze(0)
    if x.dim() != 4:
        raise ValueError(f"images: expected a tensor [B, 3, H, W] or [3, H, W], got shape {tuple(x.shape)}")
    if x.shape[1] != 3:
        hint = " (channels-last? permute to [B, 3, H, W])" if x.shape[-1] == 3 else ""
        raise ValueError(f"images: expected 3 channels in dim 1, got shape {tuple(x.shape)}{hint}")
    return x


def preprocess(
    images: ImageInput,
    patch_size: int,
    input_range: Literal["0_1", "-1_1"] = "0_1",
    size: SizeArg = None,
    mode: Literal["resize", "crop"] = "resize",
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    device: Optional[Union[str, torch.device]] = None,
) -> Tensor:
    """Images -> normalised float32 batch [B, 3, H', W'] with H', W' multiples of `patch_size`.

    `images`: float/uint8 tensor [B, 3, H, W] or [3, H, W], a PIL image, or a list of these (each sized separately,
    so a list of differently sized images needs a `size` that makes them equal, e.g. mode="crop", size=224).
    `device`: where the work happens (default: the tensor's device, CPU for PIL).
    """
    if patch_size <= 0:
        raise ValueError(f"patch_size: expected a positive int, got {patch_size}")
    if isinstance(images, (list, tuple)):
        if not images:
            raise ValueError("images: got an empty list")
        parts = [preprocess(im, patch_size, input_range, size, mode, mean, std, device) for im in images]
        shapes = sorted({tuple(p.shape[-2:]) for p in parts})
        if len(shapes) > 1:
            raise ValueError(
                f"images: the list gives different sizes {shapes}; pass size=(H, W) or mode='crop' with a size"
            )
        return torch.cat(parts, dim=0)
    if not isinstance(images, Tensor):
        if not hasattr(images, "convert"):
            raise ValueError(f"images: expected a tensor, a PIL image or a list of them, got {type(images).__name__}")
        images = pil_to_uint8(images)
    x = _one_batch(images)
    if device is not None:
        x = x.to(device)
    x = to_unit_range(x, input_range)
    resize_to, crop_to = target_geometry(x.shape[-2], x.shape[-1], patch_size, size, mode)
    x = resize_and_crop(x, resize_to, crop_to)
    return normalize(x, mean, std).contiguous()
