"""Random-resized crops and flips on the accelerator (``crops.gpu_crops``).

The loader workers draw the crop boxes and flips (`MultiCropAugmentation` with ``gpu_crops``) and ship the whole
uint8 image; here every crop is two batched float32 matmuls, ``Wy @ (image @ Wx^T)``, where Wy / Wx hold the 1-D
weights of torch's antialiased bicubic resize (``F.interpolate(mode="bicubic", antialias=True,
align_corners=False)``, the resize of the CPU path) placed at the box's rows / columns of the full (padded) image
axis, zero elsewhere.

Weights (the PIL-style "antialias" resampling of aten's UpSample kernels): for an axis window of length ``in_len``
resized to ``out``, ``scale = in_len / out``, ``support = 2 * max(scale, 1)``; output i has its centre at
``c = scale * (i + 0.5)`` and input tap j (0 <= j < in_len, window coordinates) the weight
``k((j - c + 0.5) / max(scale, 1))`` with the bicubic kernel of a = -0.5 (zero for |x| >= 2, so every tap outside
the support has weight 0), then normalised to sum 1 per output. Taps are clamped to the window (the crop), not to
the image, so pixels around the box never leak in. A horizontal flip reverses the output columns.

The CPU path resizes uint8 tensors with torch's uint8 kernel, which (like PIL) uses int16 fixed-point weights
(`fixed_point_weights`), runs the horizontal pass first and rounds / clamps to uint8 before the vertical pass (on
noisy images that differs from one float resize by up to ~20 units: bicubic overshoot is clamped in between). We
do the same: the fixed-point weights are computed exactly in int64 (`_kernel_numerators`), the matmuls sum
integers exactly in float32 (run at "highest" precision: no TF32), and each pass ends with the kernel's
``(acc + 2**(p-1)) >> p`` and clamp. The crops then equal the CPU ones bit for bit except where torch's double
weights sit on a rounding tie (about 1 pixel in 10**6 differs by 1 in our tests).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

BICUBIC_A = -0.5  # PIL's / torch antialias bicubic coefficient (plain bicubic uses -0.75)
# exact int64 fixed-point weights while 32768 * (bound on a row's kernel sum) fits in int64, else rounded float32
_INT64_BUDGET = 2**62
TABLE_BYTES = 16 * 2**20  # largest cached window table (all windows of one axis): 4 MiB for 32-px images at 32 px
CHUNK_BYTES = 256 * 2**20  # intermediates of one group of crops in `crop_batch`


def _bicubic_aa_kernel(x: torch.Tensor) -> torch.Tensor:
    """The bicubic kernel with a = -0.5 at `x` (any shape): 0 for |x| >= 2."""
    a = BICUBIC_A
    x = x.abs()
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return torch.where(x < 1.0, near, torch.where(x < 2.0, far, torch.zeros_like(x)))


def _kernel_numerators(
    in_len: torch.Tensor, out_size: int, full_len: int, offset: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact unnormalised weights: (K int64 [N, out, full], T int64 [N, out, 1] = K.sum(-1)), K / T the weights.

    The tap argument is x = (j - c + 0.5) / max(scale, 1) = num / den with the integers
    num = (2 j + 1) out - (2 i + 1) in_len and den = 2 max(in_len, out); the a = -0.5 kernel at num / den is
    (3 num^3 - 5 num^2 den + 2 den^3) / (2 den^3) for |x| < 1 and -(|num|^3 - 5 num^2 den + 8 |num| den^2
    - 4 den^3) / (2 den^3) for 1 <= |x| < 2, so K = 2 den^3 k(x) is an integer and no rounding happens at all.
    """
    in_len, offset = in_len.long(), offset.long()
    device = in_len.device
    rel = torch.arange(full_len, device=device)[None, :] - offset[:, None]  # [N, full] window coordinates
    odd_out = 2 * torch.arange(out_size, device=device) + 1  # [out]
    num = ((2 * rel + 1)[:, None, :] * out_size - (in_len[:, None] * odd_out[None, :])[:, :, None]).abs()
    den = (2 * torch.clamp(in_len, min=out_size)).view(-1, 1, 1)  # [N, 1, 1]
    num2, den2 = num * num, den * den
    near = 3 * num2 * num - 5 * num2 * den + 2 * den2 * den
    far = -(num2 * num - 5 * num2 * den + 8 * num * den2 - 4 * den2 * den)
    k = torch.where(num < den, near, torch.where(num < 2 * den, far, torch.zeros_like(num)))
    inside = (rel >= 0) & (rel < in_len[:, None])
    k = k * inside[:, None, :]
    return k, k.sum(-1, keepdim=True)


def _flip_rows(weights: torch.Tensor, flip: torch.Tensor | None) -> torch.Tensor:
    if flip is None:
        return weights
    return torch.where(flip.to(weights.device).view(-1, 1, 1), weights.flip(1), weights)


def resize_weights(
    in_len: torch.Tensor, out_size: int, full_len: int, offset: torch.Tensor, flip: torch.Tensor | None = None
) -> torch.Tensor:
    """1-D antialiased bicubic resize weights of N windows of a full-length axis (see the module docstring).

    Args:
        in_len: long [N], window lengths (>= 1); offset: long [N], window starts (offset + in_len <= full_len).
        out_size: output length; full_len: length of the axis the windows lie on (e.g. a padded image height).
        flip: bool [N] or None; True reverses the output order (a horizontal flip of the resized crop).

    Returns float32 [N, out_size, full_len]: row i holds output i's weights at the window's positions (sum 1), zero
    outside the window. ``W @ line`` resizes ``line[offset : offset + in_len]`` to out_size like F.interpolate.
    Computed from exact integers (`_kernel_numerators`), so each weight is the exact value rounded about twice.
    """
    if in_len.dim() != 1 or offset.shape != in_len.shape:
        raise ValueError(f"in_len/offset: expected two tensors [N], got {tuple(in_len.shape)} / {tuple(offset.shape)}")
    if out_size <= 0 or full_len <= 0:
        raise ValueError(f"out_size/full_len: expected positive ints, got {out_size} / {full_len}")
    k, total = _kernel_numerators(in_len, out_size, full_len, offset)
    weights = k.to(torch.float32) / total.clamp(min=1).to(torch.float32)
    return _flip_rows(weights, flip)


def _exact_fits(out_size: int, full_len: int) -> bool:
    """Whether the exact int64 fixed-point path cannot overflow for windows of up to full_len resized to out_size."""
    den = 2 * max(full_len, out_size)
    taps = 4 * max(full_len / out_size, 1.0) + 2  # taps inside the support, at most
    return 32768 * 2 * den**3 * taps * 4 < _INT64_BUDGET


def fixed_point_weights(
    in_len: torch.Tensor, out_size: int, full_len: int, offset: torch.Tensor, flip: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The int16 fixed-point form of `resize_weights` that torch's uint8 CPU kernel uses (as PIL does).

    Per window, the precision p is the largest value <= 22 with ``floor(0.5 + w_max * 2**(p + 1)) < 2**15`` (w_max
    the window's largest weight) and each weight becomes ``round_half_away_from_zero(w * 2**p)``. Computed in exact
    int64 arithmetic when the sizes allow (`_exact_fits`: windows up to ~1400 px for 96 px crops), else from the
    float32 weights (a tie may then round the other way: +-1 in one weight).

    Returns (integer-valued float32 [N, out, full], p long [N]).
    """
    if not _exact_fits(out_size, full_len):
        weights = resize_weights(in_len, out_size, full_len, offset)
        w_max = weights.amax(dim=(1, 2))  # [N]
        precision = torch.zeros_like(w_max, dtype=torch.long)
        for p in range(22):  # the condition is monotone in p: count the precisions that fit
            precision += ((w_max * float(2 ** (p + 1)) + 0.5).floor() < 2**15).long()
        scaled = weights * torch.exp2(precision.to(torch.float32)).view(-1, 1, 1)
        fixed = torch.where(scaled < 0, scaled - 0.5, scaled + 0.5).trunc()
        return _flip_rows(fixed, flip), precision
    k, total = _kernel_numerators(in_len, out_size, full_len, offset)
    total = total.clamp(min=1)
    k_max = k.amax(-1, keepdim=True)  # [N, out, 1]: each row's largest weight is k_max / total
    # floor(0.5 + (K / T) 2^(p+1)) < 2^15  <=>  K 2^(p+2) < 65535 T  <=>  K < ceil(65535 T / 2^(p+2)); per row,
    # then the smallest over rows (the precision of the window's largest weight: the condition is monotone)
    precision = torch.zeros_like(total)
    for p in range(22):
        precision += (k_max < -torch.div(-65535 * total, 2 ** (p + 2), rounding_mode="floor")).long()
    precision = precision.amin(dim=1, keepdim=True)  # [N, 1, 1]: one precision per window (w_max over all rows)
    scale = torch.pow(2, precision)
    # round_half_away(K 2^p / T) = sign(K) floor((2 |K| 2^p + T) / (2 T))
    fixed = torch.div(2 * k.abs() * scale + total, 2 * total, rounding_mode="floor") * torch.sign(k)
    return _flip_rows(fixed.to(torch.float32), flip), precision.view(-1)


def _shift_round_clamp(acc: torch.Tensor, precision: torch.Tensor) -> torch.Tensor:
    """(acc + 2**(p-1)) >> p, clamped to 0..255, in place on integer-valued float32 `acc` [..., 3, a, b]; p long
    [...] (one precision per crop)."""
    scale = torch.exp2(precision.to(torch.float32)).view(*precision.shape, 1, 1, 1)
    return acc.add_(scale * 0.5).div_(scale).floor_().clamp_(0.0, 255.0)


def _two_passes(src: torch.Tensor, wx_t: torch.Tensor, px: torch.Tensor, wy: torch.Tensor,
                py: torch.Tensor) -> torch.Tensor:
    """Horizontal pass, round, vertical pass, round: the CPU uint8 kernel's order (see the module docstring).

    src float32 [..., 3, H, W], wx_t [..., 1, W, S], wy [..., 1, S, H] (broadcast against src), px / py [...];
    returns integer-valued float32 [..., 3, S, S].
    """
    cols = _shift_round_clamp(torch.matmul(src, wx_t), px)  # [..., 3, H, S]
    return _shift_round_clamp(torch.matmul(wy, cols), py)


@contextlib.contextmanager
def _full_fp32_matmul() -> Iterator[None]:
    """float32 matmuls without TF32 inside the block (the trainer may allow TF32 globally)."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def resized_crops(
    images: torch.Tensor, sample_idx: torch.Tensor, boxes: torch.Tensor, flips: torch.Tensor, size: int
) -> torch.Tensor:
    """Crop, resize (antialiased bicubic) and flip N boxes of a batch of images, on the images' device.

    Args:
        images: uint8 [B, 3, H, W] (images smaller than H x W padded at the bottom / right; boxes stay inside).
        sample_idx: long [N], the image of each crop; boxes: long [N, 4] (top, left, h, w); flips: bool [N].
        size: output side S.

    Returns uint8 [N, 3, S, S]: the CPU path's crops (fixed-point passes, see the module docstring), up to +-1.
    Work and memory go in chunks of B crops (one float32 copy of B source images at a time).
    """
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images: expected uint8 [B, 3, H, W], got {images.dtype} {tuple(images.shape)}")
    if boxes.dim() != 2 or boxes.shape[1] != 4 or sample_idx.shape != boxes.shape[:1] or flips.shape != boxes.shape[:1]:
        raise ValueError(
            f"sample_idx/boxes/flips: expected [N] / [N, 4] / [N], got {tuple(sample_idx.shape)} / "
            f"{tuple(boxes.shape)} / {tuple(flips.shape)}"
        )
    n = boxes.shape[0]
    out = torch.empty((n, 3, size, size), dtype=torch.uint8, device=images.device)
    if n == 0:
        return out
    B, _, H, W = images.shape
    boxes = boxes.to(images.device)
    top, left, h, w = boxes.unbind(1)
    wy, py = fixed_point_weights(h, size, H, top)  # [N, S, H], [N]
    wx, px = fixed_point_weights(w, size, W, left, flips)  # [N, S, W], [N]
    wx_t = wx.transpose(1, 2)  # [N, W, S]
    sample_idx = sample_idx.to(images.device)
    with _full_fp32_matmul():
        for start in range(0, n, B):
            chunk = slice(start, min(start + B, n))
            src = images.index_select(0, sample_idx[chunk]).to(torch.float32)  # [n_c, 3, H, W]
            out[chunk] = _two_passes(src, wx_t[chunk].unsqueeze(1), px[chunk], wy[chunk].unsqueeze(1), py[chunk])
    return out


def window_table(out_size: int, full_len: int, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """`fixed_point_weights` of every window of a full_len axis, for lookup instead of per-batch arithmetic.

    Returns (float32 [L * L, out_size, L], precision long [L * L]) with L = full_len; the window (offset, in_len) is
    row ``offset * L + in_len - 1`` (rows of windows that do not fit are unused).
    """
    span = torch.arange(full_len, device=device)
    offset = span.repeat_interleave(full_len)
    in_len = (span + 1).repeat(full_len)
    fits = offset + in_len <= full_len
    return fixed_point_weights(torch.where(fits, in_len, 1), out_size, full_len, torch.where(fits, offset, 0))


def _axis_weights(
    start: torch.Tensor, length: torch.Tensor, size: int, full_len: int, flip: torch.Tensor | None, tables: dict | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed-point weights [N, size, full_len] and precisions [N] of N windows: from a cached `window_table` when
    `tables` is given and the table stays under TABLE_BYTES, else computed for these windows."""
    table_bytes = full_len * full_len * size * full_len * 4
    if tables is None or table_bytes > TABLE_BYTES:
        return fixed_point_weights(length, size, full_len, start, flip)
    key = (size, full_len, start.device)
    if key not in tables:
        tables[key] = window_table(size, full_len, start.device)
    weights, precision = tables[key]
    row = start * full_len + length - 1
    return _flip_rows(weights.index_select(0, row), flip), precision.index_select(0, row)


def crop_batch(
    images: torch.Tensor, boxes: torch.Tensor, flips: torch.Tensor, size: int, tables: dict | None = None
) -> torch.Tensor:
    """Crops of a collated batch: boxes / flips crop-major (index crop * B + sample) -> uint8 [n * B, 3, S, S].

    The same arithmetic as `resized_crops`, shaped for the trainer: the source images are converted once and
    broadcast over the crops (crop-major order means crop c of every sample is the batch in order), work goes in
    groups of crop indices of at most ~CHUNK_BYTES of intermediates, and with `tables` (a dict the caller keeps, e.g.
    one per `DeviceAugmentation`) the weights come from a cached `window_table` per (size, axis length, device).
    """
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images: expected uint8 [B, 3, H, W], got {images.dtype} {tuple(images.shape)}")
    B, _, H, W = images.shape
    n = boxes.shape[0]
    if boxes.dim() != 2 or boxes.shape[1] != 4 or flips.shape != (n,) or (B and n % B):
        raise ValueError(
            f"boxes/flips: expected [n * B, 4] / [n * B] crop-major with B={B}, got {tuple(boxes.shape)} / "
            f"{tuple(flips.shape)}"
        )
    out = torch.empty((n, 3, size, size), dtype=torch.uint8, device=images.device)
    if n == 0:
        return out
    n_crops = n // B
    boxes, flips = boxes.to(images.device), flips.to(images.device)
    top, left, h, w = boxes.unbind(1)
    wy, py = _axis_weights(top, h, size, H, None, tables)  # [n, S, H], [n]
    wx, px = _axis_weights(left, w, size, W, flips, tables)  # [n, S, W], [n]
    wy = wy.view(n_crops, B, 1, size, H)
    wx_t = wx.transpose(1, 2).view(n_crops, B, 1, W, size)
    py, px = py.view(n_crops, B), px.view(n_crops, B)
    src = images.to(torch.float32)  # [B, 3, H, W], broadcast over the crop indices
    per_crop = B * 3 * H * size * 4 * 2  # bytes of the horizontal pass and its rounding, per crop index
    step = max(1, CHUNK_BYTES // max(per_crop, 1))
    out = out.view(n_crops, B, 3, size, size)
    with _full_fp32_matmul():
        for start in range(0, n_crops, step):
            c = slice(start, min(start + step, n_crops))
            out[c] = _two_passes(src, wx_t[c], px[c], wy[c], py[c])  # src broadcast: [c, B, 3, S, S]
    return out.view(n, 3, size, size)
