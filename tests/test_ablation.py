"""The add-on ablation preset (`cifar10_ablation` + the `ablation` config group) and its table script."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from dinobridge.config import build_config
from test_train import TINY, run_cli
from vit_utils import write_two_class_folders

REPO = Path(__file__).resolve().parents[1]
OPTIONS = ("baseline", "dtch", "resize_shuffle", "bridge", "all")


@pytest.mark.parametrize("option", OPTIONS)
def test_each_ablation_option_composes_to_what_it_names(option, monkeypatch, tmp_path):
    monkeypatch.setenv("CIFAR10_DIR", str(tmp_path))
    cfg = build_config(None, [f"ablation={option}"], config_name="cifar10_ablation")
    rs = cfg.resize_shuffle_augmentor
    assert cfg.student.arch == "vit_small" and cfg.student.patch_size == 4 and cfg.optim.epochs == 4
    assert bool(cfg.dtch.enabled) == (option in ("dtch", "all"))
    assert (cfg.MODEL.META_ARCHITECTURE == "SSLResizeShuffle") == (option in ("resize_shuffle", "bridge", "all"))
    views = option in ("resize_shuffle", "all")
    assert bool(cfg.crops.use_resize_shuffle_augmentor) == views
    if views:
        assert rs.patch_shuffle_loss_weight.peak == 1.0 and rs.resize_paste_loss_weight.peak == 0.5
    if option in ("bridge", "all"):
        assert rs.bridge_global_weight.peak == 0.25


def test_sweep_of_two_options_and_the_table(tmp_path, capsys, monkeypatch):
    train_dir, val_dir = write_two_class_folders(tmp_path / "data", n_per_class=6, size=16)
    monkeypatch.setenv("CIFAR10_DIR", str(tmp_path / "data"))
    out = tmp_path / "sweep"
    small = [o for o in TINY if not o.startswith(("evaluation.knn_at_end", "optim.epochs"))]
    args = ["--config-name", "cifar10_ablation", "--output-dir", str(out), "-m", "ablation=baseline,all", *small,
            "optim.epochs=3", "optim.warmup_epochs=0", "teacher.warmup_teacher_temp_epochs=0",
            "resize_shuffle_augmentor.patch_size=4", "train.max_iter=2", "evaluation.knn_k=[3]",
            f"evaluation.knn_train=ImageFolder:root={train_dir}", f"evaluation.knn_val=ImageFolder:root={val_dir}",
            "crops.rgb_mean=[0.485,0.456,0.406]", "crops.rgb_std=[0.229,0.224,0.225]"]
    code, _, err = run_cli(args, capsys)
    assert code == 0, err
    jobs = sorted(p.name for p in out.iterdir() if (p / "knn.json").is_file())
    assert len(jobs) == 2 and "baseline" in jobs[0] and "all" in jobs[1]
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import ablation_table
    finally:
        sys.path.pop(0)
    rows = ablation_table.collect(out)
    assert [r["variant"] for r in rows] == ["baseline", "all"]
    table = ablation_table.markdown(rows)
    assert table.count("\n") == 3 and "kNN k=3" in table
    for r in rows:
        assert 0.0 <= r["knn"]["trained"]["3"] <= 100.0 and r["iteration"] == 2
