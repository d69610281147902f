"""Endless, resumable, rank-sharded sample stream with a per-sample augmentation seed.

The *global stream* is the concatenation of epochs: epoch e is a permutation of ``range(size)`` drawn from
``numpy.random.default_rng([seed, TAG, e])`` (epoch 0's permutation for every epoch when ``reshuffle_each_epoch`` is
false; the identity when ``shuffle`` is false). Global position p holds ``perm_{p // size}[p % size]``. Rank r of W
takes positions ``r, r + W, r + 2W, ...``, so the ranks partition every epoch, and the stream (hence every sample)
does not depend on the number of DataLoader workers; the first ``k * W`` samples are even the same set for any W.

Each position p also carries ``sample_seed(seed, p)``, a 63-bit seed for that sample's augmentation (a splitmix64
hash: cheap, stateless). Resuming after a rank consumed `start` samples jumps straight to position
``start * W + r``: the cost is generating the current epoch's permutation, nothing is iterated over.

Official DINOv3 (`train.cache_dataset` false / true) has two samplers with different streams and a seed that depends
on `start_iter`, so its resumed runs do not replay the uninterrupted stream; here ``train.reshuffle_sampler_perm``
maps to `reshuffle_each_epoch` and a resumed run replays the uninterrupted stream exactly.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

_MASK64 = (1 << 64) - 1
_TAG = 0x51AB1E  # decorrelates the permutation streams from other users of the same seed


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def sample_seed(seed: int, position: int) -> int:
    """Deterministic 63-bit seed of global stream position `position` under base `seed`."""
    return _splitmix64(_splitmix64(int(seed) & _MASK64) ^ (int(position) & _MASK64)) >> 1


class InfiniteSampler:
    """Endless stream of ``(dataset index, sample_seed)`` for one rank (see the module docstring).

    Args:
        size: dataset length (> 0).
        rank, world_size: this rank's share of the global stream.
        seed: base seed of the permutations and sample seeds.
        start: samples this rank already consumed (resume): iteration starts at local position `start`.
        shuffle: False -> epochs in dataset order.
        reshuffle_each_epoch: False -> the same permutation every epoch (``train.reshuffle_sampler_perm``).
    """

    def __init__(
        self,
        size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        start: int = 0,
        shuffle: bool = True,
        reshuffle_each_epoch: bool = True,
    ) -> None:
        if int(size) != size or size <= 0:
            raise ValueError(f"size: expected a positive dataset length, got {size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank/world_size: expected 0 <= rank < world_size, got {rank}/{world_size}")
        if start < 0 or seed < 0:
            raise ValueError(f"start/seed: expected non-negative integers, got start={start}, seed={seed}")
        self.size, self.rank, self.world_size = int(size), int(rank), int(world_size)
        self.seed, self.start = int(seed), int(start)
        self.shuffle, self.reshuffle_each_epoch = bool(shuffle), bool(reshuffle_each_epoch)
        self._cached: tuple[int, np.ndarray | None] | None = None

    def __repr__(self) -> str:
        return (
            f"InfiniteSampler(size={self.size}, rank={self.rank}, world_size={self.world_size}, seed={self.seed}, "
            f"start={self.start}, shuffle={self.shuffle}, reshuffle_each_epoch={self.reshuffle_each_epoch})"
        )

    def set_start(self, start: int) -> None:
        """Make the next iteration begin at local position `start` (samples already consumed by this rank)."""
        if start < 0:
            raise ValueError(f"start: expected >= 0, got {start}")
        self.start = int(start)

    def global_position(self, local_position: int) -> int:
        return int(local_position) * self.world_size + self.rank

    def permutation(self, epoch: int) -> np.ndarray | None:
        """The order of `epoch` (int64 [size]), or None for the identity (shuffle off); the last one is cached."""
        if not self.shuffle:
            return None
        key = epoch if self.reshuffle_each_epoch else 0
        if self._cached is None or self._cached[0] != key:
            self._cached = (key, np.random.default_rng([self.seed, _TAG, key]).permutation(self.size))
        return self._cached[1]

    def index_at(self, global_position: int) -> int:
        """Dataset index at a global stream position (random access)."""
        epoch, offset = divmod(int(global_position), self.size)
        perm = self.permutation(epoch)
        return offset if perm is None else int(perm[offset])

    def iter_positions(self) -> Iterator[tuple[int, int, int]]:
        """Endless ``(global_position, index, sample_seed)`` from local position `start`."""
        p = self.global_position(self.start)
        step = self.world_size
        while True:
            epoch, offset = divmod(p, self.size)
            perm = self.permutation(epoch)
            while offset < self.size:
                index = offset if perm is None else int(perm[offset])
                yield p, index, sample_seed(self.seed, p)
                p += step
                offset += step

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for _, index, s in self.iter_positions():
            yield index, s
