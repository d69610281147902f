"""Online evaluation during training (dinobridge.train.online_eval): kNN, linear probe and tensorboard pictures run
at their periods only, log the expected keys, write image summaries of the expected shape, and leave the backbone
as they found it."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from dinobridge.config import build_config
from dinobridge.distributed.device import select_device
from dinobridge.errors import ConfigError
from dinobridge.train.meta_arch import build_backbone
from dinobridge.train.metrics import MetricLogger
from dinobridge.train.online_eval import PICTURE_MIN_TILE, OnlineEvaluator, picture_indices

SIZE, PATCH, P = 32, 4, 3  # image side, patch size, picture images
EVAL = ["evaluation.knn_train_size=40", "evaluation.knn_val_size=20", "evaluation.knn_k=[3,5]",
        "evaluation.linear_lrs=[0.1,1.0]", "evaluation.linear_epochs=3", f"evaluation.picture_images={P}"]


def make_cfg(tmp_path: Path, *overrides: str):
    return build_config(None, ["student.arch=vit_test", f"student.patch_size={PATCH}", "student.layerscale=1.0",
                               f"crops.global_crops_size={SIZE}", "crops.local_crops_size=16",
                               "train.dataset_path=builtin:shapes", "train.num_workers=0", "MODEL.DEVICE=cpu",
                               f"train.output_dir={tmp_path}", *EVAL, *overrides], config_name="train")


def backbone(cfg):
    torch.manual_seed(0)
    return build_backbone(cfg.student, teacher=True).eval()


def read_images(tb_dir: Path) -> dict[str, list]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    return {tag: acc.Images(tag) for tag in acc.Tags()["images"]}


def jsonl(path: Path) -> list[dict]:
    f = path / "metrics.jsonl"
    return [json.loads(line) for line in f.read_text().splitlines()] if f.exists() else []


def test_all_parts_at_their_period(tmp_path):
    cfg = make_cfg(tmp_path, "evaluation.knn_period=10", "evaluation.linear_period=10", "evaluation.picture_period=5")
    model = backbone(cfg)
    model.train()  # the evaluator switches to eval mode and restores the caller's mode
    before = {k: v.clone() for k, v in model.state_dict().items()}
    logger = MetricLogger(tmp_path, 0, 100, True, tensorboard=True, progress_bar=False)
    ev = OnlineEvaluator(cfg, select_device("cpu"), True)
    res = ev(10, 100, model, logger)
    logger.close()

    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    assert set(res) == {"knn/top1_k3", "knn/top1_k5", "linear/top1", "linear/lr", "linear/top1_cls",
                        "linear/top1_cls_avgpool"}
    for key, value in res.items():
        if key != "linear/lr":
            assert 0.0 <= value <= 100.0 and math.isfinite(value), key
    assert res["linear/lr"] in (0.1, 1.0)
    assert res["linear/top1"] == max(res["linear/top1_cls"], res["linear/top1_cls_avgpool"])
    logged = jsonl(tmp_path)
    assert len(logged) == 1 and logged[0]["iteration"] == 10 and logged[0]["knn/top1_k3"] == res["knn/top1_k3"]

    # one grid per kind: P rows; columns image | PCA map, and image | mean attention | each head
    images = read_images(tmp_path / "tensorboard")
    assert set(images) == {"pictures/pca", "pictures/attention"}
    tile = SIZE * math.ceil(PICTURE_MIN_TILE / SIZE)
    heads = model.blocks[-1].attn.num_heads
    height = P * tile + (P - 1) * 2
    pca, attn = images["pictures/pca"], images["pictures/attention"]
    assert len(pca) == len(attn) == 1 and pca[0].step == attn[0].step == 10
    assert (pca[0].width, pca[0].height) == (2 * tile + 2, height)
    assert (attn[0].width, attn[0].height) == ((2 + heads) * tile + (1 + heads) * 2, height)


def test_knn_matches_the_final_report(tmp_path):
    """The moved online kNN gives what `knn_accuracy` (the end-of-training report) gives."""
    from dinobridge.eval.extract import make_eval_transform
    from dinobridge.eval.knn_report import knn_accuracy, knn_datasets

    cfg = make_cfg(tmp_path, "evaluation.knn_period=4")
    model = backbone(cfg)
    device = select_device("cpu")
    logger = MetricLogger(tmp_path, 0, 10, True, tensorboard=False, progress_bar=False)
    res = OnlineEvaluator(cfg, device, True)(8, 10, model, logger)
    logger.close()
    datasets = knn_datasets(cfg, make_eval_transform(SIZE, PATCH, resize_size=SIZE))
    ref = knn_accuracy(model, cfg, device, datasets, progress=False)
    assert res == {f"knn/top1_k{k}": v for k, v in ref.items()}


def test_nothing_off_period(tmp_path):
    cfg = make_cfg(tmp_path, "evaluation.knn_period=4", "evaluation.linear_period=4", "evaluation.picture_period=4")
    model = backbone(cfg)
    logger = MetricLogger(tmp_path, 0, 8, True, tensorboard=True, progress_bar=False)
    ev = OnlineEvaluator(cfg, select_device("cpu"), True)
    assert ev(3, 8, model, logger) == {}
    assert ev(8, 8, model, logger) == {}  # the last iteration: the final report covers it
    assert OnlineEvaluator(cfg, select_device("cpu"), False)(4, 8, model, logger) == {}  # not rank 0
    assert ev.due(4, 8) == {"knn": True, "linear": True, "pictures": True}
    logger.close()
    assert jsonl(tmp_path) == [] and read_images(tmp_path / "tensorboard") == {}

    cfg = make_cfg(tmp_path, "evaluation.knn_period=0", "evaluation.linear_period=0", "evaluation.picture_period=0")
    off = OnlineEvaluator(cfg, select_device("cpu"), True)
    assert not any(off.due(it, 1000)[k] for it in (1, 4, 100, 999) for k in ("knn", "linear", "pictures"))
    logger = MetricLogger(tmp_path, 0, 1000, True, tensorboard=False, progress_bar=False)
    assert all(off(it, 1000, model, logger) == {} for it in (1, 4, 100))
    logger.close()
    assert jsonl(tmp_path) == []


def test_pictures_skipped_without_tensorboard(tmp_path):
    cfg = make_cfg(tmp_path, "evaluation.picture_period=2")
    logger = MetricLogger(tmp_path, 0, 10, True, tensorboard=False, progress_bar=False)
    assert not logger.images_enabled
    assert OnlineEvaluator(cfg, select_device("cpu"), True)(2, 10, backbone(cfg), logger) == {}
    logger.close()
    assert not (tmp_path / "tensorboard").exists() and jsonl(tmp_path) == []


def test_add_images(tmp_path):
    off = MetricLogger(tmp_path, 0, 10, True, tensorboard=False, progress_bar=False)
    assert off.add_images(1, "x", torch.zeros(3, 4, 4)) is False
    off.close()
    (tmp_path / "on").mkdir()
    on = MetricLogger(tmp_path / "on", 0, 10, True, tensorboard=True, progress_bar=False)
    with pytest.raises(ValueError, match="images: expected a tensor"):
        on.add_images(1, "x", torch.zeros(4, 4))
    assert on.add_images(2, "one", torch.full((3, 5, 7), 255, dtype=torch.uint8))
    assert on.add_images(2, "many", torch.rand(2, 3, 6, 6))
    on.close()
    images = read_images(tmp_path / "on" / "tensorboard")
    assert (images["one"][0].width, images["one"][0].height, images["one"][0].step) == (7, 5, 2)
    assert "many" in images


def test_picture_indices_one_per_class_first():
    class Folder:
        samples = [("a", 0)] * 3 + [("b", 1)] * 3 + [("c", 2)]

        def __len__(self):
            return len(self.samples)

    assert picture_indices(Folder(), 4) == [0, 3, 6, 1]
    assert picture_indices(Folder(), 20) == [0, 3, 6, 1, 4, 2, 5]

    class Unlabelled:
        def __len__(self):
            return 10

    assert picture_indices(Unlabelled(), 2) == [0, 5]


@pytest.mark.parametrize("override,key", [
    ("evaluation.linear_lrs=[]", "evaluation.linear_lrs"),
    ("evaluation.linear_lrs=[0.1,-1.0]", "evaluation.linear_lrs"),
    ("evaluation.linear_epochs=0", "evaluation.linear_epochs"),
])
def test_config_errors(tmp_path, override, key):
    cfg = make_cfg(tmp_path, "evaluation.linear_period=5", override)
    with pytest.raises(ConfigError, match=key):
        OnlineEvaluator(cfg, select_device("cpu"), True)


def test_picture_images_error(tmp_path):
    cfg = make_cfg(tmp_path, "evaluation.picture_period=5", "evaluation.picture_images=0")
    with pytest.raises(ConfigError, match="evaluation.picture_images"):
        OnlineEvaluator(cfg, select_device("cpu"), True)
