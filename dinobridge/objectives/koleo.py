"""KoLeo (Kozachenko-Leonenko) uniformity regulariser, optional soft gate, patch and distributed variants."""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from dinobridge.distributed.comm import dist_ready, gather_with_grad
from dinobridge.objectives.base import Objective, SSLStep

__all__ = ["KoLeoLoss", "KoLeoLossDistributed", "KoLeoObjective", "gated_mean", "patch_koleo_loss"]

_EPS = 1e-8
_GATE_SCALE = 0.1


def gated_mean(terms: Tensor, gate_threshold: Optional[float]) -> Tensor:
    """Reduce per-sample KoLeo terms l [..., n] over the last dim -> [...].

    gate_threshold None: plain mean(l). Otherwise g = sigmoid((l - threshold) / 0.1) (no gradient through g) and
    0.5 * mean(l * g) + 0.5 * sum(l * g) / max(sum(g), 1): crowded samples (large l = -log d) dominate, spread-out
    ones are faded out; the second half is a gate-weighted mean, the first keeps the scale of the plain mean.
    """
    if gate_threshold is None:
        return terms.mean(dim=-1)
    g = torch.sigmoid((terms.detach() - gate_threshold) / _GATE_SCALE)
    lg = terms * g
    return 0.5 * lg.mean(dim=-1) + 0.5 * lg.sum(dim=-1) / g.sum(dim=-1).clamp_min(1.0)


def _koleo_terms(x: Tensor) -> Tensor:
    """x [..., n, D] -> l [..., n] = -log(d_i + eps), d_i the distance of x̂_i to its nearest other x̂_j."""
    n = x.shape[-2]
    if n < 2:
        raise ValueError(f"KoLeoLoss: needs at least 2 samples per set to find a neighbour, got {n}")
    x = F.normalize(x.float(), p=2, dim=-1, eps=_EPS)
    with torch.no_grad():
        sim = x @ x.transpose(-1, -2)
        sim.diagonal(dim1=-2, dim2=-1).fill_(-2.0)  # below any cosine similarity: never pick oneself
        nn_idx = sim.argmax(dim=-1)  # [..., n]
    neighbours = torch.gather(x, -2, nn_idx.unsqueeze(-1).expand_as(x))
    d = torch.linalg.vector_norm(x - neighbours + _EPS, dim=-1)  # nn.PairwiseDistance(eps=1e-8) convention
    return -torch.log(d + _EPS)


class KoLeoLoss(nn.Module):
    """KoLeo on one set of features: L = reduce_i(-log(d_i + 1e-8)), d_i = ‖x̂_i - x̂_{nn(i)} + 1e-8‖₂.

    x̂ = L2-normalised fp32 features (autocast off); the neighbour search carries no gradient.
    `gate_threshold` None = plain mean; a float enables the soft gate of `gated_mean`.

    Shapes: x [B, D] -> scalar; x [C, B, D] -> KoLeo within each of the C sets, mean over sets -> scalar.
    Needs B >= 2 (B = 1 or duplicates give d ≈ eps, a huge meaningless loss).
    """

    def __init__(self, gate_threshold: Optional[float] = None) -> None:
        super().__init__()
        self.gate_threshold = gate_threshold

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim not in (2, 3):
            raise ValueError(f"KoLeoLoss: x must be [B, D] or [C, B, D], got shape {tuple(x.shape)}")
        with torch.autocast(device_type=x.device.type, enabled=False):
            return gated_mean(_koleo_terms(x), self.gate_threshold).mean()

    def extra_repr(self) -> str:
        return f"gate_threshold={self.gate_threshold}"


def patch_koleo_loss(
    patch_tokens: Tensor,
    chunk_size: int,
    koleo: KoLeoLoss,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """KoLeo on patch tokens, in random chunks of the CLS batch size.

    patch_tokens [N_tokens, D] (e.g. unmasked patch tokens of the global crops) are shuffled with `generator`
    (reproducible; the permutation is drawn on the generator's device), cut into N_tokens // chunk_size chunks of
    `chunk_size` tokens (the remainder is dropped; fewer tokens than one chunk -> one chunk of all of them), KoLeo
    is computed inside each chunk and averaged over chunks -> scalar. Chunks keep the neighbour statistics at the
    scale of the CLS KoLeo and the cost at O(N_tokens · chunk_size).
    """
    if patch_tokens.ndim != 2:
        raise ValueError(f"patch_koleo_loss: patch_tokens must be [N_tokens, D], got shape {tuple(patch_tokens.shape)}")
    if chunk_size < 2:
        raise ValueError(f"patch_koleo_loss: chunk_size must be >= 2, got {chunk_size}")
    n = patch_tokens.shape[0]
    perm_device = generator.device if generator is not None else patch_tokens.device
    perm = torch.randperm(n, generator=generator, device=perm_device).to(patch_tokens.device)
    n_chunks = n // chunk_size
    if n_chunks == 0:
        return koleo(patch_tokens[perm])
    used = perm[: n_chunks * chunk_size]
    return koleo(patch_tokens[used].reshape(n_chunks, chunk_size, patch_tokens.shape[-1]))


class KoLeoLossDistributed(nn.Module):
    """KoLeo whose neighbours are searched in the global batch (DINOv3 `koleo_loss_distributed`).

    Normalised local features [B, D] are all-gathered with autograd (gradients flow to the gathered copies too);
    the global batch (world·B, rank-major) is split into groups of `group_size` consecutive samples (None = the
    whole global batch; must be a multiple of B and divide world·B). Each local sample finds its `topk` nearest
    neighbours in its group (no gradient in the search, itself excluded) and
    L = reduce(-log(‖x̂_i - x̂_j + eps‖ + eps)) over the B·topk pairs (mean, or gated with `gate_threshold`).

    Without a process group it runs on the local batch alone (topk=1, no gate: identical to `KoLeoLoss`).
    Shapes: x [B, D] -> scalar. Every rank must call it with the same B.
    """

    def __init__(
        self,
        topk: int = 1,
        group_size: Optional[int] = None,
        gate_threshold: Optional[float] = None,
        group: Optional[Any] = None,
    ) -> None:
        super().__init__()
        if topk < 1:
            raise ValueError(f"KoLeoLossDistributed: topk must be >= 1, got {topk}")
        self.topk = topk
        self.group_size = group_size
        self.gate_threshold = gate_threshold
        self.group = group

    def _gather(self, x: Tensor) -> tuple[Tensor, int, int]:
        if not dist_ready():
            return x, 0, 1
        return gather_with_grad(x, self.group), dist.get_rank(self.group), dist.get_world_size(self.group)

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 2:
            raise ValueError(f"KoLeoLossDistributed: x must be [B, D], got shape {tuple(x.shape)}")
        with torch.autocast(device_type=x.device.type, enabled=False):
            b = x.shape[0]
            x = F.normalize(x.float(), p=2, dim=-1, eps=_EPS)
            gathered, rank, world = self._gather(x)
            total = b * world
            gsize = total if self.group_size is None else self.group_size
            if gsize % b != 0 or total % gsize != 0:
                raise ValueError(
                    f"KoLeoLossDistributed: group_size must be a multiple of the local batch {b} and divide the "
                    f"global batch {total}, got {gsize}"
                )
            if self.topk >= gsize:
                raise ValueError(f"KoLeoLossDistributed: topk must be < group_size={gsize}, got {self.topk}")
            start = (rank * b // gsize) * gsize
            candidates = gathered[start : start + gsize]  # [G, D]
            offset = rank * b - start  # position of the local samples inside the group
            with torch.no_grad():
                sim = x @ candidates.t()  # [B, G]
                sim.diagonal(offset=offset).fill_(-2.0)
                idx = sim.topk(self.topk, dim=-1).indices  # [B, topk]
            neighbours = candidates[idx]  # [B, topk, D]
            d = torch.linalg.vector_norm(x.unsqueeze(1) - neighbours + _EPS, dim=-1)
            terms = -torch.log(d + _EPS).reshape(-1)  # B·topk pairs
            return gated_mean(terms, self.gate_threshold)

    def extra_repr(self) -> str:
        return f"topk={self.topk}, group_size={self.group_size}, gate_threshold={self.gate_threshold}"


class KoLeoObjective(Objective):
    """KoLeo on the student's pre-head CLS of the global crops, and optionally on their unmasked patch tokens.

    cls:   cls_weight * n_g * mean over global crops of KoLeo(crop's B CLS vectors)   (official: 0.1 * Σ_crops)
    patch: patch_weight * KoLeo over the unmasked global patch tokens, shuffled and cut into chunks of n_g*B tokens
           (as many tokens per chunk as CLS tokens), averaged over chunks.
    Each term may be gated (see `gated_mean`). With `distributed`, the CLS term searches neighbours in the global
    batch (`KoLeoLossDistributed`). The patch shuffle uses a generator seeded by (seed, iteration): reproducible.
    """

    name = "koleo"

    def __init__(
        self,
        cls_weight: float = 0.1,
        patch_weight: float = 0.0,
        cls_gate_threshold: Optional[float] = None,
        patch_gate_threshold: Optional[float] = None,
        distributed: bool = False,
        topk: int = 1,
        group_size: Optional[int] = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.cls_weight, self.patch_weight, self.seed = cls_weight, patch_weight, seed
        self.cls_loss: nn.Module = (
            KoLeoLossDistributed(topk, group_size, cls_gate_threshold) if distributed else KoLeoLoss(cls_gate_threshold)
        )
        self.patch_loss = KoLeoLoss(patch_gate_threshold)

    def forward(self, step: SSLStep) -> tuple[Tensor, dict[str, Tensor]]:
        n_g, b = step.n_global, step.batch_size
        cls = step.student_global["x_norm_clstoken"]
        total = cls.new_zeros((), dtype=torch.float32)
        logs: dict[str, Tensor] = {}
        if self.cls_weight:
            per_crop = cls.view(n_g, b, -1)
            loss = torch.stack([self.cls_loss(per_crop[c]) for c in range(n_g)]).mean()
            total = total + self.cls_weight * n_g * loss
            logs["koleo_loss"] = loss.detach()
        if self.patch_weight:
            tokens = step.student_global["x_norm_patchtokens"].flatten(0, 1)
            masks = step.batch.get("masks")
            if masks is not None:
                tokens = tokens[~masks.flatten()]
            gen = torch.Generator(device=tokens.device).manual_seed(self.seed * 1_000_003 + step.iteration)
            loss = patch_koleo_loss(tokens, chunk_size=max(n_g * b, 2), koleo=self.patch_loss, generator=gen)
            total = total + self.patch_weight * loss
            logs["koleo_patch_loss"] = loss.detach()
        return total, logs
