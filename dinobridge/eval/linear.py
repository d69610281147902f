"""Linear probe of frozen features (the DINOv2 linear protocol, on cached features).

Features are extracted once: the normed CLS token and the mean of the normed patch tokens (storage / register
tokens excluded). Two feature types are probed, as in DINOv2: "cls" [N, D] and "cls+avgpool" [N, 2D] (CLS
concatenated with the mean patch token). No further normalisation is applied.

All classifiers of the grid (learning rates x feature types) train together on the cached tensors: one stacked
weight tensor [D_f, L, C] per feature type (so the L classifiers' logits are one matmul [B, D_f] @ [D_f, L*C]),
the same shuffled mini-batches for all, SGD with momentum 0.9 and a
cosine learning-rate decay to 0 (per step), weights initialised N(0, 0.01^2), biases 0 (as DINOv2). Each classifier's
loss depends only on its own slice, so summing the L losses gives each slice its own gradient.
Learning rates are used as given (DINOv2 scales its grid by batch_size / 256; do that in the lrs if wanted).
Top-1 (and top-5, with at least 5 classes) is measured on the val features; like DINOv2 when no separate
validation split is given, the best (lr, feature type) is chosen on that same val set.
"""

from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from dinobridge.eval.extract import extract_features

FEATURE_TYPES = ("cls", "cls+avgpool")
MOMENTUM = 0.9
INIT_STD = 0.01


# ---------------------------------------------------------------------- feature extraction
class ClsAvgpool(nn.Module):
    """Wraps a backbone with `forward_features(x) -> {"x_norm_clstoken": [B, D], "x_norm_patchtokens": [B, HW, D]}`.

    forward: images [B, 3, H, W] -> [B, 2D] = concat(CLS, mean over patch tokens). The first D columns are the
    "cls" feature type, all 2D the "cls+avgpool" one, so one forward pass gives both.
    """

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        if not callable(getattr(backbone, "forward_features", None)):
            raise ValueError(f"model: expected a backbone with forward_features(x), got {type(backbone).__name__}")
        self.backbone = backbone
        self.training = backbone.training  # so that extract_features restores the backbone's own mode

    def forward(self, x: Tensor) -> Tensor:
        out = self.backbone.forward_features(x)
        if not isinstance(out, dict) or "x_norm_clstoken" not in out or "x_norm_patchtokens" not in out:
            raise ValueError("model: expected forward_features(x) to return a dict with x_norm_clstoken and "
                             "x_norm_patchtokens")
        return torch.cat([out["x_norm_clstoken"], out["x_norm_patchtokens"].mean(dim=1)], dim=1)


def split_feature_types(cls_avgpool: Tensor) -> dict[str, Tensor]:
    """[N, 2D] (from ClsAvgpool) -> {"cls": [N, D] (a view), "cls+avgpool": [N, 2D]}."""
    if cls_avgpool.dim() != 2 or cls_avgpool.shape[1] % 2:
        raise ValueError(f"cls_avgpool: expected [N, 2D], got shape {tuple(cls_avgpool.shape)}")
    d = cls_avgpool.shape[1] // 2
    return {"cls": cls_avgpool[:, :d], "cls+avgpool": cls_avgpool}


def extract_probe_features(
    model: nn.Module,
    data: Union[Dataset, DataLoader],
    device: Union[str, torch.device] = "cpu",
    batch_size: int = 128,
    num_workers: int = 0,
    transform: Optional[Callable] = None,
    autocast_dtype: Optional[torch.dtype] = None,
    progress: bool = True,
    desc: str = "features",
) -> tuple[Tensor, Tensor]:
    """One pass of `model` over `data` -> (CLS + mean patch token [N, 2D] float32, labels [N] int64), on the CPU.

    Arguments as in `dinobridge.eval.extract.extract_features`; split with `split_feature_types`.
    """
    return extract_features(ClsAvgpool(model), data, device=device, batch_size=batch_size, num_workers=num_workers,
                            transform=transform, autocast_dtype=autocast_dtype, progress=progress, desc=desc)


# ---------------------------------------------------------------------- feature cache
def cache_key(weights: Optional[str], parts: Mapping[str, Any]) -> str:
    """Hex digest naming a feature cache: the weights file (absolute path, mtime, size; "none" without one) and
    every other input that changes the features (image size, resize size, model, datasets, precision...)."""
    h = hashlib.sha256()
    if weights is not None:
        st = os.stat(weights)
        h.update(f"weights={os.path.abspath(weights)}|{st.st_mtime_ns}|{st.st_size}\n".encode())
    else:
        h.update(b"weights=none\n")
    for k in sorted(parts):
        h.update(f"{k}={parts[k]!r}\n".encode())
    return h.hexdigest()[:24]


def load_cached_features(path: Path) -> Optional[dict[str, Any]]:
    """The cached record at `path`, or None when missing or unreadable (then it is recomputed)."""
    if not path.is_file():
        return None
    try:
        record = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        return None
    return record if isinstance(record, dict) and {"train", "train_labels", "val", "val_labels"} <= set(record) else None


def save_cached_features(path: Path, record: Mapping[str, Any]) -> None:
    """Write `record` atomically (a temporary file renamed into place)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(dict(record), tmp)
    os.replace(tmp, path)


# ---------------------------------------------------------------------- training
def _check(train_feats: Mapping[str, Tensor], train_labels: Tensor, val_feats: Mapping[str, Tensor],
           val_labels: Tensor) -> None:
    if not train_feats or set(train_feats) != set(val_feats):
        raise ValueError(f"train_feats/val_feats: expected the same non-empty feature types, got "
                         f"{sorted(train_feats)} and {sorted(val_feats)}")
    for split, feats, labels in (("train", train_feats, train_labels), ("val", val_feats, val_labels)):
        if labels.dim() != 1 or labels.is_floating_point() or labels.dtype == torch.bool:
            raise ValueError(f"{split}_labels: expected a 1-D integer tensor, got {labels.dtype} {tuple(labels.shape)}")
        if labels.numel() == 0:
            raise ValueError(f"{split}_labels: got no samples")
        if int(labels.min()) < 0:
            raise ValueError(f"{split}_labels: expected class indices >= 0, got {int(labels.min())}")
        for name, f in feats.items():
            if f.dim() != 2 or f.shape[0] != labels.shape[0] or not f.is_floating_point():
                raise ValueError(f"{split}_feats[{name!r}]: expected float [{labels.shape[0]}, D], got "
                                 f"{f.dtype} {tuple(f.shape)}")
    for name in train_feats:
        if train_feats[name].shape[1] != val_feats[name].shape[1]:
            raise ValueError(f"feature type {name!r}: train dim {train_feats[name].shape[1]} != val dim "
                             f"{val_feats[name].shape[1]}")


@torch.no_grad()
def _accuracy(w: Tensor, b: Tensor, x: Tensor, y: Tensor, chunk: int = 4096) -> tuple[Tensor, Tensor]:
    """Correct counts [L] (top-1, top-5) of the L classifiers w [D, L, C], b [L, C] on x [M, D], y [M]."""
    D, L, C = w.shape
    c1 = torch.zeros(L, dtype=torch.long, device=w.device)
    c5 = torch.zeros(L, dtype=torch.long, device=w.device)
    for s in range(0, x.shape[0], chunk):
        xb, yb = x[s:s + chunk].to(w.device).float(), y[s:s + chunk].to(w.device)
        logits = (xb @ w.reshape(D, L * C) + b.reshape(L * C)).view(-1, L, C).transpose(0, 1)  # [L, n, C]
        logits = torch.nan_to_num(logits, nan=-math.inf)  # a diverged classifier scores nothing useful
        top = logits.topk(min(5, C), dim=2).indices  # [L, n, k]
        hits = top == yb[None, :, None]
        c1 += hits[:, :, 0].sum(1)
        c5 += hits.any(2).sum(1)
    return c1, c5


def train_linear_probes(
    train_feats: Mapping[str, Tensor],
    train_labels: Tensor,
    val_feats: Mapping[str, Tensor],
    val_labels: Tensor,
    lrs: Sequence[float] = (1e-4, 1e-3, 1e-2, 1e-1),
    epochs: int = 100,
    batch_size: int = 256,
    device: Union[str, torch.device] = "cpu",
    seed: int = 0,
    weight_decay: float = 0.0,
    num_classes: Optional[int] = None,
    progress: bool = False,
) -> dict[tuple[float, str], dict[str, Any]]:
    """Train one linear classifier per (lr, feature type), all in one pass over the cached features.

    train_feats: {feature type: [N, D_f]}, train_labels [N] (int >= 0); val_feats / val_labels likewise with M
    samples. Features are moved to `device` (float32). `seed` fixes the initialisation and the batch order.
    Returns {(lr, feature type): {"top1": %, "top5": % (num_classes >= 5 only), "diverged": bool}} in grid order
    (lrs outer, feature types inner); see `best_probe`.
    """
    from tqdm.auto import tqdm

    _check(train_feats, train_labels, val_feats, val_labels)
    lrs = [float(lr) for lr in lrs]
    if not lrs or min(lrs) <= 0 or not all(math.isfinite(lr) for lr in lrs):
        raise ValueError(f"lrs: expected one or more positive floats, got {lrs}")
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs/batch_size: expected positive ints, got {epochs} / {batch_size}")
    if weight_decay < 0:
        raise ValueError(f"weight_decay: expected >= 0, got {weight_decay}")
    top_label = int(max(train_labels.max(), val_labels.max()))
    if num_classes is None:
        num_classes = top_label + 1
    elif top_label >= num_classes:
        raise ValueError(f"num_classes: got {num_classes} but a label equals {top_label}")
    device = torch.device(device)
    names = list(train_feats)
    L, C, N = len(lrs), num_classes, train_labels.shape[0]

    g = torch.Generator().manual_seed(seed)
    xs = {n: train_feats[n].to(device=device, dtype=torch.float32) for n in names}
    y = train_labels.to(device=device, dtype=torch.long)
    ws = {n: (INIT_STD * torch.randn(xs[n].shape[1], 1, C, generator=g)).expand(-1, L, -1).contiguous().to(device)
          for n in names}  # [D_f, L, C]: the same start for every lr
    bs = {n: torch.zeros(L, C, device=device) for n in names}
    params = [p for n in names for p in (ws[n], bs[n])]
    bufs = [torch.zeros_like(p) for p in params]
    lr = torch.tensor(lrs, device=device)  # [L]

    steps_per_epoch = math.ceil(N / batch_size)
    total = epochs * steps_per_epoch
    step = 0
    bar = tqdm(range(epochs), desc="linear probes", unit="epoch", disable=not progress, dynamic_ncols=True)
    for _ in bar:
        order = torch.randperm(N, generator=g).to(device)
        loss_sum = torch.zeros((), device=device)
        for s in range(0, N, batch_size):
            idx = order[s:s + batch_size]
            yb = y[idx]
            for p in params:
                p.requires_grad_(True)
            loss = torch.zeros((), device=device)
            for n in names:
                D = ws[n].shape[0]
                logits = xs[n][idx] @ ws[n].view(D, L * C) + bs[n].view(L * C)  # [B, L*C]: row b, (lr l, class c)
                # sum over classifiers of each one's mean cross-entropy
                loss = loss + F.cross_entropy(logits.view(-1, C), yb.repeat_interleave(L), reduction="sum") / idx.numel()
            grads = torch.autograd.grad(loss, params)
            scale = 0.5 * (1.0 + math.cos(math.pi * step / total))  # cosine decay, 1 -> 0
            with torch.no_grad():
                for p, gr, buf in zip(params, grads, bufs):
                    p.requires_grad_(False)
                    if weight_decay and p.dim() == 3:  # decay weights, not biases
                        gr = gr + weight_decay * p
                    buf.mul_(MOMENTUM).add_(gr)
                    p.sub_((scale * lr).view(L, 1) * buf)  # weights [D, L, C] and biases [L, C] broadcast alike
            loss_sum += loss.detach()
            step += 1
        if progress:
            bar.set_postfix(loss=f"{float(loss_sum) / steps_per_epoch / (L * len(names)):.4f}")
    bar.close()

    results: dict[tuple[float, str], dict[str, Any]] = {}
    per_type = {}
    for n in names:
        c1, c5 = _accuracy(ws[n], bs[n], val_feats[n].to(device), val_labels)
        finite = torch.isfinite(ws[n]).all(2).all(0) & torch.isfinite(bs[n]).all(1)
        per_type[n] = (c1.cpu(), c5.cpu(), finite.cpu())
    M = val_labels.shape[0]
    for i, lr_i in enumerate(lrs):
        for n in names:
            c1, c5, finite = per_type[n]
            r: dict[str, Any] = {"top1": 100.0 * int(c1[i]) / M}
            if C >= 5:
                r["top5"] = 100.0 * int(c5[i]) / M
            r["diverged"] = not bool(finite[i])
            results[(lr_i, n)] = r
    return results


def best_probe(results: Mapping[tuple[float, str], Mapping[str, Any]]) -> tuple[tuple[float, str], Mapping[str, Any]]:
    """The (lr, feature type) with the highest top-1 among classifiers that did not diverge (first in grid order on
    ties; all diverged: the best of them)."""
    items = list(results.items())
    ok = [it for it in items if not it[1].get("diverged", False)] or items
    return max(ok, key=lambda it: it[1]["top1"])  # max keeps the first of equal values
