"""Linear probe: the grid trainer on synthetic features, one-pass extraction, the feature cache, `dinobridge eval linear`."""

from __future__ import annotations

import json

import pytest
import torch

from dinobridge.cli import main as dinobridge_main
from dinobridge.eval.linear import (ClsAvgpool, best_probe, extract_probe_features, split_feature_types,
                                    train_linear_probes)
from dinobridge.models.vision_transformer import VisionTransformer, build_vit
from vit_utils import write_two_class_folders

LRS = (1e-4, 1e-3, 1e-2, 1e-1)


# ---------------------------------------------------------------------- train_linear_probes
def _separable(n: int, dim: int, classes: int, seed: int):
    """Gaussian points labelled by a random linear teacher (argmax x @ W), keeping a margin >= 0.5 between the two
    top scores: linearly separable by construction."""
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(dim, classes, generator=g)
    x = torch.randn(3 * n, dim, generator=g)
    scores = x @ teacher
    top2 = scores.topk(2, dim=1).values
    keep = (top2[:, 0] - top2[:, 1]) > 0.5
    return x[keep][:n], scores[keep].argmax(1)[:n]


def test_separable_problem_is_learned():
    x, y = _separable(2500, 16, 5, seed=123)
    assert x.shape[0] == 2500 and y.bincount().min() > 300  # every class present
    noise = torch.randn(2500, 8, generator=torch.Generator().manual_seed(7))
    feats = {"x": x, "x+noise": torch.cat([x, noise], 1)}
    tr = {k: v[:1500] for k, v in feats.items()}
    va = {k: v[1500:] for k, v in feats.items()}
    res = train_linear_probes(tr, y[:1500], va, y[1500:], lrs=LRS, epochs=40, batch_size=128, seed=0)
    assert list(res) == [(lr, n) for lr in LRS for n in ("x", "x+noise")]  # the whole grid, in grid order
    assert all(not r["diverged"] and "top5" in r for r in res.values())
    (lr, name), best = best_probe(res)
    assert best["top1"] >= 98.0
    for n in ("x", "x+noise"):  # the largest lr learns both feature types
        assert res[(0.1, n)]["top1"] >= 98.0
    # the smallest lr barely moves in 40 epochs: clearly worse than the best (the lrs really differ)
    assert res[(1e-4, "x+noise")]["top1"] < best["top1"] - 10.0
    # deterministic for a seed
    again = train_linear_probes(tr, y[:1500], va, y[1500:], lrs=LRS, epochs=40, batch_size=128, seed=0)
    assert again == res


def test_grid_members_train_independently():
    # a classifier's result does not depend on the other lrs trained alongside it
    x, y = _separable(600, 8, 3, seed=5)
    tr, va = {"f": x[:400]}, {"f": x[400:]}
    together = train_linear_probes(tr, y[:400], va, y[400:], lrs=(1e-3, 3e-2), epochs=5, batch_size=64, seed=1)
    alone = train_linear_probes(tr, y[:400], va, y[400:], lrs=(3e-2,), epochs=5, batch_size=64, seed=1)
    assert together[(3e-2, "f")] == alone[(3e-2, "f")]
    assert "top5" not in alone[(3e-2, "f")]  # 3 classes: no top-5


def test_random_labels_stay_near_chance():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3000, 32, generator=g)
    y = torch.randint(0, 10, (3000,), generator=g)
    res = train_linear_probes({"f": x[:1500]}, y[:1500], {"f": x[1500:]}, y[1500:], lrs=LRS, epochs=20, seed=0)
    for r in res.values():  # chance 10 %, 1500 val samples: std ~0.8 %
        assert 5.0 < r["top1"] < 15.0


def test_divergence_is_flagged_and_not_best():
    x, y = _separable(400, 8, 3, seed=2)
    tr, va = {"f": 1e20 * x[:300]}, {"f": 1e20 * x[300:]}
    res = train_linear_probes(tr, y[:300], va, y[300:], lrs=(1e-30, 1e3), epochs=3, batch_size=50)
    assert res[(1e3, "f")]["diverged"] and not res[(1e-30, "f")]["diverged"]
    assert best_probe(res)[0] == (1e-30, "f")


def test_invalid_inputs_are_rejected():
    x, y = torch.randn(6, 4), torch.tensor([0, 1, 0, 1, 0, 1])
    with pytest.raises(ValueError, match="lrs"):
        train_linear_probes({"f": x}, y, {"f": x}, y, lrs=(0.1, -1.0))
    with pytest.raises(ValueError, match="same non-empty feature types"):
        train_linear_probes({"f": x}, y, {"g": x}, y)
    with pytest.raises(ValueError, match=r"val_feats\['f'\]"):
        train_linear_probes({"f": x}, y, {"f": x[:5]}, y)
    with pytest.raises(ValueError, match="train_labels: expected class indices >= 0"):
        train_linear_probes({"f": x}, torch.tensor([0, 1, -1, 1, 0, 1]), {"f": x}, y)
    with pytest.raises(ValueError, match="num_classes"):
        train_linear_probes({"f": x}, y, {"f": x}, y, num_classes=1)


# ---------------------------------------------------------------------- extraction
def test_cls_avgpool_features_match_forward_features():
    torch.manual_seed(0)
    model = build_vit("vit_test", patch_size=4, n_storage_tokens=2).eval()
    images = torch.randn(5, 3, 16, 16)
    data = [(images[i], i % 2) for i in range(5)]
    feats, labels = extract_probe_features(model, data, batch_size=2, progress=False)
    with torch.no_grad():
        out = model.forward_features(images)
    assert feats.shape == (5, 64) and labels.tolist() == [0, 1, 0, 1, 0]
    split = split_feature_types(feats)
    torch.testing.assert_close(split["cls"], out["x_norm_clstoken"])
    torch.testing.assert_close(split["cls+avgpool"][:, 32:], out["x_norm_patchtokens"].mean(1))  # storage excluded
    with pytest.raises(ValueError, match="forward_features"):
        ClsAvgpool(torch.nn.Linear(2, 2))


# ---------------------------------------------------------------------- CLI
def _write_folders(root, n_per_class: int = 8, size: int = 32):
    return write_two_class_folders(root, n_per_class, size, classes=("dark", "bright"))


def _save_random_vit(path):
    torch.manual_seed(0)
    torch.save({"teacher": {f"backbone.{k}": v for k, v in build_vit("vit_test", patch_size=4).state_dict().items()}},
               path)


@pytest.fixture
def count_images(monkeypatch):
    """Counts the images that go through VisionTransformer.forward_features."""
    seen = {"images": 0}
    original = VisionTransformer.forward_features

    def counting(self, x, masks=None):
        seen["images"] += x.shape[0]
        return original(self, x, masks)

    monkeypatch.setattr(VisionTransformer, "forward_features", counting)
    return seen


def _cli_args(tmp_path, train_dir, val_dir, weights):
    return ["eval", "linear", "--arch", "vit_test", "--patch-size", "4", "--weights", str(weights), "--train",
            str(train_dir), "--val", str(val_dir), "--size", "32", "--resize-size", "32", "--epochs", "30",
            "--batch-size", "8", "--extract-batch-size", "5", "--device", "cpu", "--num-workers", "0", "--quiet"]


def test_cli_linear_end_to_end_one_extraction_and_cache(tmp_path, capsys, count_images):
    train_dir, val_dir = _write_folders(tmp_path)
    weights = tmp_path / "w.pth"
    _save_random_vit(weights)
    out, cache = tmp_path / "res.json", tmp_path / "cache"
    args = _cli_args(tmp_path, train_dir, val_dir, weights) + ["--output", str(out), "--cache-dir", str(cache)]
    rc = dinobridge_main(args)
    printed = capsys.readouterr().out
    assert rc == 0
    # every image went through the model exactly once for the whole grid of 4 lrs x 2 feature types
    assert count_images["images"] == 16 + 8
    rows = [line.split() for line in printed.splitlines() if line.split()[1:2] in (["cls"], ["cls+avgpool"])]
    assert len(rows) == 8 and "top-1" in printed and "best: top-1" in printed
    res = json.loads(out.read_text())
    assert res["num_train"] == 16 and res["num_val"] == 8 and res["input_size"] == 32 and len(res["results"]) == 8
    assert {(r["lr"], r["features"]) for r in res["results"]} == {(lr, f) for lr in LRS for f in ("cls", "cls+avgpool")}
    assert res["best"]["top1"] == 100.0  # dark vs bright is linearly separable even for a random ViT
    assert len(list(cache.glob("linear_features_*.pt"))) == 1

    # second run: features come from the cache, the model is not run; same results
    rc = dinobridge_main(args)
    assert rc == 0 and count_images["images"] == 24
    assert "reusing" in capsys.readouterr().err
    assert json.loads(out.read_text())["results"] == res["results"]

    # a different image size is a different cache entry
    args[args.index("--size") + 1] = "28"
    args[args.index("--resize-size") + 1] = "28"
    assert dinobridge_main(args) == 0 and count_images["images"] == 48
    assert len(list(cache.glob("linear_features_*.pt"))) == 2


@pytest.mark.parametrize("case,expected", [
    ("bad_lr", "--lrs: expected positive floats"),
    ("bad_epochs", "--epochs: expected a positive int"),
    ("no_weights", "--weights: a weights file is required"),
    ("missing_val", "--val:"),
])
def test_cli_linear_errors(tmp_path, capsys, case, expected):
    train_dir, val_dir = _write_folders(tmp_path, n_per_class=2)
    weights = tmp_path / "w.pth"
    _save_random_vit(weights)
    args = _cli_args(tmp_path, train_dir, val_dir, weights)
    if case == "bad_lr":
        args += ["--lrs", "0.1", "0"]
    elif case == "bad_epochs":
        args[args.index("--epochs") + 1] = "0"
    elif case == "no_weights":
        args = [a for a in args if a not in ("--weights", str(weights))]
    elif case == "missing_val":
        args[args.index(str(val_dir))] = str(tmp_path / "nope")
    rc = dinobridge_main(args)
    err = capsys.readouterr().err
    assert rc == 2
    assert expected in err and len(err.strip().splitlines()) == 1, err
