"""Tools for the multi-GPU runs (one host, 2-8 GPUs): `benchmarks/multi_gpu.sh` calls them in order.

Subcommands:

* ``steps --out F [--config-name N | --config-file Y] [--global-batch G] [--steps S] [key=value ...]``:
  S training steps (`Training.step`, the loop's own step, built by `build_training` as `dinobridge train` does) on
  fixed synthetic global batches. Every rank makes the same G samples per step (seeded by step and sample index) and
  the same iBOT masks, then keeps its G / world share, so `torchrun --nproc_per_node=N` and a plain `python` run see
  one global batch. Rank 0 writes ``{"losses": [...], "world": N, "global_batch": G, "config": ...}`` to F (the loss
  is averaged over ranks by the step). Per-rank terms (KoLeo) and per-rank random draws (stochastic depth) make
  sharded and single runs differ by design: switch them off for a comparison (multi_gpu.sh does).
* ``compare A.json B.json [--rtol R]``: the two loss curves side by side; exit status 1 when a step differs by more
  than R relative.
* ``scaling J1 J2 ...``: one table from `bench_train.py --json` files (one per GPU count): img/s, img/s per GPU,
  weak-scaling efficiency against the smallest GPU count, peak memory.
* ``dtch-hash RUN_DIR``: SHA-256 of the balancer buffers (DTCH history, ring, counters) in each rank's extras of the
  latest sharded checkpoint (``ckpt/<it>/rank<r>.pt``); exit status 1 unless every rank has the same state.
* ``resume-compare RUN_A RUN_B``: total loss of the two runs' ``metrics.jsonl`` at their common iterations (exact
  resume: equal).
* ``run-summary RUN``: last iteration, median img/s, peak memory and the loss terms of the last logged iteration
  (exit status 1 if one is not finite) from ``metrics.jsonl``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path
from typing import Any, Sequence

import torch

from dinobridge.objectives.ibot import masks_weight_from_masks


# ---------------------------------------------------------------------------------------------- steps
def synthetic_global_batch(cfg: Any, step: int, global_batch: int) -> dict[str, Any]:
    """The fixed global batch of `step`: G random-pixel samples through the real collator (crop-major layout)."""
    from dinobridge.data.loader import build_collator

    g_size, l_size = int(cfg.crops.global_crops_size), int(cfg.crops.local_crops_size)
    n_local = int(cfg.crops.local_crops_number)
    samples = []
    for i in range(global_batch):
        gen = torch.Generator().manual_seed(1_000_003 * step + i)
        samples.append({
            "global_crops": [torch.randn(3, g_size, g_size, generator=gen) for _ in range(2)],
            "local_crops": [torch.randn(3, l_size, l_size, generator=gen) for _ in range(n_local)],
        })
    return build_collator(cfg, rank=0)(samples, batch_index=step)


def rank_share(batch: dict[str, Any], rank: int, world: int) -> dict[str, Any]:
    """Rank `rank`'s share of a crop-major global batch: samples [rank * b, (rank + 1) * b) of every crop, with the
    mask indices and weights rebuilt for the share (what the collator gives for those samples)."""
    masks = batch["masks"]
    G = masks.shape[0] // 2  # two global crops per sample
    if G % world:
        raise ValueError(f"global batch: expected a multiple of the world size {world}, got {G}")
    b = G // world

    def share(x: torch.Tensor) -> torch.Tensor:
        if x.numel() == 0:
            return x
        n_crops = x.shape[0] // G
        return x.view(n_crops, G, *x.shape[1:])[:, rank * b : (rank + 1) * b].flatten(0, 1)

    m = share(masks)
    idx = m.flatten().nonzero().flatten()
    weight = masks_weight_from_masks(m)  # the collator's weights, for the share
    return {"global_crops": share(batch["global_crops"]), "local_crops": share(batch["local_crops"]), "masks": m,
            "mask_indices": idx, "masks_weight": weight, "n_masked_patches": torch.tensor([idx.numel()]),
            "upperbound": int(idx.numel())}  # fmt: skip


def cmd_steps(args: argparse.Namespace) -> int:
    import tempfile

    from dinobridge.config import build_config
    from dinobridge.data.loader import batch_to_device
    from dinobridge.distributed.device import select_device
    from dinobridge.distributed.setup import init_distributed, seed_everything
    from dinobridge.train.step import build_training

    out_dir = tempfile.mkdtemp(prefix="multi_gpu_steps_")
    overrides = [*args.overrides, "train.tensorboard=false", "train.progress_bar=false"]
    probe = build_config(args.config_file, overrides, out_dir, config_name=args.config_name)
    device = select_device(str(probe.MODEL.DEVICE))
    info = init_distributed(device)
    if args.global_batch % info.world_size:
        raise SystemExit(f"--global-batch: expected a multiple of the world size {info.world_size}, "
                         f"got {args.global_batch}")
    per_rank = args.global_batch // info.world_size
    cfg = build_config(args.config_file, [*overrides, f"train.batch_size_per_gpu={per_rank}"], out_dir,
                       config_name=args.config_name)
    seed_everything(int(cfg.train.seed), 0)  # the same initial weights on every rank and in the 1-process run
    training = build_training(cfg, device, info)
    losses = []
    for step in range(args.steps):
        batch = rank_share(synthetic_global_batch(cfg, step, args.global_batch), info.rank, info.world_size)
        result = training.step(batch_to_device(batch, device.device), step)
        losses.append(float(result.loss))
        if info.is_main:
            print(f"step {step}: loss {losses[-1]:.6f}", flush=True)
    if info.is_main:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({
            "losses": losses, "world": info.world_size, "global_batch": args.global_batch, "fsdp": training.fsdp,
            "device": device.name, "config": args.config_file or args.config_name, "overrides": list(args.overrides),
        }, indent=1))  # fmt: skip
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0


# ---------------------------------------------------------------------------------------------- comparisons
def compare_losses(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
    """(max |a - b|, max |a - b| / max(|b|, 1e-12)) over the common steps."""
    if not a or not b:
        raise ValueError("losses: expected two non-empty curves")
    diffs = [abs(x - y) for x, y in zip(a, b)]
    rels = [d / max(abs(y), 1e-12) for d, y in zip(diffs, b)]
    return max(diffs), max(rels)


def cmd_compare(args: argparse.Namespace) -> int:
    a, b = (json.loads(Path(p).read_text()) for p in (args.a, args.b))
    print(f"| step | {a['world']} rank(s) | {b['world']} rank(s) | rel. diff |")
    print("|---|---|---|---|")
    for i, (x, y) in enumerate(zip(a["losses"], b["losses"])):
        print(f"| {i} | {x:.5f} | {y:.5f} | {abs(x - y) / max(abs(y), 1e-12):.2e} |")
    max_abs, max_rel = compare_losses(a["losses"], b["losses"])
    ok = max_rel <= args.rtol
    print(f"max abs diff {max_abs:.3e}, max rel diff {max_rel:.3e} (rtol {args.rtol:g}): {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


def scaling_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Weak-scaling rows sorted by GPU count: img/s, per GPU, efficiency (per-GPU img/s vs the smallest count)."""
    rows = sorted(rows, key=lambda r: int(r["world"]))
    base = rows[0]["img_per_s"] / int(rows[0]["world"])
    out = []
    for r in rows:
        per_gpu = r["img_per_s"] / int(r["world"])
        out.append({"world": int(r["world"]), "img_per_s": r["img_per_s"], "per_gpu": per_gpu,
                    "efficiency": per_gpu / base, "peak_gib": r.get("peak_mem_gib"), "device": r.get("device")})
    return out


def cmd_scaling(args: argparse.Namespace) -> int:
    rows = []
    for path in args.files:
        data = json.loads(Path(path).read_text())
        rows.extend(data if isinstance(data, list) else [data])
    print("| GPUs | img/s | img/s per GPU | efficiency | peak GiB | device |")
    print("|---|---|---|---|---|---|")
    for r in scaling_rows(rows):
        peak = "-" if r["peak_gib"] is None else f"{r['peak_gib']:.1f}"
        print(f"| {r['world']} | {r['img_per_s']:.1f} | {r['per_gpu']:.1f} | {100 * r['efficiency']:.1f}% | {peak} "
              f"| {r['device']} |")
    return 0


def latest_sharded_checkpoint(run_dir: str | Path) -> Path:
    """The highest-numbered sharded checkpoint directory ``<run>/ckpt/<iteration:08d>`` (with rank extras)."""
    dirs = [p for p in (Path(run_dir) / "ckpt").glob("[0-9]*") if p.is_dir() and p.name.isdigit()]
    if not dirs:
        raise FileNotFoundError(f"{run_dir}/ckpt: expected a sharded checkpoint directory, found none")
    return max(dirs, key=lambda p: int(p.name))


def balancer_hashes(ckpt_dir: str | Path, match: str = "balancer") -> dict[int, str]:
    """{rank: SHA-256 over the buffers whose name contains `match`, in name order} from ``rank<r>.pt`` files."""
    hashes = {}
    for path in sorted(Path(ckpt_dir).glob("rank*.pt")):
        buffers = torch.load(path, map_location="cpu", weights_only=False)["buffers"]
        h = hashlib.sha256()
        names = sorted(n for n in buffers if match in n)
        if not names:
            raise ValueError(f"{path}: expected buffers whose name contains '{match}', found none")
        for name in names:
            h.update(name.encode())
            h.update(buffers[name].contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        hashes[int(path.stem[len("rank"):])] = h.hexdigest()
    if not hashes:
        raise FileNotFoundError(f"{ckpt_dir}: expected rank<r>.pt files (a sharded checkpoint), found none")
    return hashes


def cmd_dtch_hash(args: argparse.Namespace) -> int:
    ckpt = latest_sharded_checkpoint(args.run)
    hashes = balancer_hashes(ckpt)
    for rank, digest in hashes.items():
        print(f"rank {rank}: {digest}")
    same = len(set(hashes.values())) == 1
    print(f"{ckpt}: balancer state {'identical' if same else 'DIFFERENT'} on {len(hashes)} ranks")
    return 0 if same else 1


def metric_losses(run_dir: str | Path) -> dict[int, float]:
    """{iteration: total_loss} from ``<run>/metrics.jsonl`` (the last record of an iteration wins)."""
    out = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "total_loss" in rec:
            out[int(rec["iteration"])] = float(rec["total_loss"])
    return out


def cmd_resume_compare(args: argparse.Namespace) -> int:
    a, b = metric_losses(args.a), metric_losses(args.b)
    common = sorted(set(a) & set(b))
    if not common:
        print("no common iterations")
        return 1
    worst = max(abs(a[i] - b[i]) for i in common)
    for i in common:
        print(f"iteration {i}: {a[i]:.6f} {b[i]:.6f}")
    print(f"{len(common)} common iterations, max abs diff {worst:.3e}: {'EXACT' if worst == 0 else 'differs'}")
    return 0 if worst <= args.atol else 1


def run_summary(run_dir: str | Path) -> dict[str, Any]:
    """Last iteration, median img/s, peak GiB and the last logged loss terms of a run (``metrics.jsonl``)."""
    import math
    import statistics

    records = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if line]
    steps = [r for r in records if "total_loss" in r]
    if not steps:
        raise ValueError(f"{run_dir}/metrics.jsonl: expected records with total_loss, found none")
    last = steps[-1]
    losses = {k: float(v) for k, v in last.items() if k.endswith("_loss")}
    speeds = [r["img_per_s"] for r in steps if r.get("img_per_s")]
    peaks = [r["peak_memory_gib"] for r in steps if r.get("peak_memory_gib") is not None]
    return {"iteration": int(last["iteration"]), "img_per_s": statistics.median(speeds) if speeds else None,
            "peak_gib": max(peaks) if peaks else None, "losses": losses,
            "finite": all(math.isfinite(v) for v in losses.values())}  # fmt: skip


def cmd_run_summary(args: argparse.Namespace) -> int:
    s = run_summary(args.run)
    speed = "-" if s["img_per_s"] is None else f"{s['img_per_s']:.1f}"
    peak = "-" if s["peak_gib"] is None else f"{s['peak_gib']:.1f}"
    print(f"iteration {s['iteration']}: median {speed} img/s, peak {peak} GiB, losses "
          + ", ".join(f"{k} {v:.4f}" for k, v in sorted(s["losses"].items()))
          + ("" if s["finite"] else "  NOT FINITE"))
    return 0 if s["finite"] else 1


# ---------------------------------------------------------------------------------------------- CLI
def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("steps", help="fixed-batch training steps (torchrun or python)")
    g = s.add_mutually_exclusive_group()
    g.add_argument("--config-file")
    g.add_argument("--config-name")
    s.add_argument("--global-batch", type=int, default=64)
    s.add_argument("--steps", type=int, default=20)
    s.add_argument("--out", required=True)
    s.add_argument("overrides", nargs="*")
    c = sub.add_parser("compare", help="two loss curves from `steps`")
    c.add_argument("a")
    c.add_argument("b")
    c.add_argument("--rtol", type=float, default=1e-2)
    sc = sub.add_parser("scaling", help="weak-scaling table from bench_train.py --json files")
    sc.add_argument("files", nargs="+")
    d = sub.add_parser("dtch-hash", help="balancer state hash per rank in the latest sharded checkpoint")
    d.add_argument("run")
    r = sub.add_parser("resume-compare", help="losses of two runs at common iterations")
    r.add_argument("a")
    r.add_argument("b")
    r.add_argument("--atol", type=float, default=0.0)
    rs = sub.add_parser("run-summary", help="speed, memory and last losses of a run")
    rs.add_argument("run")
    args = p.parse_args(argv)
    return {"steps": cmd_steps, "compare": cmd_compare, "scaling": cmd_scaling, "dtch-hash": cmd_dtch_hash,
            "resume-compare": cmd_resume_compare, "run-summary": cmd_run_summary}[args.cmd](args)  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
