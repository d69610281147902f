"""Weighted k-nearest-neighbour classification of frozen features (the DINO kNN protocol).

For each test sample: cosine similarity to every train sample (features L2-normalised), the k most similar train
samples vote for their class with weight exp(sim / T), and classes are ranked by their summed votes. Accuracy is
reported in percent, top-1 and (with at least 5 classes) top-5.

Determinism: among train samples with equal similarity at the k-th place, the lower train index is taken; among
classes with equal votes, the lower class index ranks first. Results do not depend on the chunk size.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

# Similarity entries per chunk when `batch_size` is None: 2**26 fp32 values = 256 MiB.
_AUTO_CHUNK_ELEMENTS = 1 << 26
# One-hot entries per block when summing class votes: 2**24 fp32 values = 64 MiB.
_VOTE_BLOCK_ELEMENTS = 1 << 24


def _check_inputs(train_feats: Tensor, train_labels: Tensor, test_feats: Tensor, test_labels: Tensor) -> None:
    for name, t in (("train_feats", train_feats), ("test_feats", test_feats)):
        if t.dim() != 2:
            raise ValueError(f"{name}: expected a 2-D tensor [N, D], got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise ValueError(f"{name}: expected floating-point features, got dtype {t.dtype}")
        if t.shape[0] == 0:
            raise ValueError(f"{name}: got no samples")
    if train_feats.shape[1] != test_feats.shape[1]:
        raise ValueError(f"train_feats has dim {train_feats.shape[1]} but test_feats has dim {test_feats.shape[1]}")
    for name, labels, feats in (("train_labels", train_labels, train_feats), ("test_labels", test_labels, test_feats)):
        if labels.dim() != 1 or labels.shape[0] != feats.shape[0]:
            raise ValueError(f"{name}: expected shape [{feats.shape[0]}], got {tuple(labels.shape)}")
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise ValueError(f"{name}: expected integer class indices, got dtype {labels.dtype}")
        negative = (labels < 0).nonzero()
        if negative.numel():
            i = int(negative[0, 0])
            raise ValueError(f"{name}: sample {i} has label {int(labels[i])} (unknown); kNN evaluation needs a class "
                             f"index >= 0 for every sample ({negative.shape[0]} sample(s) affected)")


def _topk_lowest_index_on_ties(sim: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k largest entries of each row of `sim` [B, N] -> (values [B, k], indices [B, k]), ordered by value
    (descending) then index (ascending), so every prefix [:, :j] is the top-j with ties going to the lower index
    (torch.topk does not specify which of equal values it takes, nor their order)."""
    vals, idx = sim.topk(k, dim=1)
    kth = vals[:, -1:]
    # rows where a value equal to the k-th one was left out: redo them with a stable sort (rare; exact duplicates)
    left_out = (sim == kth).sum(1) > (vals == kth).sum(1)
    if left_out.any():
        rows = left_out.nonzero().squeeze(1)
        v, i = sim[rows].sort(dim=1, descending=True, stable=True)
        vals[rows], idx[rows] = v[:, :k], i[:, :k]
    by_index = idx.argsort(dim=1)
    vals, idx = vals.gather(1, by_index), idx.gather(1, by_index)
    by_value = vals.sort(dim=1, descending=True, stable=True).indices
    return vals.gather(1, by_value), idx.gather(1, by_value)


def _class_votes(neighbour_y: Tensor, weights: Tensor, num_classes: int) -> Tensor:
    """Summed vote per class: neighbour_y [B, k] (class indices), weights [B, k] -> votes [B, C].

    Built from a one-hot [b, k, C] and a batched matmul in row blocks (deterministic, unlike scatter_add on GPUs)."""
    B, k = neighbour_y.shape
    votes = torch.empty(B, num_classes, device=weights.device, dtype=torch.float32)
    rows = max(1, _VOTE_BLOCK_ELEMENTS // (k * num_classes))
    for s in range(0, B, rows):
        y, w = neighbour_y[s:s + rows], weights[s:s + rows]
        one_hot = torch.zeros(y.shape[0], k, num_classes, device=w.device, dtype=torch.float32)
        one_hot.scatter_(2, y[:, :, None], 1.0)
        votes[s:s + rows] = torch.bmm(w[:, None, :], one_hot)[:, 0]
    return votes


def knn_classify(
    train_feats: Tensor,
    train_labels: Tensor,
    test_feats: Tensor,
    test_labels: Tensor,
    ks: Sequence[int] = (20, 200),
    temperature: float = 0.07,
    num_classes: Optional[int] = None,
    batch_size: Optional[int] = None,
) -> dict[int, dict[str, float]]:
    """Weighted kNN accuracy for each k in `ks`.

    train_feats [N, D], train_labels [N] (int, >= 0), test_feats [M, D], test_labels [M]. The work runs on
    `train_feats.device` (test chunks are moved there) in float32. `num_classes` defaults to the largest label + 1.
    `batch_size`: test samples per chunk (memory ~ batch_size x N floats); None picks a chunk of about 256 MiB.
    A k larger than N uses all N train samples.

    Returns {k: {"top1": %, "top5": %}} ("top5" only when num_classes >= 5).
    """
    _check_inputs(train_feats, train_labels, test_feats, test_labels)
    ks = [int(k) for k in ks]
    if not ks or min(ks) < 1:
        raise ValueError(f"ks: expected one or more positive ints, got {list(ks)}")
    if not temperature > 0:
        raise ValueError(f"temperature: expected a positive float, got {temperature}")
    top_label = int(max(train_labels.max(), test_labels.max()))
    if num_classes is None:
        num_classes = top_label + 1
    elif top_label >= num_classes:
        raise ValueError(f"num_classes: got {num_classes} but a label equals {top_label}")
    device = train_feats.device
    N, M = train_feats.shape[0], test_feats.shape[0]
    if batch_size is None:
        batch_size = max(1, min(4096, _AUTO_CHUNK_ELEMENTS // N))
    if batch_size < 1:
        raise ValueError(f"batch_size: expected a positive int or None, got {batch_size}")

    train = F.normalize(train_feats.float(), dim=1)
    train_y = train_labels.to(device=device, dtype=torch.long)
    if not torch.isfinite(train).all():
        raise ValueError("train_feats: features contain NaN or Inf")
    k_eff = {k: min(k, N) for k in ks}
    k_max = max(k_eff.values())
    top5 = num_classes >= 5
    correct1 = {k: 0 for k in ks}
    correct5 = {k: 0 for k in ks}
    for start in range(0, M, batch_size):
        test = F.normalize(test_feats[start:start + batch_size].to(device).float(), dim=1)
        if not torch.isfinite(test).all():
            raise ValueError("test_feats: features contain NaN or Inf")
        y = test_labels[start:start + batch_size].to(device=device, dtype=torch.long)
        sim = test @ train.T  # [B, N] cosine similarities
        vals, idx = _topk_lowest_index_on_ties(sim, k_max)  # sorted by similarity, descending
        # exp(sim / T) scaled per row by exp(-max sim / T): same ranking, no overflow for small T
        weights = ((vals - vals[:, :1]) / temperature).exp()  # [B, k_max]
        neighbour_y = train_y[idx]  # [B, k_max]
        for k in ks:
            kk = k_eff[k]
            votes = _class_votes(neighbour_y[:, :kk], weights[:, :kk], num_classes)  # [B, C]
            # stable sort: equal votes keep the lower class index first
            ranked = votes.sort(dim=1, descending=True, stable=True).indices[:, :5]
            hits = ranked == y[:, None]
            correct1[k] += int(hits[:, 0].sum())
            if top5:
                correct5[k] += int(hits.any(dim=1).sum())
    out: dict[int, dict[str, float]] = {}
    for k in ks:
        out[k] = {"top1": 100.0 * correct1[k] / M}
        if top5:
            out[k]["top5"] = 100.0 * correct5[k] / M
    return out
