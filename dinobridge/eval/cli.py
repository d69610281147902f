"""`dinobridge eval`: evaluate frozen backbone features.

    dinobridge eval knn --model dinov3_vitl16 --weights W.pth --train DIR --val DIR [--k 20 200] [--temperature 0.07]
    dinobridge eval knn --config RUN_DIR/config.yaml --weights RUN_DIR/eval/training_X/teacher_checkpoint.pth ...
    dinobridge eval knn --arch vit_small --patch-size 8 --override n_storage_tokens=4 --weights W.pth ...
    dinobridge eval linear --model dinov3_vitl16 --weights W.pth --train DIR --val DIR [--epochs 100]
        [--lrs 1e-4 1e-3 1e-2 1e-1] [--batch-size 256] [--cache-dir DIR]

DIRs are class-folder layouts (DIR/<class>/<image>); the val classes must be among the train classes. The model comes
from a hub name, from the `student:` block of a run's config (arch preset + ViT options; as in the official trainer,
the preset fixes ffn_ratio, and RoPE runs in fp32 at eval), or from a preset name. Images go through the DINO eval
transform (short side to --resize-size, centre crop --size; see dinobridge.eval.extract), then the normed CLS token
is classified by weighted kNN (dinobridge.eval.knn). `linear` extracts CLS and mean patch token once (optionally
cached under --cache-dir) and trains a grid of linear classifiers on them (dinobridge.eval.linear).
Usage errors print one line on stderr and exit with code 2.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any, Mapping, Optional

import torch

from dinobridge.cli_common import (
    PRECISIONS,
    UsageError,
    check_model_args,
    parse_overrides,
    resolve_device,
    run_subcommand,
)

PROG = "dinobridge eval"


# ---------------------------------------------------------------------- parser
def _add_model_and_data_args(p: argparse.ArgumentParser) -> None:
    """The options every `eval` subcommand shares: which backbone, which weights, which train / val folders."""
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", metavar="NAME", help="hub model, e.g. dinov3_vitl16, dinov2_vitb14_reg")
    src.add_argument("--config", metavar="FILE", help="config.yaml of a dinobridge run (or the run directory); "
                     "the backbone is built as the trainer builds it")
    src.add_argument("--arch", metavar="PRESET", help="ViT preset (vit_small, vit_base, ...); see --patch-size, "
                     "--override")
    p.add_argument("--patch-size", type=int, metavar="P", help="patch size with --arch (default 16)")
    p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                   help="architecture field (a ViTConfig field), e.g. n_storage_tokens=4; repeatable")
    p.add_argument("--weights", metavar="FILE", help="backbone weights (.pth/.safetensors: official, teacher "
                   "export or HF layout)")
    p.add_argument("--random-init", action="store_true", help="evaluate a randomly initialised model (baseline)")
    p.add_argument("--train", required=True, metavar="DIR", help="train set, DIR/<class>/<image>")
    p.add_argument("--val", required=True, metavar="DIR", help="val set, DIR/<class>/<image>")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=PROG, description="Evaluate frozen backbone features.")
    sub = ap.add_subparsers(dest="command", metavar="{knn,linear}")
    knn = sub.add_parser("knn", help="weighted kNN classification (DINO protocol) on class-folder datasets",
                         description="Weighted kNN accuracy of the normed CLS features (DINO protocol).")
    _add_model_and_data_args(knn)
    knn.add_argument("--k", type=int, nargs="+", default=[20, 200], metavar="K", help="neighbours (default 20 200)")
    knn.add_argument("--temperature", type=float, default=0.07, help="vote weight exp(sim / T) (default 0.07)")
    knn.add_argument("--size", type=int, default=224, help="centre-crop side, rounded to a multiple of the patch "
                     "size (default 224; e.g. 32 for CIFAR with a small-patch model)")
    knn.add_argument("--resize-size", type=int, metavar="R", help="short side before the crop (default "
                     "size*256/224, the DINO protocol; pass the same value as --size to keep whole square images)")
    knn.add_argument("--batch-size", type=int, default=128, help="images per forward pass (default 128)")
    knn.add_argument("--num-workers", type=int, default=min(8, os.cpu_count() or 1), metavar="N")
    knn.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps | xpu (default auto)")
    knn.add_argument("--precision", choices=tuple(PRECISIONS), default="fp32", help="autocast dtype (default fp32)")
    knn.add_argument("--output", metavar="FILE", help="also write the results as JSON")
    knn.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_linear_parser(sub)
    return ap


# ---------------------------------------------------------------------- checks and model building

def load_run_backbone(path: Path, overrides: Mapping[str, Any]) -> tuple[torch.nn.Module, str]:
    """The teacher backbone described by a run's config (RUN_DIR or RUN_DIR/config.yaml), built as the trainer does."""
    from dinobridge.config import build_config
    from dinobridge.train.meta_arch import build_backbone

    if path.is_dir():
        path = path / "config.yaml"
    if not path.is_file():
        raise UsageError(f"--config: {path} not found; expected a run's config.yaml or its run directory")
    cfg = build_config(str(path))
    for key, value in overrides.items():
        cfg.student[key] = value
    return build_backbone(cfg.student, teacher=True), f"{cfg.student.arch} (teacher of {path})"


def check_args(args: argparse.Namespace) -> None:
    """Checks that need neither data nor model."""
    check_model_args(args)
    for name in ("train", "val"):
        if not Path(getattr(args, name)).expanduser().is_dir():
            raise UsageError(f"--{name}: {getattr(args, name)} is not a directory; expected DIR/<class>/<image>")
    if min(args.k) < 1:
        raise UsageError(f"--k: expected positive ints, got {args.k}")
    if not args.temperature > 0:
        raise UsageError(f"--temperature: expected a positive float, got {args.temperature}")
    if args.size < 1 or args.batch_size < 1 or args.num_workers < 0:
        raise UsageError("--size/--batch-size: expected positive ints; --num-workers: expected >= 0")
    if args.resize_size is not None and args.resize_size < 1:
        raise UsageError(f"--resize-size: expected a positive int, got {args.resize_size}")


def build_model(args: argparse.Namespace) -> tuple[torch.nn.Module, str]:
    """The backbone (weights loaded) and a short description."""
    from dinobridge.hub import build_hub_model
    from dinobridge.models.checkpoint import load_pretrained
    from dinobridge.models.vision_transformer import build_vit

    overrides = parse_overrides(args.override)
    weights = str(Path(args.weights).expanduser()) if args.weights is not None else None
    if args.model is not None:
        return build_hub_model(args.model, weights, **overrides), args.model
    if args.config is not None:
        model, what = load_run_backbone(Path(args.config).expanduser(), overrides)
    else:
        what = args.arch
        try:
            model = build_vit(args.arch, **{**({"patch_size": args.patch_size} if args.patch_size else {}), **overrides})
        except (ValueError, TypeError) as e:
            raise UsageError(f"cannot build {what}: {e}") from None
    if weights is not None:
        load_pretrained(model, weights, strict=True)
    return model, what


# ---------------------------------------------------------------------- run
def format_table(results: Mapping[int, Mapping[str, float]], n_train: int) -> str:
    has5 = any("top5" in r for r in results.values())
    lines = [f"{'k':>6} {'top-1':>7}" + (f" {'top-5':>7}" if has5 else "")]
    for k, r in results.items():
        line = f"{k:>6} {r['top1']:>7.2f}" + (f" {r['top5']:>7.2f}" if has5 else "")
        lines.append(line + (f"   (k > {n_train} train images: uses all)" if k > n_train else ""))
    return "\n".join(lines)


def run_knn(args: argparse.Namespace) -> int:
    from dinobridge.eval.extract import ClassFolderDataset, make_eval_transform
    from dinobridge.eval.extract import extract_features
    from dinobridge.eval.knn import knn_classify

    check_args(args)
    device = resolve_device(args.device)
    train_set = ClassFolderDataset(args.train, name="--train")
    val_set = ClassFolderDataset(args.val, classes=train_set.classes, name="--val")
    if args.random_init:
        torch.manual_seed(0)
    model, what = build_model(args)
    patch = int(getattr(model, "patch_size", 16))
    transform = make_eval_transform(args.size, patch, args.resize_size)
    model.to(device)
    common = dict(device=device, batch_size=args.batch_size, num_workers=args.num_workers, transform=transform,
                  autocast_dtype=PRECISIONS[args.precision], progress=not args.quiet)
    train_x, train_y = extract_features(model, train_set, desc="train features", **common)
    val_x, val_y = extract_features(model, val_set, desc="val features", **common)
    knn_device = device if device.type != "mps" else torch.device("cpu")  # stable sort support varies on MPS
    results = knn_classify(train_x.to(knn_device), train_y, val_x, val_y, ks=args.k, temperature=args.temperature,
                           num_classes=len(train_set.classes))
    crop = transform.transforms[1].size[0]
    print(f"kNN  model {what}  input {crop}px  T={args.temperature:g}  train {len(train_set)} images / "
          f"{len(train_set.classes)} classes  val {len(val_set)} images")
    print(format_table(results, len(train_set)))
    if args.output:
        record = {"model": what, "weights": args.weights, "train": args.train, "val": args.val,
                  "temperature": args.temperature, "input_size": crop, "num_train": len(train_set),
                  "num_val": len(val_set), "num_classes": len(train_set.classes),
                  "results": {str(k): r for k, r in results.items()}}
        Path(args.output).expanduser().write_text(json.dumps(record, indent=2) + "\n")
    return 0


# ---------------------------------------------------------------------- linear probe
def _add_linear_parser(sub: Any) -> None:
    lin = sub.add_parser("linear", help="linear probe (DINOv2 protocol) on class-folder datasets",
                         description="Linear classifiers on frozen CLS and CLS+mean-patch features, over a grid of "
                         "learning rates, all trained in one pass over features extracted once.")
    _add_model_and_data_args(lin)
    lin.add_argument("--epochs", type=int, default=100, help="epochs over the cached train features (default 100)")
    lin.add_argument("--lrs", type=float, nargs="+", default=[1e-4, 1e-3, 1e-2, 1e-1], metavar="LR",
                     help="learning-rate grid, SGD momentum 0.9 with cosine decay (default 1e-4 1e-3 1e-2 1e-1)")
    lin.add_argument("--batch-size", type=int, default=256, help="classifier training batch (default 256)")
    lin.add_argument("--weight-decay", type=float, default=0.0, help="on the classifier weights (default 0)")
    lin.add_argument("--seed", type=int, default=0, help="classifier init and batch order (default 0)")
    lin.add_argument("--extract-batch-size", type=int, default=128, metavar="B",
                     help="images per forward pass during feature extraction (default 128)")
    lin.add_argument("--size", type=int, default=224, help="centre-crop side, rounded to a multiple of the patch "
                     "size (default 224)")
    lin.add_argument("--resize-size", type=int, metavar="R", help="short side before the crop (default "
                     "size*256/224, the DINO protocol)")
    lin.add_argument("--cache-dir", metavar="DIR", help="save the extracted features there (keyed by weights path, "
                     "mtime, size, image size, model and datasets) and reuse them on the next run")
    lin.add_argument("--num-workers", type=int, default=min(8, os.cpu_count() or 1), metavar="N")
    lin.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps | xpu (default auto)")
    lin.add_argument("--precision", choices=tuple(PRECISIONS), default="fp32",
                     help="autocast dtype of the feature extraction (default fp32)")
    lin.add_argument("--output", metavar="FILE", help="also write the results as JSON")
    lin.add_argument("--quiet", action="store_true", help="no progress bars")


def check_linear_args(args: argparse.Namespace) -> None:
    """Checks that need neither data nor model (the model/data checks are knn's, shared)."""
    # knn's checks cover the model source, weights, data dirs and sizes; give them neutral knn-only values
    check_args(argparse.Namespace(**vars(args), k=[1], temperature=1.0))
    if args.epochs < 1:
        raise UsageError(f"--epochs: expected a positive int, got {args.epochs}")
    if not all(lr > 0 and lr < float("inf") for lr in args.lrs):
        raise UsageError(f"--lrs: expected positive floats, got {args.lrs}")
    if args.extract_batch_size < 1:
        raise UsageError(f"--extract-batch-size: expected a positive int, got {args.extract_batch_size}")
    if not args.weight_decay >= 0:
        raise UsageError(f"--weight-decay: expected a float >= 0, got {args.weight_decay}")


def _feature_cache_path(args: argparse.Namespace, train_set: Any, val_set: Any) -> Optional[Path]:
    from dinobridge.eval.linear import cache_key

    if args.cache_dir is None:
        return None
    weights = str(Path(args.weights).expanduser()) if args.weights is not None else None
    lists = hashlib.sha256(repr([(str(p), y) for p, y in train_set.samples + val_set.samples]).encode()).hexdigest()
    key = cache_key(weights, {"size": args.size, "resize_size": args.resize_size, "model": args.model,
                              "config": args.config, "arch": args.arch, "patch_size": args.patch_size,
                              "override": list(args.override), "random_init": args.random_init,
                              "precision": args.precision, "classes": train_set.classes, "samples": lists})
    return Path(args.cache_dir).expanduser() / f"linear_features_{key}.pt"


def format_linear_table(results: Mapping[tuple[float, str], Mapping[str, Any]], best: tuple[float, str]) -> str:
    has5 = any("top5" in r for r in results.values())
    lines = [f"{'lr':>10}  {'features':<12} {'top-1':>7}" + (f" {'top-5':>7}" if has5 else "")]
    for (lr, name), r in results.items():
        line = f"{lr:>10.3g}  {name:<12} {r['top1']:>7.2f}" + (f" {r['top5']:>7.2f}" if has5 else "")
        if r.get("diverged"):
            line += "   (diverged)"
        lines.append(line + ("   <- best" if (lr, name) == best else ""))
    return "\n".join(lines)


def run_linear(args: argparse.Namespace) -> int:
    from dinobridge.eval.extract import ClassFolderDataset, make_eval_transform
    from dinobridge.eval.linear import (best_probe, extract_probe_features, load_cached_features,
                                        save_cached_features, split_feature_types, train_linear_probes)

    check_linear_args(args)
    device = resolve_device(args.device)
    train_set = ClassFolderDataset(args.train, name="--train")
    val_set = ClassFolderDataset(args.val, classes=train_set.classes, name="--val")
    cache = _feature_cache_path(args, train_set, val_set)
    record = load_cached_features(cache) if cache is not None else None
    what = args.model or args.arch or f"teacher of {args.config}"
    if record is not None:
        print(f"features: reusing {cache}", file=sys.stderr)
        what, crop = record.get("model", what), int(record.get("input_size", args.size))
    else:
        if args.random_init:
            torch.manual_seed(0)
        model, what = build_model(args)
        patch = int(getattr(model, "patch_size", 16))
        transform = make_eval_transform(args.size, patch, args.resize_size)
        crop = transform.transforms[1].size[0]
        model.to(device)
        common = dict(device=device, batch_size=args.extract_batch_size, num_workers=args.num_workers,
                      transform=transform, autocast_dtype=PRECISIONS[args.precision], progress=not args.quiet)
        train_x, train_y = extract_probe_features(model, train_set, desc="train features", **common)
        val_x, val_y = extract_probe_features(model, val_set, desc="val features", **common)
        del model
        record = {"train": train_x, "train_labels": train_y, "val": val_x, "val_labels": val_y, "model": what,
                  "input_size": crop}
        if cache is not None:
            save_cached_features(cache, record)
    probe_device = device if device.type != "mps" else torch.device("cpu")
    results = train_linear_probes(split_feature_types(record["train"]), record["train_labels"],
                                  split_feature_types(record["val"]), record["val_labels"], lrs=args.lrs,
                                  epochs=args.epochs, batch_size=args.batch_size, device=probe_device,
                                  seed=args.seed, weight_decay=args.weight_decay,
                                  num_classes=len(train_set.classes), progress=not args.quiet)
    best, best_r = best_probe(results)
    print(f"linear probe  model {what}  input {crop}px  {args.epochs} epochs  batch {args.batch_size}  train "
          f"{len(train_set)} images / {len(train_set.classes)} classes  val {len(val_set)} images")
    print(format_linear_table(results, best))
    print(f"best: top-1 {best_r['top1']:.2f}  (lr {best[0]:g}, features {best[1]})")
    if args.output:
        out = {"model": what, "weights": args.weights, "train": args.train, "val": args.val, "input_size": crop,
               "epochs": args.epochs, "batch_size": args.batch_size, "weight_decay": args.weight_decay,
               "num_train": len(train_set), "num_val": len(val_set), "num_classes": len(train_set.classes),
               "best": {"lr": best[0], "features": best[1], **best_r},
               "results": [{"lr": lr, "features": name, **r} for (lr, name), r in results.items()]}
        Path(args.output).expanduser().write_text(json.dumps(out, indent=2) + "\n")
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point of `dinobridge eval`; returns the exit code (2 for usage errors)."""
    dispatch = {"knn": run_knn, "linear": run_linear}
    return run_subcommand(PROG, build_parser(), lambda args: dispatch[args.command](args),
                          sys.argv[1:] if argv is None else argv)
