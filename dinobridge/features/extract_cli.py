"""`dinobridge extract`: features of every image in a folder, saved with torch.save.

    dinobridge extract --model dinov3_vitl16 --weights W.pth --images DIR --out features.pt [--patch-tokens]

Saved dict (load with `torch.load(path, weights_only=True)`); N = images read, L = chosen blocks (with --layers or
--last-layers the per-image tensors gain a block axis after N):
  paths [N] (relative to `root`, POSIX, sorted), root, cls [N, D] | [N, L, D] (float32),
  storage [N, R, D] | [N, L, R, D] (float32), patch_tokens [N, HW, D] | [N, L, HW, D] (float16, only with
  --patch-tokens), grid (h, w), image_size (H, W), layers (None = final output), norm, model, weights, random_init,
  overrides, resize, skipped [paths], skip_reasons [messages].
Usage errors print one line to stderr and exit with code 2 before any model work.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor

from dinobridge.cli_common import PRECISIONS, UsageError, parse_overrides, resolve_device
from dinobridge.features.extractor import FeatureExtractor, Features, resolve_layers
from dinobridge.features.image_folder import (
    IMAGE_EXTENSIONS,
    ImageFolderDataset,
    collate_skipping_failures,
    find_images,
)
from dinobridge.features.preprocess import pil_to_uint8, preprocess
from dinobridge.models.checkpoint import CheckpointMismatchError

PROG = "dinobridge extract"


class FolderTransform:
    """PIL RGB image -> normalised tensor [3, S, S] (picklable, runs in the DataLoader workers)."""

    def __init__(self, patch_size: int, size: int, resize: str) -> None:
        self.patch_size, self.size, self.resize = patch_size, size, resize

    def __call__(self, img: Any) -> Tensor:
        if self.resize == "crop":
            x = preprocess(pil_to_uint8(img), self.patch_size, size=self.size, mode="crop")
        else:
            x = preprocess(pil_to_uint8(img), self.patch_size, size=(self.size, self.size), mode="resize")
        return x[0]


def build_parser() -> argparse.ArgumentParser:
    from dinobridge.hub import ENTRYPOINTS

    ap = argparse.ArgumentParser(prog=PROG, description="Extract DINO features (CLS, storage tokens, patch tokens) "
                                 "from every image under a folder.")
    ap.add_argument("--model", required=True, metavar="NAME", help=f"hub model, one of: {', '.join(ENTRYPOINTS)}")
    ap.add_argument("--weights", metavar="FILE", help="local .pth/.safetensors weights (official, teacher export, HF)")
    ap.add_argument("--random-init", action="store_true", help="use a randomly initialised model (no --weights)")
    ap.add_argument("--images", required=True, metavar="DIR",
                    help=f"folder searched recursively for {'/'.join(e[1:] for e in IMAGE_EXTENSIONS)} (any case)")
    ap.add_argument("--out", required=True, metavar="FILE", help="output file for torch.save, e.g. features.pt")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--size", type=int, default=224, help="side of the square model input, rounded to a multiple "
                    "of the patch size (default 224)")
    ap.add_argument("--resize", choices=("crop", "stretch"), default="crop",
                    help="crop: short side to --size, then centre crop (default); stretch: resize to size x size")
    group = ap.add_mutually_exclusive_group()
    group.add_argument("--layers", type=int, nargs="+", metavar="I",
                       help="0-based block indices to read (negatives count from the end)")
    group.add_argument("--last-layers", type=int, metavar="N", help="read the last N blocks")
    ap.add_argument("--no-norm", action="store_true", help="skip the final norm on the chosen blocks' outputs")
    ap.add_argument("--patch-tokens", action="store_true", help="also save patch tokens (float16; N*HW*D values)")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps (default auto)")
    ap.add_argument("--precision", choices=tuple(PRECISIONS), default="fp32", help="autocast dtype (default fp32)")
    ap.add_argument("--num-workers", type=int, default=min(8, os.cpu_count() or 1), metavar="N")
    ap.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                    help="architecture override (a ViTConfig field), e.g. ffn_layer=swiglu64; repeatable")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    return ap


# ---------------------------------------------------------------------- checks (no model work)


def check_output_path(out: Path) -> Path:
    """Fail early when `out` cannot be written; creates nothing (a probe file in an existing parent is removed)."""
    out = Path(os.path.abspath(out.expanduser()))
    if out.is_dir():
        raise UsageError(f"--out: {out} is a directory; expected a file path such as {out / 'features.pt'}")
    anc = out.parent
    while not anc.exists():
        anc = anc.parent
    if not anc.is_dir():
        raise UsageError(f"--out: cannot write {out}: {anc} is not a directory")
    if out.exists() and not os.access(out, os.W_OK):
        raise UsageError(f"--out: {out} exists and is not writable")
    if anc == out.parent:
        try:
            with tempfile.NamedTemporaryFile(dir=anc, prefix=".dinobridge-probe-"):
                pass
        except OSError as e:
            raise UsageError(f"--out: cannot write to directory {anc}: {e.strerror or e}") from None
    elif not os.access(anc, os.W_OK | os.X_OK):
        raise UsageError(f"--out: cannot create {out.parent}: {anc} is not writable")
    return out


def check_args(args: argparse.Namespace) -> dict[str, Any]:
    """Every check that needs no model; returns the resolved settings."""
    from dinobridge.hub import ENTRYPOINTS, hub_config

    if args.model not in ENTRYPOINTS:
        raise UsageError(f"--model: unknown model {args.model!r}; valid names: {', '.join(ENTRYPOINTS)}")
    if args.weights is None and not args.random_init:
        raise UsageError("--weights: a weights file is required (pass --random-init to use a random model on purpose)")
    if args.weights is not None and args.random_init:
        raise UsageError("--weights and --random-init are exclusive: choose one")
    weights = None
    if args.weights is not None:
        weights = Path(args.weights).expanduser()
        if not weights.is_file():
            raise UsageError(f"--weights: file not found: {weights}")
        weights = Path(os.path.abspath(weights))
    for flag, value, low in (("--batch-size", args.batch_size, 1), ("--size", args.size, 1),
                             ("--num-workers", args.num_workers, 0)):
        if value < low:
            raise UsageError(f"{flag}: expected an integer >= {low}, got {value}")
    overrides = parse_overrides(args.override)
    try:
        cfg = hub_config(args.model, **overrides)
    except (ValueError, TypeError) as e:
        raise UsageError(f"--override: {e}") from None
    try:
        layers = resolve_layers(args.layers if args.layers is not None else args.last_layers, cfg.depth)
    except ValueError as e:
        raise UsageError(f"--layers/--last-layers: {e}") from None
    device = resolve_device(args.device)
    images = Path(os.path.abspath(Path(args.images).expanduser()))
    if not images.is_dir():
        raise UsageError(f"--images: not a directory: {images}")
    paths = find_images(images)
    if not paths:
        raise UsageError(f"--images: no {'/'.join(e[1:] for e in IMAGE_EXTENSIONS)} files found under {images}")
    out = check_output_path(Path(args.out))
    return dict(weights=weights, overrides=overrides, cfg=cfg, layers=layers, device=device,
                root=images, paths=paths, out=out)


# ---------------------------------------------------------------------- extraction
class FeatureStore:
    """Preallocated CPU buffers for N images, filled in order: cls, storage (float32), patch tokens (float16)."""

    def __init__(self, n: int, keep_patches: bool) -> None:
        self.capacity, self.keep_patches, self.n = n, keep_patches, 0
        self.buffers: dict[str, Tensor] = {}

    def add(self, feats: Features | list[Features]) -> None:
        many = isinstance(feats, list)
        group = feats if many else [feats]

        def stack(ts: list[Tensor]) -> Tensor:
            return (torch.stack(ts, dim=1) if many else ts[0]).cpu()

        parts = {"cls": stack([f.cls for f in group])}
        if group[0].storage is not None:
            parts["storage"] = stack([f.storage for f in group])
        if self.keep_patches:
            parts["patch_tokens"] = stack([f.patch_tokens.half() for f in group])
        b = parts["cls"].shape[0]
        for key, t in parts.items():
            if key not in self.buffers:
                self.buffers[key] = torch.empty((self.capacity, *t.shape[1:]), dtype=t.dtype)
            self.buffers[key][self.n:self.n + b] = t
        self.n += b

    def tensors(self) -> dict[str, Tensor]:
        # torch.save writes a view's whole storage: copy when images were skipped
        return {k: (v if self.n == self.capacity else v[:self.n].clone()) for k, v in self.buffers.items()}


def run_extraction(args: argparse.Namespace, s: dict[str, Any]) -> int:
    from torch.utils.data import DataLoader
    from tqdm import tqdm

    try:
        fx = FeatureExtractor.from_hub(args.model, s["weights"], random_init=args.random_init, layers=s["layers"],
                                       norm=not args.no_norm, autocast_dtype=PRECISIONS[args.precision],
                                       device=s["device"], **s["overrides"])
    except Exception as e:  # mismatching or unreadable weights: one line, not a traceback
        hint = ""
        if isinstance(e, CheckpointMismatchError):
            hint = " (another --model or --override KEY=VALUE may match the checkpoint)"
        print(f"{PROG}: error: could not build {args.model} from {s['weights']}{hint}: {e}".splitlines()[0],
              file=sys.stderr)
        return 2
    size = max(fx.patch_size, int(args.size / fx.patch_size + 0.5) * fx.patch_size)
    paths: list[Path] = s["paths"]
    dataset = ImageFolderDataset(paths, FolderTransform(fx.patch_size, size, args.resize))
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=False, num_workers=args.num_workers,
                        collate_fn=collate_skipping_failures, pin_memory=s["device"].type == "cuda")
    store = FeatureStore(len(paths), keep_patches=args.patch_tokens)
    ok: list[int] = []
    failed: list[tuple[int, str]] = []
    grid = (size // fx.patch_size, size // fx.patch_size)
    with tqdm(total=len(paths), unit="img", desc="extract", disable=args.quiet, file=sys.stderr) as bar:
        for batch in loader:
            failed += batch.failed
            if batch.images is not None:
                x = batch.images.to(s["device"], non_blocking=True)
                feats = fx(x)
                store.add(feats)
                ok += batch.indices
                grid = (feats[0] if isinstance(feats, list) else feats).grid
            bar.update(len(batch.indices) + len(batch.failed))
    root: Path = s["root"]

    def rel(i: int) -> str:
        return paths[i].relative_to(root).as_posix()

    if failed:
        print(f"{PROG}: skipped {len(failed)} unreadable image(s) of {len(paths)}:", file=sys.stderr)
        for i, err in failed[:10]:
            print(f"  {rel(i)}: {err}", file=sys.stderr)
        if len(failed) > 10:
            print(f"  ... and {len(failed) - 10} more (all listed under 'skipped' in the output)", file=sys.stderr)
    if not ok:
        print(f"{PROG}: error: none of the {len(paths)} images could be read; nothing saved", file=sys.stderr)
        return 1
    result: dict[str, Any] = {
        "paths": [rel(i) for i in ok], "root": str(root), **store.tensors(), "grid": tuple(grid),
        "image_size": (size, size), "layers": s["layers"], "norm": not args.no_norm, "model": args.model,
        "weights": None if s["weights"] is None else str(s["weights"]), "random_init": bool(args.random_init),
        "overrides": s["overrides"], "resize": args.resize,
        "skipped": [rel(i) for i, _ in failed], "skip_reasons": [err for _, err in failed],
    }
    out: Path = s["out"]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    torch.save(result, tmp)
    os.replace(tmp, out)  # no half-written file under the final name
    print(f"{PROG}: saved features of {len(ok)} image(s) ({len(failed)} skipped) to {out}")
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point of `dinobridge extract`; returns the exit code (2 for usage errors)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # argparse: --help (0) or a usage error (2), already printed
        return int(e.code or 0)
    try:
        settings = check_args(args)
    except UsageError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    if args.random_init:
        torch.manual_seed(0)
    return run_extraction(args, settings)
