"""SSL objectives: DINO (CLS), iBOT (masked patches), KoLeo, Gram anchoring, and the official loss weighting.

Each `*Loss` is the bare formula on tensors; each `*Objective` wraps one for the meta-architecture: it reads what it
needs from an `SSLStep` and returns (weighted loss, logged terms).
"""

from dinobridge.objectives.base import Objective, SSLStep
from dinobridge.objectives.dino import DINOLoss, DINOObjective
from dinobridge.objectives.gram import GramLoss, GramObjective
from dinobridge.objectives.ibot import IBOTObjective, IBOTPatchLoss, masks_weight_from_masks
from dinobridge.objectives.koleo import KoLeoLoss, KoLeoLossDistributed, KoLeoObjective, gated_mean, patch_koleo_loss
from dinobridge.objectives.weighting import dino_pair_weights, weighted_dino_loss, weighted_koleo_loss

__all__ = [
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
    "SSLStep",
    "dino_pair_weights",
    "gated_mean",
    "masks_weight_from_masks",
    "patch_koleo_loss",
    "weighted_dino_loss",
    "weighted_koleo_loss",
]
