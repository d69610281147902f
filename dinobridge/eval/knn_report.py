"""kNN of the teacher during and after training (DINO protocol: weighted kNN on normed CLS features).

Datasets: `evaluation.knn_train` / `evaluation.knn_val` (class-folder directories, or "builtin:shapes"); when unset and
the training data is the built-in dataset, its train and val splits are used. The eval image size is
`crops.global_crops_size` (resized, centre-cropped, ImageNet-normalised).
"""

from __future__ import annotations

import logging
from typing import Any, Optional

from torch import nn
from torch.utils.data import Dataset

from dinobridge.eval.extract import ClassFolderDataset, _Transformed, extract_features, make_eval_transform
from dinobridge.eval.knn import knn_classify

log = logging.getLogger("dinobridge")


def _builtin(split: str, cfg: Any, n: int) -> Dataset:
    from dinobridge.data.synthetic import ProceduralShapes

    return ProceduralShapes(n=n, size=int(cfg.crops.global_crops_size), seed=int(cfg.train.seed) + 1000, split=split)


def _labelled(spec: str, key: str, cfg: Any, split: str, n: int, transform: Any, classes: Any = None) -> Dataset:
    from dinobridge.config import parse_dataset_string
    from dinobridge.errors import ConfigError

    parsed = parse_dataset_string(str(spec), key)
    if parsed.kind == "builtin":
        return _Transformed(_builtin(split, cfg, n), transform)
    if parsed.kind == "ImageFolder":
        return ClassFolderDataset(parsed.root, transform=transform, classes=classes, name=key)
    raise ConfigError(f"{key}: kNN needs labelled data, 'builtin:shapes' or 'ImageFolder:root=DIR' with class "
                      f"sub-folders, got {spec!r}")


def knn_datasets(cfg: Any, transform: Any) -> Optional[tuple[Dataset, Dataset]]:
    """(train, val) datasets for kNN, or None when none can be derived from the config."""
    ev = cfg.evaluation
    train_spec, val_spec = ev.get("knn_train"), ev.get("knn_val")
    if train_spec is None or val_spec is None:
        data_spec = str(cfg.train.get("dataset_path") or "")
        if train_spec != val_spec or not data_spec.startswith("builtin") or len(cfg.get("data") or {}):
            return None
        train_spec = val_spec = "builtin:shapes"
    train = _labelled(train_spec, "evaluation.knn_train", cfg, "train", int(ev.knn_train_size), transform)
    val = _labelled(val_spec, "evaluation.knn_val", cfg, "val", int(ev.knn_val_size), transform,
                    classes=getattr(train, "classes", None))
    return train, val


def knn_accuracy(backbone: nn.Module, cfg: Any, device: Any, datasets: tuple[Dataset, Dataset],
                 progress: bool = True) -> dict[int, float]:
    """Top-1 (%) per k of `backbone` on the (train, val) datasets."""
    train_ds, val_ds = datasets
    kw = dict(device=device.device, batch_size=256, num_workers=int(cfg.train.num_workers),
              autocast_dtype=device.autocast_dtype if device.is_accelerator else None, progress=progress)
    tf, tl = extract_features(backbone, train_ds, desc="knn train", **kw)
    vf, vl = extract_features(backbone, val_ds, desc="knn val", **kw)
    res = knn_classify(tf.to(device.device), tl.to(device.device), vf.to(device.device), vl.to(device.device),
                       ks=tuple(cfg.evaluation.knn_k), temperature=float(cfg.evaluation.knn_temperature))
    return {int(k): float(v["top1"]) for k, v in res.items()}


def knn_report(cfg: Any, model: Any, device: Any, init_backbone: Optional[nn.Module] = None) -> dict[str, Any]:
    """kNN of the trained teacher and, when given, of the backbone at initialisation; prints a small table."""
    size = int(cfg.crops.global_crops_size)
    transform = make_eval_transform(size=size, patch_size=int(cfg.student.patch_size), resize_size=size)
    datasets = knn_datasets(cfg, transform)
    if datasets is None:
        log.info("kNN skipped: set evaluation.knn_train and evaluation.knn_val to class-folder directories")
        return {}
    results = {"trained": knn_accuracy(model.teacher.backbone, cfg, device, datasets)}
    if init_backbone is not None:
        results["init"] = knn_accuracy(init_backbone.to(device.device), cfg, device, datasets)
    ks = sorted(results["trained"])
    lines = ["kNN top-1 (%) on " + ("built-in shapes (val split)" if cfg.evaluation.get("knn_val") is None
                                     else str(cfg.evaluation.knn_val)),
             "model        " + "  ".join(f"k={k:<5}" for k in ks)]
    for name, res in results.items():
        lines.append(f"{name:<12} " + "  ".join(f"{res[k]:<7.2f}" for k in ks))
    print("\n".join(lines), flush=True)
    return results
