"""Schedules: official v1 cosine, v2 warm-up/cosine, zero-epoch loss weights, lr scaling, build_schedules."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from dinobridge.errors import ConfigError
from dinobridge.train.schedules import (
    ArraySchedule,
    build_schedules,
    build_weight_schedule,
    cosine_schedule,
    linear_warmup_cosine_decay,
    scale_lr,
    weight_schedule,
)

USER_YAML = Path("/work/shared/fixtures/dinov3_vitlarge_pretrain.yaml")


# ------------------------------------------------------------------------------------------------ v1
def test_cosine_schedule_key_indices():
    base, final, total, warm = 1.0, 0.1, 100, 10
    s = cosine_schedule(base, final, total, warm, start_warmup=0.2)
    assert len(s) == total
    # warm-up: linspace with the endpoint included
    assert s[0] == pytest.approx(0.2)
    assert s[5] == pytest.approx(0.2 + (base - 0.2) * 5 / 9)
    assert s[9] == pytest.approx(base)
    # cosine: i = it - warm, n = total - warm
    n = total - warm
    assert s[10] == pytest.approx(base)
    assert s[55] == pytest.approx(final + 0.5 * (base - final))  # i = n/2 -> cos = 0
    assert s[99] == pytest.approx(final + 0.5 * (base - final) * (1 + math.cos(math.pi * 89 / n)))
    assert s[100] == final and s[10**6] == final
    with pytest.raises(ValueError):
        cosine_schedule(1.0, 0.0, 5, 6)


def test_cosine_schedule_trunc_extra_ends_exactly_at_final():
    base, final, total, e = 2.0, 0.5, 60, 0.5
    s = cosine_schedule(base, final, total, 0, trunc_extra=e)
    m = int((1 + e) * total)
    raw = lambda i: (math.cos(math.pi * i / (m - 1)) + 1) / 2  # linspace(0, pi, m)[i]
    last = raw(total - 1)
    expect = lambda i: (raw(i) - last) / (1 - last) * (base - final) + final
    assert s[0] == pytest.approx(base)
    assert s[total - 1] == pytest.approx(final)
    assert s[17] == pytest.approx(expect(17))
    # without truncation the last value is above final
    assert cosine_schedule(base, final, total, 0)[total - 1] > final + 1e-6


# ------------------------------------------------------------------------------------------------ v2
def test_linear_warmup_cosine_decay_key_indices():
    start, peak, end, warm, total = 0.0, 1.0, 0.1, 10, 100
    s = linear_warmup_cosine_decay(start, peak, end, warm, total)
    assert s[0] == 0.0
    assert s[5] == pytest.approx(0.5)  # endpoint excluded: k/warm
    assert s[9] == pytest.approx(0.9)
    assert s[10] == pytest.approx(peak)
    n_cos = total - warm
    k = 30
    assert s[warm + k] == pytest.approx(end + (peak - end) * 0.5 * (1 + math.cos(math.pi * k / (n_cos - 1))))
    assert s[99] == pytest.approx(end)
    assert s[500] == end
    # with cosine_iters: decay ends early, then constant
    c = linear_warmup_cosine_decay(start, peak, end, warm, total, cosine_iters=50)
    assert c[35] == pytest.approx(end + (peak - end) * 0.5 * (1 + math.cos(math.pi * 25 / 49)))
    assert c[59] == pytest.approx(end)
    assert np.all(c.values[60:] == end)
    with pytest.raises(ValueError):
        linear_warmup_cosine_decay(0, 1, 0, 60, 100, cosine_iters=50)


def test_weight_schedule_zero_epochs():
    # 10 iterations/epoch, 10 epochs; zero 2 epochs, warm-up 3 epochs 0 -> 0.5, constant after
    s = weight_schedule(0.0, 0.5, 0.5, total_iters=100, zero_iters=20, warmup_iters=30)
    assert np.all(s.values[:21] == 0.0)
    assert s[35] == pytest.approx(0.5 * 15 / 30)
    assert s[49] == pytest.approx(0.5 * 29 / 30)
    assert np.allclose(s.values[50:], 0.5)
    assert s[10**7] == 0.5
    # non-zero start: jumps to `start` right after the zero phase
    s2 = weight_schedule(0.2, 1.0, 0.0, total_iters=100, zero_iters=10, warmup_iters=10, cosine_iters=20)
    assert s2[9] == 0.0 and s2[10] == pytest.approx(0.2) and s2[20] == pytest.approx(1.0)
    assert s2[39] == pytest.approx(0.0) and s2[60] == 0.0


def test_user_yaml_weight_schedules():
    cfg = OmegaConf.load(USER_YAML)
    L, total = cfg.train.OFFICIAL_EPOCH_LENGTH, cfg.optim.epochs * cfg.train.OFFICIAL_EPOCH_LENGTH
    w = build_weight_schedule(cfg.resize_shuffle_augmentor.resize_paste_loss_weight, L, total, "rp")
    assert len(w) == 1_000_000
    assert w[0] == 0.0 and w[49_999] == 0.0 and w[50_000] == 0.0
    assert w[75_000] == pytest.approx(0.25)
    assert w[100_000] == pytest.approx(0.5) and w[999_999] == pytest.approx(0.5) and w[2_000_000] == 0.5
    assert w.max() == pytest.approx(0.5)
    b = build_weight_schedule(cfg.resize_shuffle_augmentor.bridge_global_weight, L, total, "bg")
    assert b[75_000] == pytest.approx(0.125)
    const = build_weight_schedule(0.3, L, total, "c")
    assert const[0] == 0.3 and const[123456] == 0.3 and len(const) == 0
    assert build_weight_schedule(0, L, total, "z").max() == 0.0
    with pytest.raises(ConfigError, match="rp"):
        build_weight_schedule("abc", L, total, "rp")
    with pytest.raises(ConfigError, match="rp"):
        spec = {"start": 0, "peak": 1, "end": 1, "zero_epochs": 900, "warmup_epochs": 200}
        build_weight_schedule(spec, L, total, "rp")


def test_scale_lr():
    assert scale_lr(5e-5, "sqrt_wrt_1024", 64) == pytest.approx(5e-5)
    assert scale_lr(1e-3, "sqrt_wrt_1024", 1024) == pytest.approx(4e-3)
    assert scale_lr(1e-3, "sqrt_wrt_1024", 2048) == pytest.approx(1e-3 * 4 * math.sqrt(2))
    assert scale_lr(1e-3, "linear_wrt_256", 512) == pytest.approx(2e-3)
    assert scale_lr(1e-3, None, 512) == 1e-3
    assert scale_lr(1e-3, "something_else", 512) == 1e-3


# ------------------------------------------------------------------------------------------------ build_schedules
def _v1_cfg(**optim):
    base = dict(
        epochs=10, lr=1e-3, min_lr=1e-6, warmup_epochs=2, weight_decay=0.04, weight_decay_end=0.4,
        schedule_trunc_extra=0.0, freeze_last_layer_epochs=1, scaling_rule="sqrt_wrt_1024",
    )
    base.update(optim)
    return OmegaConf.create(
        {
            "optim": base,
            "teacher": dict(
                momentum_teacher=0.992, final_momentum_teacher=1.0, warmup_teacher_temp=0.04, teacher_temp=0.07,
                warmup_teacher_temp_epochs=3,
            ),
            "schedules": None,
        }
    )


def test_build_schedules_v1():
    L, total, B = 10, 100, 2048
    s = build_schedules(_v1_cfg(), L, total, B)
    assert s.version == 1
    peak = 1e-3 * 4 * math.sqrt(B / 1024)
    assert s.lr[0] == 0.0 and s.lr[19] == pytest.approx(peak) and s.lr[20] == pytest.approx(peak)
    assert s.lr[60] == pytest.approx(1e-6 + 0.5 * (peak - 1e-6))  # i = 40 of n = 80
    assert s.lr[total] == 1e-6  # min_lr is not scaled
    assert s.wd[0] == pytest.approx(0.04) and s.wd[50] == pytest.approx(0.22) and s.wd[total] == 0.4
    assert s.momentum[0] == pytest.approx(0.992) and s.momentum[total + 5] == 1.0
    assert s.teacher_temp[0] == pytest.approx(0.04)
    assert s.teacher_temp[10] == pytest.approx(0.04 + 0.03 * 10 / 29)
    assert s.teacher_temp[29] == pytest.approx(0.07) and s.teacher_temp[80] == 0.07
    assert all(s.last_layer_lr[i] == 0.0 for i in range(10))
    assert s.last_layer_lr[10] == s.lr[10] > 0 and s.last_layer_lr[77] == s.lr[77]
    v = s.at(60)
    assert v.lr == s.lr[60] and v.wd == s.wd[60] and v.momentum == s.momentum[60]
    assert isinstance(v.teacher_temp, float) and v.last_layer_lr == s.lr[60]
    # the config is not modified by the scaling rule
    cfg = _v1_cfg()
    build_schedules(cfg, L, total, B)
    assert cfg.optim.lr == 1e-3


def test_build_schedules_v1_missing_key():
    with pytest.raises(ConfigError, match="optim.lr"):
        build_schedules(_v1_cfg(lr=None), 10, 100, 64)


def test_build_schedules_user_yaml_v2():
    cfg = OmegaConf.load(USER_YAML)
    L = cfg.train.OFFICIAL_EPOCH_LENGTH
    total = cfg.optim.epochs * L
    s = build_schedules(cfg, L, total, global_batch=64)
    assert s.version == 2 and len(s.lr) == total
    # 5e-5 * 4 * sqrt(64/1024) == 5e-5: peak and end unchanged at batch 64
    assert s.lr[0] == 0.0
    assert s.lr[500] == pytest.approx(2.5e-5)
    assert s.lr[1000] == pytest.approx(5e-5)
    n_cos = total - 1000
    k = n_cos // 2
    assert s.lr[1000 + k] == pytest.approx(5e-6 + (5e-5 - 5e-6) * 0.5 * (1 + math.cos(math.pi * k / (n_cos - 1))))
    assert s.lr[total - 1] == pytest.approx(5e-6) and s.lr[total] == pytest.approx(5e-6)
    assert np.all(s.last_layer_lr.values[:1000] == 0.0) and s.last_layer_lr[1000] == pytest.approx(5e-5)
    assert s.wd[0] == pytest.approx(0.04) and s.wd[777_777] == pytest.approx(0.04)
    assert s.momentum[0] == pytest.approx(0.994) and s.momentum[999_999] == pytest.approx(0.994)
    assert s.teacher_temp[0] == pytest.approx(0.04)
    assert s.teacher_temp[50_000] == pytest.approx(0.055)
    assert s.teacher_temp[100_000] == pytest.approx(0.07) and s.teacher_temp[999_999] == pytest.approx(0.07)
    # at a global batch of 1024 the peak and the end are scaled x4, start is not
    s4 = build_schedules(cfg, L, total, global_batch=1024)
    assert s4.lr[1000] == pytest.approx(2e-4) and s4.lr[total] == pytest.approx(2e-5) and s4.lr[0] == 0.0
    assert cfg.schedules.lr.peak == 5e-5
    # loss weights of the add-ons, by config key
    assert s.extras(75_000) == pytest.approx(
        {"resize_paste_loss_weight": 0.25, "patch_shuffle_loss_weight": 0.5,
         "bridge_patchshuffle_weight": 0.125, "bridge_global_weight": 0.125}
    )
    assert all(v == 0.0 for v in s.extras(10).values())
    v = s.at(1000)
    assert v["lr"] == v.lr == pytest.approx(5e-5) and v.as_dict()["momentum"] == pytest.approx(0.994)
    with pytest.raises(KeyError):
        v["learning_rate"]


def test_build_schedules_v2_cosine_epochs_and_errors():
    cfg = OmegaConf.create(
        {
            "optim": {"scaling_rule": None},
            "schedules": {
                "lr": {"start": 0.0, "peak": 1.0, "end": 0.0, "warmup_epochs": 1, "cosine_epochs": 2},
                "weight_decay": {"start": 0.1, "peak": 0.1, "end": 0.1, "warmup_epochs": 0},
                "momentum": {"start": 0.9, "peak": 0.9, "end": 0.99, "warmup_epochs": 0},
                "teacher_temp": {"start": 0.04, "peak": 0.07, "end": 0.07, "warmup_epochs": 2},
            },
        }
    )
    s = build_schedules(cfg, epoch_length=10, total_iters=50, global_batch=8)
    assert s.lr[10] == 1.0 and s.lr[29] == pytest.approx(0.0) and np.all(s.lr.values[30:] == 0.0)
    assert np.all(s.last_layer_lr.values == s.lr.values)  # no freeze key -> nothing frozen
    assert s.momentum[49] == pytest.approx(0.99)
    cfg.schedules.lr.warmup_epochs = 4
    with pytest.raises(ConfigError, match="schedules.lr"):
        build_schedules(cfg, 10, 50, 8)
    del cfg.schedules["momentum"]
    cfg.schedules.lr.warmup_epochs = 1
    with pytest.raises(ConfigError, match="schedules.momentum"):
        build_schedules(cfg, 10, 50, 8)


def test_array_schedule_lookup():
    s = ArraySchedule(np.arange(3, dtype=np.float64), 7.0)
    assert s[2] == 2.0 and s[3] == 7.0 and isinstance(s[0], float)
    with pytest.raises(IndexError):
        s[-1]


def test_extras_dino_local_and_gram_weights():
    cfg = _v1_cfg()
    cfg.dino = {"reweight_dino_local_loss": True,
                "local_loss_weight_schedule": {"start": 1.0, "peak": 1.0, "end": 0.5, "warmup_epochs": 0}}
    cfg.gram = {"loss_weight_schedule": {"start": 0.0, "peak": 2.0, "end": 2.0, "warmup_epochs": 5}}
    cfg.resize_shuffle_augmentor = {"resize_paste_loss_weight": 0.3,
                                    "patch_shuffle_loss_weight": {"start": 0, "peak": 0, "end": 0}}
    s = build_schedules(cfg, 10, 100, 64)
    e = s.extras(50)
    assert set(e) == {"dino_local_weight", "gram_weight", "resize_paste_loss_weight", "patch_shuffle_loss_weight"}
    assert e["dino_local_weight"] == pytest.approx(0.5 + 0.5 * 0.5 * (1 + math.cos(math.pi * 50 / 99)))
    assert e["gram_weight"] == pytest.approx(2.0) and s.extras(25)["gram_weight"] == pytest.approx(1.0)
    assert e["resize_paste_loss_weight"] == 0.3
    assert s.weights["patch_shuffle_loss_weight"].max() == 0.0 and len(s.weights["patch_shuffle_loss_weight"]) == 0
    cfg.dino.reweight_dino_local_loss = False
    assert "dino_local_weight" not in build_schedules(cfg, 10, 100, 64).extras(0)
