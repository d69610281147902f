"""The training data loader: sampler stream -> robust load -> seeded transform -> collate with per-batch seeding.

Batch k of a rank (k = start_iter, start_iter + 1, ...) holds the rank's local stream positions
``[k * B, (k + 1) * B)`` of `InfiniteSampler`. Every random draw is a function of (seed, position):

* the augmentation of a sample runs with that position's ``sample_seed`` (``transform(img, generator_seed=s)`` for
  `MultiCropAugmentation`, ``transform(img, seed=s)`` for transforms taking `seed`, else under a forked and seeded
  torch / numpy / python global RNG);
* a collate function accepting ``batch_index`` (`MultiCropCollator`) gets ``batch_index=k`` and seeds the iBOT masks
  from (its seed, rank, k);

so batch k is identical whether the run started at 0 or resumed at k, and for any ``num_workers``.

Each batch is the collate output (a dict; a non-dict output is put under ``"batch"``) plus
``data_skipped`` (int: unreadable files replaced in this batch, summed over workers), ``batch_index`` (int, k),
``sample_indices`` (long [B], dataset indices) and ``labels`` (long [B], -1 when unknown).
"""

from __future__ import annotations

import inspect
import os
import random
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, default_collate

from dinobridge.data.datasets import load_sample
from dinobridge.data.sampler import InfiniteSampler
from dinobridge.errors import DataError, one_line


def _accepts_kwarg(fn: Callable, name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


@dataclass
class _Sample:
    output: Any
    label: int
    index: int
    skipped: int
    batch_index: int


class SeededTransformDataset(Dataset):
    """Map-style view whose keys are ``(index, sample_seed, batch_index)``: load robustly, transform under the seed."""

    def __init__(self, dataset: Any, transform: Callable | None) -> None:
        self.dataset = dataset
        self.transform = transform
        self._mode = "none"
        if transform is not None:
            if _accepts_kwarg(transform, "generator_seed"):
                self._mode = "generator_seed"
            elif _accepts_kwarg(transform, "seed"):
                self._mode = "seed"
            else:
                self._mode = "global_rng"
        self._logged: set = set()

    def __len__(self) -> int:
        return len(self.dataset)

    def apply_transform(self, image: Any, seed: int) -> Any:
        if self._mode == "none":
            return image
        if self._mode == "generator_seed":
            return self.transform(image, generator_seed=seed)
        if self._mode == "seed":
            return self.transform(image, seed=seed)
        py_state, np_state = random.getstate(), np.random.get_state()
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                random.seed(seed)
                np.random.seed(seed & 0xFFFFFFFF)
                return self.transform(image)
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)

    def __getitem__(self, key: tuple[int, int, int]) -> _Sample:
        index, seed, batch_index = key
        image, label, skipped = load_sample(self.dataset, index, self._logged)
        return _Sample(self.apply_transform(image, seed), label, index, skipped, batch_index)


class CollateWithMeta:
    """Wraps a collate function: passes ``batch_index`` when it accepts it, adds skip counts / indices / labels."""

    def __init__(self, collate_fn: Callable | None) -> None:
        self.collate_fn = collate_fn or default_collate
        self._pass_batch_index = _accepts_kwarg(self.collate_fn, "batch_index")

    def __call__(self, samples: list[_Sample]) -> dict[str, Any]:
        batch_index = samples[0].batch_index
        outputs = [s.output for s in samples]
        if self._pass_batch_index:
            batch = self.collate_fn(outputs, batch_index=batch_index)
        else:
            batch = self.collate_fn(outputs)
        if not isinstance(batch, dict):
            batch = {"batch": batch}
        batch["data_skipped"] = int(sum(s.skipped for s in samples))
        batch["batch_index"] = int(batch_index)
        batch["sample_indices"] = torch.tensor([s.index for s in samples], dtype=torch.long)
        batch["labels"] = torch.tensor([s.label for s in samples], dtype=torch.long)
        return batch


class InfiniteBatchSampler:
    """Groups a rank's `InfiniteSampler` stream into batches of keys ``(index, sample_seed, batch_index)``."""

    def __init__(self, sampler: InfiniteSampler, batch_size: int, start_iter: int = 0) -> None:
        if batch_size <= 0:
            raise ValueError(f"batch_size: expected a positive int, got {batch_size}")
        self.sampler, self.batch_size = sampler, int(batch_size)
        self.set_start_iter(start_iter)

    def set_start_iter(self, start_iter: int) -> None:
        if start_iter < 0:
            raise ValueError(f"start_iter: expected >= 0, got {start_iter}")
        self.start_iter = int(start_iter)
        self.sampler.set_start(self.start_iter * self.batch_size)

    def __iter__(self) -> Iterator[list[tuple[int, int, int]]]:
        batch_index, batch = self.start_iter, []
        for _, index, seed in self.sampler.iter_positions():
            batch.append((index, seed, batch_index))
            if len(batch) == self.batch_size:
                yield batch
                batch_index, batch = batch_index + 1, []


def _worker_init(worker_id: int) -> None:
    torch.set_num_threads(1)  # workers run many small CPU ops; avoid oversubscribing the cores
    # Own process group: a SIGTERM / SIGINT sent to the trainer's group (`timeout`, `kill -- -PGID`, Ctrl-C) reaches
    # the main process only, which saves after its step (train/preemption.py) and shuts the workers down itself; a
    # signal sent to a worker's pid still ends it, and workers exit when the main process dies.
    if hasattr(os, "setsid"):
        try:
            os.setsid()
        except OSError:
            pass


class TrainLoader:
    """Endless iterable of training batches (see the module docstring); ``iter()`` starts at `start_iter`."""

    def __init__(self, dataloader: DataLoader, batch_sampler: InfiniteBatchSampler) -> None:
        self.dataloader, self.batch_sampler = dataloader, batch_sampler

    @property
    def start_iter(self) -> int:
        return self.batch_sampler.start_iter

    def set_start_iter(self, start_iter: int) -> None:
        """Make the next ``iter()`` begin at batch `start_iter` (workers are kept when persistent)."""
        self.batch_sampler.set_start_iter(start_iter)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        iterator = iter(self.dataloader)
        while True:
            try:
                batch = next(iterator)
            except DataError as exc:
                raise DataError(one_line(exc)) from None
            yield batch


def build_train_loader(
    dataset: Any,
    transform: Callable | None,
    collate_fn: Callable | None,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    start_iter: int = 0,
    num_workers: int = 0,
    pin_memory: bool | None = None,
    persistent_workers: bool = True,
    drop_last: bool = True,
    shuffle: bool = True,
    reshuffle_each_epoch: bool = True,
    prefetch_factor: int = 2,
    multiprocessing_context: Any = None,
) -> TrainLoader:
    """Endless training loader of one rank (batch k = local stream positions [k*B, (k+1)*B), from k = start_iter).

    Args:
        dataset: map-style dataset of (image, label) (dinobridge datasets add robust `load`).
        transform: per-image transform (`MultiCropAugmentation` or any callable; None = identity).
        collate_fn: list of transform outputs -> batch (`MultiCropCollator` gets ``batch_index``); None = default.
        batch_size: per-rank batch size B; rank, world_size: the data-parallel group.
        seed: base seed of the sample stream (``train.seed``); start_iter: first batch index (resume).
        num_workers: DataLoader worker processes (0 = load in the main process).
        pin_memory: None = when CUDA is available; True is ignored without CUDA.
        persistent_workers: keep workers alive across ``iter()`` calls (only with num_workers > 0).
        drop_last: accepted for API symmetry: the stream is endless, every batch is full.
        shuffle, reshuffle_each_epoch: see `InfiniteSampler` (``train.reshuffle_sampler_perm``).
        prefetch_factor: batches prefetched per worker; multiprocessing_context: e.g. "spawn" (default: fork).
    """
    del drop_last  # every batch of an endless stream is full
    if len(dataset) == 0:
        raise DataError("dataset: expected at least one image, got an empty dataset")
    sampler = InfiniteSampler(
        len(dataset), rank=rank, world_size=world_size, seed=seed, shuffle=shuffle,
        reshuffle_each_epoch=reshuffle_each_epoch,
    )  # fmt: skip
    batch_sampler = InfiniteBatchSampler(sampler, batch_size, start_iter)
    cuda = torch.cuda.is_available()
    workers = int(num_workers)
    dataloader = DataLoader(
        SeededTransformDataset(dataset, transform),
        batch_sampler=batch_sampler,
        num_workers=workers,
        collate_fn=CollateWithMeta(collate_fn),
        pin_memory=cuda if pin_memory is None else bool(pin_memory) and cuda,
        worker_init_fn=_worker_init if workers > 0 else None,
        persistent_workers=bool(persistent_workers) and workers > 0,
        prefetch_factor=prefetch_factor if workers > 0 else None,
        multiprocessing_context=multiprocessing_context if workers > 0 else None,
        generator=torch.Generator().manual_seed(int(seed)),  # worker base seeds: leave the global RNG alone
    )
    return TrainLoader(dataloader, batch_sampler)


def loader_kwargs_from_cfg(cfg: Any) -> dict[str, Any]:
    """build_train_loader keyword arguments read from ``train.*`` (batch_size_per_gpu, seed, num_workers,
    reshuffle_sampler_perm)."""
    train = cfg["train"] if isinstance(cfg, dict) else cfg.train
    get = train.get if hasattr(train, "get") else (lambda k, d=None: getattr(train, k, d))
    reshuffle = get("reshuffle_sampler_perm", True)
    return {
        "batch_size": int(get("batch_size_per_gpu")),
        "seed": int(get("seed", 0) or 0),
        "num_workers": int(get("num_workers", 0) or 0),
        "reshuffle_each_epoch": True if reshuffle is None else bool(reshuffle),
    }


def multicrop_config(cfg: Any) -> Any:
    """The augmentation settings of a run: every `crops.*` key that `MultiCropConfig` has, plus the patch size.

    With ``crops.gpu_augmentation`` the batches carry uint8 crops until ``DeviceAugmentation(config)`` (see
    dinobridge.data.gpu_augmentation) runs on them on the device."""
    from dataclasses import fields

    from dinobridge.data.augmentation import MultiCropConfig

    crops = cfg.crops
    kwargs = {f.name: crops[f.name] for f in fields(MultiCropConfig) if f.name in crops and crops[f.name] is not None}
    kwargs["patch_size"] = int(cfg.student.patch_size)
    return MultiCropConfig(**kwargs)


def batch_to_device(batch: dict[str, Any], device: torch.device, non_blocking: bool = False) -> dict[str, Any]:
    """The batch with its top-level tensors on `device` (other values as they are)."""
    return {k: (v.to(device, non_blocking=non_blocking) if torch.is_tensor(v) else v) for k, v in batch.items()}


class DevicePrefetcher:
    """Batches already on the training device: ``next()`` returns batch k and starts moving batch k+1 (and its
    device-side augmentation) on a side CUDA stream, so the host-to-device copy overlaps step k's compute.

    batches: an iterator of CPU batches (pinned memory makes the copies asynchronous); transform: applied on the
    device after the copy (e.g. `DeviceAugmentation`). On devices other than CUDA the copy is synchronous and
    nothing is read ahead. ``last_wait_s`` is the time the last ``next()`` waited for the loader.
    """

    def __init__(self, batches: Iterator[dict[str, Any]], device: torch.device,
                 transform: Callable[[dict[str, Any]], dict[str, Any]] | None = None) -> None:
        self.batches, self.device, self.transform = batches, torch.device(device), transform
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._ahead: dict[str, Any] | None = None
        self.last_wait_s = 0.0

    def __iter__(self) -> "DevicePrefetcher":
        return self

    def _load(self) -> dict[str, Any]:
        t0 = time.perf_counter()
        batch = next(self.batches)
        self.last_wait_s += time.perf_counter() - t0
        if self.stream is None:
            batch = batch_to_device(batch, self.device)
            return self.transform(batch) if self.transform is not None else batch
        with torch.cuda.stream(self.stream):
            batch = batch_to_device(batch, self.device, non_blocking=True)
            return self.transform(batch) if self.transform is not None else batch

    def __next__(self) -> dict[str, Any]:
        self.last_wait_s = 0.0
        batch = self._ahead if self._ahead is not None else self._load()
        self._ahead = None
        if self.stream is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_stream(self.stream)
            for v in batch.values():
                if torch.is_tensor(v) and v.device.type == "cuda":
                    v.record_stream(current)  # allocated on the side stream, used on the compute stream
            self._ahead = self._load()  # batch k+1 travels while step k computes
        return batch


@dataclass
class TrainingData:
    """The data path of a training run: ``batch = device_augment(to_device(next(iter(loader))))``.

    loader: the endless `TrainLoader` (decode, crops and, without ``crops.gpu_augmentation``, the photometric
    augmentation in the workers; iBOT masks in the collator); device_augment: the device half of the augmentation
    (`DeviceAugmentation`; a no-op unless ``crops.gpu_augmentation``)."""

    loader: TrainLoader
    device_augment: Callable[[dict[str, Any]], dict[str, Any]]


def build_collator(cfg: Any, rank: int = 0) -> Any:
    """The run's `MultiCropCollator`: iBOT block masks on the global-crop grid (`ibot.*`), seeded by (train.seed, rank)."""
    from dinobridge.data.collate import MultiCropCollator

    return MultiCropCollator.for_crops(
        int(cfg.crops.global_crops_size), int(cfg.student.patch_size),
        mask_ratio_min_max=tuple(cfg.ibot.mask_ratio_min_max),
        mask_sample_probability=float(cfg.ibot.mask_sample_probability),
        mask_random_circular_shift=bool(cfg.ibot.mask_random_circular_shift),
        seed=int(cfg.train.seed), rank=rank,
    )  # fmt: skip


def build_training_data(
    cfg: Any, dataset: Any, rank: int = 0, world_size: int = 1, start_iter: int = 0, pin_memory: bool = False
) -> TrainingData:
    """The loader and device augmentation a training run (and the training benchmark) uses, from `cfg`."""
    from dinobridge.data.augmentation import MultiCropAugmentation
    from dinobridge.data.gpu_augmentation import DeviceAugmentation

    augment = MultiCropAugmentation(multicrop_config(cfg))
    loader = build_train_loader(
        dataset, augment, build_collator(cfg, rank), batch_size=int(cfg.train.batch_size_per_gpu), rank=rank, world_size=world_size,
        seed=int(cfg.train.seed), start_iter=start_iter, num_workers=int(cfg.train.num_workers),
        pin_memory=pin_memory,
    )  # fmt: skip
    return TrainingData(loader, DeviceAugmentation(augment.config, compile=bool(cfg.train.get("compile", False))))
