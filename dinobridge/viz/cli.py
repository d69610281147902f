"""`dinobridge viz`: pictures of what a backbone sees.

    dinobridge viz pca --weights W.pth (--model HUB | --config RUN_DIR | --arch PRESET) --images DIR --out DIR
                       [--size 448] [--per-image] [--fg-threshold T]
    dinobridge viz attention --weights W.pth (--model ... | --config ... | --arch ...) --images DIR --out DIR [--size 448]

Every image under DIR (recursively) is resized so that its short side is --size (each side then rounded to the nearest
multiple of the patch size; aspect ratio kept) and normalised with the ImageNet mean/std.

pca: one PNG per image: the (resized) image, and beside it the first three principal components of its normed patch
features (`x_norm_patchtokens`) as R, G, B, each min-max scaled to [0, 1] and upsampled with nearest neighbour (one
block per patch). The PCA is fitted over the patches of all images together (same colour = same feature direction in
every picture; all patch features are held in memory), or per image with --per-image. --fg-threshold T keeps only
the patches whose first component (scaled to [0, 1], signed so that the grid border scores low) exceeds T, refits the
PCA on them and paints the rest black.

attention: one PNG per image: a grid of the image followed by one heat map per head of the last block's CLS-to-patch
attention (viridis-like colours, each head min-max scaled on its own, upsampled with nearest neighbour).

Outputs go to OUT/<path of the image relative to DIR, suffix replaced by .png>. Usage errors print one line on stderr
and exit with code 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

import torch
from PIL import Image
from torch import Tensor

from dinobridge.cli_common import UsageError, check_model_args, resolve_device, run_subcommand

PROG = "dinobridge viz"


def _add_common(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", metavar="NAME", help="hub model, e.g. dinov3_vitl16, dinov2_vitb14_reg")
    src.add_argument("--config", metavar="FILE", help="config.yaml of a dinobridge run (or the run directory)")
    src.add_argument("--arch", metavar="PRESET", help="ViT preset (vit_small, vit_base, ...); see --patch-size")
    p.add_argument("--patch-size", type=int, metavar="P", help="patch size with --arch (default 16)")
    p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                   help="architecture field (a ViTConfig field), e.g. n_storage_tokens=4; repeatable")
    p.add_argument("--weights", metavar="FILE", help="backbone weights (.pth/.safetensors)")
    p.add_argument("--random-init", action="store_true", help="use a randomly initialised model (seed 0)")
    p.add_argument("--images", required=True, metavar="DIR", help="folder of images (searched recursively)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder for the PNGs (created)")
    p.add_argument("--size", type=int, default=448, help="short side of the model input (default 448)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps | xpu (default auto)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=PROG, description="PCA and attention pictures of patch features.")
    sub = ap.add_subparsers(dest="command", metavar="{pca,attention}")
    pca = sub.add_parser("pca", help="first three principal components of the patch features as RGB")
    _add_common(pca)
    pca.add_argument("--per-image", action="store_true", help="fit the PCA on each image alone (default: jointly)")
    pca.add_argument("--fg-threshold", type=float, metavar="T",
                     help="foreground = first component (scaled to [0, 1]) > T; PCA refitted on it, background black")
    att = sub.add_parser("attention", help="last block's CLS-to-patch attention, one heat map per head")
    _add_common(att)
    return ap


def check_args(args: argparse.Namespace) -> list[Path]:
    """Checks that need no model; returns the image paths."""
    from dinobridge.features.image_folder import find_images
    check_model_args(args)
    if args.size < 1:
        raise UsageError(f"--size: expected a positive int, got {args.size}")
    fg = getattr(args, "fg_threshold", None)
    if fg is not None and not 0.0 <= fg < 1.0:
        raise UsageError(f"--fg-threshold: expected a value in [0, 1), got {fg}")
    root = Path(args.images).expanduser()
    if not root.is_dir():
        raise UsageError(f"--images: {args.images} is not a directory")
    paths = find_images(root)
    if not paths:
        raise UsageError(f"--images: no images (.jpg, .jpeg, .png, .bmp, .webp) under {args.images}")
    out = Path(args.out).expanduser()
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out: {args.out} exists and is not a directory")
    return paths


def output_paths(paths: list[Path], root: Path, out: Path) -> list[Path]:
    """OUT/<relative path>.png with the image suffix replaced; kept (a.jpg -> a.jpg.png) where two would collide."""
    rel = [p.relative_to(root) for p in paths]
    plain = [r.with_suffix(".png") for r in rel]
    counts: dict[Path, int] = {}
    for q in plain:
        counts[q] = counts.get(q, 0) + 1
    return [out / (q if counts[q] == 1 else r.with_name(r.name + ".png")) for q, r in zip(plain, rel)]


def load_input(path: Path, patch: int, size: int, device: torch.device) -> Optional[tuple[Tensor, Image.Image]]:
    """Image file -> (normalised model input [1, 3, H, W], the resized RGB picture), or None if unreadable."""
    from dinobridge.features.image_folder import load_rgb
    from dinobridge.features.preprocess import IMAGENET_MEAN, IMAGENET_STD, pil_to_uint8, preprocess
    from dinobridge.viz.colormap import to_pil

    try:
        img = load_rgb(path)
    except Exception as e:  # unreadable file: skipped with a warning
        print(f"{PROG}: warning: skipping {path}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
              file=sys.stderr)
        return None
    x = preprocess(pil_to_uint8(img), patch, size=size, mode="resize")
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return x.to(device), to_pil((x * std + mean)[0])


def _build(args: argparse.Namespace, device: torch.device) -> torch.nn.Module:
    from dinobridge.eval.cli import build_model

    if args.random_init:
        torch.manual_seed(0)
    model, _ = build_model(args)
    return model.to(device).eval()


@torch.no_grad()
def run(args: argparse.Namespace) -> int:
    from dinobridge.viz.attention import cls_attention
    from dinobridge.viz.colormap import grid, heatmap, to_pil, upsample_nearest
    from dinobridge.viz.pca import pca_rgb_list

    paths = check_args(args)
    device = resolve_device(args.device)
    model = _build(args, device)
    patch = int(model.patch_size)
    root, out = Path(args.images).expanduser(), Path(args.out).expanduser()
    targets = output_paths(paths, root, out)
    written = 0
    if args.command == "pca":
        feats, grids, pics, dests = [], [], [], []
        for path, dest in zip(paths, targets):
            item = load_input(path, patch, args.size, device)
            if item is None:
                continue
            x, pic = item
            feats.append(model.forward_features(x)["x_norm_patchtokens"][0].float().cpu())
            grids.append((x.shape[-2] // patch, x.shape[-1] // patch))
            pics.append(pic)
            dests.append(dest)
        if not feats:
            raise UsageError(f"--images: none of the {len(paths)} images under {args.images} could be read")
        try:
            maps = pca_rgb_list(feats, grids, per_image=args.per_image, fg_threshold=args.fg_threshold)
        except ValueError as e:
            raise UsageError(f"pca: {e}") from None
        for pic, rgb, dest in zip(pics, maps, dests):
            dest.parent.mkdir(parents=True, exist_ok=True)
            grid([pic, upsample_nearest(to_pil(rgb), pic.size)], cols=2).save(dest)
            written += 1
    else:
        for path, dest in zip(paths, targets):
            item = load_input(path, patch, args.size, device)
            if item is None:
                continue
            x, pic = item
            attn = cls_attention(model, x)[0].cpu()  # [heads, h, w]
            tiles = [pic] + [heatmap(a, pic.size) for a in attn]
            dest.parent.mkdir(parents=True, exist_ok=True)
            grid(tiles).save(dest)
            written += 1
        if not written:
            raise UsageError(f"--images: none of the {len(paths)} images under {args.images} could be read")
    print(f"{PROG} {args.command}: wrote {written} picture(s) to {out}")
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point of `dinobridge viz`; returns the exit code (2 for usage errors)."""
    return run_subcommand(PROG, build_parser(), run, sys.argv[1:] if argv is None else argv)
