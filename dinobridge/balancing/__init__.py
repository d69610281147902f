"""Teacher-target balancers: teacher logits -> target probabilities (Sinkhorn-Knopp, softmax centering).

`build_balancer(cfg.train.centering, n_prototypes=K)` selects one by name. A new balancer (e.g. DTCH-SK) only needs
`@register_balancer("dtch")` on its class and an import here; the losses never see which one is used.
"""

from dinobridge.balancing.base import Balancer, available_balancers, build_balancer, register_balancer
from dinobridge.balancing.dtch import DTCHSinkhorn, build_dtch_balancer
from dinobridge.balancing.sinkhorn import SinkhornKnopp
from dinobridge.balancing.softmax_center import SoftmaxCenter

__all__ = [
    "Balancer", "DTCHSinkhorn", "SinkhornKnopp", "SoftmaxCenter", "available_balancers", "build_balancer",
    "build_dtch_balancer", "register_balancer",
]
