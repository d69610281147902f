"""Tests for dinobridge.data.gpu_crops and ``crops.gpu_crops`` (random-resized crops + flips made on the device).

Tolerances: `resize_weights` against F.interpolate(bicubic, antialias) in float64: 1e-4 on 0..255 values. Crops
against the CPU path's uint8 crops (torch's uint8 kernel): at most 1 unit and almost all pixels equal (the device
path reproduces the kernel's int16 fixed-point arithmetic exactly; a 1 can only come from a double-rounding tie in
torch's weights). Final normalised crops: every pixel within 1 uint8 unit pushed through the photometric ops
(< 0.1 normalised units), and all but a tiny fraction equal to 1e-5.
"""

from __future__ import annotations

import dataclasses
import itertools
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dinobridge.data.augmentation import MultiCropAugmentation, MultiCropConfig
from dinobridge.data.collate import MultiCropCollator
from dinobridge.data.gpu_augmentation import DeviceAugmentation
from dinobridge.data import gpu_crops
from dinobridge.data.gpu_crops import crop_batch, fixed_point_weights, resize_weights, resized_crops
from dinobridge.data.loader import build_train_loader, multicrop_config
from dinobridge.data.synthetic import ProceduralShapes

SMALL = dict(global_crops_size=32, local_crops_size=16, local_crops_number=4, patch_size=8)
DENSE = dict(color_jitter_prob=0.9, grayscale_prob=0.4, global_crop_1_blur_prob=0.5, global_crop_2_blur_prob=0.7,
             local_crops_blur_prob=0.6, global_crop_2_solarize_prob=0.6)  # fmt: skip

pytestmark = pytest.mark.usefixtures("one_thread")


def _noise(h: int, w: int, seed: int) -> torch.Tensor:
    """uint8 [3, h, w] random pixels (the hardest case for rounding: bicubic overshoot everywhere)."""
    return torch.from_numpy((np.random.default_rng(seed).random((3, h, w)) * 255).astype(np.uint8))


def _cpu_crop(img: torch.Tensor, box, flip: bool, size: int) -> torch.Tensor:
    """The worker path's uint8 crop [3, S, S] (torch's uint8 antialiased bicubic kernel)."""
    top, left, h, w = (int(v) for v in box)
    crop = F.interpolate(img[None, :, top : top + h, left : left + w], size=(size, size), mode="bicubic",
                         antialias=True)[0]  # fmt: skip
    return crop.flip(-1) if flip else crop


def _assert_within_one(out: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    diff = (out.int() - ref.int()).abs()
    assert diff.max() <= 1, what
    assert (diff > 0).float().mean() < 1e-3, what


# ----------------------------------------------------------------------------------- resize weights
@pytest.mark.parametrize("in_len, out_size", [(7, 3), (5, 17), (33, 16), (100, 7), (13, 96), (224, 96), (31, 224),
                                              (301, 224), (32, 32), (1, 4), (4, 1), (97, 32)])  # fmt: skip
def test_resize_weights_match_interpolate(in_len, out_size):
    gen = torch.Generator().manual_seed(in_len * 1000 + out_size)
    full = in_len + 9
    line = torch.rand(full, generator=gen, dtype=torch.float64) * 255
    for offset in (0, 4, 9):  # window at the start, inside, at the end of the axis
        weights = resize_weights(torch.tensor([in_len]), out_size, full, torch.tensor([offset]))
        assert weights.shape == (1, out_size, full) and weights.dtype == torch.float32
        window = line[offset : offset + in_len]
        ref = F.interpolate(window.view(1, 1, 1, -1), size=(1, out_size), mode="bicubic", antialias=True).flatten()
        assert (weights[0].double() @ line - ref).abs().max() < 1e-4
        outside = torch.ones(full, dtype=torch.bool)
        outside[offset : offset + in_len] = False
        assert weights[0][:, outside].abs().max() == 0
        assert torch.allclose(weights.sum(-1), torch.ones(1, out_size), atol=1e-6)
        flipped = resize_weights(torch.tensor([in_len, in_len]), out_size, full, torch.tensor([offset, offset]),
                                 torch.tensor([True, False]))  # fmt: skip
        assert torch.equal(flipped[0], weights[0].flip(0)) and torch.equal(flipped[1], weights[0])


def test_resize_weights_batch_rows_are_independent():
    in_len, offset = torch.tensor([5, 12, 20]), torch.tensor([15, 0, 3])
    batch = resize_weights(in_len, 8, 23, offset)
    for i in range(3):
        assert torch.equal(batch[i], resize_weights(in_len[i : i + 1], 8, 23, offset[i : i + 1])[0])
    with pytest.raises(ValueError, match="in_len/offset"):
        resize_weights(in_len, 8, 23, offset[:2])


def test_fixed_point_float_fallback_agrees_with_exact_path(monkeypatch):
    from dinobridge.data import gpu_crops

    in_len, offset, flip = torch.tensor([40, 7, 63]), torch.tensor([0, 30, 1]), torch.tensor([False, True, False])
    exact, p_exact = fixed_point_weights(in_len, 24, 64, offset, flip)
    monkeypatch.setattr(gpu_crops, "_exact_fits", lambda out_size, full_len: False)
    approx, p_approx = fixed_point_weights(in_len, 24, 64, offset, flip)
    assert torch.equal(p_exact, p_approx) and p_exact.min() >= 14
    assert (exact - approx).abs().max() <= 1  # a tie at most rounds the other way
    assert torch.equal(exact.abs().sum(-1) > 0, torch.ones(3, 24, dtype=torch.bool))


# ----------------------------------------------------------------------------------- crops vs the CPU kernel
def test_resized_crops_equal_the_cpu_uint8_kernel():
    rnd = random.Random(0)
    images = [_noise(rnd.randint(8, 90), rnd.randint(8, 90), seed) for seed in range(6)]
    H, W = max(i.shape[1] for i in images), max(i.shape[2] for i in images)
    padded = torch.zeros((len(images), 3, H, W), dtype=torch.uint8)
    for dst, img in zip(padded, images):
        dst[:, : img.shape[1], : img.shape[2]] = img
    for size in (7, 16, 33, 64):  # down and up scales, odd sizes
        idx, boxes, flips = [], [], []
        for _ in range(24):
            b = rnd.randrange(len(images))
            h_img, w_img = images[b].shape[1:]
            h, w = rnd.randint(1, h_img), rnd.randint(1, w_img)
            top, left = rnd.choice([0, h_img - h, rnd.randint(0, h_img - h)]), rnd.choice([0, w_img - w])
            idx.append(b), boxes.append([top, left, h, w]), flips.append(rnd.random() < 0.5)
        out = resized_crops(padded, torch.tensor(idx), torch.tensor(boxes), torch.tensor(flips), size)
        assert out.dtype == torch.uint8 and out.shape == (24, 3, size, size)
        ref = torch.stack([_cpu_crop(images[b], box, f, size) for b, box, f in zip(idx, boxes, flips)])
        _assert_within_one(out, ref, f"size {size}")
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        resized_crops(padded, torch.tensor([0]), torch.tensor([[0, 0, 8, 8]]), torch.tensor([False]), 4)
        assert torch.get_float32_matmul_precision() == "high"  # the TF32 setting of the caller survives
    finally:
        torch.set_float32_matmul_precision(before)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (cuBLAS float32 matmuls)")
def test_resized_crops_on_cuda_equal_the_cpu_uint8_kernel():
    rnd = random.Random(1)
    images = torch.stack([_noise(32, 32, seed) for seed in range(8)])  # CIFAR-sized sources
    for size in (32, 16):
        idx, boxes, flips = [], [], []
        for _ in range(64):
            h, w = rnd.randint(4, 32), rnd.randint(4, 32)
            idx.append(rnd.randrange(8)), flips.append(rnd.random() < 0.5)
            boxes.append([rnd.randint(0, 32 - h), rnd.randint(0, 32 - w), h, w])
        out = resized_crops(images.cuda(), torch.tensor(idx), torch.tensor(boxes), torch.tensor(flips), size)
        assert out.device.type == "cuda"
        ref = torch.stack([_cpu_crop(images[b], box, f, size) for b, box, f in zip(idx, boxes, flips)])
        _assert_within_one(out.cpu(), ref, f"cuda size {size}")


def test_crop_batch_with_cached_tables_equals_per_crop_weights(monkeypatch):
    rnd = random.Random(2)
    B, n_crops, H, W = 5, 3, 24, 20
    images = torch.stack([_noise(H, W, seed) for seed in range(B)])
    boxes, flips = [], []
    for _ in range(n_crops * B):
        h, w = rnd.randint(1, H), rnd.randint(1, W)
        boxes.append([rnd.randint(0, H - h), rnd.randint(0, W - w), h, w]), flips.append(rnd.random() < 0.5)
    boxes, flips = torch.tensor(boxes), torch.tensor(flips)
    sample_idx = torch.arange(n_crops * B) % B
    for size in (16, 32):
        ref = resized_crops(images, sample_idx, boxes, flips, size)
        tables: dict = {}
        assert torch.equal(crop_batch(images, boxes, flips, size, tables), ref)
        assert len(tables) == 2  # one table per axis length at this size
        assert torch.equal(crop_batch(images, boxes, flips, size), ref)  # computed per crop, no table
    monkeypatch.setattr(gpu_crops, "CHUNK_BYTES", 1)  # one crop index per group
    assert torch.equal(crop_batch(images, boxes, flips, 16, {}), resized_crops(images, sample_idx, boxes, flips, 16))


# ----------------------------------------------------------------------------------- augmentation + collate
def _collated(config: dict, images: list[torch.Tensor], seeds: list[int]):
    """(gpu_augmentation batch, gpu_crops batch, gpu_crops augmentation, per-sample gpu_crops outputs)."""
    deferred = MultiCropAugmentation(**config, gpu_augmentation=True)
    on_device = MultiCropAugmentation(**config, gpu_augmentation=True, gpu_crops=True)
    collate = MultiCropCollator.for_crops(config["global_crops_size"], config["patch_size"], seed=3)
    samples = [on_device(img, generator_seed=s) for img, s in zip(images, seeds)]
    ref = collate([deferred(img, generator_seed=s) for img, s in zip(images, seeds)], batch_index=5)
    return ref, collate(samples, batch_index=5), on_device, samples


@pytest.mark.parametrize(
    "name, config",
    [("official", SMALL), ("dense", {**SMALL, **DENSE}),
     ("shared-jitter", {**SMALL, **DENSE, "share_color_jitter": True}),
     ("no-local", {**SMALL, "local_crops_number": 0}), ("no-flips", {**SMALL, "horizontal_flips": False})],
)  # fmt: skip
def test_gpu_crops_equal_the_cpu_path(name, config):
    images = [_noise(40 + 3 * i, 48 - 2 * i, i) for i in range(5)]
    ref, batch, aug, _ = _collated(config, images, [100 + i for i in range(5)])
    # same draws: photometric parameters and plans, masks
    for key in ("global_photometric", "local_photometric"):
        for field, value in ref[key].items():
            same = value == batch[key][field] if field == "plan_splits" else torch.equal(value, batch[key][field])
            assert same, (name, key, field)
    for key in ("masks", "mask_indices", "masks_weight", "n_masked_patches", "upperbound"):
        assert torch.equal(torch.as_tensor(ref[key]), torch.as_tensor(batch[key])), (name, key)
    # crops before the photometric ops
    assert batch["images"].dtype == torch.uint8 and "global_crops" not in batch
    for crop_set, size in (("global", 32), ("local", 16)):
        if ref[f"{crop_set}_crops"].numel():
            made = crop_batch(batch["images"], batch[f"{crop_set}_boxes"], batch[f"{crop_set}_flips"], size)
            _assert_within_one(made, ref[f"{crop_set}_crops"], f"{name} {crop_set}")
    # final normalised crops, and the CPU path (no gpu_augmentation) as the reference
    cpu = MultiCropAugmentation(**config)
    collate = MultiCropCollator.for_crops(32, 8, seed=3)
    cpu_batch = collate([cpu(img, generator_seed=100 + i) for i, img in enumerate(images)], batch_index=5)
    out = DeviceAugmentation(aug.config)(batch)
    via_deferred = DeviceAugmentation(dataclasses.replace(aug.config, gpu_crops=False))(ref)
    assert set(out) == set(via_deferred) == set(cpu_batch), name
    for key in ("global_crops", "local_crops"):
        assert out[key].shape == cpu_batch[key].shape and out[key].dtype == cpu_batch[key].dtype, (name, key)
        if out[key].numel():
            diff = (out[key] - cpu_batch[key]).abs()
            assert diff.max() < 0.1, (name, key)
            assert (diff > 1e-5).float().mean() < 2e-3, (name, key)


def test_random_stream_is_unchanged(monkeypatch):
    """The gpu_crops worker makes the very generator calls of the other paths (same state after each draw)."""
    from dinobridge.data import augmentation

    states: list[torch.Tensor] = []
    photometric, boxes = MultiCropAugmentation._sample_photometric, augmentation._sample_crop_boxes

    def record_photometric(self, gen, *args, **kwargs):
        out = photometric(self, gen, *args, **kwargs)
        states.append(gen.get_state())
        return out

    def record_boxes(gen, *args, **kwargs):
        out = boxes(gen, *args, **kwargs)
        states.append(gen.get_state())
        return out

    monkeypatch.setattr(MultiCropAugmentation, "_sample_photometric", record_photometric)
    monkeypatch.setattr(augmentation, "_sample_crop_boxes", record_boxes)
    img = _noise(37, 45, 0)
    runs = {}
    for flag in (False, True):
        states.clear()
        out = MultiCropAugmentation(**SMALL, **DENSE, gpu_augmentation=True, gpu_crops=flag)(img, generator_seed=7)
        runs[flag] = (list(states), out)
    assert len(runs[True][0]) == 4 and all(torch.equal(a, b) for a, b in zip(runs[False][0], runs[True][0]))
    states = {flag: (None, out) for flag, (_, out) in runs.items()}
    sample = states[True][1]
    assert torch.equal(sample["image"], img)
    assert sample["global_boxes"].shape == (2, 4) and sample["local_boxes"].shape == (4, 4)
    assert sample["global_flips"].dtype == torch.bool and sample["local_flips"].shape == (4,)
    for crop_set, size in (("global", 32), ("local", 16)):
        ref = states[False][1][f"{crop_set}_crops"]
        for crop, box, flip in zip(ref, sample[f"{crop_set}_boxes"], sample[f"{crop_set}_flips"]):
            assert torch.equal(crop, _cpu_crop(img, box, bool(flip), size))  # the boxes are the CPU path's boxes


def test_collate_pads_mixed_image_sizes():
    sizes = [(20, 50), (41, 17), (33, 33)]
    images = [_noise(h, w, i) for i, (h, w) in enumerate(sizes)]
    ref, batch, aug, samples = _collated(SMALL, images, [3, 4, 5])
    assert batch["images"].shape == (3, 3, 41, 50)
    assert batch["image_sizes"].tolist() == [list(s) for s in sizes]
    for b, img in enumerate(images):
        h, w = sizes[b]
        assert torch.equal(batch["images"][b, :, :h, :w], img)
        assert batch["images"][b, :, h:].sum() == 0 and batch["images"][b, :, :, w:].sum() == 0
    B = len(images)
    for crop_set, n, size in (("global", 2, 32), ("local", 4, 16)):
        boxes, flips = batch[f"{crop_set}_boxes"], batch[f"{crop_set}_flips"]
        assert boxes.shape == (n * B, 4) and flips.shape == (n * B,)
        for c, b in itertools.product(range(n), range(B)):  # crop-major: index c * B + b
            assert torch.equal(boxes[c * B + b], samples[b][f"{crop_set}_boxes"][c])
            top, left, h, w = boxes[c * B + b].tolist()
            assert top >= 0 and left >= 0 and top + h <= sizes[b][0] and left + w <= sizes[b][1]
        made = crop_batch(batch["images"], boxes, flips, size)
        want = torch.stack([_cpu_crop(images[i % B], box, bool(f), size)
                            for i, (box, f) in enumerate(zip(boxes, flips))])  # fmt: skip
        _assert_within_one(made, want, crop_set)
        _assert_within_one(made, ref[f"{crop_set}_crops"], crop_set)


# ----------------------------------------------------------------------------------- errors, config, loader
def test_refused_combinations():
    with pytest.raises(ValueError, match="gpu_crops: expected gpu_augmentation=True"):
        MultiCropConfig(**SMALL, gpu_crops=True)
    with pytest.raises(ValueError, match="gpu_crops / localcrops_subset_of_globalcrops"):
        MultiCropConfig(**SMALL, gpu_crops=True, gpu_augmentation=True, localcrops_subset_of_globalcrops=True)
    _, deferred, _, _ = _collated(SMALL, [_noise(30, 30, 0)], [1])
    with pytest.raises(ValueError, match="crops.gpu_crops is on"):
        DeviceAugmentation(MultiCropConfig(**SMALL, gpu_augmentation=True, gpu_crops=True))(
            {k: v for k, v in deferred.items() if k != "images"}
        )
    with pytest.raises(ValueError, match="images: expected uint8"):
        resized_crops(torch.zeros(1, 3, 8, 8), torch.tensor([0]), torch.tensor([[0, 0, 8, 8]]), torch.tensor([0]), 4)

    from dinobridge.config import build_config
    from dinobridge.errors import ConfigError

    with pytest.raises(ConfigError, match="crops.gpu_crops.*gpu_augmentation"):
        build_config(overrides=["crops.gpu_crops=true"])
    with pytest.raises(ConfigError, match="crops.gpu_crops.*localcrops_subset_of_globalcrops"):
        build_config(overrides=["crops.gpu_crops=true", "crops.gpu_augmentation=true",
                                "crops.localcrops_subset_of_globalcrops=true"])  # fmt: skip


def test_config_key_reaches_the_augmentation():
    from dinobridge.config import build_config

    cfg = build_config(overrides=["crops.gpu_augmentation=true", "crops.gpu_crops=true", "crops.global_crops_size=32",
                                  "crops.local_crops_size=16", "student.patch_size=8"])  # fmt: skip
    mc = multicrop_config(cfg)
    assert mc.gpu_crops is True and DeviceAugmentation(mc).gpu_crops
    assert build_config().crops.gpu_crops is False


def test_device_placement_on_a_non_cpu_device():
    """Every tensor the crop stage makes lives on the batch's device (the meta device stands in for CUDA)."""
    _, batch, aug, _ = _collated({**SMALL, **DENSE}, [_noise(30, 36, i) for i in range(3)], [1, 2, 3])
    on_meta = {k: (v.to("meta") if torch.is_tensor(v) else v) for k, v in batch.items()}
    out = DeviceAugmentation(aug.config)(on_meta)
    assert out["global_crops"].device.type == "meta" and out["global_crops"].shape == (6, 3, 32, 32)
    assert out["local_crops"].shape == (12, 3, 16, 16) and out["local_crops"].dtype == torch.float32


@pytest.mark.parametrize("n_local", [4, 0])
def test_loader_batches_match_the_gpu_augmentation_path(n_local):
    ds = ProceduralShapes(n=9, size=24)
    kw = dict(dataset=ds, batch_size=3, seed=4, world_size=1, rank=0, num_workers=0)
    config = MultiCropConfig(**{**SMALL, "local_crops_number": n_local}, **DENSE, gpu_augmentation=True)
    batches = {}
    for gpu_crops in (False, True):
        cfg = dataclasses.replace(config, gpu_crops=gpu_crops)
        collate = MultiCropCollator.for_crops(32, 8, seed=4)
        loader = build_train_loader(transform=MultiCropAugmentation(cfg), collate_fn=collate, start_iter=2, **kw)
        batches[gpu_crops] = [DeviceAugmentation(cfg, dtype=torch.bfloat16)(b) for b in itertools.islice(loader, 2)]
    for ref, out in zip(batches[False], batches[True]):
        assert set(ref) == set(out)
        for key, value in ref.items():
            if torch.is_tensor(value):
                assert value.shape == out[key].shape and value.dtype == out[key].dtype, key
        assert ref["batch_index"] == out["batch_index"] and torch.equal(ref["masks"], out["masks"])
        for key in ("global_crops", "local_crops"):
            if ref[key].numel():
                diff = (ref[key].float() - out[key].float()).abs()
                assert diff.max() < 0.1 and (diff > 0.02).float().mean() < 2e-3, key
