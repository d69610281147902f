"""Backbone speed: forward + backward of ViT-L/16 (batch 64, 224 px, bf16 autocast), ours vs timm, same process.

All variants are built and warmed up first, then timed in interleaved rounds (ours, timm, ours, timm, ...), so a
drift of the GPU clock during the run affects every variant alike.

    python benchmarks/bench_backbone.py --batch 64 --size 224 [--compile] [--timm]

Prints one markdown row per model/mode: median step time, images/s, achieved TFLOP/s, peak memory.
FLOPs per image (forward) = depth * (24 N D^2 [qkv, proj, 2-layer MLP with ratio 4] + 4 N^2 D [QK^T, AV])
+ 2 N_patch * 3 p^2 D [patch embed]; forward + backward = 3x forward.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dinobridge import hub  # noqa: E402


def vit_flops_per_image(depth: int, dim: int, tokens: int, patches: int, patch: int, mlp_ratio: float = 4.0) -> float:
    per_block = 2 * tokens * dim * (3 * dim + dim + 2 * mlp_ratio * dim) + 4 * tokens * tokens * dim
    return depth * per_block + 2 * patches * 3 * patch * patch * dim


def time_steps(model: torch.nn.Module, x: torch.Tensor, steps: int, warmup: int, fwd) -> list[float]:
    times = []
    for i in range(warmup + steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = fwd(model, x)
        out.float().square().mean().backward()
        end.record()
        torch.cuda.synchronize()
        if i >= warmup:
            times.append(start.elapsed_time(end))
        model.zero_grad(set_to_none=True)
    return times


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds over all variants")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile'd models")
    ap.add_argument("--timm", action="store_true", help="compare with timm vit_large_patch16_dinov3(_qkvb)")
    args = ap.parse_args()
    dev = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True

    models = {"dinobridge dinov3_vitl16": lambda: hub.dinov3_vitl16()}
    if args.timm:
        import timm

        for name in ("vit_large_patch16_dinov3", "vit_large_patch16_dinov3_qkvb"):
            models[f"timm {name}"] = (lambda n=name: timm.create_model(n, pretrained=False, num_classes=0,
                                                                       global_pool="token", img_size=args.size))
    grid = args.size // 16
    flops = 3 * vit_flops_per_image(24, 1024, 1 + 4 + grid * grid, grid * grid, 16) * args.batch

    def fwd_ours(m, x):
        return m.forward_features(x)["x_norm_patchtokens"]

    def fwd_timm(m, x):
        return m.forward_features(x)

    # Build every variant first, then time them in interleaved rounds so that clock drift hits all alike.
    x = torch.randn(args.batch, 3, args.size, args.size, device=dev)
    variants = []
    for name, make in models.items():
        for compiled in ([False, True] if args.compile else [False]):
            torch.manual_seed(0)
            model = make().to(dev).train()
            if compiled:
                for blk in model.blocks:
                    blk.compile()
            fwd = fwd_ours if name.startswith("dinobridge") else fwd_timm
            torch.cuda.reset_peak_memory_stats()
            time_steps(model, x, 0, args.warmup, fwd)  # warm-up (and compilation)
            variants.append({"name": name, "mode": "compile" if compiled else "eager", "model": model, "fwd": fwd,
                             "times": [], "peak": torch.cuda.max_memory_allocated() / 2**30})
    per_round = max(args.steps // args.rounds, 1)
    for _ in range(args.rounds):
        for v in variants:
            v["times"] += time_steps(v["model"], x, per_round, 1, v["fwd"])
    rows = []
    for v in variants:
        med = statistics.median(v["times"])
        rows.append((v["name"], v["mode"], med, args.batch / med * 1e3, flops / med / 1e9, v["peak"]))
    dev_name = torch.cuda.get_device_name()
    print(f"\n{dev_name}, torch {torch.__version__}, {datetime.date.today()}, batch {args.batch}, {args.size} px, "
          f"fwd+bwd, bf16 autocast, median of {args.steps} steps in {args.rounds} interleaved rounds")
    print("| model | mode | ms/step | img/s | TFLOP/s | peak GiB |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]:.1f} | {r[3]:.0f} | {r[4]:.0f} | {r[5]:.1f} |")


if __name__ == "__main__":
    main()
