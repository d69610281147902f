"""SSL objectives: DINO (CLS), iBOT (masked patches), KoLeo, Gram anchoring, and the official loss weighting."""

from dinobridge.objectives.dino import DINOLoss
from dinobridge.objectives.gram import GramLoss
from dinobridge.objectives.ibot import IBOTPatchLoss, masks_weight_from_masks
from dinobridge.objectives.koleo import KoLeoLoss, KoLeoLossDistributed, gated_mean, patch_koleo_loss
from dinobridge.objectives.weighting import dino_pair_weights, weighted_dino_loss, weighted_koleo_loss

__all__ = [
    "DINOLoss",
    "GramLoss",
    "IBOTPatchLoss",
    "KoLeoLoss",
    "KoLeoLossDistributed",
    "dino_pair_weights",
    "gated_mean",
    "masks_weight_from_masks",
    "patch_koleo_loss",
    "weighted_dino_loss",
    "weighted_koleo_loss",
]
