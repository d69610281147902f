"""AdamW parameter groups (layer-wise lr decay, weight-decay masks), per-step schedule writes, gradient clipping.

Follows DINOv3 (reference §1.8) with two deliberate differences, both driven by the user's `optim` keys:

* `optim.dino_head_lr_multiplier` (dino_bridge key, default 1.0): multiplies the lr of every `dino_head` parameter
  (MLP and prototypes). It does NOT touch `ibot_head`: the seed describes it as "the LR multiplier of the DINO head"
  and the user's config uses a separate iBOT head (`ibot.separate_head: true`).
* `optim.dino_head_wd_multiplier`: the official code tests for "dino_head" in names that are relative to the head,
  so it never applies. Here it IS applied, multiplicatively, to every `dino_head` parameter's wd multiplier (biases
  keep 0). With the default 1.0 the result is identical to the official one.

Group dict keys: `params`, `param_names` (names prefixed with the submodule, e.g. "backbone.blocks.0.norm1.weight"),
`lr_multiplier`, `wd_multiplier`, `is_last_layer`, plus `lr` / `weight_decay` written by `apply_schedule`.
"""

from __future__ import annotations

import logging
from typing import Any, Iterable, Optional

import torch
from torch import Tensor, nn

from dinobridge.errors import ConfigError

__all__ = [
    "apply_schedule",
    "build_optimizer",
    "build_param_groups",
    "clip_grad_norms",
    "iter_group_summary",
    "layer_id_for",
    "supports_fused_adamw",
]

logger = logging.getLogger(__name__)

# Backbone parameters living "before" block 0 (layer id 0). register_tokens/pos_embed: DINOv2-style backbones.
_EMBED_NAMES = ("cls_token", "storage_tokens", "register_tokens", "mask_token", "pos_embed", "patch_embed")
_NO_WD_SUBSTRINGS = ("norm", "gamma", "fourier_w")


def _opt(cfg: Any, key: str, default: Any) -> Any:
    """Read `optim.<key>` from the full config or the `optim` section itself; None -> default."""
    section = cfg.get("optim", None) if hasattr(cfg, "get") else getattr(cfg, "optim", None)
    node = cfg if section is None else section
    value = node.get(key, default) if hasattr(node, "get") else getattr(node, key, default)
    return default if value is None else value


def layer_id_for(name: str, n_blocks: int) -> int:
    """Layer id of a backbone parameter: embeddings/tokens 0, `blocks.i.*` i+1, everything else n_blocks+1."""
    first = name.split(".", 1)[0]
    if first in _EMBED_NAMES:
        return 0
    if first == "blocks":
        parts = name.split(".")
        if len(parts) > 1 and parts[1].isdigit():
            return int(parts[1]) + 1
    return n_blocks + 1


def _wd_multiplier(name: str) -> float:
    """0 for biases, norms, LayerScale gammas (and `fourier_w`); 1 otherwise (tokens and prototypes included)."""
    if name.endswith("bias") or any(s in name for s in _NO_WD_SUBSTRINGS):
        return 0.0
    return 1.0


def _groups_for_submodule(sub_name: str, module: nn.Module, cfg: Any) -> list[dict]:
    rho = float(_opt(cfg, "layerwise_decay", 1.0))
    patch_embed_mult = float(_opt(cfg, "patch_embed_lr_mult", 1.0))
    is_backbone = sub_name == "backbone"
    n_blocks = len(module.blocks) if is_backbone and hasattr(module, "blocks") else 0
    is_dino_head = sub_name == "dino_head"
    head_lr = float(_opt(cfg, "dino_head_lr_multiplier", 1.0)) if is_dino_head else 1.0
    head_wd = float(_opt(cfg, "dino_head_wd_multiplier", 1.0)) if is_dino_head else 1.0

    groups = []
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        lr_mult = 1.0
        if is_backbone:
            lr_mult = rho ** (n_blocks + 1 - layer_id_for(name, n_blocks))
            if "patch_embed" in name:
                lr_mult *= patch_embed_mult
        groups.append(
            {
                "params": [param],
                "param_names": [f"{sub_name}.{name}"],
                "lr_multiplier": lr_mult * head_lr,
                "wd_multiplier": _wd_multiplier(name) * head_wd,
                "is_last_layer": "last_layer" in name,
            }
        )
    return groups


def _fuse(groups: list[dict]) -> list[dict]:
    """Merge groups with identical (lr_multiplier, wd_multiplier, is_last_layer), keeping first-seen order."""
    fused: dict[tuple, dict] = {}
    for g in groups:
        key = (g["lr_multiplier"], g["wd_multiplier"], g["is_last_layer"])
        if key not in fused:
            fused[key] = {**g, "params": [], "param_names": []}
        fused[key]["params"] += g["params"]
        fused[key]["param_names"] += g["param_names"]
    return list(fused.values())


def build_param_groups(student: nn.ModuleDict, cfg: Any) -> list[dict]:
    """AdamW parameter groups for `student` (ModuleDict with `backbone`, `dino_head`, `ibot_head`, add-ons).

    Per submodule (names relative to it, as official): backbone lr multiplier ρ^(L+1-layer_id) with
    ρ = optim.layerwise_decay, L = len(backbone.blocks), tokens/patch_embed at layer 0 (patch_embed additionally
    × optim.patch_embed_lr_mult), blocks.i at i+1, final norms at L+1 (multiplier 1); other submodules 1
    (dino_head × optim.dino_head_lr_multiplier). wd multiplier 0 for biases/norms/gammas, else 1 (dino_head ×
    optim.dino_head_wd_multiplier). `is_last_layer` for names containing "last_layer". With
    optim.multi_tensor_optim, groups are fused per submodule (official: 52 for a ViT-L backbone).
    `cfg` is the full config or its `optim` section.
    """
    if not isinstance(student, nn.ModuleDict):
        raise TypeError(f"build_param_groups: student must be an nn.ModuleDict, got {type(student).__name__}")
    fuse = bool(_opt(cfg, "multi_tensor_optim", True))
    all_groups: list[dict] = []
    for sub_name, module in student.items():
        groups = _groups_for_submodule(sub_name, module, cfg)
        all_groups += _fuse(groups) if fuse else groups
    if not all_groups:
        raise ValueError("build_param_groups: the student has no trainable parameters")
    return all_groups


def supports_fused_adamw(device_type: str) -> bool:
    """True where torch ships a fused AdamW kernel we trust: cuda, xpu, mps, cpu (if torch lists the device)."""
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

        supported = set(_get_fused_kernels_supported_devices())
    except ImportError:  # pragma: no cover - very old torch
        supported = {"cuda"}
    return device_type in supported and device_type in ("cuda", "xpu", "mps", "cpu")


def build_optimizer(
    param_groups: list[dict], cfg: Any, device_type: str, fused: Optional[bool] = None
) -> torch.optim.AdamW:
    """AdamW(betas=(optim.adamw_beta1, optim.adamw_beta2), eps 1e-8), fused where supported, else foreach.

    `optim.optimizer` is ignored (always AdamW, as official). `fused` overrides the automatic choice. The initial
    lr / weight_decay are 0; `apply_schedule` sets them before every step.
    """
    optimizer_name = str(_opt(cfg, "optimizer", "adamw")).lower()
    if optimizer_name != "adamw":
        logger.warning("optim.optimizer=%r is ignored: DINOv3 always trains with AdamW", optimizer_name)
    beta1, beta2 = float(_opt(cfg, "adamw_beta1", 0.9)), float(_opt(cfg, "adamw_beta2", 0.999))
    for key, beta in (("adamw_beta1", beta1), ("adamw_beta2", beta2)):
        if not 0.0 <= beta < 1.0:
            raise ConfigError(f"optim.{key}: expected a value in [0, 1), got {beta}")
    use_fused = supports_fused_adamw(device_type) if fused is None else bool(fused)
    groups = [{**g, "lr": 0.0, "weight_decay": 0.0} for g in param_groups]
    kwargs = {"fused": True} if use_fused else {"foreach": None}
    return torch.optim.AdamW(groups, lr=0.0, betas=(beta1, beta2), eps=1e-8, weight_decay=0.0, **kwargs)


def apply_schedule(optimizer: torch.optim.Optimizer, lr: float, wd: float, last_layer_lr: float) -> None:
    """Per group: lr = (last_layer_lr if is_last_layer else lr) · lr_multiplier; weight_decay = wd · wd_multiplier."""
    for group in optimizer.param_groups:
        base = last_layer_lr if group.get("is_last_layer", False) else lr
        group["lr"] = base * group.get("lr_multiplier", 1.0)
        group["weight_decay"] = wd * group.get("wd_multiplier", 1.0)


def _local_norm(norm: Tensor) -> Tensor:
    """A DTensor total norm (FSDP2) -> a plain replicated tensor; plain tensors pass through."""
    full_tensor = getattr(norm, "full_tensor", None)
    return full_tensor() if callable(full_tensor) else norm


def clip_grad_norms(
    student: nn.ModuleDict, max_norm: Optional[float], norm_when_disabled: bool = False
) -> dict[str, Tensor]:
    """Clip gradients separately per submodule (official: backbone, dino_head, ibot_head) to `max_norm`.

    Returns {submodule name: total L2 norm before clipping} as 0-dim tensors (no host sync; call `.item()` when
    logging). `max_norm` 0 / None disables clipping; then norms are computed only if `norm_when_disabled`
    (else {} is returned). Works with DTensor (FSDP2) gradients: the norm is made whole before scaling.
    Submodules without gradients are skipped.
    """
    enabled = bool(max_norm) and max_norm > 0
    if not enabled and not norm_when_disabled:
        return {}
    norms: dict[str, Tensor] = {}
    for name, module in student.items():
        params = [p for p in module.parameters() if p.grad is not None]
        if not params:
            continue
        total = _local_norm(torch.nn.utils.get_total_norm([p.grad for p in params], 2.0, False, None))
        if enabled:
            torch.nn.utils.clip_grads_with_norm_(params, float(max_norm), total, None)
        norms[name] = total
    return norms


def iter_group_summary(optimizer: torch.optim.Optimizer) -> Iterable[str]:
    """One line per group (count, multipliers, first name) for the startup log."""
    for i, g in enumerate(optimizer.param_groups):
        names = g.get("param_names", [])
        yield (
            f"group {i}: {len(g['params'])} tensors, lr_mult={g.get('lr_multiplier', 1.0):.6g}, "
            f"wd_mult={g.get('wd_multiplier', 1.0):g}, last_layer={g.get('is_last_layer', False)}, "
            f"first={names[0] if names else '?'}"
        )

