"""Online evaluation of the teacher during training: kNN, a linear probe, and pictures for tensorboard.

`OnlineEvaluator(cfg, device, is_main)` is built once before the training loop and called after every iteration;
each part runs when its period (`evaluation.knn_period`, `linear_period`, `picture_period`; 0 = off) divides the
iteration, never at the last iteration (the final report covers it), and only on rank 0:

- kNN: weighted kNN top-1 of the normed CLS token for each k of `evaluation.knn_k` -> `knn/top1_k{k}`.
- Linear probe: linear classifiers on the cached features of the same train / val data, one per learning rate of
  `evaluation.linear_lrs` and per feature type ("cls", "cls+avgpool" = CLS and mean patch token, DINOv2), trained
  together for `evaluation.linear_epochs` epochs (dinobridge.eval.linear) -> `linear/top1` (best classifier, chosen
  on the val data as DINOv2 does without a separate validation split), `linear/lr` (its learning rate) and
  `linear/top1_cls`, `linear/top1_cls_avgpool` (best of each feature type).
- Pictures (tensorboard only): a fixed set of `evaluation.picture_images` images of the kNN val data (one per class
  first) -> `pictures/pca` (each image beside the RGB map of the first three principal components of its patch
  features; one PCA over the patches of all the images) and `pictures/attention` (each image, then the CLS-to-patch
  attention of the last block averaged over heads, then each head).

Features are extracted once per call (CLS and mean patch token in one pass) and shared by kNN and the probe. Cost on
top of the extraction (N train images, M val, D the embedding size, L learning rates): the probe does
linear_epochs * ceil(N / 256) SGD steps of [256, 3D] @ [3D, L*C]: about 0.2 s on one CPU thread for the default
preset (N = 2000, M = 1000, D = 64, 4 lrs, 10 epochs), next to about 15 s for the extraction of its 3000 images on 2
busy CPU cores, which kNN pays anyway when both share a period. Pictures cost one forward of a few images (~0.1 s).

Runs in eval mode under no-grad (the backbone's train/eval mode is restored), in float32 on the CPU and under the
device's autocast dtype on accelerators (as `dinobridge.eval.knn_report.knn_accuracy`).
"""

from __future__ import annotations

import contextlib
import math
import time
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from dinobridge.errors import ConfigError

__all__ = ["OnlineEvaluator", "picture_indices"]

PICTURE_MIN_TILE = 96  # small images are enlarged (nearest) to at least this many pixels per side in the pictures


def _period(ev: Any, key: str) -> int:
    value = ev.get(key)
    value = 0 if value is None else value
    if int(value) != value or value < 0:
        raise ConfigError(f"evaluation.{key}: expected an iteration period >= 0 (0 = off), got {value!r}")
    return int(value)


def _labels_of(ds: Dataset) -> Optional[list[int]]:
    """Labels of a kNN dataset without loading its images (None when it cannot tell)."""
    base = getattr(ds, "base", ds)  # _Transformed wraps the built-in dataset
    if hasattr(base, "samples"):
        return [int(label) for _, label in base.samples]
    if callable(getattr(base, "label", None)):
        return [int(base.label(i)) for i in range(len(base))]
    return None


def picture_indices(ds: Dataset, n: int) -> list[int]:
    """`n` fixed indices of `ds`: one image per class in class order, then a second per class, ... (evenly spaced
    indices when the labels are unknown)."""
    size = len(ds)  # type: ignore[arg-type]
    n = min(n, size)
    labels = _labels_of(ds)
    if labels is None:
        return [i * size // n for i in range(n)]
    seen: dict[int, int] = {}
    rank = []
    for label in labels:
        rank.append(seen.get(label, 0))
        seen[label] = rank[-1] + 1
    return sorted(range(size), key=lambda i: (rank[i], labels[i], i))[:n]


def _to_uint8_chw(img: Any) -> Tensor:
    """PIL RGB image -> uint8 tensor [3, H, W]."""
    return torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()


class OnlineEvaluator:
    """Periodic kNN, linear probe and pictures of a backbone during training (see the module docstring).

    cfg: the run config (uses `evaluation`, `crops.global_crops_size`, `student.patch_size`, `train.num_workers`,
    `train.seed`); device: a `dinobridge.distributed.device.DeviceInfo`; is_main: rank 0 (other ranks do nothing).
    The datasets are built on first use and kept; the picture images are loaded once and kept ([P, 3, S, S]).
    """

    def __init__(self, cfg: Any, device: Any, is_main: bool) -> None:
        ev = cfg.evaluation
        self.cfg, self.device, self.is_main = cfg, device, bool(is_main)
        self.knn_period = _period(ev, "knn_period")
        self.linear_period = _period(ev, "linear_period")
        self.picture_period = _period(ev, "picture_period")
        self.linear_lrs = [float(lr) for lr in (ev.get("linear_lrs") or [])]
        self.linear_epochs = int(ev.get("linear_epochs") or 0)
        self.picture_images = int(ev.get("picture_images") or 0)
        if self.linear_period:
            if not self.linear_lrs or min(self.linear_lrs) <= 0 or not all(map(math.isfinite, self.linear_lrs)):
                raise ConfigError(f"evaluation.linear_lrs: expected a non-empty list of learning rates > 0, got "
                                  f"{self.linear_lrs}")
            if self.linear_epochs < 1:
                raise ConfigError(f"evaluation.linear_epochs: expected an int >= 1, got {ev.get('linear_epochs')!r}")
        if self.picture_period and self.picture_images < 1:
            raise ConfigError(f"evaluation.picture_images: expected an int >= 1, got {ev.get('picture_images')!r}")
        self._datasets: Optional[tuple[Dataset, Dataset]] = None
        self._no_data = False
        self._pictures: Optional[Tensor] = None

    # ------------------------------------------------------------------ scheduling
    def scheduled(self, iteration: int, max_iter: int) -> bool:
        """Whether any part is due at `iteration` on rank 0 (the same answer on every rank: under FSDP2 every rank
        must then take part in gathering the teacher)."""
        ok = 0 < iteration < max_iter
        return any(ok and p and iteration % p == 0 for p in (self.knn_period, self.linear_period, self.picture_period))

    def due(self, iteration: int, max_iter: int) -> dict[str, bool]:
        """Which parts run at `iteration` ({"knn", "linear", "pictures"} -> bool)."""
        ok = self.is_main and 0 < iteration < max_iter
        return {name: bool(ok and p and iteration % p == 0) for name, p in
                (("knn", self.knn_period), ("linear", self.linear_period), ("pictures", self.picture_period))}

    def __call__(self, iteration: int, max_iter: int, backbone: nn.Module, logger: Any) -> dict[str, float]:
        """Run the parts due at `iteration` on `backbone`; log them with `logger` (a MetricLogger); return the
        scalars logged ({} when nothing ran)."""
        due = self.due(iteration, max_iter)
        due["pictures"] = due["pictures"] and logger.images_enabled
        if not any(due.values()):
            return {}
        if self._data(logger) is None:
            return {}
        was_training = backbone.training
        backbone.eval()
        try:
            scalars = self._evaluate(iteration, backbone, logger, due)
        finally:
            backbone.train(was_training)
        if scalars:
            logger.log(iteration, scalars)
        return scalars

    # ------------------------------------------------------------------ parts
    def _data(self, logger: Any) -> Optional[tuple[Dataset, Dataset]]:
        if self._datasets is None and not self._no_data:
            from dinobridge.eval.extract import make_eval_transform
            from dinobridge.eval.knn_report import knn_datasets

            size = int(self.cfg.crops.global_crops_size)
            transform = make_eval_transform(size, int(self.cfg.student.patch_size), resize_size=size)
            self._datasets = knn_datasets(self.cfg, transform)
            if self._datasets is None:
                self._no_data = True
                logger.write("online evaluation skipped: set evaluation.knn_train and evaluation.knn_val to labelled "
                             "datasets ('ImageFolder:root=DIR' with class sub-folders)")
        return self._datasets

    def _autocast_dtype(self) -> Optional[torch.dtype]:
        return self.device.autocast_dtype if self.device.is_accelerator else None

    def _evaluate(self, iteration: int, backbone: nn.Module, logger: Any, due: dict[str, bool]) -> dict[str, float]:
        scalars: dict[str, float] = {}
        if due["knn"] or due["linear"]:
            train, val = self._features(backbone)
            if due["knn"]:
                res = self._knn(train, val)
                scalars.update({f"knn/top1_k{k}": v for k, v in res.items()})
                logger.write(f"iteration {iteration}: kNN top-1 "
                             + ", ".join(f"k={k}: {v:.2f}%" for k, v in res.items()))
            if due["linear"]:
                t0 = time.perf_counter()
                lin, (lr, ftype) = self._linear(train, val)
                scalars.update(lin)
                logger.write(f"iteration {iteration}: linear probe top-1 {lin['linear/top1']:.2f}% ({ftype}, "
                             f"lr {lr:g}; probe {time.perf_counter() - t0:.1f} s)")
        if due["pictures"]:
            self._write_pictures(iteration, backbone, logger)
        return scalars

    def _features(self, backbone: nn.Module) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
        """((train [N, 2D], labels [N]), (val [M, 2D], labels [M])): CLS and mean patch token, float32, CPU."""
        from dinobridge.eval.linear import extract_probe_features

        kw = dict(device=self.device.device, batch_size=256, num_workers=int(self.cfg.train.num_workers),
                  autocast_dtype=self._autocast_dtype(), progress=False)
        train_ds, val_ds = self._datasets  # type: ignore[misc]
        return (extract_probe_features(backbone, train_ds, desc="online train", **kw),
                extract_probe_features(backbone, val_ds, desc="online val", **kw))

    def _knn(self, train: tuple[Tensor, Tensor], val: tuple[Tensor, Tensor]) -> dict[int, float]:
        from dinobridge.eval.knn import knn_classify

        d = train[0].shape[1] // 2  # the CLS columns
        dev = self.device.device
        res = knn_classify(train[0][:, :d].to(dev), train[1].to(dev), val[0][:, :d].to(dev), val[1].to(dev),
                           ks=tuple(self.cfg.evaluation.knn_k), temperature=float(self.cfg.evaluation.knn_temperature))
        return {int(k): float(v["top1"]) for k, v in res.items()}

    def _linear(self, train: tuple[Tensor, Tensor],
                val: tuple[Tensor, Tensor]) -> tuple[dict[str, float], tuple[float, str]]:
        from dinobridge.eval.linear import best_probe, split_feature_types, train_linear_probes

        results = train_linear_probes(split_feature_types(train[0]), train[1], split_feature_types(val[0]), val[1],
                                      lrs=self.linear_lrs, epochs=self.linear_epochs, batch_size=256,
                                      device=self.device.device, seed=int(self.cfg.train.seed))
        (lr, ftype), best = best_probe(results)
        out = {"linear/top1": float(best["top1"]), "linear/lr": float(lr)}
        for name in ("cls", "cls+avgpool"):
            sub = {key: r for key, r in results.items() if key[1] == name}
            out[f"linear/top1_{name.replace('+', '_')}"] = float(best_probe(sub)[1]["top1"])
        return out, (lr, ftype)

    # ------------------------------------------------------------------ pictures
    def _picture_batch(self) -> Tensor:
        """The fixed picture images, normalised model inputs [P, 3, S, S] on the CPU (loaded once)."""
        if self._pictures is None:
            val_ds = self._datasets[1]  # type: ignore[index]
            idx = picture_indices(val_ds, self.picture_images)
            self._pictures = torch.stack([torch.as_tensor(val_ds[i][0]) for i in idx])
        return self._pictures

    @torch.no_grad()
    def pictures(self, backbone: nn.Module) -> dict[str, Tensor]:
        """{"pictures/pca": uint8 [3, H, W], "pictures/attention": uint8 [3, H', W']}: one grid per kind, one row
        per picture image (the backbone must be in eval mode)."""
        from dinobridge.eval.extract import IMAGENET_MEAN, IMAGENET_STD
        from dinobridge.viz.attention import cls_attention
        from dinobridge.viz.colormap import grid, heatmap, to_pil, upsample_nearest
        from dinobridge.viz.pca import pca_rgb

        x = self._picture_batch().to(self.device.device)
        dtype = self._autocast_dtype()
        amp = (torch.autocast(device_type=self.device.device.type, dtype=dtype) if dtype is not None
               else contextlib.nullcontext())
        with amp:
            patches = backbone.forward_features(x)["x_norm_patchtokens"].float().cpu()  # [P, hw, D]
            attn = cls_attention(backbone, x).float().cpu()  # [P, heads, h, w]
        h, w = attn.shape[-2:]
        maps = pca_rgb(patches, (h, w))  # [P, 3, h, w]
        mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        images = x.float().cpu() * std + mean  # [P, 3, S, S] in [0, 1]
        scale = max(1, math.ceil(PICTURE_MIN_TILE / max(images.shape[-2:])))
        tile = (images.shape[-1] * scale, images.shape[-2] * scale)  # (width, height)
        pca_tiles, attn_tiles = [], []
        for img, rgb, a in zip(images, maps, attn):
            pic = upsample_nearest(to_pil(img), tile) if scale > 1 else to_pil(img)
            pca_tiles += [pic, upsample_nearest(to_pil(rgb), tile)]
            attn_tiles += [pic, heatmap(a.mean(0), tile)] + [heatmap(head, tile) for head in a]
        return {"pictures/pca": _to_uint8_chw(grid(pca_tiles, cols=2)),
                "pictures/attention": _to_uint8_chw(grid(attn_tiles, cols=2 + attn.shape[1]))}

    def _write_pictures(self, iteration: int, backbone: nn.Module, logger: Any) -> None:
        for tag, image in self.pictures(backbone).items():
            logger.add_images(iteration, tag, image)

