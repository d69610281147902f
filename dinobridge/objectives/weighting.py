"""Official DINOv3 weighting of the loss terms (identical to DINOv2's)."""

from __future__ import annotations

from torch import Tensor

__all__ = ["dino_pair_weights", "weighted_dino_loss", "weighted_koleo_loss"]


def dino_pair_weights(n_global_crops: int, n_local_crops: int, ignore_diagonal: bool) -> tuple[float, float]:
    """(local, global) weights = pair counts / total pairs.

    global pairs g = n_g(n_g-1) with ignore_diagonal else n_g², local pairs l = n_g·n_l;
    returns (l/(g+l), g/(g+l)), e.g. (16/18, 2/18) for 2 global + 8 local crops with ignore_diagonal.
    """
    if n_global_crops < 1 or n_local_crops < 0:
        raise ValueError(
            f"dino_pair_weights: need n_global_crops >= 1 and n_local_crops >= 0, got {n_global_crops}, {n_local_crops}"
        )
    g = n_global_crops * (n_global_crops - 1) if ignore_diagonal else n_global_crops**2
    loc = n_global_crops * n_local_crops
    if g + loc == 0:
        raise ValueError("dino_pair_weights: no crop pairs (1 global crop, no local crops, ignore_diagonal)")
    return loc / (g + loc), g / (g + loc)


def weighted_dino_loss(
    local_loss: Tensor | float,
    global_loss: Tensor | float,
    n_global_crops: int,
    n_local_crops: int,
    ignore_diagonal: bool,
    local_weight: float = 1.0,
    loss_weight: float = 1.0,
) -> Tensor | float:
    """loss_weight · [ l/(g+l) · local_weight · local_loss + g/(g+l) · global_loss ].

    `local_weight` is the optional `dino.reweight_dino_local_loss` schedule value (not renormalised, as official).
    """
    w_local, w_global = dino_pair_weights(n_global_crops, n_local_crops, ignore_diagonal)
    return loss_weight * (w_local * local_weight * local_loss + w_global * global_loss)


def weighted_koleo_loss(koleo_loss: Tensor | float, n_global_crops: int, loss_weight: float) -> Tensor | float:
    """loss_weight · n_g · koleo_loss, where koleo_loss is the mean over global crops (= weight · Σ_crops KoLeo)."""
    return loss_weight * n_global_crops * koleo_loss
