"""Photometric augmentation of a collated batch on the accelerator (``crops.gpu_augmentation``).

With ``crops.gpu_augmentation`` the loader workers decode, crop, resize and flip, and draw every photometric
parameter with the same generator calls as the CPU path (so the random stream, and exact resume, do not depend on
where the colour ops run); the crops leave the workers as uint8 together with their draws. `DeviceAugmentation`
then applies, batched on the crops' device: colour jitter (in each crop's own op order), grayscale, Gaussian blur
(per-crop sigma), solarize and normalisation, with the very kernels of the CPU path (dinobridge.data.augmentation,
which take one parameter per image as a tensor [N]). Given the same draws the output equals the CPU path's up to
float rounding (no uint8 rounding happens on either path between the uint8 crop and the normalised output).

Work is grouped, not masked: the collator (in the workers) turns the draws into a `photometric_plan`: for each of
the 4 jitter steps and each op, the indices of the crops that apply that op at that step with a non-identity factor,
then the indices of the grayscale, blur and solarize crops. The device gathers each group, runs the op on it and
scatters it back, so every crop runs each op at most once; the group sizes are Python ints, so nothing waits on the
device. ``share_color_jitter`` stays on the CPU (it colours the whole image before cropping, as the official code).

Where the run compiles (``train.compile`` on CUDA), the same ops run instead as one compiled function over every
crop (`photometric_dense`: each op computed for all crops and kept where the crop's plan has it, `torch.where`),
which inductor fuses into a few kernels: the grouped form launches ~200 small kernels per crop set, and at short
steps those launches, not the device, set the pace. Both forms give the same images (a test compares them).

With ``crops.gpu_crops`` the workers do not crop either: the batch carries the whole images, the crop boxes and the
flips, and `DeviceAugmentation` first makes the uint8 crops on the device (dinobridge.data.gpu_crops).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import torch

from dinobridge.data.augmentation import (
    IDENTITY_FACTORS,
    MultiCropConfig,
    _adjust_brightness_,
    _adjust_contrast_,
    _adjust_hue_,
    _adjust_saturation_,
    _blur_with_taps_,
    _grayscale_,
    _solarize_,
)
from dinobridge.data.gpu_crops import crop_batch

GEOMETRY_KEYS = ("images", "image_sizes", "global_boxes", "local_boxes", "global_flips", "local_flips")  # gpu_crops
PARAM_KEYS = ("jitter", "order", "factors", "grayscale", "blur", "blur_sigma", "blur_taps", "solarize")
DENSE_KEYS = ("jitter", "order", "factors", "grayscale", "blur", "blur_taps", "solarize")  # photometric_dense
N_JITTER_GROUPS = 16  # (step, op) for 4 steps x 4 ops; then grayscale, blur, solarize
CROP_SETS = ("global", "local")


def photometric_plan(params: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Group the crops of a batch by the operation they need (CPU; see the module docstring).

    Args:
        params: `photometric_tensors` fields for N crops (``jitter`` [N], ``order`` [N, 4], ``factors`` [N, 4],
            ``grayscale`` / ``blur`` / ``solarize`` [N], ``blur_sigma`` [N], ``blur_taps`` [N, K]).

    Returns ``plan_indices`` long [T] (crop indices of the 19 groups, concatenated), ``plan_values`` float32 [T] (the
    op's factor for a jitter group, the sigma for the blur group, 0 otherwise), ``plan_splits`` (19 Python ints:
    group sizes) and ``plan_blur_taps`` float32 [n_blur, K] (the blur group's kernels). Groups: (step s, op o) for
    s, o in 0..3 (index 4 s + o), then grayscale, blur, solarize.
    """
    factors = params["factors"].to(torch.float32)
    order = params["order"]
    active = params["jitter"].unsqueeze(1) & (factors != torch.tensor(IDENTITY_FACTORS))  # [N, 4]
    indices, values = [], []
    for step in range(4):
        for op in range(4):
            idx = ((order[:, step] == op) & active[:, op]).nonzero().flatten()
            indices.append(idx)
            values.append(factors[idx, op])
    for flag, value in (("grayscale", None), ("blur", "blur_sigma"), ("solarize", None)):
        idx = params[flag].nonzero().flatten()
        indices.append(idx)
        values.append(params[value][idx].to(torch.float32) if value else torch.zeros(len(idx)))
    return {
        "plan_blur_taps": params["blur_taps"][indices[N_JITTER_GROUPS + 1]].to(torch.float32),
        "plan_indices": torch.cat(indices),
        "plan_values": torch.cat(values),
        "plan_splits": [len(i) for i in indices],
    }


def collate_photometric(per_sample: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, Any]:
    """B per-image draws (n crops each) -> crop-major fields [n * B, ...] (index crop * B + sample) plus the plan."""
    out: dict[str, Any] = {}
    for key in PARAM_KEYS:
        stacked = torch.stack([d[key] for d in per_sample], dim=1)  # [n, B, ...]
        out[key] = stacked.reshape(-1, *stacked.shape[2:])
    out.update(photometric_plan(out))
    return out


def _check_crops(crops: torch.Tensor) -> None:
    if crops.dtype != torch.uint8 or crops.dim() != 4 or crops.shape[1] != 3:
        raise ValueError(f"crops: expected uint8 [N, 3, S, S], got {crops.dtype} {tuple(crops.shape)}")


def _jitter_kernels(device: torch.device) -> tuple[Callable[[torch.Tensor, torch.Tensor], None], ...]:
    """The in-place colour-jitter kernels in op-code order (brightness, contrast, saturation, hue), one factor per
    image; `_HSV_CHANNEL_OFFSETS` (5, 3, 1) is made on the device: no host copy, which could wait for the device."""
    hsv_offsets = torch.arange(5, 0, -2, dtype=torch.float32, device=device).view(3, 1, 1)
    return (
        _adjust_brightness_, _adjust_contrast_, _adjust_saturation_,
        lambda sub, factor: _adjust_hue_(sub, factor, hsv_offsets),
    )  # fmt: skip


def _on_subset_(x: torch.Tensor, idx: torch.Tensor, fn: Callable[[torch.Tensor], None]) -> None:
    """Run the in-place `fn` on the images ``x[idx]`` (all of x when idx covers it, as nonzero() sorts)."""
    if idx.shape[0] == x.shape[0]:
        fn(x)
        return
    sub = x.index_select(0, idx)
    fn(sub)
    x.index_copy_(0, idx, sub)


def apply_photometric(
    crops: torch.Tensor,
    params: Mapping[str, Any],
    *,
    mean: torch.Tensor,
    inv_std: torch.Tensor,
    solarize_threshold: float,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """uint8 crops [N, 3, S, S] + their plan -> normalised crops [N, 3, S, S] (float32, or `dtype`).

    Args:
        crops: uint8 crops on the target device (an empty tensor passes through: no crops of this kind).
        params: a `collate_photometric` dict (``plan_indices`` / ``plan_values`` may be on the CPU, pinned).
        mean, inv_std: float32 [1, 3, 1, 1] on the crops' device (``rgb_mean``, ``1 / rgb_std``).
        solarize_threshold: the `MultiCropConfig` value.
        dtype: output dtype (the collator's cast on the CPU path; None = float32).
    """
    if crops.numel() == 0:
        return crops
    _check_crops(crops)
    splits = [int(n) for n in params["plan_splits"]]
    if len(splits) != N_JITTER_GROUPS + 3:
        raise ValueError(f"params['plan_splits']: expected {N_JITTER_GROUPS + 3} group sizes, got {len(splits)}")
    device = crops.device
    indices = params["plan_indices"].to(device, non_blocking=True).split(splits)
    values = params["plan_values"].to(device, non_blocking=True).split(splits)
    blur_taps = params["plan_blur_taps"].to(device, non_blocking=True)
    kernels = _jitter_kernels(device)

    x = crops.to(torch.float32).mul_(1.0 / 255.0)
    for group in range(N_JITTER_GROUPS):  # step-major: the ops of step s before those of step s + 1
        if splits[group]:
            kernel, factor = kernels[group % 4], values[group]
            _on_subset_(x, indices[group], lambda sub: kernel(sub, factor))
    gray, blur, solarize = N_JITTER_GROUPS, N_JITTER_GROUPS + 1, N_JITTER_GROUPS + 2
    if splits[gray]:
        _on_subset_(x, indices[gray], _grayscale_)
    if splits[blur]:
        _on_subset_(x, indices[blur], lambda sub: _blur_with_taps_(sub, blur_taps))
    if splits[solarize]:
        _on_subset_(x, indices[solarize], lambda sub: _solarize_(sub, solarize_threshold))
    x.sub_(mean).mul_(inv_std)
    return x if dtype is None or dtype == torch.float32 else x.to(dtype)


def photometric_dense(
    crops: torch.Tensor,
    params: Mapping[str, torch.Tensor],
    mean: torch.Tensor,
    inv_std: torch.Tensor,
    solarize_threshold: float,
) -> torch.Tensor:
    """`apply_photometric` without groups: every op on every crop, kept where the crop has it (static shapes).

    Args:
        crops: uint8 [N, 3, S, S]. params: the per-crop draws (``jitter``, ``order``, ``factors``, ``grayscale``,
            ``blur``, ``blur_taps``, ``solarize``; `photometric_tensors` fields, collated) on the crops' device.
        mean, inv_std: float32 [1, 3, 1, 1]. Returns float32 [N, 3, S, S].
    """
    kernels = _jitter_kernels(crops.device)
    factors = params["factors"].to(torch.float32)
    active = params["jitter"].unsqueeze(1) & (factors != torch.tensor(IDENTITY_FACTORS, device=factors.device))

    def where_(flag: torch.Tensor, fn: Callable[[torch.Tensor], None], x: torch.Tensor) -> torch.Tensor:
        y = x.clone()
        fn(y)
        return torch.where(flag.view(-1, 1, 1, 1), y, x)

    x = crops.to(torch.float32).mul_(1.0 / 255.0)
    for step in range(4):
        for op, kernel in enumerate(kernels):
            here = active[:, op] & (params["order"][:, step] == op)
            x = where_(here, lambda y: kernel(y, factors[:, op]), x)
    x = where_(params["grayscale"], _grayscale_, x)
    x = where_(params["blur"], lambda y: _blur_with_taps_(y, params["blur_taps"].to(torch.float32)), x)
    x = where_(params["solarize"], lambda y: _solarize_(y, solarize_threshold), x)
    return x.sub_(mean).mul_(inv_std)


class DeviceAugmentation:
    """The device half of ``crops.gpu_augmentation``: ``batch = device_augment(batch)`` right after the batch is on
    the device; a no-op returning `batch` itself when the key is off.

    When on, replaces ``global_crops`` / ``local_crops`` (uint8 [n * B, 3, S, S]) by normalised crops (float32, or
    `dtype`: what the CPU path's collator would give) and removes ``global_photometric`` / ``local_photometric``.
    With ``config.gpu_crops`` the uint8 crops are first made here from ``images`` / ``*_boxes`` / ``*_flips`` (see
    `collate_multicrop`), which are removed with ``image_sizes``; the output has the keys, shapes and dtypes of the
    ``gpu_augmentation`` path (``local_crops`` an empty float32 tensor [0] without local crops).

    Args:
        config: the run's `MultiCropConfig` (``multicrop_config(cfg)``; ``augment.config`` in the trainer).
        dtype: output dtype of the crops, as the collator's ``dtype`` (None = float32).
        compile: on CUDA devices, run `photometric_dense` compiled (``train.compile``); elsewhere, or when False,
            the grouped `apply_photometric`.
    """

    def __init__(self, config: MultiCropConfig, dtype: torch.dtype | None = None, compile: bool = False) -> None:
        self.enabled = bool(config.gpu_augmentation)
        self.compile = bool(compile)
        self._compiled: Callable[..., torch.Tensor] | None = None
        self.gpu_crops = bool(config.gpu_crops)
        self.crop_sizes = {"global": config.global_crops_size, "local": config.local_crops_size}
        self._weight_tables: dict = {}  # gpu_crops: resize weights of every window, per (size, axis, device)
        self.solarize_threshold = config.solarize_threshold
        self.dtype = dtype
        # the CPU path's constants (MultiCropAugmentation), copied to each device once
        mean = torch.tensor(config.rgb_mean, dtype=torch.float32).view(1, 3, 1, 1)
        inv_std = 1.0 / torch.tensor(config.rgb_std, dtype=torch.float32).view(1, 3, 1, 1)
        self._constants: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {mean.device: (mean, inv_std)}

    def __repr__(self) -> str:
        return (f"DeviceAugmentation(enabled={self.enabled}, gpu_crops={self.gpu_crops}, dtype={self.dtype}, "
                f"compile={self.compile})")

    def _make_crops(self, out: dict[str, Any]) -> None:
        """``crops.gpu_crops``: the batch's geometry keys -> uint8 ``global_crops`` / ``local_crops``, in place."""
        missing = [key for key in GEOMETRY_KEYS if key not in out]
        if missing:
            raise ValueError(
                f"batch: expected {missing} (crops.gpu_crops is on, so the loader's augmentation must run with "
                f"gpu_crops=True too)"
            )
        geometry = {key: out.pop(key) for key in GEOMETRY_KEYS}
        images = geometry["images"]
        for crop_set in CROP_SETS:
            boxes, flips = geometry[f"{crop_set}_boxes"], geometry[f"{crop_set}_flips"]
            if boxes.shape[0] == 0:  # what collating zero crops gives on the other paths
                out[f"{crop_set}_crops"] = torch.empty(0, device=images.device)
            else:
                size = self.crop_sizes[crop_set]
                out[f"{crop_set}_crops"] = crop_batch(images, boxes, flips, size, self._weight_tables)

    def _constants_on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._constants:
            mean, inv_std = next(iter(self._constants.values()))
            self._constants[device] = (mean.to(device), inv_std.to(device))
        return self._constants[device]

    @torch.no_grad()
    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        if not self.enabled:
            return batch
        out = dict(batch)
        if self.gpu_crops:
            self._make_crops(out)
        for crop_set in CROP_SETS:
            params = out.pop(f"{crop_set}_photometric", None)
            if params is None:
                raise ValueError(
                    f"batch: expected '{crop_set}_photometric' (crops.gpu_augmentation is on, so the loader's "
                    f"augmentation must run with gpu_augmentation=True too)"
                )
            crops = out[f"{crop_set}_crops"]
            mean, inv_std = self._constants_on(crops.device)
            if self.compile and crops.device.type == "cuda" and crops.numel():
                out[f"{crop_set}_crops"] = self._dense(crops, params, mean, inv_std)
            else:
                out[f"{crop_set}_crops"] = apply_photometric(
                    crops, params, mean=mean, inv_std=inv_std, solarize_threshold=self.solarize_threshold,
                    dtype=self.dtype,
                )  # fmt: skip
        return out

    def _dense(self, crops: torch.Tensor, params: Mapping[str, Any], mean: torch.Tensor,
               inv_std: torch.Tensor) -> torch.Tensor:
        """The compiled `photometric_dense` (one graph per crop shape; the draws are copied to the device first)."""
        _check_crops(crops)
        if self._compiled is None:
            self._compiled = torch.compile(photometric_dense, dynamic=False)
        draws = {key: params[key].to(crops.device, non_blocking=True) for key in DENSE_KEYS}
        x = self._compiled(crops, draws, mean, inv_std, self.solarize_threshold)
        return x if self.dtype is None or self.dtype == torch.float32 else x.to(self.dtype)
