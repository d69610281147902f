"""Benchmark of the real training step (`dinobridge.train.step`): images/s, step time, TFLOP/s, MFU, memory, data wait.

Each variant builds the model exactly as `dinobridge train` does (`build_training`: meta-device build, init,
activation checkpointing / compile / FSDP2 as configured, AdamW) and runs `Training.step`, the loop's own step, on

* ``--data synthetic`` (default): one fixed batch made by the real augmentation + collator from random images,
  reused every step (no loader cost: the compute ceiling), or
* ``--data DIR``: an ImageFolder / flat folder of JPEGs through the real loader (`build_training_data`, with
  ``train.num_workers`` workers, pinned memory and ``crops.gpu_augmentation`` as configured); data wait is the
  share of the step spent waiting for the next batch.

FLOPs are analytic (`dinobridge.train.flops`, formula in its docstring: student forward+backward on every crop,
teacher forward on the global crops, heads on the tokens they see) and MFU is against the device's dense bf16 peak
(989 TFLOP/s for H100 / H200). Warm-up steps (compilation) are each waited for; then the measured steps run as in
training, the host launching step k+1 while the device computes step k, and the step time is that window / steps.

Examples (one GPU):
  python benchmarks/bench_train.py --config-file ../shared/fixtures/official_vitl16_im1k_recipe.yaml \
      --variant compiled: --variant "eager-fp32:train.compile=false compute_precision.param_dtype=fp32"
  python benchmarks/bench_train.py --config-name cifar10_vits4 --data /data/cifar10/train
Prints one row per variant, and writes them as JSON with --json. ``--host-profile DIR`` writes a cProfile of the
main process over each measured window (where the host time goes when the run is host-bound).
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import json
import math
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dinobridge.config import build_config
from dinobridge.data.augmentation import MultiCropAugmentation
from dinobridge.data.loader import (
    DevicePrefetcher, batch_to_device, build_collator, build_training_data, multicrop_config,
)
from dinobridge.distributed.device import select_device
from dinobridge.distributed.setup import init_distributed, seed_everything
from dinobridge.train.flops import peak_flops, step_flops_from_config
from dinobridge.train.step import build_training


def _synthetic_batch(cfg: Any, seed: int = 0) -> dict[str, Any]:
    """One batch from the real augmentation and collator applied to random images (ImageNet-like 400 x 300)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    augment = MultiCropAugmentation(multicrop_config(cfg))
    B = int(cfg.train.batch_size_per_gpu)
    samples = []
    for i in range(B):
        img = Image.fromarray(rng.integers(0, 256, size=(300, 400, 3), dtype=np.uint8))
        samples.append(augment(img, generator_seed=i))
    return build_collator(cfg)(samples, batch_index=0)


def _sync(device: Any) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_variant(name: str, args: argparse.Namespace, overrides: list[str]) -> dict[str, Any]:
    out_dir = tempfile.mkdtemp(prefix="bench_train_")
    all_overrides = list(args.overrides) + overrides + ["train.tensorboard=false", "train.progress_bar=false"]
    if args.data != "synthetic":
        all_overrides.append(f"train.dataset_path={args.data}")
    cfg = build_config(args.config_file, all_overrides, out_dir, config_name=args.config_name)
    device = select_device(str(cfg.MODEL.DEVICE))
    distinfo = init_distributed(device, always_group=args.fsdp)
    seed_everything(int(cfg.train.seed), distinfo.rank)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t_build = time.perf_counter()
    training = build_training(cfg, device, distinfo, force_fsdp=args.fsdp)
    build_s = time.perf_counter() - t_build

    # the add-on objectives (Crop-Resize, PatchRoll) add global-size student rows: count them on the first step
    seen: list[int] = []
    G = int(cfg.crops.global_crops_size)
    hook = training.model.student.backbone.patch_embed.register_forward_pre_hook(
        lambda mod, inp: seen.append(inp[0].shape[0] if inp[0].shape[-1] == G else 0))

    if args.data == "synthetic":
        from dinobridge.data.gpu_augmentation import DeviceAugmentation

        # the device half of the augmentation (`crops.gpu_augmentation`) once: the batch is fixed
        augment = DeviceAugmentation(MultiCropAugmentation(multicrop_config(cfg)).config)
        fixed = augment(batch_to_device(_synthetic_batch(cfg), device.device))

        def next_batch() -> dict[str, Any]:
            return fixed
    else:
        from dinobridge.data.datasets import build_train_dataset

        data = build_training_data(cfg, build_train_dataset(cfg), distinfo.rank, distinfo.world_size,
                                   pin_memory=device.type == "cuda")
        prefetch = DevicePrefetcher(iter(data.loader), device.device, data.device_augment)  # as the train loop

        def next_batch() -> dict[str, Any]:
            batch = next(prefetch)
            batch.pop("data_skipped", None)
            return batch

    waits = []
    static_gib = None
    first_step_s = None
    for it in range(args.warmup):  # compilation happens here; each step is waited for
        t0 = time.perf_counter()
        training.step(next_batch(), it)
        _sync(device.device)
        if it == 0:
            first_step_s = time.perf_counter() - t0
            hook.remove()
    if device.type == "cuda":  # model, gradients, optimizer state between steps
        static_gib = torch.cuda.memory_allocated() / 2**30
    # the measured window: as in training, the host runs ahead of the device (no wait between steps)
    host_profile = cProfile.Profile() if args.host_profile else None
    if host_profile is not None:
        host_profile.enable()
    t_start = time.perf_counter()
    for it in range(args.warmup, args.warmup + args.steps):
        t0 = time.perf_counter()
        batch = next_batch()
        waits.append(time.perf_counter() - t0)
        result = training.step(batch, it)
    _sync(device.device)
    window_s = time.perf_counter() - t_start
    if host_profile is not None:  # the main process only (loader workers are other processes)
        host_profile.disable()
        Path(args.host_profile).mkdir(parents=True, exist_ok=True)
        suffix = f".rank{distinfo.rank}" if distinfo.world_size > 1 else ""
        host_profile.dump_stats(Path(args.host_profile) / f"{name}{suffix}.prof")
    step_s = window_s / args.steps
    B = int(cfg.train.batch_size_per_gpu)
    extra_views = max(sum(seen) // B - 2, 0)
    flops = step_flops_from_config(training.model, cfg, extra_global_views=extra_views)
    peak = peak_flops(device.name)
    achieved = flops["total"] / step_s
    row = {
        "variant": name,
        "device": device.name,
        "world": distinfo.world_size,
        "batch_per_rank": B,
        "img_per_s": B * distinfo.world_size / step_s,
        "step_ms": 1000 * step_s,
        "tflops": achieved / 1e12,
        "mfu_pct": None if peak is None else 100 * achieved / peak,
        "gflop_per_step": flops["total"] / 1e9,
        "extra_global_views": extra_views,
        "peak_mem_gib": (torch.cuda.max_memory_allocated() / 2**30) if device.type == "cuda" else None,
        "static_mem_gib": static_gib,
        "fsdp": training.fsdp,
        "data_wait_pct": 100 * sum(waits) / window_s,
        "build_s": build_s,
        "first_step_s": first_step_s,
        "overrides": " ".join(overrides),
        "last_loss": float(result.loss),
    }
    del training
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def _fmt(v: Any, spec: str) -> str:
    width = int(spec.split(".")[0])
    return "-".rjust(width) if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def print_table(rows: list[dict[str, Any]]) -> None:
    print(f"{'variant':<22} {'img/s':>8} {'step ms':>8} {'TFLOP/s':>8} {'MFU %':>6} {'mem GiB':>8} {'static':>7} "
          f"{'wait %':>7} {'loss':>8}")
    for r in rows:
        print(f"{r['variant']:<22} {_fmt(r['img_per_s'], '8.1f')} {_fmt(r['step_ms'], '8.1f')} "
              f"{_fmt(r['tflops'], '8.1f')} {_fmt(r['mfu_pct'], '6.1f')} {_fmt(r['peak_mem_gib'], '8.2f')} "
              f"{_fmt(r.get('static_mem_gib'), '7.2f')} {_fmt(r['data_wait_pct'], '7.1f')} {_fmt(r['last_loss'], '8.3f')}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group()
    src.add_argument("--config-file", default=None, help="a YAML config (official recipe, user config, ...)")
    src.add_argument("--config-name", default=None, help="a dinobridge preset (default: train)")
    p.add_argument("--data", default="synthetic", help="'synthetic' or a dataset string / folder of images")
    p.add_argument("--steps", type=int, default=20, help="measured steps")
    p.add_argument("--warmup", type=int, default=8, help="steps before measuring (compilation happens here)")
    p.add_argument("--variant", action="append", default=[],
                   help="NAME:OVERRIDES (space-separated key=value), repeatable; default: one variant 'default:'")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    p.add_argument("--host-profile", default=None, metavar="DIR",
                   help="cProfile the main process over the measured window: DIR/<variant>[.rankR].prof (pstats)")
    p.add_argument("--fsdp", action="store_true",
                   help="FSDP2 even on one process (a 1-rank group), as the official trainer always runs")
    p.add_argument("overrides", nargs="*", help="key=value overrides applied to every variant")
    args = p.parse_args(argv)
    if args.data != "synthetic" and not args.data.startswith(("ImageFolder:", "builtin:")) and ":" not in args.data:
        if not Path(args.data).is_dir():
            p.error(f"--data: expected 'synthetic' or an existing folder, got {args.data}")
        args.data = f"ImageFolder:root={args.data}"
    variants = args.variant or ["default:"]
    rows = []
    for spec in variants:
        name, _, ov = spec.partition(":")
        try:
            row = run_variant(name or "default", args, shlex.split(ov))
        except (RuntimeError, torch.OutOfMemoryError) as e:  # e.g. out of memory: report it, go on
            row = {"variant": name, "error": str(e).splitlines()[0][:200], "img_per_s": None, "step_ms": None,
                   "tflops": None, "mfu_pct": None, "peak_mem_gib": None, "data_wait_pct": None, "last_loss": None}
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        rows.append(row)
        print(json.dumps(row), flush=True)
    print_table(rows)
    rank0 = not (torch.distributed.is_available() and torch.distributed.is_initialized()) or \
        torch.distributed.get_rank() == 0
    if args.json and rank0:  # under torchrun: one file, from rank 0
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
