"""Tests for dinobridge.data.gpu_augmentation (``crops.gpu_augmentation``: photometric ops batched on the device).

Tolerance: on the CPU the device path is checked to be bit-identical to the worker path (``torch.equal``): both run
the same kernels on the same float32 parameters (factors and sigmas are rounded to float32 when drawn, the blur taps
travel with the batch) and neither rounds to uint8 after the crop. On CUDA (test skipped without it) reductions and
fused multiply-adds may round differently: values agree to 1e-4 (normalised units), except that a pixel within
rounding of the solarize threshold may land on the other side (a jump of ~1/255 / std); such pixels must be rare.
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest
import torch

from dinobridge.data import augmentation as A
from dinobridge.data.augmentation import MultiCropAugmentation, MultiCropConfig, photometric_tensors
from dinobridge.data.collate import MultiCropCollator
from dinobridge.data.gpu_augmentation import (
    DENSE_KEYS, DeviceAugmentation, apply_photometric, photometric_dense, photometric_plan,
)
from dinobridge.data.loader import build_train_loader, multicrop_config
from dinobridge.data.synthetic import ProceduralShapes

SMALL = dict(global_crops_size=32, local_crops_size=16, local_crops_number=4, patch_size=8)
# every photometric op frequent, so that all 19 groups of the plan are exercised
DENSE = dict(color_jitter_prob=0.9, grayscale_prob=0.4, global_crop_1_blur_prob=0.5, global_crop_2_blur_prob=0.7,
             local_crops_blur_prob=0.6, global_crop_2_solarize_prob=0.6)  # fmt: skip


pytestmark = pytest.mark.usefixtures("one_thread")


def _images(n: int, seed: int = 0) -> list[torch.Tensor]:
    """uint8 [3, 40, 48] images: random pixels, with a flat gray block (zero chroma) and a saturated block."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        img = torch.from_numpy((rng.random((3, 40, 48)) * 255).astype(np.uint8))
        img[:, :12, :12] = 128
        img[0, -10:, -10:], img[1:, -10:, -10:] = 255, 0
        out.append(img)
    return out


def _batches(config: dict, n_batches: int = 2, batch_size: int = 5, dtype=None):
    """(CPU-path batch, device-path batch before `DeviceAugmentation`, the gpu-path augmentation) per batch index."""
    cpu = MultiCropAugmentation(**config)
    gpu = MultiCropAugmentation(**config, gpu_augmentation=True)
    collate = MultiCropCollator.for_crops(config["global_crops_size"], config["patch_size"], seed=3, dtype=dtype)
    images = _images(n_batches * batch_size)
    for k in range(n_batches):
        idx = range(k * batch_size, (k + 1) * batch_size)
        yield (
            collate([cpu(images[i], generator_seed=100 + i) for i in idx], batch_index=k),
            collate([gpu(images[i], generator_seed=100 + i) for i in idx], batch_index=k),
            gpu,
        )


# ----------------------------------------------------------------------------------- same function as the CPU path
@pytest.mark.parametrize(
    "name, config",
    [
        ("official", SMALL),
        ("dense", {**SMALL, **DENSE}),
        ("subset", {**SMALL, **DENSE, "localcrops_subset_of_globalcrops": True}),
        ("shared-jitter", {**SMALL, **DENSE, "share_color_jitter": True}),
        ("no-local", {**SMALL, **DENSE, "local_crops_number": 0}),
        ("odd-kernel", {**SMALL, **DENSE, "blur_kernel_size": 5, "rgb_mean": (0.5, 0.4, 0.3), "hue": 0.5}),
    ],
)
def test_device_path_equals_cpu_path_bit_for_bit(name, config):
    for ref, deferred, gpu in _batches(config):
        assert deferred["global_crops"].dtype == torch.uint8
        out = DeviceAugmentation(gpu.config)(deferred)
        assert "global_photometric" not in out and "local_photometric" not in out
        assert set(out) == set(ref), name
        for key in ("global_crops", "local_crops"):
            assert out[key].dtype == ref[key].dtype and out[key].shape == ref[key].shape, (name, key)
            assert torch.equal(out[key], ref[key]), (name, key, (out[key] - ref[key]).abs().max())
        for key in ("masks", "mask_indices", "masks_weight", "offsets"):
            if key in ref:
                assert torch.equal(out[key], ref[key]), (name, key)


@pytest.mark.parametrize("config", [{**SMALL, **DENSE}, {**SMALL, **DENSE, "blur_kernel_size": 5, "hue": 0.5}])
def test_dense_form_equals_the_grouped_form(config):
    """`photometric_dense` (every op on every crop, kept by `torch.where`; what the trainer compiles on CUDA) gives
    the grouped path's images bit for bit on the CPU."""
    mean, inv_std = torch.rand(1, 3, 1, 1), 1 + torch.rand(1, 3, 1, 1)
    for _, deferred, gpu in _batches(config):
        for key in ("global", "local"):
            crops, params = deferred[f"{key}_crops"], deferred[f"{key}_photometric"]
            grouped = apply_photometric(crops, params, mean=mean, inv_std=inv_std, solarize_threshold=0.5)
            dense = photometric_dense(crops, {k: params[k] for k in DENSE_KEYS}, mean, inv_std, 0.5)
            assert torch.equal(dense, grouped), (key, (dense - grouped).abs().max())
            assert not torch.equal(grouped, crops.float().div(255).sub(mean).mul(inv_std))  # ops did run
        # compile=True compiles on CUDA only: on the CPU the grouped form runs (nothing is compiled)
        augment = DeviceAugmentation(gpu.config, compile=True)
        out = augment(dict(deferred))
        assert augment._compiled is None
        assert torch.equal(out["global_crops"], DeviceAugmentation(gpu.config)(dict(deferred))["global_crops"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the compiled dense form runs on CUDA only")
def test_compiled_dense_form_matches_the_cpu_path_on_cuda():
    for ref, deferred, gpu in _batches({**SMALL, **DENSE}):
        on_gpu = {k: ({f: t.cuda() for f, t in v.items() if torch.is_tensor(t)} | {"plan_splits": v["plan_splits"]}
                      if isinstance(v, dict) else v.cuda() if torch.is_tensor(v) else v) for k, v in deferred.items()}
        out = DeviceAugmentation(gpu.config, compile=True)(on_gpu)
        for key in ("global_crops", "local_crops"):
            diff = (out[key].cpu() - ref[key]).abs()
            assert (diff > 1e-4).float().mean() < 1e-3, (key, diff.max())  # solarize-threshold ties only


def test_output_dtype_follows_the_collator_cast():
    for ref, deferred, gpu in _batches({**SMALL, **DENSE}, n_batches=1, dtype=torch.bfloat16):
        assert deferred["global_crops"].dtype == torch.uint8  # the cast waits for the device
        out = DeviceAugmentation(gpu.config, dtype=torch.bfloat16)(deferred)
        assert out["global_crops"].dtype == ref["global_crops"].dtype == torch.bfloat16
        assert torch.equal(out["global_crops"], ref["global_crops"])
        assert torch.equal(out["local_crops"], ref["local_crops"])


@pytest.mark.parametrize(
    "kernel, factors",
    [
        (A._adjust_brightness_, [0.6, 1.0, 1.37]),
        (A._adjust_contrast_, [0.6, 1.0, 1.4]),
        (A._adjust_saturation_, [0.8, 1.0, 1.2]),
        (A._adjust_hue_, [-0.1, 0.0, 0.5]),
    ],
)
def test_batched_kernels_equal_per_image_calls(kernel, factors):
    factors = [float(np.float32(f)) for f in factors]  # the pipeline draws float32 values
    x = torch.rand(3, 3, 11, 13, generator=torch.Generator().manual_seed(1))
    x[:, :, :2, :2] = 0.5  # zero chroma
    x[:, 0, 4, 4] = x[:, 1, 4, 4] = 0.9  # R / G tie
    batched = x.clone()
    kernel(batched, torch.tensor(factors))
    for xi, bi, f in zip(x.clone(), batched, factors):
        kernel(xi, f)
        assert torch.equal(xi, bi)


def test_batched_blur_taps_equal_per_image_sigma():
    x = torch.rand(3, 3, 12, 10, generator=torch.Generator().manual_seed(2))
    sigmas = [0.1, 0.73, 2.0]
    taps = torch.tensor([A._gaussian_kernel1d(9, s) for s in sigmas], dtype=torch.float32)
    batched = x.clone()
    A._blur_with_taps_(batched, taps)
    for xi, bi, s in zip(x.clone(), batched, sigmas):
        A._gaussian_blur_(xi, 9, s)
        assert torch.equal(xi, bi)


# ----------------------------------------------------------------------------------- same draws, same stream
def test_emitted_parameters_are_what_the_cpu_path_applies(monkeypatch):
    """The gpu path emits exactly the crops and parameters the CPU path feeds its photometric stage."""
    config = {**SMALL, **DENSE}
    cpu = MultiCropAugmentation(**config)
    gpu = MultiCropAugmentation(**config, gpu_augmentation=True)
    applied = []
    original = MultiCropAugmentation._photometric_

    def record(self, batch_u8, params):
        applied.append((batch_u8.clone(), list(params)))
        return original(self, batch_u8, params)

    monkeypatch.setattr(MultiCropAugmentation, "_photometric_", record)
    for i, img in enumerate(_images(8, seed=1)):
        applied.clear()
        cpu(img, generator_seed=i)
        out = gpu(img, generator_seed=i)
        (g_u8, g_params), (l_u8, l_params) = applied
        assert torch.equal(torch.stack(out["global_crops"]), g_u8)
        assert torch.equal(torch.stack(out["local_crops"]), l_u8)
        for emitted, params in ((out["global_photometric"], g_params), (out["local_photometric"], l_params)):
            assert emitted["jitter"].tolist() == [p.jitter for p in params]
            assert emitted["order"].tolist() == [list(p.order) for p in params]
            assert emitted["factors"].tolist() == [list(p.factors) for p in params]  # exact: float32 draws
            assert emitted["grayscale"].tolist() == [p.grayscale for p in params]
            assert emitted["blur"].tolist() == [p.blur_sigma is not None for p in params]
            assert emitted["blur_sigma"].tolist() == [p.blur_sigma or 0.0 for p in params]
            assert emitted["solarize"].tolist() == [p.solarize for p in params]
            for row, p in zip(emitted["blur_taps"], params):
                expected = A._gaussian_kernel1d(9, p.blur_sigma) if p.blur_sigma is not None else [0.0] * 9
                assert torch.equal(row, torch.tensor(expected, dtype=torch.float32))


def test_generator_states_match_after_every_draw(monkeypatch):
    """Both paths make the same generator calls: the generator state after each photometric draw is the same."""
    states: list[torch.Tensor] = []
    original = MultiCropAugmentation._sample_photometric

    def record(self, gen, *args, **kwargs):
        out = original(self, gen, *args, **kwargs)
        states.append(gen.get_state())
        return out

    monkeypatch.setattr(MultiCropAugmentation, "_sample_photometric", record)
    runs = []
    for gpu_aug in (False, True):
        states.clear()
        aug = MultiCropAugmentation(**SMALL, **DENSE, gpu_augmentation=gpu_aug)
        for i, img in enumerate(_images(3, seed=2)):
            aug(img, generator_seed=i)
        runs.append(list(states))
    assert len(runs[0]) == 6 and all(torch.equal(a, b) for a, b in zip(*runs))


def test_parameter_distributions_follow_the_config():
    """Frequencies and ranges of the emitted draws (the CPU path's law; equal draws by the test above)."""
    aug = MultiCropAugmentation(global_crops_size=16, local_crops_size=8, local_crops_number=8, patch_size=4,
                                gpu_augmentation=True)  # fmt: skip
    img = _images(1)[0][:, :20, :20].contiguous()
    outs = [aug(img, generator_seed=s) for s in range(400)]
    g = {k: torch.stack([o["global_photometric"][k] for o in outs]) for k in outs[0]["global_photometric"]}
    loc = {k: torch.cat([o["local_photometric"][k] for o in outs]) for k in outs[0]["local_photometric"]}
    both = {k: torch.cat([g[k].flatten(0, 1), loc[k]]) for k in g}
    assert abs(both["jitter"].float().mean() - 0.8) < 0.03
    assert abs(both["grayscale"].float().mean() - 0.2) < 0.03
    assert g["blur"][:, 0].sum() == 0 and abs(g["blur"][:, 1].float().mean() - 0.9) < 0.05
    assert abs(loc["blur"].float().mean() - 0.5) < 0.03
    assert g["solarize"][:, 0].sum() == 0 and loc["solarize"].sum() == 0
    assert abs(g["solarize"][:, 1].float().mean() - 0.2) < 0.06
    lo, hi = torch.tensor([0.6, 0.6, 0.8, -0.1]), torch.tensor([1.4, 1.4, 1.2, 0.1])
    f = both["factors"]
    assert torch.all((f >= lo) & (f <= hi)) and torch.allclose(f.mean(0), (lo + hi) / 2, atol=0.02)
    sigma = both["blur_sigma"][both["blur"]]
    assert sigma.min() >= 0.1 and sigma.max() <= 2.0 and abs(sigma.mean() - 1.05) < 0.05
    order = both["order"]
    assert torch.equal(order.sort(dim=1).values, torch.arange(4).expand_as(order))  # permutations
    first = torch.bincount(order[:, 0], minlength=4).float() / len(order)
    assert torch.all((first - 0.25).abs() < 0.03)


# ----------------------------------------------------------------------------------- the plan
def test_plan_groups_crops_by_step_and_op():
    params = photometric_tensors(
        [
            A._Photometric(True, [3, 0, 1, 2], (1.2, 0.9, 1.0, 0.05), False, None, False),  # saturation: identity
            A._Photometric(False, [0, 1, 2, 3], (1.3, 1.3, 1.1, 0.02), True, 0.5, True),  # no jitter
            A._Photometric(True, [0, 3, 2, 1], (0.7, 1.1, 0.9, 0.0), True, 1.5, False),  # hue: identity
        ],
        blur_kernel_size=5,
    )
    plan = photometric_plan(params)
    groups = torch.split(plan["plan_indices"], plan["plan_splits"])
    values = torch.split(plan["plan_values"], plan["plan_splits"])
    expected = {  # (step, op) -> [(crop, factor)]
        (0, 3): [(0, 0.05)], (1, 0): [(0, 1.2)], (2, 1): [(0, 0.9)],
        (0, 0): [(2, 0.7)], (2, 2): [(2, 0.9)], (3, 1): [(2, 1.1)],
    }  # fmt: skip
    for step, op in itertools.product(range(4), range(4)):
        want = expected.get((step, op), [])
        assert groups[4 * step + op].tolist() == [c for c, _ in want], (step, op)
        assert torch.equal(values[4 * step + op], torch.tensor([v for _, v in want], dtype=torch.float32))
    assert groups[16].tolist() == [1, 2] and groups[17].tolist() == [1, 2] and groups[18].tolist() == [1]
    assert torch.equal(values[17], torch.tensor([0.5, 1.5]))
    assert torch.equal(plan["plan_blur_taps"], params["blur_taps"][[1, 2]]) and plan["plan_blur_taps"].shape == (2, 5)


# ----------------------------------------------------------------------------------- entry point, loader, config
def test_disabled_is_a_no_op_and_enabled_needs_the_parameters():
    batch = {"global_crops": torch.rand(2, 3, 8, 8), "local_crops": torch.empty(0)}
    assert DeviceAugmentation(MultiCropConfig(**SMALL))(batch) is batch
    with pytest.raises(ValueError, match="global_photometric"):
        DeviceAugmentation(MultiCropConfig(**SMALL, gpu_augmentation=True))(batch)
    _, deferred, gpu = next(_batches(SMALL, n_batches=1))
    with pytest.raises(ValueError, match="crops: expected uint8"):
        apply_photometric(
            deferred["global_crops"].float(), deferred["global_photometric"], mean=torch.zeros(1, 3, 1, 1),
            inv_std=torch.ones(1, 3, 1, 1), solarize_threshold=0.5,
        )  # fmt: skip


def test_device_placement_on_a_non_cpu_device():
    """Every tensor the device path makes lives on the crops' device (the meta device stands in for CUDA here)."""
    for _, deferred, gpu in _batches({**SMALL, **DENSE}, n_batches=1):
        on_meta = {k: (v.to("meta") if torch.is_tensor(v) else v) for k, v in deferred.items()}
        out = DeviceAugmentation(gpu.config)(on_meta)
        assert out["global_crops"].device.type == "meta" and out["global_crops"].dtype == torch.float32
        assert out["local_crops"].shape == (4 * 5, 3, 16, 16)


def test_loader_batches_match_with_and_without_gpu_augmentation():
    ds = ProceduralShapes(n=9, size=24)
    kw = dict(dataset=ds, batch_size=3, seed=4, world_size=1, rank=0, num_workers=0)
    config = MultiCropConfig(**SMALL, **DENSE)
    batches = {}
    for gpu_aug in (False, True):
        cfg = dataclasses.replace(config, gpu_augmentation=gpu_aug)
        collate = MultiCropCollator.for_crops(32, 8, seed=4)
        loader = build_train_loader(transform=MultiCropAugmentation(cfg), collate_fn=collate, start_iter=2, **kw)
        batches[gpu_aug] = [DeviceAugmentation(cfg)(b) for b in itertools.islice(loader, 2)]
    for ref, out in zip(batches[False], batches[True]):
        assert ref["batch_index"] == out["batch_index"]
        assert torch.equal(ref["global_crops"], out["global_crops"])
        assert torch.equal(ref["local_crops"], out["local_crops"])


def test_config_key_reaches_the_augmentation():
    from dinobridge.config import build_config

    cfg = build_config(overrides=["crops.gpu_augmentation=true", "crops.global_crops_size=32",
                                  "crops.local_crops_size=16", "student.patch_size=8"])  # fmt: skip
    mc = multicrop_config(cfg)
    assert mc.gpu_augmentation is True and DeviceAugmentation(mc).enabled
    assert build_config().crops.gpu_augmentation is False
    assert MultiCropConfig.from_mapping({"gpu_augmentation": True}).gpu_augmentation is True


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_the_cpu_path():
    config = {**SMALL, **DENSE, "global_crops_size": 64, "local_crops_size": 32}
    for ref, deferred, gpu in _batches(config, n_batches=2, batch_size=8):
        on_gpu = {k: (v.cuda() if torch.is_tensor(v) else v) for k, v in deferred.items()}
        out = DeviceAugmentation(gpu.config)(on_gpu)
        for key in ("global_crops", "local_crops"):
            diff = (out[key].cpu() - ref[key]).abs()
            assert diff.max() < 0.02, key  # a solarize flip: |1 - 2 * 128/255| / min(std) = 0.0175
            assert (diff > 1e-4).float().mean() < 1e-3, key
