import itertools
import os

import numpy as np
import pytest
import torch
from PIL import Image

from dinobridge.data.augmentation import MultiCropAugmentation
from dinobridge.data.collate import MultiCropCollator
from dinobridge.data.datasets import ImageFolderDataset
from dinobridge.data.loader import build_train_loader, loader_kwargs_from_cfg
from dinobridge.data.sampler import InfiniteSampler, sample_seed
from dinobridge.data.synthetic import ProceduralShapes
from dinobridge.errors import DataError


def _take(iterable, n):
    return list(itertools.islice(iterable, n))


# ---------------------------------------------------------------------------------------------- sampler
def test_ranks_partition_each_epoch_and_reshuffle():
    size, world = 10, 3
    per_rank = [_take(InfiniteSampler(size, r, world, seed=7), 40) for r in range(world)]
    # global position p = q * world + r
    stream = [None] * (40 * world)
    for r, items in enumerate(per_rank):
        for q, item in enumerate(items):
            stream[q * world + r] = item
    epochs = [[idx for idx, _ in stream[e * size : (e + 1) * size]] for e in range(10)]
    for perm in epochs:
        assert sorted(perm) == list(range(size))
    assert len({tuple(p) for p in epochs}) > 5  # reshuffled every epoch
    seeds = [s for _, s in stream]
    assert len(set(seeds)) == len(seeds) and all(0 <= s < 2**63 for s in seeds)
    assert seeds[5] == sample_seed(7, 5)
    fixed = _take(InfiniteSampler(size, 0, 1, seed=7, reshuffle_each_epoch=False), 30)
    assert [i for i, _ in fixed[:10]] == [i for i, _ in fixed[10:20]] == [i for i, _ in fixed[20:]]
    assert sorted(i for i, _ in fixed[:10]) == list(range(10))
    ordered = _take(InfiniteSampler(size, 1, 2, shuffle=False), 7)
    assert [i for i, _ in ordered] == [1, 3, 5, 7, 9, 1, 3]
    assert _take(InfiniteSampler(size, 0, 1, seed=8), 10) != _take(InfiniteSampler(size, 0, 1, seed=7), 10)


@pytest.mark.parametrize("world, rank, start", [(1, 0, 0), (1, 0, 23), (3, 2, 17), (4, 1, 250)])
def test_resume_equals_tail_of_uninterrupted_stream(world, rank, start):
    full = _take(InfiniteSampler(13, rank, world, seed=3), start + 40)
    resumed = _take(InfiniteSampler(13, rank, world, seed=3, start=start), 40)
    assert resumed == full[start:]


def test_resume_does_not_iterate_skipped_items(monkeypatch):
    sampler = InfiniteSampler(100, 0, 2, seed=1, start=10**12)
    calls = []
    orig = sampler.permutation
    monkeypatch.setattr(sampler, "permutation", lambda e: calls.append(e) or orig(e))
    first = next(iter(sampler))
    assert calls == [2 * 10**12 // 100]  # only the current epoch's permutation is built
    assert first == (sampler.index_at(2 * 10**12), sample_seed(1, 2 * 10**12))


def test_world_size_invariance_of_global_stream():
    one = _take(InfiniteSampler(50, 0, 1, seed=2), 40)
    four = [_take(InfiniteSampler(50, r, 4, seed=2), 10) for r in range(4)]
    merged = [four[p % 4][p // 4] for p in range(40)]
    assert merged == one


# ---------------------------------------------------------------------------------------------- loader
def _aug():
    return MultiCropAugmentation(global_crops_size=32, local_crops_size=16, local_crops_number=2, patch_size=8)


def _collator(rank=0):
    return MultiCropCollator.for_crops(32, 8, seed=11, rank=rank)


def _assert_batches_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if torch.is_tensor(a[k]):
            assert torch.equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k


def test_resume_and_worker_count_give_identical_batches():
    ds = ProceduralShapes(n=19, size=32)
    kw = dict(dataset=ds, transform=_aug(), collate_fn=_collator(), batch_size=4, seed=5, world_size=1, rank=0)
    full = _take(build_train_loader(**kw, num_workers=0), 6)  # 24 samples: crosses an epoch
    assert [b["batch_index"] for b in full] == list(range(6))
    assert full[0]["global_crops"].shape == (8, 3, 32, 32) and full[0]["local_crops"].shape == (8, 3, 16, 16)
    assert full[0]["masks"].shape == (8, 16) and full[0]["masks"].any()
    assert full[0]["data_skipped"] == 0
    assert full[0]["labels"].tolist() == [i % 10 for i in full[0]["sample_indices"].tolist()]
    assert not torch.equal(full[0]["global_crops"], full[1]["global_crops"])
    resumed = _take(build_train_loader(**kw, start_iter=4, num_workers=0), 2)
    for a, b in zip(full[4:], resumed):
        _assert_batches_equal(a, b)
    workers = _take(build_train_loader(**kw, num_workers=2), 6)
    for a, b in zip(full, workers):
        _assert_batches_equal(a, b)
    workers_resumed = _take(build_train_loader(**kw, start_iter=3, num_workers=2, persistent_workers=False), 3)
    for a, b in zip(full[3:], workers_resumed):
        _assert_batches_equal(a, b)


def test_epoch_boundary_and_ranks_in_loader():
    ds = ProceduralShapes(n=10, size=16)
    seen = []
    for rank in range(2):
        loader = build_train_loader(ds, _identity_tensor, None, batch_size=5, rank=rank, world_size=2, seed=1)
        seen.append(torch.cat([b["sample_indices"] for b in _take(loader, 2)]).tolist())
    # positions 0..19 of the global stream = two epochs, split between the ranks
    first_epoch = seen[0][:5] + seen[1][:5]
    assert sorted(first_epoch) == list(range(10))


def _identity_tensor(img):
    return torch.from_numpy(np.asarray(img).copy())


class _RandomNoise:
    """A transform without a seed argument (uses torch's global RNG): run under a seeded, forked RNG."""

    def __call__(self, img):
        return torch.rand(3)


def test_global_rng_transform_is_seeded_per_sample():
    ds = ProceduralShapes(n=20, size=16)
    state = torch.get_rng_state()
    a = _take(build_train_loader(ds, _RandomNoise(), None, batch_size=3, seed=2, num_workers=0), 4)
    assert torch.equal(state, torch.get_rng_state())  # global RNG untouched
    b = _take(build_train_loader(ds, _RandomNoise(), None, batch_size=3, seed=2, start_iter=2, num_workers=2), 2)
    assert torch.equal(a[2]["batch"], b[0]["batch"]) and torch.equal(a[3]["batch"], b[1]["batch"])
    assert not torch.equal(a[0]["batch"][0], a[0]["batch"][1])


def _folder_with_corrupt(root, n_good=8, corrupt=(2, 5)):
    os.makedirs(root, exist_ok=True)
    for i in range(n_good + len(corrupt)):
        path = os.path.join(root, f"{i:02d}.jpg")
        if i in corrupt:
            with open(path, "wb") as f:
                f.write(b"\xff\xd8 broken")
        else:
            Image.new("RGB", (16, 16), (i * 10, 0, 0)).save(path)
    return root


@pytest.mark.parametrize("num_workers", [0, 2])
def test_skipped_files_reach_the_batch(tmp_path, num_workers):
    ds = ImageFolderDataset(_folder_with_corrupt(str(tmp_path / "imgs")))
    loader = build_train_loader(ds, _identity_tensor, None, batch_size=5, seed=0, num_workers=num_workers)
    batches = _take(loader, 4)  # two epochs over 10 files
    assert sum(b["data_skipped"] for b in batches) == 4  # each corrupt file hit once per epoch
    for b in batches:
        assert b["batch"].shape == (5, 16, 16, 3)
        assert 20 not in b["batch"][:, 0, 0, 0].tolist() and 50 not in b["batch"][:, 0, 0, 0].tolist()


def test_worker_data_error_is_one_line(tmp_path):
    root = tmp_path / "bad"
    root.mkdir()
    for i in range(55):
        (root / f"{i:02d}.jpg").write_bytes(b"nope")
    loader = build_train_loader(ImageFolderDataset(str(root)), _identity_tensor, None, batch_size=2, num_workers=2)
    with pytest.raises(DataError) as e:
        next(iter(loader))
    assert "\n" not in str(e.value) and "consecutive images failed" in str(e.value)


def test_loader_kwargs_from_cfg():
    cfg = {"train": {"batch_size_per_gpu": 64, "seed": 3, "num_workers": 4, "reshuffle_sampler_perm": False}}
    assert loader_kwargs_from_cfg(cfg) == {"batch_size": 64, "seed": 3, "num_workers": 4, "reshuffle_each_epoch": False}


def test_device_prefetcher_yields_the_batches_in_order_and_transformed():
    from dinobridge.data.loader import DevicePrefetcher

    batches = [{"x": torch.full((2,), float(i)), "n": i} for i in range(4)]
    seen = []

    def transform(b):
        seen.append(b["n"])
        return {**b, "x": b["x"] * 10}

    pre = DevicePrefetcher(iter(batches), torch.device("cpu"), transform)
    out = [next(pre) for _ in range(4)]
    assert [b["n"] for b in out] == [0, 1, 2, 3]
    assert all(torch.equal(b["x"], torch.full((2,), 10.0 * i)) for i, b in enumerate(out))
    assert seen == [0, 1, 2, 3]  # no read-ahead without a CUDA stream
    with pytest.raises(StopIteration):
        next(pre)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (side-stream prefetch)")
def test_device_prefetcher_on_cuda_reads_one_batch_ahead():
    from dinobridge.data.loader import DevicePrefetcher

    batches = [{"x": torch.full((1024,), float(i)).pin_memory()} for i in range(3)]
    pre = DevicePrefetcher(iter(batches), torch.device("cuda"))
    first = next(pre)
    assert first["x"].is_cuda and first["x"][0].item() == 0.0
    assert pre._ahead is not None and pre._ahead["x"][0].item() == 1.0


@pytest.mark.skipif(not hasattr(os, "setsid"), reason="no process groups on this platform")
def test_workers_run_in_their_own_process_group():
    """A signal sent to the trainer's process group (`timeout`, `kill -- -PGID`) must not reach the data workers (the
    trainer saves, then stops them); the trainer still shuts them down."""
    ds = ProceduralShapes(n=40, size=16)
    loader = build_train_loader(ds, _identity_tensor, None, batch_size=4, seed=0, num_workers=1)
    iterator = iter(loader.dataloader)
    assert next(iterator)["batch"].shape[0] == 4
    (worker,) = iterator._workers  # torch's worker processes (private attribute, read only)
    assert os.getpgid(worker.pid) != os.getpgid(0)
    assert next(iterator)["batch"].shape[0] == 4
    iterator._shutdown_workers()
    assert not worker.is_alive()
