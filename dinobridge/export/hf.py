"""Hugging Face layout: a directory with config.json + model.safetensors for `transformers.AutoModel`.

DINOv3 backbones become `DINOv3ViTModel`, DINOv2 ones `Dinov2Model` (no registers) or `Dinov2WithRegistersModel`.
Keys and config come from dinobridge.models.convert (`to_hf_state_dict`, `hf_config_dict`); options HF cannot hold
(untied cls/patch norms, RMSNorm, no LayerScale, RoPE min/max periods, ...) are refused. `local_cls_norm` is
dropped (only the student's local crops use it in training). Layers are written as `model.layer.*` (DINOv3) /
`encoder.layer.*` (DINOv2), the names of transformers 5. transformers is imported only here.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from dinobridge.export.common import ExportError, check_output_dir, cpu_copy, dropped_keys_note
from dinobridge.models.convert import hf_config_dict, to_hf_state_dict


_CLASSES = {  # model_type -> (config class, model class)
    "dinov3_vit": ("DINOv3ViTConfig", "DINOv3ViTModel"),
    "dinov2": ("Dinov2Config", "Dinov2Model"),
    "dinov2_with_registers": ("Dinov2WithRegistersConfig", "Dinov2WithRegistersModel"),
}


def _transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise ExportError("--format hf needs the transformers package (pip install 'transformers>=5')") from None
    return transformers


def hf_config(model: nn.Module) -> Any:
    """The transformers config object of `model` (ExportError when HF cannot represent it)."""
    transformers = _transformers()
    try:
        kw = hf_config_dict(model)
    except ValueError as e:
        raise ExportError(str(e)) from None
    cfg_name, model_name = _CLASSES[kw.pop("model_type")]
    config = getattr(transformers, cfg_name)(**kw)
    config.architectures = [model_name]
    return config


def hf_state_dict(model: nn.Module, config: Any) -> dict[str, Tensor]:
    """HF-named tensors for `model`, checked key by key and shape by shape against the HF model of `config`."""
    transformers = _transformers()
    sd = to_hf_state_dict(model.state_dict(), dinov2=model.dinov2)
    with torch.device("meta"):
        hf_model = getattr(transformers, config.architectures[0])(config)
    expected = {k: tuple(v.shape) for k, v in hf_model.state_dict().items()}
    if "embeddings.register_tokens" in expected and "embeddings.register_tokens" not in sd:
        sd["embeddings.register_tokens"] = torch.zeros(1, 0, model.embed_dim)  # HF keeps an empty [1, 0, D]
    missing, unexpected = sorted(set(expected) - set(sd)), sorted(set(sd) - set(expected))
    shapes = [k for k in set(expected) & set(sd) if tuple(sd[k].shape) != expected[k]]
    if missing or unexpected or shapes:  # a mapping bug, not a user error
        raise RuntimeError(f"HF key mapping mismatch: missing {missing}, unexpected {unexpected}, shapes {shapes}")
    return cpu_copy(sd)


def export_hf(model: nn.Module, out_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write config.json + model.safetensors into `out_dir` for `transformers.AutoModel.from_pretrained`."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    check_output_dir(out, overwrite)
    config = hf_config(model)
    sd = hf_state_dict(model, config)
    dtypes = {v.dtype for v in sd.values() if v.is_floating_point()}
    config.dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
    dropped_keys_note(model, "hf", antialias=model.dinov2 and model.n_storage_tokens > 0)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "model.safetensors.tmp"
    save_file(sd, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, out / "model.safetensors")
    config.save_pretrained(str(out))
    return out
