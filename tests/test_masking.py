"""Tests for dinobridge.data.masking.BlockMaskGenerator."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from dinobridge.data.masking import BlockMaskGenerator


def _components(mask: np.ndarray) -> int:
    """Number of 4-connected components of True cells (test oracle, plain flood fill)."""
    seen = np.zeros_like(mask)
    H, W = mask.shape
    n = 0
    for i in range(H):
        for j in range(W):
            if mask[i, j] and not seen[i, j]:
                n += 1
                stack = [(i, j)]
                seen[i, j] = True
                while stack:
                    y, x = stack.pop()
                    for dy, dx in ((1, 0), (-1, 0), (0, 1), (0, -1)):
                        v, u = y + dy, x + dx
                        if 0 <= v < H and 0 <= u < W and mask[v, u] and not seen[v, u]:
                            seen[v, u] = True
                            stack.append((v, u))
    return n


@pytest.mark.parametrize("grid", [(14, 14), (6, 9)])
@pytest.mark.parametrize("shift", [False, True])
def test_exact_count(grid, shift):
    gen = BlockMaskGenerator(grid)
    rng = np.random.default_rng(0)
    n = grid[0] * grid[1]
    for T in [0, 1, 3, 4, 7, n // 4, n // 2, n - 1, n]:
        for _ in range(5):
            m = gen(T, rng, random_circular_shift=shift)
            assert m.dtype == torch.bool and tuple(m.shape) == grid
            assert int(m.sum()) == T


def test_default_max_block_is_half_grid():
    gen = BlockMaskGenerator(14)
    assert gen.max_num_patches == 98 and gen.min_num_patches == 4 and gen.num_patches == 196
    assert gen.log_aspect_ratio == pytest.approx((np.log(0.3), np.log(1 / 0.3)))


def test_circular_shift_is_a_roll_of_the_unshifted_mask():
    gen = BlockMaskGenerator((10, 12))
    for seed in range(20):
        plain = gen(40, np.random.default_rng(seed)).numpy()
        shifted = gen(40, np.random.default_rng(seed), random_circular_shift=True).numpy()
        assert shifted.sum() == 40
        rolls = [np.roll(plain, (dy, dx), axis=(0, 1)) for dy in range(10) for dx in range(12)]
        assert any(np.array_equal(shifted, r) for r in rolls)


def test_shift_moves_masks_around():
    # with the shift, every cell of the grid is masked in some draw
    gen = BlockMaskGenerator(14)
    rng = np.random.default_rng(1)
    shifted = torch.stack([gen(20, rng, random_circular_shift=True) for _ in range(200)]).float()
    assert shifted.mean(0).min() > 0  # every cell is hit sometimes


def test_same_seed_same_masks_and_no_global_rng_use():
    gen = BlockMaskGenerator(14)
    torch_state = torch.get_rng_state()
    np_state = np.random.get_state()[1].copy()
    py_state = random.getstate()
    a = [gen(t, np.random.default_rng(123)) for t in (20, 60, 98)]
    b = [gen(t, np.random.default_rng(123)) for t in (20, 60, 98)]
    c = [gen(t, np.random.default_rng(124)) for t in (20, 60, 98)]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))
    # torch.Generator input is reproducible too
    t1 = gen(50, torch.Generator().manual_seed(5))
    t2 = gen(50, torch.Generator().manual_seed(5))
    assert torch.equal(t1, t2)
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert np.array_equal(np.random.get_state()[1], np_state)
    assert random.getstate() == py_state


def test_masks_are_blocky_not_scattered():
    gen = BlockMaskGenerator(14)
    rng = np.random.default_rng(0)
    block = np.mean([_components(gen(60, rng).numpy()) for _ in range(40)])
    scattered = np.mean(
        [_components(np.isin(np.arange(196), rng.choice(196, 60, replace=False)).reshape(14, 14)) for _ in range(40)]
    )
    assert block < 6 and scattered > 2.5 * block


def test_generate_many_shapes_and_counts():
    gen = BlockMaskGenerator((4, 5))
    m = gen.generate_many([0, 3, 10, 20], np.random.default_rng(0))
    assert m.shape == (4, 20) and m.sum(1).tolist() == [0, 3, 10, 20]


def test_errors():
    gen = BlockMaskGenerator(4)
    with pytest.raises(ValueError, match="num_masking_patches"):
        gen(17, np.random.default_rng(0))
    with pytest.raises(ValueError, match="num_masking_patches"):
        gen(-1, np.random.default_rng(0))
    with pytest.raises(TypeError, match="rng"):
        gen(3, 0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="input_size"):
        BlockMaskGenerator((0, 4))
