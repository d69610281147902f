"""Tests for dinobridge.data.collate (multi-crop collation + iBOT masks)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from dinobridge.data.collate import MultiCropCollator, collate_multicrop, mask_counts
from dinobridge.data.masking import BlockMaskGenerator


def _samples(B: int, n_g: int = 2, n_l: int = 3, g: int = 8, l: int = 4, offsets: bool = False) -> list[dict]:
    """Crops filled with distinguishable constants: global 100*c + b, local 1000 + 100*c + b."""
    out = []
    for b in range(B):
        d = {
            "global_crops": [torch.full((3, g, g), 100.0 * c + b) for c in range(n_g)],
            "local_crops": [torch.full((3, l, l), 1000.0 + 100.0 * c + b) for c in range(n_l)],
        }
        if offsets:
            d["offsets"] = [(b, c) for c in range(n_l)]
        out.append(d)
    return out


def _collate(samples, grid=(4, 4), seed=0, **kw):
    return collate_multicrop(samples, mask_generator=BlockMaskGenerator(grid), rng=np.random.default_rng(seed), **kw)


def test_crop_major_order():
    B, n_g, n_l = 5, 2, 3
    out = _collate(_samples(B, n_g, n_l))
    assert out["global_crops"].shape == (n_g * B, 3, 8, 8)
    assert out["local_crops"].shape == (n_l * B, 3, 4, 4)
    for c in range(n_g):
        for b in range(B):
            assert torch.all(out["global_crops"][c * B + b] == 100.0 * c + b)
    for c in range(n_l):
        for b in range(B):
            assert torch.all(out["local_crops"][c * B + b] == 1000.0 + 100.0 * c + b)


def test_dtype_cast_and_tuple_samples():
    samples = [(s, ()) for s in _samples(4)]
    out = _collate(samples, dtype=torch.bfloat16)
    assert out["global_crops"].dtype == torch.bfloat16 and out["local_crops"].dtype == torch.bfloat16
    assert torch.equal(out["global_crops"][5].float(), torch.full((3, 8, 8), 101.0).bfloat16().float())
    assert _collate(_samples(4))["global_crops"].dtype == torch.float32


def test_masks_official_numbers_b64():
    # reference §1.5 [verified]: B=64, 224/16: 64 of 128 masked, counts 20..98, sum of masks_weight = 64
    out = _collate(_samples(64, g=2, l=1), grid=(14, 14), mask_ratio_min_max=(0.1, 0.5), mask_sample_probability=0.5)
    masks = out["masks"]
    assert masks.shape == (128, 196) and masks.dtype == torch.bool
    per_image = masks.sum(1)
    masked = per_image > 0
    assert int(masked.sum()) == 64
    assert int(per_image[masked].min()) == 20 and int(per_image.max()) == 98
    assert out["masks_weight"].sum().item() == pytest.approx(64.0, abs=1e-3)
    assert out["upperbound"] == int(per_image.sum())
    assert 0.13 < per_image.sum().item() / masks.numel() < 0.17  # ~15% of all global patches


@pytest.mark.parametrize("p", [0.0, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("ratios", [(0.1, 0.5), (0.2, 0.4)])
def test_mask_share_and_ratio_span(p, ratios):
    B, N = 16, 64
    out = _collate(_samples(B), grid=(8, 8), mask_ratio_min_max=ratios, mask_sample_probability=p)
    per_image = out["masks"].sum(1)
    n_masked = int((per_image > 0).sum())
    assert n_masked == int(2 * B * p)
    if n_masked:
        # float64 oracle of the linspace recipe (the code uses float32 as the official one: allow +-1 patch)
        expected = [int(N * (ratios[0] + (ratios[1] - ratios[0]) * (i + 1) / n_masked)) for i in range(n_masked)]
        got = sorted(per_image[per_image > 0].tolist())
        assert all(abs(a - b) <= 1 for a, b in zip(got, sorted(expected)))
        assert got[-1] == int(N * ratios[1])
        assert got[0] >= int(N * ratios[0])


def test_mask_counts_matches_float32_recipe():
    probs = torch.linspace(0.1, 0.5, 65)
    assert mask_counts(128, 196, (0.1, 0.5), 0.5) == [int(196 * probs[i + 1]) for i in range(64)]
    with pytest.raises(ValueError, match="mask_ratio_min_max"):
        mask_counts(4, 16, (0.6, 0.5), 0.5)
    with pytest.raises(ValueError, match="mask_sample_probability"):
        mask_counts(4, 16, (0.1, 0.5), 1.5)


def test_mask_indices_and_weights_consistent():
    out = _collate(_samples(8), grid=(6, 6), mask_random_circular_shift=True)
    masks, idx, w = out["masks"], out["mask_indices"], out["masks_weight"]
    assert torch.equal(idx, torch.nonzero(masks.flatten()).flatten())
    assert out["n_masked_patches"].dtype == torch.long and out["n_masked_patches"].tolist() == [idx.numel()]
    per_image = masks.sum(1).double()
    rows = idx // masks.shape[1]
    assert torch.allclose(w.double(), 1.0 / per_image[rows])
    assert w.dtype == torch.float32
    assert w.sum().item() == pytest.approx(float((per_image > 0).sum()), abs=1e-4)


def test_both_global_crops_get_masked_over_batches():
    B = 8
    first_crop, second_crop = 0, 0
    for seed in range(20):
        m = _collate(_samples(B), seed=seed)["masks"].any(1)
        first_crop += int(m[:B].sum())
        second_crop += int(m[B:].sum())
    assert first_crop > 0 and second_crop > 0 and first_crop + second_crop == 20 * B


def test_offsets_collated_crop_major():
    B, n_l = 3, 2
    out = _collate(_samples(B, n_l=n_l, offsets=True))
    assert out["offsets"].tolist() == [[b, c] for c in range(n_l) for b in range(B)]
    assert "offsets" not in _collate(_samples(B))


def test_collator_reproducible_and_resumable():
    samples = _samples(4)
    col = MultiCropCollator(BlockMaskGenerator(4), seed=7)
    seq = [col(samples)["masks"] for _ in range(5)]
    assert col.state_dict() == {"seed": 7, "rank": 0, "step": 5}
    assert not all(torch.equal(seq[0], s) for s in seq[1:])
    # explicit index == counted index
    assert torch.equal(col(samples, batch_index=3)["masks"], seq[3])
    # resume from a state dict at step 2
    other = MultiCropCollator(BlockMaskGenerator(4), seed=0)
    other.load_state_dict({"seed": 7, "rank": 0, "step": 2})
    assert all(torch.equal(other(samples)["masks"], s) for s in seq[2:])
    # another rank or seed draws other masks
    r1 = MultiCropCollator(BlockMaskGenerator(4), seed=7, rank=1)
    assert not all(torch.equal(r1(samples, batch_index=i)["masks"], seq[i]) for i in range(5))
    col.set_step(1)
    assert torch.equal(col(samples)["masks"], seq[1])


def test_collator_for_crops():
    col = MultiCropCollator.for_crops(224, 16, dtype=torch.bfloat16)
    assert col.mask_generator.shape == (14, 14) and col.mask_generator.max_num_patches == 98
    with pytest.raises(ValueError, match="global_crops_size"):
        MultiCropCollator.for_crops(100, 16)


class _FakeAugDataset(Dataset):
    def __len__(self) -> int:
        return 24

    def __getitem__(self, i: int) -> dict:
        return {"global_crops": [torch.full((3, 4, 4), float(i))] * 2, "local_crops": [torch.zeros(3, 2, 2)]}


def test_masks_independent_of_num_workers():
    def run(workers: int) -> list[torch.Tensor]:
        col = MultiCropCollator(BlockMaskGenerator(4), seed=3, mask_sample_probability=0.5)
        loader = DataLoader(_FakeAugDataset(), batch_size=4, num_workers=workers, collate_fn=col)
        return [b["masks"] for b in loader]

    main, workers = run(0), run(2)
    assert len(main) == len(workers) == 6
    assert all(torch.equal(a, b) for a, b in zip(main, workers))


def test_errors():
    with pytest.raises(ValueError, match="samples"):
        _collate([])
    with pytest.raises(TypeError, match="samples"):
        _collate([torch.zeros(3)])
    bad = _samples(2)
    bad[1]["local_crops"] = bad[1]["local_crops"][:1]
    with pytest.raises(ValueError, match="local_crops"):
        _collate(bad)
