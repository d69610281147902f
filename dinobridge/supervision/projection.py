"""Projection of student features into the teacher's feature space."""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["StudentProjection"]


class StudentProjection(nn.Module):
    """Linear or small-MLP projection from the student dimension to the teacher dimension.

    With ``hidden_dim`` set (the seeds' layout): Linear(in, hidden) -> GELU -> LayerNorm(hidden) -> Linear(hidden, out).
    With ``hidden_dim=None``: a single Linear(in, out).

    x [..., in_dim] -> [..., out_dim]
    """

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int | None = None) -> None:
        super().__init__()
        for name, v in (("in_dim", in_dim), ("out_dim", out_dim)):
            if not (isinstance(v, int) and v > 0):
                raise ValueError(f"{name}: expected a positive int, got {v!r}")
        if hidden_dim is None:
            self.net: nn.Module = nn.Linear(in_dim, out_dim)
        else:
            if not (isinstance(hidden_dim, int) and hidden_dim > 0):
                raise ValueError(f"hidden_dim: expected a positive int or None, got {hidden_dim!r}")
            self.net = nn.Sequential(
                nn.Linear(in_dim, hidden_dim),
                nn.GELU(),
                nn.LayerNorm(hidden_dim),
                nn.Linear(hidden_dim, out_dim),
            )
        self.in_dim, self.out_dim, self.hidden_dim = in_dim, out_dim, hidden_dim

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)
