"""Configuration of the dino_bridge add-ons and data sources: `dtch.*`, `resize_shuffle_augmentor.*`, `data.*`.

Key names follow the user's YAML (seed 004) and reference/addons_and_devices.md §2.1.7 (DTCH-SK), §2.2
(Crop-Resize, "resize-paste"), §2.3 (PatchRoll, "patch-shuffle") and §2.4 (patch-to-CLS bridge). With
`dtch.enabled: false` and every `*_weight` schedule at 0 (the defaults) training is plain DINOv3.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from dinobridge.config.schedules import WeightScheduleConfig


@dataclass
class DtchConfig:
    """DTCH-SK (Dual-Temperature Cumulative-History Sinkhorn), reference §2.1.7.

    enabled: false -> plain Sinkhorn-Knopp (exact). cls_hist_cache / patch_hist_cache: history size in samples per
    rank-equivalent (N_cap = value * world_size) for the DINO-CLS / iBOT-patch targets; 0 = no history.
    history_mode: "ema" (O(K) memory, default) | "window" (exact sliding window, the public ring buffer).
    soft_scale: s >= 1, balance on z / (s * tau) (1.0 = dual temperature off). power: p > 0 sharpening after balancing
    (null = soft_scale). hist_weight: lambda >= 0, weight of the history pseudo-column. n_iterations: SK iterations.
    """

    enabled: bool = False
    cls_hist_cache: int = 40000
    patch_hist_cache: int = 40000
    history_mode: str = "ema"
    soft_scale: float = 1.0
    power: Optional[float] = None
    hist_weight: float = 1.0
    n_iterations: int = 3


@dataclass
class ResizeShuffleAugmentorConfig:
    """Auxiliary invariance losses: Crop-Resize (`resize_paste_*`, §2.2), PatchRoll (`patch_shuffle_*`, §2.3) and the
    patch-to-CLS bridge (`bridge_*`, §2.4). Keys of the user's YAML come first; the rest are the spec's knobs.

    Weights (schedules, a plain number = constant):
      resize_paste_loss_weight: w_rp(t) of the Crop-Resize CLS loss.
      patch_shuffle_loss_weight: w_ps(t), multiplies `patch_shuffle_cls_weight * L_cls + patch_shuffle_patch_weight *
        L_patch` (the public code only gated the sum; here it scales it).
      bridge_global_weight / bridge_patchshuffle_weight: w_bg(t) / w_bp(t) of the bridge losses on the global crops /
        on the rolled view.
    PatchRoll: patch_shuffle_patch_probability = fraction of samples that get a patch-selection mask, with masked
      fraction upper bounds spread over patch_shuffle_patch_min_max; use_all_shift_mask: true keeps the whole mask,
      false supervises only rolled tokens visible to the student; patch_shuffle_max_shift = R (patches);
      patch_shuffle_allow_zero_shift: false redraws (0, 0); patch_shuffle_mode: "roll" | "local_shuffle" (permute
      inside patch_shuffle_cell_fraction of the cells of patch_shuffle_cell_size x patch_shuffle_cell_size patches);
      patch_shuffle_ibot_mask: the rolled student view is iBOT-masked (public behaviour).
    Crop-Resize: with resize_paste_crop_prob take a sub-crop with side fractions in resize_paste_crop_scale; with
      resize_paste_keep_aspect_prob one scale in resize_paste_scale for both sides, else one per side; snap to the
      patch grid; paste on a canvas (resize_paste_background: "random" | "mean" | "zero"); optional
      resize_paste_roll_prob / resize_paste_split_prob (public, off). resize_paste_n_views: global crops used per
      sample (1 or 2); resize_paste_target: "same" (the same view's teacher target) | "both" (mean of both global
      targets); resize_paste_ibot_mask: iBOT-mask the resized view.
    Bridge: bridge_pool: "attn" (any grid, ~3M params at D=1024, recommended) | "conv_full" (public 14x14 conv,
      224 px only); bridge_hidden_dim: null = D/2 for conv_full, D for attn; bridge_direction: "patch_to_cls"
      (bridge output vs teacher CLS targets) | "cls_from_patch" (student CLS vs the teacher bridge output, needs
      bridge_teacher_ema); bridge_teacher_ema: keep an EMA teacher copy of the bridge;
      bridge_gate_ibot_loss_below: null = always on, else the bridge loss runs only while the iBOT loss is below it.
    patch_size: patch grid of the views; null = student.patch_size (if set it must equal it).
    """

    resize_paste_loss_weight: WeightScheduleConfig = field(default_factory=WeightScheduleConfig)
    patch_shuffle_loss_weight: WeightScheduleConfig = field(default_factory=WeightScheduleConfig)
    patch_shuffle_patch_weight: float = 1.0
    patch_shuffle_cls_weight: float = 1.0
    patch_shuffle_patch_probability: float = 0.5
    patch_shuffle_patch_min_max: List[float] = field(default_factory=lambda: [0.05, 0.15])
    use_all_shift_mask: bool = True
    bridge_patchshuffle_weight: WeightScheduleConfig = field(default_factory=WeightScheduleConfig)
    bridge_global_weight: WeightScheduleConfig = field(default_factory=WeightScheduleConfig)
    patch_size: Optional[int] = None
    # PatchRoll (§2.3)
    patch_shuffle_max_shift: int = 5
    patch_shuffle_allow_zero_shift: bool = False
    patch_shuffle_mode: str = "roll"
    patch_shuffle_cell_size: int = 2
    patch_shuffle_cell_fraction: float = 0.1
    patch_shuffle_ibot_mask: bool = True
    # Crop-Resize (§2.2)
    resize_paste_crop_prob: float = 0.7
    resize_paste_crop_scale: List[float] = field(default_factory=lambda: [0.7, 1.0])
    resize_paste_keep_aspect_prob: float = 0.3
    resize_paste_scale: List[float] = field(default_factory=lambda: [0.5, 0.9])
    resize_paste_background: str = "random"
    resize_paste_roll_prob: float = 0.0
    resize_paste_split_prob: float = 0.0
    resize_paste_n_views: int = 1
    resize_paste_target: str = "same"
    resize_paste_ibot_mask: bool = False
    # Bridge (§2.4)
    bridge_pool: str = "attn"
    bridge_hidden_dim: Optional[int] = None
    bridge_direction: str = "patch_to_cls"
    bridge_teacher_ema: bool = False
    bridge_gate_ibot_loss_below: Optional[float] = None


@dataclass
class DataSourceConfig:
    """One named source of the `data:` mapping (used when `train.dataset_path` is null), e.g.
    `data: {imagenet_1k: {txt_path: /data/list.txt, dataset_ratio: 1.0}}`.

    Exactly one of `txt_path` (a text file with one image path per line; relative entries are resolved against the
    list file's folder) or `root` (an image folder, searched recursively) is set.
    `dataset_ratio` > 0: the source's share of the sample stream relative to its size (1.0 = each image once per pass,
    0.5 = half of it, 2.0 = twice).
    """

    txt_path: Optional[str] = None
    root: Optional[str] = None
    dataset_ratio: float = 1.0
