"""Weighted kNN evaluation: the classifier on synthetic features, feature extraction and `dinobridge eval knn`."""

from __future__ import annotations

import json
import math

import pytest
import torch
from PIL import Image

from dinobridge.cli import main as dinobridge_main
from dinobridge.eval.extract import ClassFolderDataset, extract_features, make_eval_transform, round_to_patch
from dinobridge.eval.knn import knn_classify
from dinobridge.errors import DataError
from dinobridge.models.vision_transformer import build_vit
from vit_utils import write_two_class_folders


# ---------------------------------------------------------------------- knn_classify
def _clusters(n_per_class: int, num_classes: int, dim: int, spread: float, seed: int):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_classes, dim, generator=g)
    labels = torch.arange(num_classes).repeat_interleave(n_per_class)
    feats = centres[labels] + spread * torch.randn(labels.shape[0], dim, generator=g)
    return feats, labels


def test_separated_clusters_are_classified_perfectly():
    x, y = _clusters(40, 10, 32, 0.05, seed=0)
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(1))
    x, y = x[perm], y[perm]
    res = knn_classify(x[:300], y[:300], x[300:], y[300:], ks=(1, 20))
    assert set(res) == {1, 20}
    for k in (1, 20):
        assert res[k]["top1"] == 100.0 and res[k]["top5"] == 100.0


def test_random_labels_give_chance_accuracy():
    g = torch.Generator().manual_seed(0)
    train, test = torch.randn(2000, 16, generator=g), torch.randn(1000, 16, generator=g)
    ytr, yte = torch.randint(0, 10, (2000,), generator=g), torch.randint(0, 10, (1000,), generator=g)
    res = knn_classify(train, ytr, test, yte, ks=(20,))
    # chance: 10 % top-1, 50 % top-5; 1000 samples -> std ~1 % and ~1.6 %
    assert 5.0 < res[20]["top1"] < 15.0
    assert 42.0 < res[20]["top5"] < 58.0


def test_weighted_vote_hand_computed():
    # test point at angle 0; train points on the unit circle at angles 0.1 (class 0), 0.3 and 0.35 (class 1), far
    # ones at 2 and 3 rad. k=3 neighbours: class 0 (sim cos 0.1), class 1 (cos 0.3), class 1 (cos 0.35); a majority
    # vote says class 1, the exp(sim / T) vote with T = 0.01 says class 0.
    angles = torch.tensor([0.1, 0.3, 0.35, 2.0, 3.0], dtype=torch.float64)
    train = torch.stack([angles.cos(), angles.sin()], 1)
    ytr = torch.tensor([0, 1, 1, 0, 1])
    test = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    T = 0.01
    w0 = math.exp(math.cos(0.1) / T)
    w1 = math.exp(math.cos(0.3) / T) + math.exp(math.cos(0.35) / T)
    assert w0 > w1  # the oracle: the weighted vote picks class 0, a majority vote would pick class 1
    for label, expected in ((0, 100.0), (1, 0.0)):
        res = knn_classify(train.float(), ytr, test.float(), torch.tensor([label]), ks=(3,), temperature=T)
        assert res[3]["top1"] == expected
    # a high temperature flattens the weights: 2 votes beat 1
    res = knn_classify(train.float(), ytr, test.float(), torch.tensor([1]), ks=(3,), temperature=100.0)
    assert res[3]["top1"] == 100.0
    assert "top5" not in res[3]  # 2 classes: no top-5


def test_ties_resolve_to_lower_index():
    # duplicated train points (equal similarity): k=1 takes the lower train index
    train = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    test = torch.tensor([[1.0, 0.0]])
    for order, expected_class in (([3, 1, 0], 3), ([1, 3, 0], 1)):
        ytr = torch.tensor(order)
        res = knn_classify(train, ytr, test, torch.tensor([expected_class]), ks=(1,), num_classes=5)
        assert res[1]["top1"] == 100.0
    # equal class votes (k=2, two duplicates of different class): class 1 (lower index) beats class 3
    res = knn_classify(train, torch.tensor([3, 1, 0]), test, torch.tensor([1]), ks=(2,), num_classes=5)
    assert res[2]["top1"] == 100.0


def test_chunking_matches_unchunked_and_k_is_clamped():
    x, y = _clusters(30, 6, 8, 1.5, seed=3)  # overlapping clusters: accuracy well below 100 %
    tr, te = slice(0, None, 2), slice(1, None, 2)
    full = knn_classify(x[tr], y[tr], x[te], y[te], ks=(1, 5, 20, 500), batch_size=10_000)
    assert 30.0 < full[20]["top1"] < 100.0
    for bs in (1, 7, 64):
        assert knn_classify(x[tr], y[tr], x[te], y[te], ks=(1, 5, 20, 500), batch_size=bs) == full
    # k larger than the train set uses all train samples
    assert full[500] == knn_classify(x[tr], y[tr], x[te], y[te], ks=(90,))[90]


def test_invalid_inputs_are_rejected():
    x, y = torch.randn(6, 4), torch.tensor([0, 1, 0, 1, 0, 1])
    with pytest.raises(ValueError, match=r"train_labels: sample 2 has label -1 \(unknown\)"):
        knn_classify(x, torch.tensor([0, 1, -1, 1, 0, 1]), x, y)
    with pytest.raises(ValueError, match="test_labels.*-1"):
        knn_classify(x, y, x, torch.tensor([0, 1, 0, 1, 0, -1]))
    with pytest.raises(ValueError, match="dim"):
        knn_classify(x, y, torch.randn(6, 5), y)
    with pytest.raises(ValueError, match="num_classes"):
        knn_classify(x, y, x, y, num_classes=1)
    with pytest.raises(ValueError, match="temperature"):
        knn_classify(x, y, x, y, temperature=0.0)


# ---------------------------------------------------------------------- extraction and datasets
def _write_folders(root, n_per_class: int = 8, size: int = 32):
    return write_two_class_folders(root, n_per_class, size, classes=("black", "white"))


def test_transform_and_extract(tmp_path):
    train_dir, _ = _write_folders(tmp_path, n_per_class=3)
    assert round_to_patch(30, 4) == 32 and round_to_patch(224, 14) == 224 and round_to_patch(5, 16) == 16
    t = make_eval_transform(size=30, patch_size=4, resize_size=32)
    ds = ClassFolderDataset(train_dir, transform=t)
    assert ds.classes == ["black", "white"] and len(ds) == 6
    img, label = ds[0]
    assert img.shape == (3, 32, 32) and label == 0
    # black image normalised with ImageNet stats: strongly negative
    assert img.mean() < -1.5
    model = build_vit("vit_test", patch_size=4)
    model.train()
    feats, labels = extract_features(model, ClassFolderDataset(train_dir), "cpu", batch_size=4, transform=t,
                                     progress=False)
    assert feats.shape == (6, 32) and feats.dtype == torch.float32
    assert labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert model.training  # mode restored
    with torch.no_grad():
        model.eval()
        ref = model(torch.stack([t(Image.open(p).convert("RGB")) for p, _ in ds.samples]))
    torch.testing.assert_close(feats, ref)


def test_class_folder_errors(tmp_path):
    with pytest.raises(DataError, match="not a directory"):
        ClassFolderDataset(tmp_path / "missing")
    (tmp_path / "a").mkdir()
    with pytest.raises(DataError, match="holds no images"):
        ClassFolderDataset(tmp_path)
    with pytest.raises(DataError, match="not among"):
        ClassFolderDataset(tmp_path, classes=["b"])


# ---------------------------------------------------------------------- CLI
def _save_random_vit(path, arch="vit_test", **kw):
    torch.manual_seed(0)
    torch.save({"teacher": {f"backbone.{k}": v for k, v in build_vit(arch, **kw).state_dict().items()}}, path)


def test_cli_knn_end_to_end(tmp_path, capsys):
    train_dir, val_dir = _write_folders(tmp_path)
    weights = tmp_path / "w.pth"
    _save_random_vit(weights, patch_size=4)
    out = tmp_path / "res.json"
    rc = dinobridge_main(["eval", "knn", "--arch", "vit_test", "--patch-size", "4", "--weights", str(weights),
                          "--train", str(train_dir), "--val", str(val_dir), "--k", "3", "200", "--size", "32",
                          "--resize-size", "32", "--device", "cpu", "--num-workers", "0", "--quiet",
                          "--output", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0
    assert "top-1" in printed and "uses all" in printed
    res = json.loads(out.read_text())
    assert res["num_train"] == 16 and res["num_val"] == 8 and res["input_size"] == 32
    assert res["results"]["3"]["top1"] == 100.0

    # a run's teacher through the run's config.yaml: built exactly as the trainer builds it (ffn_ratio 3 honoured)
    from dinobridge.config import build_config, save_config
    from dinobridge.train.meta_arch import build_backbone

    cfg = tmp_path / "run" / "config.yaml"
    run_cfg = build_config(None, ["student.arch=vit_test", "student.patch_size=4", "student.ffn_ratio=3",
                                  "student.drop_path_rate=0.1", "student.layerscale=0.5",
                                  "crops.global_crops_size=32", "crops.local_crops_size=16"], config_name="train")
    save_config(run_cfg, cfg)
    torch.manual_seed(0)
    teacher = build_backbone(run_cfg.student, teacher=True)
    assert teacher.blocks[0].mlp.fc1.out_features == 96
    torch.save({"teacher": {f"backbone.{k}": v for k, v in teacher.state_dict().items()}}, weights)
    rc = dinobridge_main(["eval", "knn", "--config", str(cfg.parent), "--weights", str(weights), "--train",
                          str(train_dir), "--val", str(val_dir), "--k", "3", "--size", "32", "--resize-size", "32",
                          "--device", "cpu", "--num-workers", "0", "--quiet", "--output", str(out)])
    assert rc == 0 and json.loads(out.read_text())["results"]["3"]["top1"] == 100.0


def test_cli_knn_hub_model(tmp_path, capsys):
    train_dir, val_dir = _write_folders(tmp_path, n_per_class=4)
    weights = tmp_path / "vits16.pth"
    torch.manual_seed(0)
    from dinobridge.hub import build_hub_model

    # LayerScale 1 (not the 1e-5 init) so that a random model's CLS depends on the image
    torch.save(build_hub_model("dinov3_vits16", layerscale=1.0).state_dict(), weights)
    rc = dinobridge_main(["eval", "knn", "--model", "dinov3_vits16", "--weights", str(weights), "--train",
                          str(train_dir), "--val", str(val_dir), "--k", "2", "--size", "32", "--device", "cpu",
                          "--num-workers", "0", "--quiet"])
    out = capsys.readouterr().out
    assert rc == 0
    row = [line.split() for line in out.splitlines() if line.split()[:1] == ["2"]]
    assert row and float(row[0][1]) == 100.0


@pytest.mark.parametrize("case,expected", [
    ("no_weights", "--weights: a weights file is required"),
    ("missing_weights", "--weights: file not found"),
    ("missing_train", "--train:"),
    ("unknown_model", "--model: unknown model 'dinov9_vitz'"),
    ("empty_class", "holds no images"),
    ("bad_override", "--override: unknown architecture field"),
    ("mismatched_weights", "error:"),
    ("bad_config", "student.archh"),
])
def test_cli_errors(tmp_path, capsys, case, expected):
    train_dir, val_dir = _write_folders(tmp_path, n_per_class=2)
    weights = tmp_path / "w.pth"
    _save_random_vit(weights, patch_size=4)
    args = ["eval", "knn", "--arch", "vit_test", "--patch-size", "4", "--weights", str(weights), "--train",
            str(train_dir), "--val", str(val_dir), "--device", "cpu", "--num-workers", "0", "--quiet"]
    if case == "no_weights":
        args = [a for a in args if a not in ("--weights", str(weights))]
    elif case == "missing_weights":
        args[args.index(str(weights))] = str(tmp_path / "nope.pth")
    elif case == "missing_train":
        args[args.index(str(train_dir))] = str(tmp_path / "nope")
    elif case == "unknown_model":
        args[2:6] = ["--model", "dinov9_vitz"]
    elif case == "empty_class":
        for f in (val_dir / "black").iterdir():
            f.unlink()
    elif case == "bad_override":
        args += ["--override", "depthh=3"]
    elif case == "mismatched_weights":
        args[args.index("4")] = "8"  # patch 8: patch_embed shape differs from the saved weights
    elif case == "bad_config":
        cfg = tmp_path / "config.yaml"
        cfg.write_text("student:\n  archh: vit_test\n")
        args[2:6] = ["--config", str(cfg)]
    rc = dinobridge_main(args)
    err = capsys.readouterr().err
    assert rc == 2
    assert expected in err and len(err.strip().splitlines()) == 1, err
