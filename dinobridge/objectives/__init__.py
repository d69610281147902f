"""SSL objectives: DINO (CLS), iBOT (masked patches), KoLeo, Gram anchoring, the official loss weighting, and the
ResizeShuffle add-ons (Crop-Resize, PatchRoll, patch-to-CLS bridge; see `addon.py` for how they get extra views).

Each `*Loss` is the bare formula on tensors; each `*Objective` wraps one for the meta-architecture: it reads what it
needs from an `SSLStep` and returns (weighted loss, logged terms).
"""

from dinobridge.objectives.addon import AddonObjective, ViewContext, ViewRequest, soft_cross_entropy, view_generator
from dinobridge.objectives.base import Objective, SSLStep
from dinobridge.objectives.bridge import BridgeObjective, PatchBridge, detached_head_forward
from dinobridge.objectives.crop_resize import CropResizeObjective, crop_resize_paste, draw_paste_params
from dinobridge.objectives.dino import DINOLoss, DINOObjective
from dinobridge.objectives.gram import GramLoss, GramObjective
from dinobridge.objectives.ibot import IBOTObjective, IBOTPatchLoss, masks_weight_from_masks
from dinobridge.objectives.koleo import KoLeoLoss, KoLeoLossDistributed, KoLeoObjective, gated_mean, patch_koleo_loss
from dinobridge.objectives.patch_roll import (
    PatchRollObjective,
    inverse_permutation,
    permute_patches,
    roll_permutation,
    selection_masks,
)
from dinobridge.objectives.weighting import dino_pair_weights, weighted_dino_loss, weighted_koleo_loss

__all__ = [
    "AddonObjective",
    "BridgeObjective",
    "CropResizeObjective",
    "DINOLoss",
    "DINOObjective",
    "GramLoss",
    "GramObjective",
    "IBOTObjective",
    "IBOTPatchLoss",
    "KoLeoLoss",
    "KoLeoLossDistributed",
    "KoLeoObjective",
    "Objective",
    "PatchBridge",
    "PatchRollObjective",
    "SSLStep",
    "ViewContext",
    "ViewRequest",
    "crop_resize_paste",
    "detached_head_forward",
    "dino_pair_weights",
    "draw_paste_params",
    "gated_mean",
    "inverse_permutation",
    "masks_weight_from_masks",
    "patch_koleo_loss",
    "permute_patches",
    "roll_permutation",
    "selection_masks",
    "soft_cross_entropy",
    "view_generator",
    "weighted_dino_loss",
    "weighted_koleo_loss",
]
