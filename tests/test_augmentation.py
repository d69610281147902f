"""Tests for dinobridge.data.augmentation (multi-crop augmentation)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image

from dinobridge.data import augmentation as A
from dinobridge.data.augmentation import MultiCropAugmentation, MultiCropConfig, derive_seed

FIXTURE = Path("/work/shared/fixtures/dinov3_vitlarge_pretrain.yaml")
SMALL = dict(global_crops_size=32, local_crops_size=16, local_crops_number=4, patch_size=8)
NO_PHOTOMETRIC = dict(
    color_jitter_prob=0.0,
    grayscale_prob=0.0,
    global_crop_1_blur_prob=0.0,
    global_crop_2_blur_prob=0.0,
    local_crops_blur_prob=0.0,
    global_crop_2_solarize_prob=0.0,
)
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


pytestmark = pytest.mark.usefixtures("one_thread")


def _random_image(h: int = 48, w: int = 64, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8)


def _all_crops(out: dict) -> list[torch.Tensor]:
    return out["global_crops"] + out["local_crops"]


# ----------------------------------------------------------------------------------- outputs
def test_shapes_dtypes_and_value_range():
    aug = MultiCropAugmentation(**SMALL)
    out = aug(Image.fromarray(_random_image()), generator_seed=0)
    assert len(out["global_crops"]) == 2 and len(out["local_crops"]) == 4
    assert out["global_crops_teacher"] is out["global_crops"]
    for crop in out["global_crops"]:
        assert crop.shape == (3, 32, 32) and crop.dtype == torch.float32
    for crop in out["local_crops"]:
        assert crop.shape == (3, 16, 16) and crop.dtype == torch.float32
    lo, hi = (0 - MEAN) / STD, (1 - MEAN) / STD
    for crop in _all_crops(out):
        assert torch.all(crop >= lo - 1e-5) and torch.all(crop <= hi + 1e-5)


def test_normalisation_of_a_constant_image():
    aug = MultiCropAugmentation(**SMALL, **NO_PHOTOMETRIC)
    value = torch.tensor([30, 128, 250], dtype=torch.uint8).view(3, 1, 1)
    out = aug(value.expand(3, 40, 50).contiguous(), generator_seed=1)
    expected = (value.double() / 255 - MEAN.double()) / STD.double()
    for crop in _all_crops(out):
        assert torch.allclose(crop.double(), expected.expand_as(crop), atol=1e-5)


def test_same_seed_same_crops_different_seed_differs():
    aug = MultiCropAugmentation(**SMALL)
    img = Image.fromarray(_random_image())
    a, b, c = aug(img, generator_seed=5), aug(img, generator_seed=5), aug(img, generator_seed=6)
    assert all(torch.equal(x, y) for x, y in zip(_all_crops(a), _all_crops(b)))
    assert not any(torch.equal(x, y) for x, y in zip(_all_crops(a), _all_crops(c)))


def test_seeded_call_leaves_global_rng_alone_and_unseeded_uses_it():
    aug = MultiCropAugmentation(**SMALL)
    img = torch.from_numpy(_random_image()).permute(2, 0, 1)
    state = torch.get_rng_state()
    aug(img, generator_seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(11)
    a = aug(img)
    torch.manual_seed(11)
    b = aug(img)
    assert all(torch.equal(x, y) for x, y in zip(_all_crops(a), _all_crops(b)))


def test_pil_and_uint8_tensor_inputs_agree():
    arr = _random_image()
    aug = MultiCropAugmentation(**SMALL)
    from_pil = aug(Image.fromarray(arr), generator_seed=9)
    from_tensor = aug(torch.from_numpy(arr).permute(2, 0, 1).contiguous(), generator_seed=9)
    assert all(torch.equal(x, y) for x, y in zip(_all_crops(from_pil), _all_crops(from_tensor)))
    gray = aug(torch.from_numpy(arr[..., :1]).permute(2, 0, 1), generator_seed=9)  # [1, H, W]
    assert gray["global_crops"][0].shape == (3, 32, 32)
    assert aug(Image.fromarray(arr).convert("L"), generator_seed=0)["local_crops"][0].shape == (3, 16, 16)
    with pytest.raises(ValueError, match="image"):
        aug(torch.rand(3, 20, 20))
    with pytest.raises(TypeError, match="image"):
        aug(arr)


# ----------------------------------------------------------------------------------- probabilities
def _mark(monkeypatch, name: str, channel: int, row: int) -> None:
    """Replace a photometric kernel by one that stamps a marker pixel, so its application is visible."""

    def stamp(x, *args):
        x[channel, row, 0] = 100.0

    monkeypatch.setattr(A, name, stamp)


def _no_color_ops(monkeypatch) -> None:
    """Replace the colour-jitter kernels by no-ops (they do not affect the other draws) to keep tests fast."""
    for name in ("_adjust_brightness_", "_adjust_contrast_", "_adjust_saturation_", "_adjust_hue_"):
        monkeypatch.setattr(A, name, lambda x, f: None)


def _marked(crop: torch.Tensor, channel: int, row: int) -> bool:
    return bool(crop[channel, row, 0] > 50)


def test_blur_and_solarize_probabilities_per_crop(monkeypatch):
    _no_color_ops(monkeypatch)
    _mark(monkeypatch, "_gaussian_blur_", 0, 0)
    _mark(monkeypatch, "_solarize_", 1, 1)
    aug = MultiCropAugmentation(global_crops_size=16, local_crops_size=8, local_crops_number=8, patch_size=4)
    img = torch.from_numpy(_random_image(20, 20)).permute(2, 0, 1)
    n = 600
    blur = np.zeros((n, 10), dtype=bool)
    sol = np.zeros((n, 10), dtype=bool)
    for i in range(n):
        crops = _all_crops(aug(img, generator_seed=i))
        blur[i] = [_marked(c, 0, 0) for c in crops]
        sol[i] = [_marked(c, 1, 1) for c in crops]
    # effective official probabilities: global 1: 0.0, global 2: 0.9, local: 0.5; solarize 0.2 on global 2 only
    assert blur[:, 0].mean() == 0.0
    assert abs(blur[:, 1].mean() - 0.9) < 0.05
    assert abs(blur[:, 2:].mean() - 0.5) < 0.03
    assert abs(sol[:, 1].mean() - 0.2) < 0.06
    assert sol[:, 0].sum() == 0 and sol[:, 2:].sum() == 0


def test_probabilities_follow_the_config(monkeypatch):
    _no_color_ops(monkeypatch)
    _mark(monkeypatch, "_gaussian_blur_", 0, 0)
    _mark(monkeypatch, "_solarize_", 1, 1)
    _mark(monkeypatch, "_grayscale_", 2, 2)
    aug = MultiCropAugmentation(
        global_crops_size=16,
        local_crops_size=8,
        local_crops_number=2,
        patch_size=4,
        global_crop_1_blur_prob=1.0,
        global_crop_2_blur_prob=0.0,
        local_crops_blur_prob=0.0,
        global_crop_2_solarize_prob=1.0,
        grayscale_prob=0.5,
    )
    img = torch.from_numpy(_random_image(20, 20)).permute(2, 0, 1)
    gray = []
    for i in range(300):
        crops = _all_crops(aug(img, generator_seed=i))
        assert [_marked(c, 0, 0) for c in crops] == [True, False, False, False]
        assert [_marked(c, 1, 1) for c in crops] == [False, True, False, False]
        gray += [_marked(c, 2, 2) for c in crops]
    assert abs(np.mean(gray) - 0.5) < 0.06


def test_color_jitter_probability(monkeypatch):
    calls = []
    _no_color_ops(monkeypatch)
    monkeypatch.setattr(A, "_adjust_brightness_", lambda x, f: calls.append(1))
    aug = MultiCropAugmentation(global_crops_size=16, local_crops_size=8, local_crops_number=8, patch_size=4)
    img = torch.from_numpy(_random_image(20, 20)).permute(2, 0, 1)
    n = 300
    for i in range(n):
        aug(img, generator_seed=i)
    assert abs(len(calls) / (10 * n) - 0.8) < 0.04


# ----------------------------------------------------------------------------------- geometry
def _gradient_image(h: int = 40, w: int = 40) -> torch.Tensor:
    ramp = torch.linspace(0, 255, w).round().to(torch.uint8)
    return ramp.view(1, 1, w).expand(3, h, w).contiguous()


def _is_flipped(crop: torch.Tensor) -> bool:
    profile = crop.mean(dim=(0, 1))
    return bool(profile[-1] < profile[0])


def test_no_flips_when_disabled():
    aug = MultiCropAugmentation(**SMALL, **NO_PHOTOMETRIC, horizontal_flips=False)
    img = _gradient_image()
    flips = [_is_flipped(c) for s in range(60) for c in _all_crops(aug(img, generator_seed=s))]
    assert not any(flips)


def test_flips_when_enabled():
    aug = MultiCropAugmentation(**SMALL, **NO_PHOTOMETRIC, horizontal_flips=True)
    img = _gradient_image()
    flips = [_is_flipped(c) for s in range(60) for c in _all_crops(aug(img, generator_seed=s))]
    assert 0.4 < np.mean(flips) < 0.6


def test_crop_boxes_follow_scale_and_ratio():
    gen = torch.Generator().manual_seed(0)
    boxes = A._sample_crop_boxes(gen, 2000, 300, 400, (0.32, 1.0), (3 / 4, 4 / 3))
    area = np.array([h * w for _, _, h, w in boxes]) / (300 * 400)
    aspect = np.array([w / h for _, _, h, w in boxes])
    assert all(0 <= t and 0 <= l and t + h <= 300 and l + w <= 400 for t, l, h, w in boxes)
    assert area.min() > 0.31 and area.max() <= 1.0 and aspect.min() > 0.74 and aspect.max() < 1.35
    # scale is uniform in [0.32, 1] when the box fits: mean area well above the midpoint of a log law
    assert 0.55 < area.mean() < 0.7


def test_local_crops_subset_of_global_crops_are_patch_aligned_windows():
    aug = MultiCropAugmentation(**SMALL, **NO_PHOTOMETRIC, localcrops_subset_of_globalcrops=True)
    for seed in range(10):
        out = aug(torch.from_numpy(_random_image()).permute(2, 0, 1), generator_seed=seed)
        assert len(out["offsets"]) == 4
        for j, ((row, col), local) in enumerate(zip(out["offsets"], out["local_crops"])):
            assert row % 8 == 0 and col % 8 == 0 and row + 16 <= 32 and col + 16 <= 32
            src = out["global_crops"][0 if j < 2 else 1]
            assert torch.equal(local, src[:, row : row + 16, col : col + 16])


def test_share_color_jitter_applies_one_draw_to_all_crops():
    # brightness only, always applied: on a constant image every crop is value * factor
    cfg = {**SMALL, **NO_PHOTOMETRIC, "color_jitter_prob": 1.0, "contrast": 0.0, "saturation": 0.0, "hue": 0.0}
    img = torch.full((3, 40, 40), 120, dtype=torch.uint8)
    shared = MultiCropAugmentation(**cfg, share_color_jitter=True)(img, generator_seed=4)
    values = {round(float(c[0, 0, 0]), 5) for c in _all_crops(shared)}
    assert len(values) == 1
    per_crop = MultiCropAugmentation(**cfg, share_color_jitter=False)(img, generator_seed=4)
    assert len({round(float(c[0, 0, 0]), 5) for c in _all_crops(per_crop)}) > 1


# ----------------------------------------------------------------------------------- kernels vs torchvision
@pytest.mark.parametrize(
    "name, mine, ref",
    [
        ("brightness", lambda x: A._adjust_brightness_(x, 1.3), lambda x: TF.adjust_brightness(x, 1.3)),
        ("contrast", lambda x: A._adjust_contrast_(x, 0.7), lambda x: TF.adjust_contrast(x, 0.7)),
        ("saturation", lambda x: A._adjust_saturation_(x, 1.2), lambda x: TF.adjust_saturation(x, 1.2)),
        ("hue+", lambda x: A._adjust_hue_(x, 0.08), lambda x: TF.adjust_hue(x, 0.08)),
        ("hue-", lambda x: A._adjust_hue_(x, -0.1), lambda x: TF.adjust_hue(x, -0.1)),
        ("hue-half", lambda x: A._adjust_hue_(x, 0.5), lambda x: TF.adjust_hue(x, 0.5)),
        ("grayscale", A._grayscale_, lambda x: TF.rgb_to_grayscale(x, num_output_channels=3)),
        ("blur", lambda x: A._gaussian_blur_(x, 9, 1.7), lambda x: TF.gaussian_blur(x, [9, 9], [1.7, 1.7])),
        ("blur-thin", lambda x: A._gaussian_blur_(x, 9, 0.3), lambda x: TF.gaussian_blur(x, [9, 9], [0.3, 0.3])),
        ("solarize", lambda x: A._solarize_(x, 128 / 255), lambda x: TF.solarize(x, 128 / 255)),
    ],
)
def test_kernels_match_torchvision(name, mine, ref):
    x = torch.rand(3, 21, 26, generator=torch.Generator().manual_seed(0))
    x[:, :2, :2] = 0.5  # gray pixels (zero chroma)
    x[0, 4, 4] = x[1, 4, 4] = 0.9  # tie between R and G maxima
    expected = ref(x.clone())
    got = x.clone()
    mine(got)
    assert torch.allclose(got, expected, atol=1e-5), name


# ----------------------------------------------------------------------------------- config
def test_config_from_mapping_and_fixture():
    from omegaconf import OmegaConf

    crops = OmegaConf.load(FIXTURE).crops if FIXTURE.exists() else None  # the user's config, where available
    plain = {
        "global_crops_scale": [0.32, 1.0],
        "local_crops_number": 8,
        "global_crops_size": 224,
        "horizontal_flips": False,
        "gram_teacher_crops_size": None,
        "global_local_crop_pairs_ratios": 1.0,
        "use_resize_shuffle_augmentor": True,  # consumed by another component
    }
    for node in [plain, OmegaConf.create(plain)] + ([crops] if crops is not None else []):
        aug = MultiCropAugmentation.from_config(node, patch_size=14)
        cfg = aug.config
        assert cfg.global_crops_scale == (0.32, 1.0) and cfg.horizontal_flips is False and cfg.patch_size == 14
        assert (cfg.global_crop_1_blur_prob, cfg.global_crop_2_blur_prob, cfg.local_crops_blur_prob) == (0.0, 0.9, 0.5)
    with pytest.raises(ValueError, match="not_a_key"):
        MultiCropConfig.from_mapping({**plain, "not_a_key": 1})
    assert MultiCropConfig.from_mapping({**plain, "not_a_key": 1}, ignore_unknown=True).local_crops_number == 8
    with pytest.raises(NotImplementedError, match="gram_teacher_crops_size"):
        MultiCropConfig.from_mapping({"gram_teacher_crops_size": 448})
    with pytest.raises(ValueError, match="global_crops_size"):
        MultiCropConfig.from_mapping(OmegaConf.create({"global_crops_size": [224, 256]}))


@pytest.mark.parametrize(
    "bad",
    [
        {"local_crops_number": -1},
        {"global_crops_size": [224, 256]},
        {"blur_kernel_size": 8},
        {"blur_kernel_size": 9, "local_crops_size": 4},
        {"local_crops_blur_prob": 1.5},
        {"local_crops_scale": (0.5, 0.1)},
        {"rgb_std": (0.2, 0.0, 0.2)},
        {"localcrops_subset_of_globalcrops": True, "local_crops_size": 300},
    ],
)
def test_config_validation(bad):
    with pytest.raises(ValueError, match=next(iter(bad)) if "subset" not in str(bad) else "local_crops_size"):
        MultiCropConfig(**bad)


def test_derive_seed():
    assert derive_seed(1, 2, 3) == derive_seed(1, 2, 3)
    assert derive_seed(1, 2, 3) != derive_seed(1, 2, 4)
    assert 0 <= derive_seed(0) < 2**63
