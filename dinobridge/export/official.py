"""Official layout: the flat state dict of the official DINOv3 / DINOv2 hub backbones.

Our backbone's keys are the official ones (`cls_token`, `storage_tokens`, `blocks.i.attn.qkv.*`, `rope_embed.periods`,
`blocks.i.attn.qkv.bias_mask`, `local_cls_norm.*` ...), so the file is `model.state_dict()` as it is: the official
hub code and `dinobridge.models.load_pretrained` load it with strict=True. Nothing is dropped (the official ViT-7B and
SAT ViT-L carry `local_cls_norm` too).
"""

from __future__ import annotations

import os
from pathlib import Path

from torch import Tensor, nn

from dinobridge.export.common import check_output_file, cpu_copy, save_tensors


def official_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The official hub-layout backbone state dict (CPU copies)."""
    return cpu_copy(model.state_dict())


def export_official(model: nn.Module, out: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write the official hub-layout `.pth` (or `.safetensors`) to `out`; returns the path."""
    path = Path(out)
    check_output_file(path, overwrite)
    save_tensors(official_state_dict(model), path)
    return path
