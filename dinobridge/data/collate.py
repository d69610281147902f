"""Multi-crop batch collation with iBOT masks (DINOv3 `collate_data_and_cast` equivalent).

`collate_multicrop` is the pure function (all randomness from the generator passed in); `MultiCropCollator` is the
picklable callable to hand to a DataLoader as ``collate_fn``: it holds the masking config and derives one generator
per batch from ``(seed, rank, batch_index)``.

Seeding (MultiCropCollator)
---------------------------
The masks of a batch are a pure function of ``(seed, rank, batch_index)``: the generator is
``numpy.random.default_rng([seed, rank, batch_index])`` (a SeedSequence over the three integers). `batch_index` is
either passed explicitly (``collator(samples, batch_index=i)``) or counted:
``batch_index = start_step + calls * num_workers + worker_id``, where `calls` counts the calls made by this copy of
the collator and (worker_id, num_workers) come from ``torch.utils.data.get_worker_info()`` ((0, 1) in the main
process). This matches the DataLoader's default in-order round-robin dispatch of batches to workers, so the masks
do not depend on the number of workers. It assumes one long-lived loader iterator (an infinite sampler, as DINOv3
uses); when a new iterator is created (resume, or a new epoch with non-persistent workers) call
``set_step(batches_already_consumed)`` first, because every iterator starts workers from a fresh copy of the
main-process collator. ``state_dict()`` / ``load_state_dict()`` save and restore (seed, rank, step) — the step is
only tracked when collation runs in the main process (num_workers=0); with workers the trainer knows the step.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import torch

from dinobridge.data.gpu_augmentation import CROP_SETS, collate_photometric
from dinobridge.data.masking import BlockMaskGenerator, Rng, as_numpy_rng


def mask_counts(
    n_images: int, n_tokens: int, mask_ratio_min_max: Sequence[float], mask_sample_probability: float
) -> list[int]:
    """Masked-patch counts of the masked images of a batch (DINOv3 §1.5).

    ``n_masked = int(n_images * mask_sample_probability)``; ``probs = linspace(r_min, r_max, n_masked + 1)``
    (float32, as the official code); image i < n_masked gets ``int(n_tokens * probs[i + 1])`` patches.
    """
    r_min, r_max = (float(v) for v in mask_ratio_min_max)
    if not 0.0 <= r_min <= r_max <= 1.0:
        raise ValueError(f"mask_ratio_min_max: expected 0 <= min <= max <= 1, got {tuple(mask_ratio_min_max)}")
    if not 0.0 <= mask_sample_probability <= 1.0:
        raise ValueError(f"mask_sample_probability: expected a value in [0, 1], got {mask_sample_probability}")
    n_masked = int(n_images * mask_sample_probability)
    probs = torch.linspace(r_min, r_max, n_masked + 1, dtype=torch.float32)
    return (n_tokens * probs[1:]).long().tolist()


def _unwrap(sample: Any) -> Mapping[str, Any]:
    # accept the augmentation's dict, or the official (dict, target) pair
    if isinstance(sample, Mapping):
        return sample
    if isinstance(sample, (tuple, list)) and sample and isinstance(sample[0], Mapping):
        return sample[0]
    raise TypeError(
        f"samples: expected dicts from the augmentation or (dict, target) pairs, got {type(sample).__name__}"
    )


def _stack_crop_major(dicts: Sequence[Mapping[str, Any]], key: str, dtype: torch.dtype | None) -> torch.Tensor:
    """[n_crops * B, C, H, W] with index = crop_idx * B + sample_idx, cast to `dtype` while copying."""
    n_crops = len(dicts[0][key])
    for i, d in enumerate(dicts):
        if len(d[key]) != n_crops:
            raise ValueError(f"samples[{i}]['{key}']: expected {n_crops} crops like samples[0], got {len(d[key])}")
    if n_crops == 0:
        return torch.empty(0)
    first = dicts[0][key][0]
    B = len(dicts)
    out = torch.empty((n_crops * B, *first.shape), dtype=dtype or first.dtype)
    for c in range(n_crops):
        dst = out[c * B : (c + 1) * B]
        crops = [d[key][c] for d in dicts]
        if dst.dtype == first.dtype:
            torch.stack(crops, out=dst)
        else:  # cast while copying: no float32 intermediate batch
            for b, crop in enumerate(crops):
                dst[b].copy_(crop)
    return out


def _stack_images(dicts: Sequence[Mapping[str, Any]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Whole uint8 images [3, H_i, W_i] -> (uint8 [B, 3, Hmax, Wmax], zero-padded bottom / right; sizes long [B, 2])."""
    images = [d["image"] for d in dicts]
    for i, img in enumerate(images):
        if not torch.is_tensor(img) or img.dtype != torch.uint8 or img.dim() != 3 or img.shape[0] != 3:
            got = f"{img.dtype} {tuple(img.shape)}" if torch.is_tensor(img) else type(img).__name__
            raise ValueError(f"samples[{i}]['image']: expected a uint8 tensor [3, H, W], got {got}")
    sizes = torch.tensor([list(img.shape[1:]) for img in images], dtype=torch.long).view(len(images), 2)
    h_max, w_max = (int(v) for v in sizes.max(dim=0).values)
    out = torch.zeros((len(images), 3, h_max, w_max), dtype=torch.uint8)
    for dst, img in zip(out, images):
        dst[:, : img.shape[1], : img.shape[2]].copy_(img)
    return out, sizes


def _stack_geometry(dicts: Sequence[Mapping[str, Any]], key: str) -> torch.Tensor:
    """Per-sample boxes [n, 4] or flips [n] -> crop-major [n * B, ...] (index crop * B + sample)."""
    n = dicts[0][key].shape[0]
    for i, d in enumerate(dicts):
        if d[key].shape[0] != n:
            raise ValueError(f"samples[{i}]['{key}']: expected {n} rows like samples[0], got {d[key].shape[0]}")
    stacked = torch.stack([d[key] for d in dicts], dim=1)  # [n, B, ...]
    return stacked.reshape(-1, *stacked.shape[2:])


def collate_multicrop(
    samples: Sequence[Any],
    *,
    mask_generator: BlockMaskGenerator,
    rng: Rng,
    mask_ratio_min_max: Sequence[float] = (0.1, 0.5),
    mask_sample_probability: float = 0.5,
    mask_random_circular_shift: bool = False,
    dtype: torch.dtype | None = None,
) -> dict[str, Any]:
    """Collate per-image multi-crop dicts into a batch and draw the iBOT masks.

    Args:
        samples: B dicts with ``global_crops`` (n_g tensors [3, H, W]) and ``local_crops`` (n_l tensors [3, h, w]),
            optionally ``offsets`` (n_l (row, col) pairs) and, from ``crops.gpu_augmentation``,
            ``global_photometric`` / ``local_photometric`` (draws of uint8 crops); (dict, target) pairs are accepted.
            From ``crops.gpu_crops`` the samples carry no crops but ``image`` (uint8 [3, H, W]), ``global_boxes`` /
            ``local_boxes`` (long [n, 4]: top, left, h, w) and ``global_flips`` / ``local_flips`` (bool [n]).
        mask_generator: block mask generator on the global-crop patch grid (N = grid h * w tokens).
        rng: numpy or torch generator; the only source of randomness.
        dtype: cast of the crops (e.g. torch.bfloat16); None keeps the augmentation's dtype. Not applied to uint8
            crops awaiting device augmentation (`DeviceAugmentation` casts them after normalising).

    Returns dict:
        global_crops [n_g*B, 3, H, W], local_crops [n_l*B, 3, h, w] (crop-major: index = crop_idx * B + sample_idx);
        masks bool [n_g*B, N]; mask_indices long [M] (flat indices of True in masks.flatten());
        masks_weight float32 [M] (1 / #masked patches of the image each masked patch belongs to);
        n_masked_patches long [1] (= M); upperbound int (sum of the target counts);
        offsets long [n_l*B, 2] (crop-major) only when the samples carry non-empty ``offsets``;
        global_photometric / local_photometric (crop-major draws + plan, `collate_photometric`) when the samples
        carry them.
        With ``image`` samples (``crops.gpu_crops``), instead of the crops: images uint8 [B, 3, Hmax, Wmax] (padded
        bottom / right), image_sizes long [B, 2] (h, w), global_boxes / local_boxes long [n*B, 4] and global_flips
        / local_flips bool [n*B] (crop-major); the masks are drawn for n_g * B global crops as usual.
    """
    if len(samples) == 0:
        raise ValueError("samples: expected at least one sample, got an empty batch")
    dicts = [_unwrap(s) for s in samples]
    deferred = "global_photometric" in dicts[0]  # uint8 crops, colour ops on the device later
    if "image" in dicts[0]:  # crops.gpu_crops: whole images + boxes, the device crops
        images, image_sizes = _stack_images(dicts)
        geometry = {key: _stack_geometry(dicts, key)
                    for key in ("global_boxes", "local_boxes", "global_flips", "local_flips")}  # fmt: skip
        crops: dict[str, Any] = {"images": images, "image_sizes": image_sizes, **geometry}
        n_images = geometry["global_boxes"].shape[0]
    else:
        crops = {
            "global_crops": _stack_crop_major(dicts, "global_crops", None if deferred else dtype),
            "local_crops": _stack_crop_major(dicts, "local_crops", None if deferred else dtype),
        }
        n_images = crops["global_crops"].shape[0]

    rng = as_numpy_rng(rng)
    n_tokens = mask_generator.num_patches
    counts = mask_counts(n_images, n_tokens, mask_ratio_min_max, mask_sample_probability)
    masks = torch.zeros((n_images, n_tokens), dtype=torch.bool)
    if counts:
        generated = mask_generator.generate_many(counts, rng, mask_random_circular_shift)
        # shuffle which images get the masks (same law as random.shuffle of [masked..., unmasked...])
        targets = torch.from_numpy(rng.permutation(n_images)[: len(counts)])
        masks[targets] = generated
    mask_indices = masks.flatten().nonzero().flatten()
    per_image = masks.sum(-1).clamp_(min=1).to(torch.float32)
    masks_weight = per_image.reciprocal_()[mask_indices // n_tokens]

    out: dict[str, Any] = {
        **crops,
        "masks": masks,
        "mask_indices": mask_indices,
        "masks_weight": masks_weight,
        "n_masked_patches": torch.tensor([mask_indices.numel()], dtype=torch.long),
        "upperbound": int(sum(counts)),
    }
    if all(len(d.get("offsets", ())) for d in dicts):
        n_l = len(dicts[0]["offsets"])
        out["offsets"] = torch.tensor(
            [list(d["offsets"][c]) for c in range(n_l) for d in dicts], dtype=torch.long
        ).view(n_l * len(dicts), 2)
    if deferred:
        for crop_set in CROP_SETS:
            key = f"{crop_set}_photometric"
            if not all(key in d for d in dicts):
                raise ValueError(f"samples: expected '{key}' in every sample (crops.gpu_augmentation), some lack it")
            out[key] = collate_photometric([d[key] for d in dicts])
    return out


class MultiCropCollator:
    """Picklable ``collate_fn``: `collate_multicrop` with a fixed config and per-batch generators.

    Args:
        mask_generator: block mask generator on the student global-crop patch grid.
        mask_ratio_min_max, mask_sample_probability, mask_random_circular_shift: the ``ibot.*`` keys.
        dtype: cast of the crops (None keeps float32).
        seed: base seed; rank: data-parallel rank (folded into every batch generator so ranks differ).

    See the module docstring for how the batch index, and so the generator, is derived.
    """

    def __init__(
        self,
        mask_generator: BlockMaskGenerator,
        *,
        mask_ratio_min_max: Sequence[float] = (0.1, 0.5),
        mask_sample_probability: float = 0.5,
        mask_random_circular_shift: bool = False,
        dtype: torch.dtype | None = None,
        seed: int = 0,
        rank: int = 0,
    ) -> None:
        mask_counts(2, mask_generator.num_patches, mask_ratio_min_max, mask_sample_probability)  # validates
        if seed < 0 or rank < 0:
            raise ValueError(f"seed/rank: expected non-negative integers, got seed={seed}, rank={rank}")
        self.mask_generator = mask_generator
        self.mask_ratio_min_max = tuple(float(v) for v in mask_ratio_min_max)
        self.mask_sample_probability = float(mask_sample_probability)
        self.mask_random_circular_shift = bool(mask_random_circular_shift)
        self.dtype = dtype
        self.seed = int(seed)
        self.rank = int(rank)
        self._start_step = 0
        self._calls = 0

    @classmethod
    def for_crops(cls, global_crops_size: int, patch_size: int, **kwargs: Any) -> "MultiCropCollator":
        """Collator with the official mask generator: grid global/patch, block area up to half the grid."""
        if global_crops_size % patch_size:
            raise ValueError(
                f"global_crops_size: expected a multiple of patch_size={patch_size}, got {global_crops_size}"
            )
        grid = global_crops_size // patch_size
        return cls(BlockMaskGenerator((grid, grid), max_num_patches=0.5 * grid * grid), **kwargs)

    # ------------------------------------------------------------------ seeding
    def rng_for(self, batch_index: int) -> np.random.Generator:
        """The generator used for batch `batch_index` (pure function of seed, rank, batch_index)."""
        return np.random.default_rng([self.seed, self.rank, int(batch_index)])

    def _next_batch_index(self) -> int:
        info = torch.utils.data.get_worker_info()
        worker_id, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        index = self._start_step + self._calls * num_workers + worker_id
        self._calls += 1
        return index

    def set_step(self, step: int) -> None:
        """Make the next (main-process or fresh-worker) call produce batch `step`."""
        if step < 0:
            raise ValueError(f"step: expected >= 0, got {step}")
        self._start_step = int(step)
        self._calls = 0

    def state_dict(self) -> dict[str, int]:
        return {"seed": self.seed, "rank": self.rank, "step": self._start_step + self._calls}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self.seed = int(state["seed"])
        self.rank = int(state["rank"])
        self.set_step(int(state["step"]))

    # ------------------------------------------------------------------ call
    def __call__(self, samples: Sequence[Any], batch_index: int | None = None) -> dict[str, Any]:
        index = self._next_batch_index() if batch_index is None else int(batch_index)
        return collate_multicrop(
            samples,
            mask_generator=self.mask_generator,
            rng=self.rng_for(index),
            mask_ratio_min_max=self.mask_ratio_min_max,
            mask_sample_probability=self.mask_sample_probability,
            mask_random_circular_shift=self.mask_random_circular_shift,
            dtype=self.dtype,
        )
