"""Shared pieces of the exporters: the error type, atomic writes, plain CPU copies of tensors."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Mapping

import torch
from torch import Tensor, nn

from dinobridge.errors import UserError

log = logging.getLogger("dinobridge")


class ExportError(UserError):
    """The model uses an option the target format cannot represent, or the output cannot be written."""


def cpu_copy(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Detached, contiguous CPU tensors that share no storage (safetensors refuses shared or strided views)."""
    return {k: v.detach() if v.is_meta else v.detach().to("cpu").contiguous().clone() for k, v in sd.items()}


def save_tensors(sd: Mapping[str, Tensor], path: Path) -> None:
    """Write a flat dict of tensors as `.safetensors` (by suffix) or with torch.save, atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    sd = cpu_copy(sd)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(sd, str(tmp), metadata={"format": "pt"})
    else:
        torch.save(sd, tmp)
    os.replace(tmp, path)


def check_output_file(path: Path, overwrite: bool) -> None:
    """Refuse a directory, an existing file (unless `overwrite`) and suffixes other than .pth/.pt/.safetensors."""
    if path.is_dir():
        raise ExportError(f"--out: {path} is a directory; expected a file path (.pth or .safetensors)")
    if path.exists() and not overwrite:
        raise ExportError(f"--out: {path} exists (pass --overwrite to replace it)")
    if path.suffix not in (".pth", ".pt", ".safetensors"):
        raise ExportError(f"--out: expected a .pth, .pt or .safetensors file name, got {path.name!r}")


def dropped_keys_note(model: nn.Module, target: str, antialias: bool = False) -> None:
    """Log what an eval-only export leaves out or computes differently (shared by the hf and timm exporters).

    `antialias`: whether the target resizes a DINOv2 position table with antialiasing.
    """
    c = model.cfg
    if getattr(model, "local_cls_norm", None) is not None:
        log.info("%s export: local_cls_norm dropped (used only for the student's local crops in training; "
                 "inference never applies it)", target)
    if not model.dinov2 and c.pos_embed_rope_dtype not in (None, "fp32", "float32"):
        log.info("%s export: RoPE tables are computed in fp32 there (this model asks pos_embed_rope_dtype=%s)",
                 target, c.pos_embed_rope_dtype)
    if model.dinov2 and (c.interpolate_offset or bool(c.interpolate_antialias) != antialias):
        log.info("%s export: at input sizes other than img_size=%d the position table is resized differently "
                 "(there: no offset, antialias=%s; here: interpolate_offset=%s, interpolate_antialias=%s), so "
                 "features differ slightly at those sizes", target, c.img_size, antialias, c.interpolate_offset,
                 c.interpolate_antialias)


def check_output_dir(path: Path, overwrite: bool) -> None:
    """Refuse a file, and a directory that already holds an HF model (unless `overwrite`)."""
    if path.exists() and not path.is_dir():
        raise ExportError(f"--out: {path} is a file; --format hf writes a directory")
    if not overwrite and any((path / n).exists() for n in ("config.json", "model.safetensors")):
        raise ExportError(f"--out: {path} already holds an HF model (pass --overwrite to replace it)")
