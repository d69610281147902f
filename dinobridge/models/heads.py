"""DINO / iBOT projection head (DINOv3 layout, no weight norm on the last layer)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["DINOHead"]


def _build_mlp(in_dim: int, hidden_dim: int, bottleneck_dim: int, nlayers: int, bias: bool) -> nn.Module:
    """Linear(-GELU-Linear)* ending in `bottleneck_dim`; a single Linear when nlayers == 1."""
    if nlayers == 1:
        return nn.Linear(in_dim, bottleneck_dim, bias=bias)
    layers: list[nn.Module] = [nn.Linear(in_dim, hidden_dim, bias=bias), nn.GELU()]
    for _ in range(nlayers - 2):
        layers += [nn.Linear(hidden_dim, hidden_dim, bias=bias), nn.GELU()]
    layers.append(nn.Linear(hidden_dim, bottleneck_dim, bias=bias))
    return nn.Sequential(*layers)


class DINOHead(nn.Module):
    """MLP -> L2-normalise -> prototypes.

    `mlp` is Linear-GELU-...-Linear (keys `mlp.0`, `mlp.2`, `mlp.4` for nlayers=3; `mlp.weight` for nlayers=1),
    `last_layer = Linear(bottleneck_dim, n_prototypes, bias=False)` with no weight norm (DINOv3). With
    `norm_last_layer=True` the prototype rows are L2-normalised in the forward pass (DINOv1/v2 style, same keys), so
    logits are cosine similarities in [-1, 1]; this gives teacher targets a usable spread from the first step on
    small data, where the DINOv3 head's tiny initial logits keep Sinkhorn-Knopp targets uniform.

    Shapes: x [..., in_dim] -> logits [..., n_prototypes]
    (or the normalised bottleneck [..., bottleneck_dim] with `no_last_layer=True`; `only_last_layer=True` expects
    the bottleneck [..., bottleneck_dim] as input).

    Construction does no data-dependent work, so it can run under `with torch.device("meta"):`; call
    `init_weights()` (alias `reset_parameters()`) once the parameters are materialised.
    """

    def __init__(
        self,
        in_dim: int,
        n_prototypes: int = 65536,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        nlayers: int = 3,
        mlp_bias: bool = True,
        norm_last_layer: bool = False,
    ) -> None:
        super().__init__()
        if nlayers < 1:
            raise ValueError(f"DINOHead: nlayers must be >= 1, got {nlayers}")
        self.in_dim = in_dim
        self.n_prototypes = n_prototypes
        self.bottleneck_dim = bottleneck_dim
        self.mlp = _build_mlp(in_dim, hidden_dim, bottleneck_dim, nlayers, mlp_bias)
        self.last_layer = nn.Linear(bottleneck_dim, n_prototypes, bias=False)
        self.norm_last_layer = norm_last_layer

    @torch.no_grad()
    def init_weights(self) -> None:
        """Trunc-normal(std 0.02) weights, zero biases (official init)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    reset_parameters = init_weights

    def forward(self, x: Tensor, no_last_layer: bool = False, only_last_layer: bool = False) -> Tensor:
        """x [..., in_dim] -> [..., n_prototypes]; see the class docstring for the two partial modes."""
        if no_last_layer and only_last_layer:
            raise ValueError("DINOHead.forward: no_last_layer and only_last_layer cannot both be True")
        if not only_last_layer:
            x = self.mlp(x)
            eps = 1e-6 if x.dtype == torch.float16 else 1e-12
            x = F.normalize(x, p=2, dim=-1, eps=eps)
        if not no_last_layer:
            w = self.last_layer.weight
            x = F.linear(x, F.normalize(w, dim=1)) if self.norm_last_layer else self.last_layer(x)
        return x
