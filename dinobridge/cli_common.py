"""Helpers shared by the command-line tools (`dinobridge extract`, `dinobridge eval`)."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import sys
from typing import Any, Callable, Sequence

import torch

from dinobridge.errors import UserError, one_line

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class UsageError(UserError):
    """A problem with the command line or its files; one line on stderr, exit code 2."""


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """["key=value", ...] -> {key: python value}; keys must be ViTConfig fields."""
    from dinobridge.models.vision_transformer import ViTConfig

    fields = {f.name for f in dataclasses.fields(ViTConfig)}
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = (s.strip() for s in item.partition("="))
        if not sep or not key:
            raise UsageError(f"--override: expected KEY=VALUE, got {item!r}")
        if key not in fields:
            raise UsageError(f"--override: unknown architecture field {key!r}; expected one of {sorted(fields)}")
        if raw.lower() in ("true", "false", "none", "null"):
            out[key] = {"true": True, "false": False}.get(raw.lower())
        else:
            try:
                out[key] = ast.literal_eval(raw)
            except (ValueError, SyntaxError):
                out[key] = raw
    return out


def resolve_device(name: str) -> torch.device:
    """auto -> cuda, xpu, mps or cpu (the first available); otherwise the named device, checked."""
    mps_ok = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    xpu_ok = hasattr(torch, "xpu") and torch.xpu.is_available()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("xpu" if xpu_ok else "mps" if mps_ok else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device: expected auto, cpu, cuda, cuda:N, mps or xpu, got {name!r}") from None
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": mps_ok, "xpu": xpu_ok}
    if not available.get(device.type, True):
        raise UsageError(f"--device: {name} requested but it is not available; use --device auto or cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UsageError(f"--device: {name} requested but only {torch.cuda.device_count()} CUDA device(s) exist")
    return device


def run_subcommand(prog: str, parser: "argparse.ArgumentParser", run: Callable[[Any], int], argv: Sequence[str]) -> int:
    """Parse `argv`, call `run(args)`; user errors become one line on stderr and exit code 2."""
    from dinobridge.models.checkpoint import CheckpointMismatchError

    try:
        args = parser.parse_args(list(argv))
    except SystemExit as e:  # --help (0) or an argparse usage error (2), already printed
        return int(e.code or 0)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return run(args)
    except (UserError, CheckpointMismatchError, FileNotFoundError) as e:
        print(f"{prog} {args.command}: error: {one_line(e)}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        if "weights file" in str(e):  # unreadable / not a state dict (dinobridge.models.checkpoint)
            print(f"{prog} {args.command}: error: {one_line(e)}", file=sys.stderr)
            return 2
        raise


def check_model_args(args: Any) -> None:
    """Checks of the model-selection options shared by `eval` and `viz` (--model | --arch [--patch-size] and
    --weights | --random-init); they need neither data nor a model."""
    from pathlib import Path

    from dinobridge.hub import ENTRYPOINTS
    from dinobridge.models.vision_transformer import ARCHS

    if args.model is not None and args.model not in ENTRYPOINTS:
        raise UsageError(f"--model: unknown model {args.model!r}; expected one of {', '.join(ENTRYPOINTS)}")
    if args.arch is not None and args.arch not in ARCHS:
        raise UsageError(f"--arch: unknown preset {args.arch!r}; expected one of {', '.join(sorted(ARCHS))}")
    if args.patch_size is not None and (args.arch is None or args.patch_size < 1):
        raise UsageError("--patch-size: expected a positive int, used with --arch only (else use --override)")
    if args.weights is None and not args.random_init:
        raise UsageError("--weights: a weights file is required (or --random-init for a random model)")
    if args.weights is not None and args.random_init:
        raise UsageError("--weights and --random-init are exclusive: choose one")
    if args.weights is not None and not Path(args.weights).expanduser().is_file():
        raise UsageError(f"--weights: file not found: {args.weights}")
