"""`dinobridge export`: write the teacher backbone in the official, Hugging Face or timm layout.

    dinobridge export --run RUN_DIR --format official --out teacher.pth
    dinobridge export --run RUN_DIR --format hf --out hf_model/
    dinobridge export --weights W.pth --model dinov3_vitl16 --format timm --out teacher_timm.pth
    dinobridge export --weights W.pth --config RUN_DIR/config.yaml --format hf --out hf_model/

--run uses RUN_DIR/config.yaml for the architecture and RUN_DIR/teacher_backbone.pth for the weights (else the newest
eval/training_*/teacher_checkpoint.pth, else the newest ckpt/*.pth; --weights picks another file). Errors (missing
files, an option the format cannot hold, transformers / timm not installed) print one line and exit with code 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional

from dinobridge.errors import UserError

PROG = "dinobridge export"
FORMATS = ("official", "hf", "timm")
log = logging.getLogger("dinobridge")


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of printing usage + error, so every error is one line."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UserError(message)


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog=PROG, description="Export the teacher backbone of a run (or a weights file) to the official "
                 "DINOv3/DINOv2 hub layout, a Hugging Face transformers directory or a timm checkpoint.")
    ap.add_argument("--run", metavar="DIR", help="run directory (config.yaml + teacher weights)")
    ap.add_argument("--weights", metavar="FILE", help="weights file (any layout load_pretrained reads)")
    ap.add_argument("--model", metavar="HUBNAME", help="architecture from a hub name, e.g. dinov3_vitl16")
    ap.add_argument("--config", metavar="YAML", help="architecture from a run config (RUN_DIR/config.yaml)")
    ap.add_argument("--format", required=True, metavar="FMT", help=f"one of {', '.join(FORMATS)}")
    ap.add_argument("--out", required=True, metavar="PATH",
                    help="output file (official, timm: .pth or .safetensors) or directory (hf)")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing output")
    return ap


def run_export(args: argparse.Namespace) -> int:
    from pathlib import Path

    from dinobridge.export.common import check_output_dir, check_output_file
    from dinobridge.export.source import load_teacher

    if args.format not in FORMATS:
        raise UserError(f"--format: expected one of {', '.join(FORMATS)}, got {args.format!r}")
    if args.format == "hf":  # output problems surface before any model work
        check_output_dir(Path(args.out), args.overwrite)
    else:
        check_output_file(Path(args.out), args.overwrite)
    model, weights = load_teacher(run=args.run, weights=args.weights, model_name=args.model, config=args.config)
    c = model.cfg
    print(f"teacher backbone: {'DINOv2' if model.dinov2 else 'DINOv3'} ViT, embed_dim {c.embed_dim}, depth {c.depth}, "
          f"heads {c.num_heads}, patch {c.patch_size}, ffn {c.ffn_layer}, {c.n_storage_tokens} storage tokens "
          f"(weights: {weights})")
    if args.format == "official":
        from dinobridge.export.official import export_official

        path = export_official(model, args.out, overwrite=args.overwrite)
        print(f"wrote {path} (official hub layout); load with dinobridge.models.load_pretrained or the official "
              "hub model's load_state_dict(strict=True)")
    elif args.format == "hf":
        from dinobridge.export.hf import export_hf

        path = export_hf(model, args.out, overwrite=args.overwrite)
        print(f"wrote {path}/config.json and model.safetensors; load with transformers.AutoModel.from_pretrained("
              f"{str(path)!r})")
    else:
        from dinobridge.export.timm_format import export_timm

        path, spec = export_timm(model, args.out, overwrite=args.overwrite)
        print(f"wrote {path} (timm keys); timm model: {spec.name}")
        hint = " (add global_pool='token' so model(x) gives the normed CLS token like DINOv3)" \
            if spec.family == "eva" else ""
        print(f"load with: {spec.code(path)}{hint}")
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point of `dinobridge export`; returns the exit code (2 for user errors)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not logging.getLogger().handlers and not log.handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help
        return int(e.code or 0)
    except UserError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    from dinobridge.models.checkpoint import CheckpointMismatchError

    try:
        return run_export(args)
    except (UserError, FileNotFoundError, CheckpointMismatchError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
