"""Analytic FLOPs of one SSL training step, and model FLOPs utilisation (MFU).

Counted per rank, 2 FLOPs per multiply-add, matmuls only (norms, activations, softmax, RoPE and the optimizer are
left out, as is usual for MFU):

  ViT forward, one image of N tokens (prefix + patches), per block:
      linear(N)   = 2 * N * sum(in * out over the block's nn.Linear layers)  (qkv, proj, fc1/fc2 or w1/w2/w3)
      attention   = 4 * N^2 * D                                              (q @ k^T and attn @ v)
    plus the patch embedding 2 * N_patches * (C * P^2) * D.
  Head on T tokens: 2 * T * sum(in * out over its nn.Linear layers) (MLP + prototypes).

  step = 3 * student forward on every crop (forward + backward = 1 + 2)
       + 1 * teacher forward on the global crops
       + 3 * student DINO head on every CLS + 1 * teacher DINO head on the global CLS
       + 3 * student iBOT head on the masked patches + 1 * teacher iBOT head on them
       (+ 3 * student forward per extra global-size view of the add-on objectives)

The expected number of masked patches is mask_sample_probability * mean(mask_ratio_min_max) * patches * 2B.
MFU = step FLOPs / step time / peak dense bf16 FLOP/s of the device (989e12 for H100 / H200 SXM).
"""

from __future__ import annotations

from typing import Any, Optional

from torch import nn

# dense (no sparsity) bf16 tensor-core peaks, FLOP/s, by substring of the device name
_PEAK_BF16 = (("H200", 989e12), ("H100", 989e12), ("A100", 312e12), ("L40S", 362e12), ("A10", 125e12))


def peak_flops(device_name: str) -> Optional[float]:
    """Dense bf16 peak FLOP/s of an accelerator named `device_name`, or None when unknown (CPU, other GPUs)."""
    for key, value in _PEAK_BF16:
        if key in device_name:
            return value
    return None


def linear_macs(module: nn.Module) -> int:
    """sum(in_features * out_features) over the nn.Linear layers of `module` (multiply-adds per token)."""
    return sum(m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear))


def vit_forward_flops(backbone: nn.Module, n_patches: int) -> float:
    """Forward FLOPs of one image with `n_patches` patch tokens through a dinobridge VisionTransformer."""
    D = int(backbone.embed_dim)
    n_tokens = n_patches + 1 + int(getattr(backbone, "n_storage_tokens", 0))
    pe = backbone.patch_embed.proj
    patch = 2 * n_patches * pe.in_channels * pe.kernel_size[0] * pe.kernel_size[1] * D
    blocks = sum(2 * n_tokens * linear_macs(b) + 4 * n_tokens * n_tokens * D for b in backbone.blocks)
    return float(patch + blocks)


def ssl_step_flops(
    model: Any,
    batch_size: int,
    global_size: int,
    local_size: int,
    n_local: int,
    mask_sample_probability: float = 0.5,
    mask_ratio_min_max: tuple[float, float] = (0.1, 0.5),
    extra_global_views: int = 0,
    n_global: int = 2,
) -> dict[str, float]:
    """FLOPs of one training step of an SSLMetaArch on one rank (see the module docstring for the formula).

    Returns {"student", "teacher", "heads", "total"} in FLOPs for `batch_size` images per rank.
    """
    backbone = model.student["backbone"]
    P = int(backbone.patch_size)
    g_patches = (global_size // P) ** 2
    l_patches = (local_size // P) ** 2
    g_img = vit_forward_flops(backbone, g_patches)
    l_img = vit_forward_flops(backbone, l_patches) if n_local else 0.0
    B = batch_size
    student = 3.0 * B * ((n_global + extra_global_views) * g_img + n_local * l_img)
    teacher = 1.0 * B * n_global * g_img
    n_cls = B * (n_global + n_local + extra_global_views)
    masked = mask_sample_probability * 0.5 * (mask_ratio_min_max[0] + mask_ratio_min_max[1]) * g_patches * n_global * B
    dino = linear_macs(model.student["dino_head"]) * 2
    ibot = linear_macs(model.student["ibot_head"]) * 2 if "ibot_head" in model.student else 0
    heads = 3.0 * n_cls * dino + 1.0 * n_global * B * dino + 4.0 * masked * ibot
    return {"student": student, "teacher": teacher, "heads": heads, "total": student + teacher + heads}


def _first(size: Any) -> int:
    """A crop size given as an int or as a list of sizes (the first one is the training size)."""
    return int(size) if isinstance(size, (int, float, str)) else int(list(size)[0])


def step_flops_from_config(model: Any, cfg: Any, extra_global_views: int = 0) -> dict[str, float]:
    """`ssl_step_flops` with the crop, batch and masking settings of a training config."""
    crops = cfg.crops
    g, l_size = _first(crops.global_crops_size), _first(crops.local_crops_size)
    masking = cfg.ibot
    prob = float(masking.mask_sample_probability) if float(masking.loss_weight or 0) else 0.0
    return ssl_step_flops(
        model, int(cfg.train.batch_size_per_gpu), g, l_size, int(crops.local_crops_number),
        mask_sample_probability=prob, mask_ratio_min_max=tuple(masking.mask_ratio_min_max),
        extra_global_views=extra_global_views,
    )
