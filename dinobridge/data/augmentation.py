"""DINOv3 multi-crop augmentation on uint8 tensors (torchvision.transforms.v2 semantics, faster CPU kernels).

Per image (official `DataAugmentationDINO`, see reference §5.1):

* 2 global crops: RandomResizedCrop(global_crops_size, scale=global_crops_scale, ratio (3/4, 4/3), bicubic,
  antialiased) + horizontal flip (p=0.5, or 0 when ``horizontal_flips`` is false).
* ``local_crops_number`` local crops: the same with local_crops_size / local_crops_scale — or, with
  ``localcrops_subset_of_globalcrops``, patch-aligned windows of the global crops (see below).
* Colour, per crop: ColorJitter(brightness 0.4, contrast 0.4, saturation 0.2, hue 0.1; random op order) applied with
  p=0.8, then grayscale with p=0.2. With ``share_color_jitter`` this is drawn once and applied to the whole image
  before cropping (as the official code does), and the crops get no further colour jitter.
* Gaussian blur (kernel 9, sigma ~ U(0.1, 2.0)) with the EFFECTIVE official probabilities: global crop 1: 0.0,
  global crop 2: 0.9, local crops: 0.5. (The official `GaussianBlur(p)` wrapper passes ``1 - p`` to RandomApply, so
  its nominal 1.0 / 0.1 / 0.5 become 0.0 / 0.9 / 0.5; these defaults reproduce the trained behaviour and are
  configurable.) Solarize (threshold 128/255) with p=0.2 on global crop 2 only.
* Normalise with rgb_mean / rgb_std -> float32 [3, S, S].

`localcrops_subset_of_globalcrops` (our reading of the official code): the first ``n_local // 2`` local crops are
windows of global crop 1, the rest of global crop 2, each of size local_crops_size taken *without resizing* from the
global crop after its flip and before its colour ops, at a top-left (row, col) that is a multiple of ``patch_size``,
so local tokens coincide with global tokens. The window position is uniform over all patch-aligned positions that fit
(the official code never picks the last one, an off-by-one we do not copy). Unlike the official code the local colour
ops run on the window rather than on the whole global crop before windowing (same law per pixel, except that the
contrast mean is the window's and blur borders are reflected at the window edge). ``offsets`` holds the (row, col)s.

Speed: geometry runs on uint8 tensors (the uint8 bicubic-antialias resize that torchvision v2 uses for uint8 tensors,
called directly; ~3x faster than on float); each crop is converted to float once; brightness / contrast / saturation /
grayscale work in place; hue is a fused HSV rotation without comparisons; the 9-tap blur is separable as shifted adds
(torchvision's hue and blur are 4-5x slower on CPU); normalisation is one in-place op per batch of crops. Results
match torchvision's float ops to ~1e-6 (not the PIL path bit for bit: PIL rounds to uint8 between ops). The ops are
small: run with one intra-op thread (DataLoader workers do by default); several threads on a busy machine stall.

``gpu_augmentation``: the same geometry and the same draws, but the crops are returned as uint8 with their
photometric parameters (``global_photometric`` / ``local_photometric``, see `photometric_tensors`); the colour ops,
blur, solarize and normalisation then run batched on the accelerator (`dinobridge.data.gpu_augmentation`), through
the kernels below, which also take one parameter per image of a batch [N, 3, H, W] as a tensor [N]. Factors and
sigmas are rounded to float32 when drawn, so both paths apply the same values (bit-identical results on the CPU).

``gpu_crops`` (needs ``gpu_augmentation``; refuses ``localcrops_subset_of_globalcrops``): the same draws again, but
no crop is made in the worker: it returns the whole uint8 image (after ``share_color_jitter``) with the crop boxes
and flips, and `dinobridge.data.gpu_crops` resizes on the accelerator (the fixed-point arithmetic of torch's uint8
antialiased bicubic kernel as float32 matmuls: equal to this path's crops up to +-1 on ~1 pixel in 10**6).

Randomness: every random number is drawn from one ``torch.Generator``: ``aug(img, generator_seed=s)`` uses a fresh
generator seeded with `s` (global RNG untouched; same seed -> same crops), ``aug(img)`` uses torch's global RNG (which
a DataLoader seeds per worker). For resumable pipelines pass ``generator_seed=derive_seed(seed, rank, sample_key)``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, fields
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision rgb_to_grayscale
JITTER_OPS = ("brightness", "contrast", "saturation", "hue")  # op codes 0..3 of a jitter order
IDENTITY_FACTORS = (1.0, 1.0, 1.0, 0.0)  # factors at which each jitter op is skipped

# crops.* keys consumed by other components (loader, mask grid, auxiliary augmentors), accepted and ignored here
_KEYS_USED_ELSEWHERE = (
    "global_local_crop_pairs_ratios",
    "teacher_to_student_resolution_scale",
    "use_resize_shuffle_augmentor",
    "resize_shuffle_augmentor_switch",
)


def derive_seed(*keys: int) -> int:
    """A 63-bit seed from integer keys (e.g. base seed, rank, sample index) through numpy's SeedSequence."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1, np.uint64)[0] >> np.uint64(1))


# ---------------------------------------------------------------------------------------------- config
@dataclass
class MultiCropConfig:
    """Multi-crop augmentation settings; the first fields are named like the DINOv3 ``crops.*`` keys."""

    global_crops_scale: tuple[float, float] = (0.32, 1.0)
    local_crops_number: int = 8
    local_crops_scale: tuple[float, float] = (0.05, 0.32)
    global_crops_size: int = 224
    local_crops_size: int = 96
    localcrops_subset_of_globalcrops: bool = False
    share_color_jitter: bool = False
    horizontal_flips: bool = True
    rgb_mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    rgb_std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    # True: the crops leave the workers as uint8 with their photometric parameters; `DeviceAugmentation`
    # (dinobridge.data.gpu_augmentation) applies colour / blur / solarize / normalisation on the accelerator
    gpu_augmentation: bool = False
    # True (needs gpu_augmentation): the workers only draw the crop boxes and flips and return the whole image; the
    # accelerator resizes (dinobridge.data.gpu_crops). Same draws; crops equal the CPU path's up to uint8 rounding
    gpu_crops: bool = False
    # not crops.* keys: official constants, exposed
    patch_size: int = 16  # window alignment for localcrops_subset_of_globalcrops
    crops_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    color_jitter_prob: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    grayscale_prob: float = 0.2
    blur_kernel_size: int = 9
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    global_crop_1_blur_prob: float = 0.0  # effective official value (nominal 1.0)
    global_crop_2_blur_prob: float = 0.9  # effective official value (nominal 0.1)
    local_crops_blur_prob: float = 0.5
    global_crop_2_solarize_prob: float = 0.2
    solarize_threshold: float = 128 / 255  # on [0, 1] images; official: 128 on uint8

    def __post_init__(self) -> None:
        for name in ("global_crops_scale", "local_crops_scale", "crops_ratio", "blur_sigma", "rgb_mean", "rgb_std"):
            setattr(self, name, tuple(float(v) for v in getattr(self, name)))
        for name in ("global_crops_size", "local_crops_size", "patch_size", "blur_kernel_size"):
            value = getattr(self, name)
            try:
                as_int = int(value)
            except TypeError:
                raise ValueError(
                    f"{name}: expected one positive int (multi-resolution lists are handled by the loader), got {value}"
                ) from None
            if as_int != value or as_int <= 0:
                raise ValueError(f"{name}: expected a positive int, got {value}")
            setattr(self, name, as_int)
        if self.local_crops_number < 0:
            raise ValueError(f"local_crops_number: expected >= 0, got {self.local_crops_number}")
        for name in ("global_crops_scale", "local_crops_scale", "crops_ratio", "blur_sigma"):
            lo_hi = getattr(self, name)
            if len(lo_hi) != 2 or not 0 < lo_hi[0] <= lo_hi[1]:
                raise ValueError(f"{name}: expected (low, high) with 0 < low <= high, got {lo_hi}")
        if len(self.rgb_mean) != 3 or len(self.rgb_std) != 3 or min(self.rgb_std) <= 0:
            raise ValueError(f"rgb_mean/rgb_std: expected 3 values each, std > 0, got {self.rgb_mean} / {self.rgb_std}")
        for name in ("color_jitter_prob", "grayscale_prob", "global_crop_1_blur_prob", "global_crop_2_blur_prob",
                     "local_crops_blur_prob", "global_crop_2_solarize_prob", "solarize_threshold"):  # fmt: skip
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name}: expected a value in [0, 1], got {getattr(self, name)}")
        for name in ("brightness", "contrast", "saturation"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: expected >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.hue <= 0.5:
            raise ValueError(f"hue: expected a value in [0, 0.5], got {self.hue}")
        if self.blur_kernel_size % 2 == 0:
            raise ValueError(f"blur_kernel_size: expected an odd size, got {self.blur_kernel_size}")
        smallest = min(self.global_crops_size, self.local_crops_size)
        if self.blur_kernel_size // 2 >= smallest:  # reflect padding needs pad < size
            raise ValueError(
                f"blur_kernel_size: expected < 2 * smallest crop size + 1 = {2 * smallest + 1}, "
                f"got {self.blur_kernel_size}"
            )
        if self.gpu_crops and not self.gpu_augmentation:
            raise ValueError("gpu_crops: expected gpu_augmentation=True too (device crops feed the device colour ops)")
        if self.gpu_crops and self.localcrops_subset_of_globalcrops:
            raise ValueError(
                "gpu_crops / localcrops_subset_of_globalcrops: expected at most one of them to be true, got both"
            )
        if self.localcrops_subset_of_globalcrops and self.local_crops_size > self.global_crops_size:
            raise ValueError(
                f"local_crops_size: expected <= global_crops_size={self.global_crops_size} with "
                f"localcrops_subset_of_globalcrops, got {self.local_crops_size}"
            )

    @classmethod
    def from_mapping(cls, crops: Any, ignore_unknown: bool = False, **overrides: Any) -> "MultiCropConfig":
        """Build from ``crops.*`` (a mapping, an OmegaConf node or a dataclass) plus `overrides` (e.g. patch_size).

        Keys that other components consume are skipped; other unknown keys raise unless `ignore_unknown`; gram
        teacher crops are not supported (NotImplementedError when enabled).
        """
        if dataclasses.is_dataclass(crops) and not isinstance(crops, type):
            crops = {f.name: getattr(crops, f.name) for f in fields(crops)}
        elif not hasattr(crops, "items"):
            raise TypeError(f"crops: expected a mapping or a dataclass, got {type(crops).__name__}")
        known = {f.name for f in fields(cls)}
        kwargs, unknown = {}, []
        for key, value in {**dict(crops.items()), **overrides}.items():
            if key in known:
                kwargs[key] = value
            elif key == "gram_teacher_crops_size":
                if value is not None:
                    raise NotImplementedError(
                        f"crops.gram_teacher_crops_size: gram crops are not supported, got {value}"
                    )
            elif key == "gram_teacher_no_distortions":
                if value:
                    raise NotImplementedError(
                        "crops.gram_teacher_no_distortions: gram crops are not supported, got true"
                    )
            elif key not in _KEYS_USED_ELSEWHERE:
                unknown.append(key)
        if unknown and not ignore_unknown:
            raise ValueError(f"crops: unknown keys {sorted(unknown)} (pass ignore_unknown=True to skip them)")
        return cls(**kwargs)


# ---------------------------------------------------------------------------------------------- float kernels
# All take / modify float32 images [..., 3, H, W] with values in [0, 1]: one image [3, H, W] (the worker path, with
# Python float parameters) or a batch [N, 3, H, W] with one parameter per image as a tensor [N] (the device path,
# dinobridge.data.gpu_augmentation). Both run the same arithmetic.
def _per_image(value: float | torch.Tensor, ndim: int) -> float | torch.Tensor:
    """A float as is; a tensor [N] of per-image values as [N, 1, ..., 1] (`ndim` dims) for broadcasting."""
    if torch.is_tensor(value):
        return value.view(-1, *([1] * (ndim - 1)))
    return value


def _gray(x: torch.Tensor) -> torch.Tensor:
    """Luma [..., H, W] with torchvision's weights."""
    wr, wg, wb = GRAY_WEIGHTS
    r, g, b = x.unbind(-3)
    return torch.mul(r, wr).add_(g, alpha=wg).add_(b, alpha=wb)


def _adjust_brightness_(x: torch.Tensor, factor: float | torch.Tensor) -> None:
    x.mul_(_per_image(factor, x.dim())).clamp_(0.0, 1.0)


def _adjust_contrast_(x: torch.Tensor, factor: float | torch.Tensor) -> None:
    wr, wg, wb = GRAY_WEIGHTS
    f = _per_image(factor, x.dim())
    mr, mg, mb = x.mean(dim=(-2, -1)).unbind(-1)  # [...] each
    gray_mean = mr * wr + mg * wg + mb * wb
    if gray_mean.dim():  # a batch: [N] -> [N, 1, 1, 1]
        gray_mean = gray_mean.view(-1, 1, 1, 1)
    x.mul_(f).add_(gray_mean * (1.0 - f)).clamp_(0.0, 1.0)


def _adjust_saturation_(x: torch.Tensor, factor: float | torch.Tensor) -> None:
    gray = _gray(x).unsqueeze_(-3)
    if torch.is_tensor(factor):  # addcmul_ rounds like add_(alpha=) on the CPU (one fused multiply-add)
        f = _per_image(factor, x.dim())
        x.mul_(f).addcmul_(gray, 1.0 - f).clamp_(0.0, 1.0)
    else:
        x.mul_(factor).add_(gray, alpha=1.0 - factor).clamp_(0.0, 1.0)


def _grayscale_(x: torch.Tensor) -> None:
    x.copy_(_gray(x).unsqueeze(-3).expand_as(x))


_HSV_CHANNEL_OFFSETS = torch.tensor([5.0, 3.0, 1.0]).view(3, 1, 1)


def _adjust_hue_(x: torch.Tensor, factor: float | torch.Tensor, channel_offsets: torch.Tensor | None = None) -> None:
    """Rotate the HSV hue by `factor` turns (|factor| <= 0.5; V and S kept), written into `x`.

    Hue h in sextants [0, 6); channel n of the result is ``max - chroma * clamp(2 - d, 0, 1)`` where d is the
    distance from ``k = n + h`` (n = 5, 3, 1 for R, G, B; k in [1, 11)) to the nearest of 2 and 8. Which channel is
    the maximum is found with ``1 + sign(v - max)`` (float ops; boolean masks are much slower on CPU), R before G
    before B as in torchvision. `channel_offsets`: `_HSV_CHANNEL_OFFSETS` on x's device (None: the CPU copy).
    """
    r, g, b = x.unbind(-3)
    mx = x.amax(dim=-3)
    chroma = mx - x.amin(dim=-3)
    is_r = torch.sign(r - mx).add_(1.0)
    is_g = torch.sign(g - mx).add_(1.0).mul_(1.0 - is_r)
    is_b = 1.0 - is_r - is_g
    # hue * chroma, per branch: (g - b), (b - r) + 2 chroma, (r - g) + 4 chroma
    h = (g - b).mul_(is_r)
    h.addcmul_((b - r).add_(chroma, alpha=2.0), is_g)
    h.addcmul_((r - g).add_(chroma, alpha=4.0), is_b)
    h.mul_(chroma.clamp(min=1e-12).reciprocal_()).add_(6.0 * _per_image(factor, h.dim()))  # chroma == 0: any h
    h.sub_(torch.floor(h * (1.0 / 6.0)).mul_(6.0))  # mod 6 on the grid
    k = h.unsqueeze(-3) + (_HSV_CHANNEL_OFFSETS if channel_offsets is None else channel_offsets)
    dist = torch.minimum((k - 2.0).abs_(), k.sub_(8.0).abs_())
    dist.neg_().add_(2.0).clamp_(0.0, 1.0)
    torch.addcmul(mx.unsqueeze(-3), chroma.unsqueeze(-3), dist, value=-1.0, out=x)


def _gaussian_kernel1d(kernel_size: int, sigma: float) -> list[float]:
    half = (kernel_size - 1) * 0.5
    pdf = [math.exp(-0.5 * ((i - half) / sigma) ** 2) for i in range(kernel_size)]
    total = sum(pdf)
    return [p / total for p in pdf]


def _gaussian_blur_(x: torch.Tensor, kernel_size: int, sigma: float) -> None:
    """Separable Gaussian blur with reflect padding (= torchvision gaussian_blur on float), written into `x`."""
    _blur_with_taps_(x, _gaussian_kernel1d(kernel_size, sigma))


def _blur_with_taps_(x: torch.Tensor, taps: Sequence[float] | torch.Tensor) -> None:
    """Separable blur with a symmetric 1-D kernel and reflect padding, written into `x`.

    `taps`: kernel_size floats, or per image a float32 tensor [N, kernel_size] for a batch x [N, 3, H, W]
    (``addcmul_`` with a tensor tap rounds like ``add_(alpha=)`` with a float one on the CPU).
    """
    H, W = x.shape[-2:]
    if torch.is_tensor(taps):
        kernel_size = taps.shape[-1]
        weights: Sequence[Any] = [_per_image(t, x.dim()) for t in taps.unbind(-1)]
    else:
        kernel_size, weights = len(taps), taps

    def add_pair_(acc: torch.Tensor, pair: torch.Tensor, w: Any) -> None:
        if torch.is_tensor(w):
            acc.addcmul_(pair, w)
        else:
            acc.add_(pair, alpha=w)

    r = kernel_size // 2
    padded = F.pad(x, (r, r, r, r), mode="reflect")  # [..., 3, H + 2r, W + 2r]
    rows = padded[..., r : r + W] * weights[r]  # horizontal pass over all (padded) rows
    for t in range(r):  # symmetric kernel: pair the taps
        add_pair_(rows, padded[..., t : t + W] + padded[..., kernel_size - 1 - t : kernel_size - 1 - t + W], weights[t])
    x.copy_(rows[..., r : r + H, :]).mul_(weights[r])
    for t in range(r):
        add_pair_(x, rows[..., t : t + H, :] + rows[..., kernel_size - 1 - t : kernel_size - 1 - t + H, :], weights[t])


def _solarize_(x: torch.Tensor, threshold: float) -> None:
    x.copy_(torch.where(x >= threshold, 1.0 - x, x))


# ---------------------------------------------------------------------------------------------- random parameters
@dataclass
class _Photometric:
    """Random draws of one crop's photometric pipeline."""

    jitter: bool
    order: list[int]  # permutation of (brightness, contrast, saturation, hue)
    factors: tuple[float, float, float, float]
    grayscale: bool
    blur_sigma: float | None
    solarize: bool


def photometric_tensors(params: Sequence[_Photometric], blur_kernel_size: int) -> dict[str, torch.Tensor]:
    """The draws of n crops as tensors (what a worker emits with ``gpu_augmentation``).

    Returns ``jitter`` bool [n], ``order`` long [n, 4] (op codes of `JITTER_OPS` in application order), ``factors``
    float32 [n, 4] (brightness, contrast, saturation, hue), ``grayscale`` bool [n], ``blur`` bool [n],
    ``blur_sigma`` float32 [n] (0 where no blur), ``blur_taps`` float32 [n, blur_kernel_size] (the normalised 1-D
    kernel the CPU path uses; 0 where no blur), ``solarize`` bool [n].
    """
    taps = torch.zeros((len(params), blur_kernel_size), dtype=torch.float32)
    for row, p in zip(taps, params):
        if p.blur_sigma is not None:
            row.copy_(torch.tensor(_gaussian_kernel1d(blur_kernel_size, p.blur_sigma)))
    return {
        "blur_taps": taps,
        "jitter": torch.tensor([p.jitter for p in params], dtype=torch.bool),
        "order": torch.tensor([list(p.order) for p in params], dtype=torch.long).view(len(params), 4),
        "factors": torch.tensor([list(p.factors) for p in params], dtype=torch.float32).view(len(params), 4),
        "grayscale": torch.tensor([p.grayscale for p in params], dtype=torch.bool),
        "blur": torch.tensor([p.blur_sigma is not None for p in params], dtype=torch.bool),
        "blur_sigma": torch.tensor([p.blur_sigma or 0.0 for p in params], dtype=torch.float32),
        "solarize": torch.tensor([p.solarize for p in params], dtype=torch.bool),
    }


def _f32(value: float) -> float:
    """`value` rounded to the nearest float32."""
    return float(np.float32(value))


def _as_uint8_chw(image: Any) -> torch.Tensor:
    """PIL image or uint8 tensor [C, H, W] (C = 1 or 3) -> uint8 tensor [3, H, W] (possibly a strided view)."""
    if isinstance(image, Image.Image):
        if image.mode != "RGB":
            image = image.convert("RGB")
        return torch.from_numpy(np.array(image)).permute(2, 0, 1)  # HWC memory: what the uint8 resize likes
    if isinstance(image, torch.Tensor):
        image = image.as_subclass(torch.Tensor)
        if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] not in (1, 3):
            raise ValueError(
                f"image: expected a PIL image or a uint8 tensor [3 or 1, H, W], got {image.dtype} {tuple(image.shape)}"
            )
        return image.expand(3, -1, -1) if image.shape[0] == 1 else image
    raise TypeError(f"image: expected a PIL image or a uint8 tensor, got {type(image).__name__}")


def _sample_crop_boxes(
    gen: torch.Generator | None, n: int, height: int, width: int, scale: Sequence[float], ratio: Sequence[float]
) -> list[tuple[int, int, int, int]]:
    """n RandomResizedCrop boxes (top, left, h, w), torchvision's recipe: 10 attempts, then a central crop."""
    attempts = 10
    u = torch.rand((n, attempts, 4), generator=gen).tolist()
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    boxes = []
    for draws in u:
        for u_scale, u_ratio, u_top, u_left in draws:
            target = area * (scale[0] + (scale[1] - scale[0]) * u_scale)
            aspect = math.exp(log_lo + (log_hi - log_lo) * u_ratio)
            w = round(math.sqrt(target * aspect))
            h = round(math.sqrt(target / aspect))
            if 0 < w <= width and 0 < h <= height:
                boxes.append((int(u_top * (height - h + 1)), int(u_left * (width - w + 1)), h, w))
                break
        else:
            in_ratio = width / height
            if in_ratio < min(ratio):
                w, h = width, round(width / min(ratio))
            elif in_ratio > max(ratio):
                w, h = round(height * max(ratio)), height
            else:
                w, h = width, height
            boxes.append(((height - h) // 2, (width - w) // 2, h, w))
    return boxes


# ---------------------------------------------------------------------------------------------- augmentation
class MultiCropAugmentation:
    """DINOv3 multi-crop augmentation: image -> dict of normalised float32 crops (see the module docstring).

    Call: ``aug(image, generator_seed=None)`` with a PIL image or a uint8 tensor [3, H, W] ([1, H, W] is broadcast).
    Returns ``{"global_crops": [2 x Tensor[3, G, G]], "global_crops_teacher": (same list),
    "local_crops": [n_local x Tensor[3, L, L]], "offsets": [(row, col)] * n_local or ()}``.
    With ``config.gpu_augmentation`` the crops are the uint8 crops before colour ops, and ``global_photometric`` /
    ``local_photometric`` hold their draws (`photometric_tensors`); the draws, and so the random stream, are the same.
    With ``config.gpu_crops`` the same draws give ``{"image": uint8 [3, H, W], "global_boxes": long [2, 4],
    "local_boxes": long [n_local, 4]`` (top, left, h, w) ``, "global_flips": bool [2], "local_flips": bool [n_local],
    "offsets": (), "global_photometric", "local_photometric"}`` and no crops.
    """

    n_global_crops = 2

    def __init__(self, config: MultiCropConfig | None = None, **overrides: Any) -> None:
        if config is None:
            config = MultiCropConfig(**overrides)
        elif overrides:
            config = dataclasses.replace(config, **overrides)
        self.config = config
        c = config
        self._flip_p = 0.5 if c.horizontal_flips else 0.0
        self._mean = torch.tensor(c.rgb_mean, dtype=torch.float32).view(1, 3, 1, 1)
        self._inv_std = 1.0 / torch.tensor(c.rgb_std, dtype=torch.float32).view(1, 3, 1, 1)
        self._factor_ranges = (
            (max(0.0, 1.0 - c.brightness), 1.0 + c.brightness),
            (max(0.0, 1.0 - c.contrast), 1.0 + c.contrast),
            (max(0.0, 1.0 - c.saturation), 1.0 + c.saturation),
            (-c.hue, c.hue),
        )
        self._ops = (_adjust_brightness_, _adjust_contrast_, _adjust_saturation_, _adjust_hue_)
        self._identity = IDENTITY_FACTORS

    @classmethod
    def from_config(cls, crops: Any, **overrides: Any) -> "MultiCropAugmentation":
        """From the ``crops.*`` config node (mapping, OmegaConf or dataclass); `overrides` e.g. ``patch_size=16``."""
        return cls(MultiCropConfig.from_mapping(crops, **overrides))

    def __repr__(self) -> str:
        return f"MultiCropAugmentation({self.config})"

    # ------------------------------------------------------------------ random draws
    def _sample_photometric(
        self, gen: torch.Generator | None, blur_probs: Sequence[float], solarize_probs: Sequence[float], jitter: bool
    ) -> list[_Photometric]:
        """One parameter set per crop; the number of draws does not depend on the config (stable streams).

        Factors and sigmas are rounded to float32 (the precision the kernels use them at), so the uint8 + parameter
        tensors of ``gpu_augmentation`` carry exactly the values this path applies.
        """
        c = self.config
        n = len(blur_probs)
        u = torch.rand((n, 9), generator=gen).tolist()
        orders = torch.rand((n, 4), generator=gen).argsort(dim=1).tolist()
        out = []
        for i in range(n):
            ui = u[i]
            factors = tuple(_f32(lo + (hi - lo) * ui[1 + j]) for j, (lo, hi) in enumerate(self._factor_ranges))
            out.append(
                _Photometric(
                    jitter=jitter and ui[0] < c.color_jitter_prob,
                    order=orders[i],
                    factors=factors,  # type: ignore[arg-type]
                    grayscale=jitter and ui[5] < c.grayscale_prob,
                    blur_sigma=_f32(c.blur_sigma[0] + (c.blur_sigma[1] - c.blur_sigma[0]) * ui[7])
                    if ui[6] < blur_probs[i]
                    else None,
                    solarize=ui[8] < solarize_probs[i],
                )
            )
        return out

    def _blur_solarize_probs(self) -> tuple[list[float], list[float]]:
        """Per-crop blur and solarize probabilities (global 1, global 2, locals)."""
        c = self.config
        n_l = c.local_crops_number
        blur_probs = [c.global_crop_1_blur_prob, c.global_crop_2_blur_prob] + [c.local_crops_blur_prob] * n_l
        solarize_probs = [0.0, c.global_crop_2_solarize_prob] + [0.0] * n_l
        return blur_probs, solarize_probs

    # ------------------------------------------------------------------ pipelines
    def _color_(self, x: torch.Tensor, p: _Photometric) -> None:
        """ColorJitter (random order) then grayscale, in place on a float image [3, H, W]."""
        if p.jitter:
            for op in p.order:
                if p.factors[op] != self._identity[op]:
                    self._ops[op](x, p.factors[op])
        if p.grayscale:
            _grayscale_(x)

    def _photometric_(self, batch_u8: torch.Tensor, params: Sequence[_Photometric]) -> torch.Tensor:
        """uint8 crops [n, 3, S, S] -> colour / blur / solarize -> normalised float32 crops [n, 3, S, S]."""
        x = batch_u8.to(torch.float32).mul_(1.0 / 255.0)
        k = self.config.blur_kernel_size
        for xi, p in zip(x, params):
            self._color_(xi, p)
            if p.blur_sigma is not None:
                _gaussian_blur_(xi, k, p.blur_sigma)
            if p.solarize:
                _solarize_(xi, self.config.solarize_threshold)
        return x.sub_(self._mean).mul_(self._inv_std)

    def _resized_crops(
        self, img: torch.Tensor, boxes: Sequence[tuple[int, int, int, int]], flips: Sequence[bool], size: int
    ) -> torch.Tensor:
        out = torch.empty((len(boxes), 3, size, size), dtype=torch.uint8)
        for o, (top, left, h, w), flip in zip(out, boxes, flips):
            # the call torchvision.transforms.v2.functional.resized_crop makes for uint8 CPU tensors (same output),
            # without its ~0.1 ms per-call overhead
            window = img[:, top : top + h, left : left + w].unsqueeze(0)
            crop = F.interpolate(window, size=(size, size), mode="bicubic", antialias=True)[0]
            o.copy_(crop.flip(-1) if flip else crop)
        return out

    def __call__(self, image: Any, generator_seed: int | None = None) -> dict[str, Any]:
        """Augment one image; `generator_seed` None draws from torch's global RNG, an int from a private generator."""
        c = self.config
        gen = None if generator_seed is None else torch.Generator().manual_seed(int(generator_seed))
        img = _as_uint8_chw(image)
        n_g, n_l = self.n_global_crops, c.local_crops_number

        # fixed draw order whatever the config: shared jitter, flips, global boxes, local geometry, photometric
        shared = self._sample_photometric(gen, [0.0], [0.0], jitter=True)[0]
        if c.share_color_jitter and (shared.jitter or shared.grayscale):
            x = img.to(torch.float32).mul_(1.0 / 255.0)
            self._color_(x, shared)
            img = x.mul_(255.0).round_().to(torch.uint8)
        height, width = img.shape[-2:]
        flips = (torch.rand(n_g + n_l, generator=gen) < self._flip_p).tolist()
        g_boxes = _sample_crop_boxes(gen, n_g, height, width, c.global_crops_scale, c.crops_ratio)
        if c.gpu_crops:  # the same draws; the accelerator resizes (localcrops_subset_of_globalcrops is refused)
            l_boxes = _sample_crop_boxes(gen, n_l, height, width, c.local_crops_scale, c.crops_ratio)
            params = self._sample_photometric(gen, *self._blur_solarize_probs(), jitter=not c.share_color_jitter)
            return {
                "image": img,
                "global_boxes": torch.tensor(g_boxes, dtype=torch.long).view(n_g, 4),
                "local_boxes": torch.tensor(l_boxes, dtype=torch.long).view(n_l, 4),
                "global_flips": torch.tensor(flips[:n_g], dtype=torch.bool),
                "local_flips": torch.tensor(flips[n_g:], dtype=torch.bool),
                "offsets": (),
                "global_photometric": photometric_tensors(params[:n_g], c.blur_kernel_size),
                "local_photometric": photometric_tensors(params[n_g:], c.blur_kernel_size),
            }
        global_u8 = self._resized_crops(img, g_boxes, flips[:n_g], c.global_crops_size)

        offsets: Any = ()
        if c.localcrops_subset_of_globalcrops:
            size, step = c.local_crops_size, c.patch_size
            n_pos = (c.global_crops_size - size) // step + 1
            pos = (torch.randint(0, n_pos, (n_l, 2), generator=gen) * step).tolist()
            source = [0] * (n_l // 2) + [1] * (n_l - n_l // 2)
            local_u8 = torch.empty((n_l, 3, size, size), dtype=torch.uint8)
            for o, s, (row, col) in zip(local_u8, source, pos):
                o.copy_(global_u8[s, :, row : row + size, col : col + size])
            offsets = [tuple(p) for p in pos]
        else:
            l_boxes = _sample_crop_boxes(gen, n_l, height, width, c.local_crops_scale, c.crops_ratio)
            local_u8 = self._resized_crops(img, l_boxes, flips[n_g:], c.local_crops_size)

        params = self._sample_photometric(gen, *self._blur_solarize_probs(), jitter=not c.share_color_jitter)
        if c.gpu_augmentation:  # the same draws, applied later on the accelerator
            global_crops = list(global_u8.unbind(0))
            return {
                "global_crops": global_crops,
                "global_crops_teacher": global_crops,
                "local_crops": list(local_u8.unbind(0)) if n_l else [],
                "offsets": offsets,
                "global_photometric": photometric_tensors(params[:n_g], c.blur_kernel_size),
                "local_photometric": photometric_tensors(params[n_g:], c.blur_kernel_size),
            }
        global_crops = list(self._photometric_(global_u8, params[:n_g]).unbind(0))
        local_crops = list(self._photometric_(local_u8, params[n_g:]).unbind(0)) if n_l else []
        return {
            "global_crops": global_crops,
            "global_crops_teacher": global_crops,
            "local_crops": local_crops,
            "offsets": offsets,
        }
