"""Reading backbone weights: official DINOv3 / DINOv2 hub files, teacher exports and HF-layout files.

Layouts recognised by `load_pretrained`:
  * official hub backbone: a flat state dict (`cls_token`, `blocks.0.attn.qkv.weight`, ...);
  * teacher export: `{"teacher": {"backbone.<key>": ..., "dino_head.<key>": ..., ...}}` (also `"student"`, `"model"`);
  * wrappers such as `{"state_dict": ...}` and prefixes `module.`, `_orig_mod.`, `backbone.`;
  * Hugging Face `DINOv3ViTModel` / `Dinov2Model` / `Dinov2WithRegistersModel` keys (converted on the fly).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

import torch
from torch import Tensor, nn

_WRAPPER_KEYS = ("teacher", "model_ema", "student", "model", "state_dict", "backbone")
_PREFIXES = ("module.", "_orig_mod.", "backbone.")


class CheckpointMismatchError(RuntimeError):
    """Raised when a state dict does not match the model (missing, unexpected or mis-shaped keys)."""


def load_state_dict_file(path: str | os.PathLike) -> dict[str, Tensor]:
    """Read a `.pth`/`.pt`/`.bin` (torch.load, weights only) or `.safetensors` file into a dict of tensors."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path} (nothing is downloaded; pass a local file)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt or truncated files give obscure pickle errors
        raise RuntimeError(f"could not read weights file {path}: {type(e).__name__}: {e}") from e
    if not isinstance(obj, Mapping):
        raise RuntimeError(f"weights file {path} holds a {type(obj).__name__}, expected a state dict")
    return dict(obj)


def extract_backbone_state_dict(obj: Mapping[str, object]) -> dict[str, Tensor]:
    """Find the backbone's flat state dict inside any of the recognised layouts."""
    sd: Mapping = obj
    for _ in range(3):  # unwrap nested containers, e.g. {"teacher": {"backbone.x": ...}}
        inner = next((sd[k] for k in _WRAPPER_KEYS if k in sd and isinstance(sd[k], Mapping)), None)
        if inner is None:
            break
        sd = inner
    out: dict[str, Tensor] = {}
    for key, value in sd.items():
        if not isinstance(value, Tensor):
            continue
        for prefix in _PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
        out[key] = value
    # teacher exports carry heads next to the backbone: keep only backbone keys when those are present
    if any(k.startswith(("dino_head.", "ibot_head.")) for k in out):
        out = {k: v for k, v in out.items() if not k.startswith(("dino_head.", "ibot_head."))}
    return out


def check_state_dict(model: nn.Module, sd: Mapping[str, Tensor], source: str = "state dict") -> None:
    """Raise one `CheckpointMismatchError` listing missing keys, unexpected keys and shape mismatches."""
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    shapes = sorted(
        f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
        for k in set(own) & set(sd)
        if tuple(sd[k].shape) != tuple(own[k].shape)
    )
    if missing or unexpected or shapes:
        def fmt(items: list[str]) -> str:
            return ", ".join(items[:12]) + (f", ... (+{len(items) - 12} more)" if len(items) > 12 else "")

        parts = [f"{source} does not match the model"]
        if missing:
            parts.append(f"missing keys ({len(missing)}): {fmt(missing)}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {fmt(unexpected)}")
        if shapes:
            parts.append(f"shape mismatches ({len(shapes)}): {fmt(shapes)}")
        raise CheckpointMismatchError("; ".join(parts))


def load_pretrained(model: nn.Module, path: str | os.PathLike, strict: bool = True) -> dict[str, list[str]]:
    """Load backbone weights from `path` into `model` (official, teacher-export or HF layout).

    Strict by default: any missing key, unexpected key or shape mismatch raises `CheckpointMismatchError` naming them
    all. With `strict=False` matching keys are loaded and the lists of missing / unexpected keys are returned.
    """
    sd = extract_backbone_state_dict(load_state_dict_file(path))
    from dinobridge.models.convert import from_hf_state_dict, is_hf_state_dict

    if is_hf_state_dict(sd):
        sd = from_hf_state_dict(sd, model)
    own = model.state_dict()
    if strict:
        check_state_dict(model, sd, source=f"weights file {path}")
    else:
        sd = {k: v for k, v in sd.items() if k in own and tuple(v.shape) == tuple(own[k].shape)}
    result = model.load_state_dict(sd, strict=strict)
    return {"missing_keys": list(result.missing_keys), "unexpected_keys": list(result.unexpected_keys)}
