"""The user's dino_bridge YAML (SSLResizeShuffle, DTCH on, add-on schedules) trains on CPU with only model-size, batch
and data overrides; with schedule overrides every auxiliary loss switches on and stays finite."""

from __future__ import annotations

import math

import pytest
import torch

from dinobridge.config import build_config
from dinobridge.train.schedules import build_schedules
from test_train import USER_YAML, _jpegs, _write, metrics, run_cli

RS = "resize_shuffle_augmentor"
ADDON_KEYS = ("resize_paste_loss_weight", "patch_shuffle_loss_weight", "bridge_global_weight",
              "bridge_patchshuffle_weight")
ADDON_LOSSES = ("resize_paste_loss", "patch_shuffle_cls_loss", "patch_shuffle_patch_loss", "bridge_global_loss",
                "bridge_patchshuffle_loss")
# model size (the patch grid of the add-ons follows the patch size), batch, data, device
SMALL = [
    "student.arch=vit_test", "student.patch_size=4", f"{RS}.patch_size=4", "crops.global_crops_size=16",
    "crops.local_crops_size=8", "crops.local_crops_number=2", "dino.head_n_prototypes=32", "ibot.head_n_prototypes=32",
    "dino.head_hidden_dim=32", "ibot.head_hidden_dim=32", "dino.head_bottleneck_dim=16", "ibot.head_bottleneck_dim=16",
    "train.batch_size_per_gpu=4", "train.num_workers=0", "train.max_iter=3", "MODEL.DEVICE=cpu",
]
PEAK_FROM_STEP_0 = [f"{RS}.resize_paste_loss_weight=0.5", f"{RS}.patch_shuffle_loss_weight=1.0",
                    f"{RS}.bridge_global_weight=0.25", f"{RS}.bridge_patchshuffle_weight=0.25"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def listing(tmp_path_factory):
    if not USER_YAML.is_file():
        pytest.skip("../shared/fixtures is not beside this checkout")
    root = tmp_path_factory.mktemp("imgs")
    _jpegs(root / "imgs", 10)
    return _write(root / "list.txt", "\n".join(str(p) for p in sorted((root / "imgs").iterdir())))


def test_user_yaml_as_is_trains_three_iterations(tmp_path, capsys, listing):
    run = tmp_path / "run"
    code, _, err = run_cli(["--config-file", str(USER_YAML), "--output-dir", str(run), *SMALL,
                            f"data.imagenet_1k.txt_path={listing}"], capsys)
    assert code == 0, err
    m = metrics(run)
    assert sorted(m) == [3]  # train.log_period 10: the last iteration is logged
    assert math.isfinite(m[3]["total_loss"]) and math.isfinite(m[3]["ibot_loss"])
    for key in ADDON_KEYS:
        assert m[3][key] == 0.0  # the user's schedules: zero for the first 50 epochs
    assert not any(k in m[3] for k in ADDON_LOSSES)
    state = torch.load(run / "ckpt" / "00000003.pth", map_location="cpu", weights_only=False)["model"]
    assert any(k.startswith("student.bridge.") for k in state)  # bridge built (its schedule is > 0 later)
    assert not any(k.startswith("teacher.bridge.") for k in state)
    assert state["dino_balancer.n_hist"].item() == pytest.approx(3 * 2 * 4, rel=1e-3)  # DTCH history: 3 x 8 crops


def test_schedule_override_switches_each_auxiliary_loss_on(tmp_path, capsys, listing):
    # 0 for iteration 0 (zero phase), start 0 at iteration 1 (warm-up), peak from iteration 2 on
    sched = [f"{RS}.{k}.{f}=0.001" for k in ADDON_KEYS for f in ("zero_epochs", "warmup_epochs")]
    run = tmp_path / "run"
    code, _, err = run_cli(["--config-file", str(USER_YAML), "--output-dir", str(run), *SMALL,
                            f"data.imagenet_1k.txt_path={listing}", "train.log_period=1", *sched], capsys)
    assert code == 0, err
    m = metrics(run)
    assert sorted(m) == [1, 2, 3]
    for it in (1, 2):
        assert not any(k in m[it] for k in ADDON_LOSSES) and m[it]["resize_paste_loss_weight"] == 0.0
    assert (m[3]["resize_paste_loss_weight"], m[3]["patch_shuffle_loss_weight"], m[3]["bridge_global_weight"],
            m[3]["bridge_patchshuffle_weight"]) == (0.5, 1.0, 0.25, 0.25)
    for key in ADDON_LOSSES:
        assert key in m[3] and math.isfinite(m[3][key]) and m[3][key] > 0, key
    assert math.isfinite(m[3]["total_loss"]) and "bridge_grad_norm" in m[3]


def test_peak_from_step_zero_override(listing):
    cfg = build_config(str(USER_YAML), [*SMALL, *PEAK_FROM_STEP_0])
    extras = build_schedules(cfg, 1000, 1000 * 1000, 4).extras(0)
    assert {k: extras[k] for k in ADDON_KEYS} == {"resize_paste_loss_weight": 0.5, "patch_shuffle_loss_weight": 1.0,
                                                   "bridge_global_weight": 0.25, "bridge_patchshuffle_weight": 0.25}
