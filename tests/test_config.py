"""Typed config, YAML/override loading, presets and the launch front-end (dinobridge.config)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from dinobridge.config import (
    PACKAGE_CONFIG_DIR,
    build_config,
    config_to_container,
    effective_koleo_cls_weight,
    launch,
    list_presets,
    parse_dataset_string,
    save_config,
)
from dinobridge.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
USER_YAML = PACKAGE_CONFIG_DIR / "dinov3_vitlarge_pretrain.yaml"

# Official DINOv3 ssl_default_config.yaml values (reference/dinov3_official.md §7), written out by hand.
OFFICIAL = {
    "MODEL.META_ARCHITECTURE": "SSLMetaArch",
    "MODEL.WEIGHTS": "",
    "compute_precision.param_dtype": "bf16",
    "compute_precision.sharding_strategy": "SHARD_GRAD_OP",
    "dino.loss_weight": 1.0,
    "dino.global_ignore_diagonal": True,
    "dino.head_n_prototypes": 65536,
    "dino.head_bottleneck_dim": 256,
    "dino.head_nlayers": 3,
    "dino.head_hidden_dim": 2048,
    "dino.koleo_loss_weight": 0.1,
    "dino.koleo_topk": 1,
    "dino.koleo_distributed_loss_group_size": None,
    "dino.reweight_dino_local_loss": False,
    "dino.local_loss_weight_schedule.start": 0.5,
    "ibot.mask_sample_probability": 0.5,
    "ibot.mask_ratio_min_max": [0.1, 0.5],
    "ibot.separate_head": True,
    "ibot.head_n_prototypes": 65536,
    "gram.use_loss": False,
    "gram.loss_weight": 1.0,
    "gram.ckpt": None,
    "gram.it_load_ema_teacher": -1,
    "gram.update_frequency": 50000,
    "gram.tokens_used": "all",
    "gram.global_teacher_resize_method": "bicubic",
    "gram.loss_weight_schedule": None,
    "train.batch_size_per_gpu": 64,
    "train.seed": 0,
    "train.num_workers": 10,
    "train.OFFICIAL_EPOCH_LENGTH": 1250,
    "train.centering": "sinkhorn_knopp",
    "train.checkpointing": False,
    "train.compile": True,
    "train.cache_dataset": False,
    "student.arch": "vit_large",
    "student.patch_size": 16,
    "student.drop_path_rate": 0.3,
    "student.layerscale": 1e-05,
    "student.ffn_layer": "mlp",
    "student.norm_layer": "layernorm",
    "student.n_storage_tokens": 0,
    "student.pos_embed_rope_base": 100.0,
    "student.pos_embed_rope_normalize_coords": "separate",
    "student.pos_embed_rope_rescale_coords": None,
    "teacher.momentum_teacher": 0.992,
    "teacher.final_momentum_teacher": 1,
    "teacher.warmup_teacher_temp": 0.04,
    "teacher.teacher_temp": 0.07,
    "teacher.warmup_teacher_temp_epochs": 30,
    "optim.epochs": 100,
    "optim.weight_decay": 0.04,
    "optim.weight_decay_end": 0.4,
    "optim.lr": 0.001,
    "optim.warmup_epochs": 10,
    "optim.min_lr": 1e-06,
    "optim.schedule_trunc_extra": 0.0,
    "optim.clip_grad": 3.0,
    "optim.scaling_rule": "sqrt_wrt_1024",
    "optim.patch_embed_lr_mult": 0.2,
    "optim.layerwise_decay": 0.9,
    "optim.adamw_beta2": 0.999,
    "crops.global_crops_scale": [0.32, 1.0],
    "crops.local_crops_number": 8,
    "crops.global_crops_size": 224,
    "crops.local_crops_size": 96,
    "crops.global_local_crop_pairs_ratios": 1.0,
    "crops.gram_teacher_crops_size": None,
    "crops.horizontal_flips": True,
    "crops.rgb_std": [0.229, 0.224, 0.225],
    "evaluation.eval_period_iterations": 12500,
    "evaluation.config_files.high_freq": "benchmark_high_frequency.yaml",
    "checkpointing.period": 3750,
    "checkpointing.max_to_keep": 3,
    "checkpointing.keep_every": 99999999999999999,
}
# Our documented deviations from the official defaults.
DEVIATIONS = {"MODEL.DEVICE": "auto", "train.dataset_path": "builtin:shapes", "train.output_dir": "./outputs/default"}


def _leaves(data, prefix=""):
    if isinstance(data, dict):
        for key, value in data.items():
            yield from _leaves(value, f"{prefix}{key}.")
    else:
        yield prefix[:-1], data


def _error(**kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        build_config(**kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


# ------------------------------------------------------------------------------------------------ schema / YAML
def test_user_yaml_validates_with_every_value_typed():
    cfg = build_config(USER_YAML)
    raw = yaml.safe_load(USER_YAML.read_text())
    for key, value in _leaves(raw):  # every key of the user's YAML exists and keeps its value
        assert OmegaConf.select(cfg, key, default="<absent>") == value, key
    assert cfg.optim.adamw_beta2 == 0.99 and isinstance(cfg.optim.adamw_beta2, float)
    assert cfg.student.ffn_layer == "swiglu64"
    assert cfg.schedules.lr.peak == 5e-5 and isinstance(cfg.schedules.lr.peak, float)
    assert cfg.schedules.lr.freeze_last_layer_epochs == 1
    assert cfg.data.imagenet_1k.dataset_ratio == 1.0
    assert cfg.data.imagenet_1k.txt_path == "/root/data/imagenet_1k/data_new/imagenet_1k.txt"
    assert isinstance(cfg.student.layerscale, float) and cfg.student.layerscale == 1e-5
    assert cfg.student.pos_embed_rope_rescale_coords == 2.0 and isinstance(cfg.student.ffn_ratio, float)
    assert cfg.teacher.teacher_temp is None and cfg.optim.lr is None  # v2 schedules make v1 keys nullable
    assert cfg.dtch.enabled is True and cfg.dtch.history_mode == "ema"  # spec default for a key the YAML lacks
    assert cfg.resize_shuffle_augmentor.bridge_global_weight.zero_epochs == 50
    assert cfg.MODEL.META_ARCHITECTURE == "SSLResizeShuffle"
    assert effective_koleo_cls_weight(cfg.dino) == 0.1
    assert cfg.train.output_dir == "./outputs/dinov3_vitlarge_pretrain"


def test_koleo_weights_combine():
    assert effective_koleo_cls_weight(build_config().dino) == 0.1  # official key when the user key is null
    cfg = build_config(overrides=["dino.koleo_loss_weight=0.3", "dino.koleo_cls_loss_weight=0.05"])
    assert effective_koleo_cls_weight(cfg.dino) == 0.05


@pytest.mark.skipif(not (SHARED / "fixtures").is_dir(), reason="../shared not present")
def test_presets_are_the_fixtures_verbatim():
    fixtures = SHARED / "fixtures"
    assert USER_YAML.read_bytes() == (fixtures / "dinov3_vitlarge_pretrain.yaml").read_bytes()
    assert (PACKAGE_CONFIG_DIR / "official_vitl16_im1k.yaml").read_bytes() == (
        fixtures / "official_vitl16_im1k_recipe.yaml"
    ).read_bytes()


def test_official_defaults():
    cfg = build_config()
    assert len(OFFICIAL) >= 30
    for key, value in {**OFFICIAL, **DEVIATIONS}.items():
        assert OmegaConf.select(cfg, key, default="<absent>") == value, key
    assert cfg.schedules is None and dict(cfg.data) == {}


@pytest.mark.skipif(not (SHARED / "reference" / "dinov3_official.md").is_file(), reason="../shared not present")
def test_all_153_official_keys_exist_with_official_values():
    text = (SHARED / "reference" / "dinov3_official.md").read_text()
    section = text[text.index("## 7.") : text.index("## 8.")]
    rows = re.findall(r"^\| `([^`]+)` \| `?([^|`]*)`? \|", section, re.M)
    assert len(rows) == 153
    cfg = build_config()
    for key, text_value in rows:
        expected = ast.literal_eval(text_value.strip())  # Python literals: 1e-05, 'bf16', [0.1, 0.5], None
        if key in DEVIATIONS:
            continue
        assert OmegaConf.select(cfg, key, default="<absent>") == expected, key


def test_float_literals_parse_as_floats(tmp_path):
    path = tmp_path / "f.yaml"
    path.write_text("optim:\n  lr: 1.0e-05\n  min_lr: 1e-7\n")
    cfg = build_config(path, ["optim.weight_decay=5e-2"])
    assert (cfg.optim.lr, cfg.optim.min_lr, cfg.optim.weight_decay) == (1e-5, 1e-7, 0.05)
    assert all(isinstance(v, float) for v in (cfg.optim.lr, cfg.optim.min_lr, cfg.optim.weight_decay))


# ------------------------------------------------------------------------------------------------ errors
def test_unknown_key_names_closest_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("optim:\n  lrr: 0.1\n")
    assert _error(config_file=path) == f"unknown config key 'optim.lrr' (did you mean 'optim.lr'?) in {path}"
    assert "did you mean 'teacher.teacher_temp'" in _error(overrides=["optim.teacher_temp=0.1"])
    assert "did you mean 'MODEL'" in _error(overrides=["model.DEVICE=cpu"])
    assert "did you mean 'data.x.txt_path'" in _error(overrides=["data.x.txt_pth=/a"])


def test_wrong_type_names_key_and_type(tmp_path):
    message = _error(overrides=["optim.lr=abc"])
    assert "'optim.lr'" in message and "float" in message and "abc" in message
    assert "'train.seed' expects int" in _error(overrides=["train.seed=1.5"])
    assert "'crops' expects a mapping" in _error(overrides=["crops=3"])
    path = tmp_path / "t.yaml"
    path.write_text("train:\n  compile: maybe\n")
    message = _error(config_file=path)
    assert "'train.compile' expects bool" in message and str(path) in message


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("optim:\n  lr: 0.1\n  epochs: [1, 2\n  x: 1\n")
    message = _error(config_file=path)
    assert message.startswith(f"cannot parse YAML {path}:4:")


@pytest.mark.parametrize(
    "override, key",
    [
        ("ibot.mask_ratio_min_max=[0.5,0.1]", "ibot.mask_ratio_min_max"),
        ("teacher.teacher_temp=0", "teacher.teacher_temp"),
        ("crops.global_crops_size=225", "crops.global_crops_size"),
        ("crops.local_crops_number=-1", "crops.local_crops_number"),
        ("MODEL.DEVICE=tpu", "MODEL.DEVICE"),
        ("dino.koleo_topk=2", "dino.koleo_topk"),
        ("schedules.lr.peak=1e-4", "schedules.lr.end"),
        ("train.dataset_path=Foo:x", "train.dataset_path"),
        ("optim.lr=null", "optim.lr"),
        ("resize_shuffle_augmentor.patch_size=8", "resize_shuffle_augmentor.patch_size"),
        ("optim.lr=${optim.nope}", "optim.lr"),
    ],
)
def test_validation_rules_name_the_key(override, key):
    message = _error(overrides=[override])
    assert f"'{key}'" in message or message.startswith(f"{key}:")


def test_dataset_path_null_needs_data_sources():
    assert "'train.dataset_path' is null" in _error(overrides=["train.dataset_path=null"])
    assert "exactly one of" in _error(overrides=["data.a.txt_path=/x", "data.a.root=/y"])
    cfg = build_config(overrides=["train.dataset_path=null", "data.a.root=/imgs", "+data.b.txt_path=/l.txt"])
    assert sorted(cfg.data) == ["a", "b"] and cfg.data.b.dataset_ratio == 1.0


# ------------------------------------------------------------------------------------------------ overrides
def test_override_grammar():
    cfg = build_config(
        overrides=[
            "train.dataset_path=ImageFolder:root=/data/x",  # '=' inside the value, unquoted
            "crops.global_crops_size=[224,256]",
            "crops.local_crops_size=[96,112]",
            "student.layerscale=null",
            "resize_shuffle_augmentor.bridge_global_weight=0.25",  # number -> constant schedule
            "optim.min_lr=${optim.lr}",
            "+optim.epochs=7",
            "gram.loss_weight_schedule={start:0,peak:2,end:2,warmup_epochs:1}",
        ]
    )
    assert cfg.train.dataset_path == "ImageFolder:root=/data/x"
    assert list(cfg.crops.global_crops_size) == [224, 256] and cfg.student.layerscale is None
    assert cfg.resize_shuffle_augmentor.bridge_global_weight.peak == 0.25
    assert cfg.resize_shuffle_augmentor.bridge_global_weight.zero_epochs == 0.0
    assert cfg.optim.min_lr == cfg.optim.lr == 0.001 and cfg.optim.epochs == 7
    assert cfg.gram.loss_weight_schedule.peak == 2.0
    user = build_config(USER_YAML, ["~schedules", "optim.lr=1e-3", "optim.min_lr=0", "optim.warmup_epochs=1",
                                    "optim.weight_decay=0.04", "optim.weight_decay_end=0.04",
                                    "optim.freeze_last_layer_epochs=0", "teacher.momentum_teacher=0.99",
                                    "teacher.final_momentum_teacher=1", "teacher.warmup_teacher_temp=0.04",
                                    "teacher.teacher_temp=0.07", "teacher.warmup_teacher_temp_epochs=1",
                                    "~data.imagenet_1k", "train.dataset_path=builtin:shapes"])  # fmt: skip
    assert user.schedules is None and dict(user.data) == {}
    constant = build_config(USER_YAML, ["resize_shuffle_augmentor.bridge_global_weight=0.5"])
    assert dict(constant.resize_shuffle_augmentor.bridge_global_weight) == {
        "start": 0.5, "peak": 0.5, "end": 0.5, "zero_epochs": 0.0, "warmup_epochs": 0.0, "cosine_epochs": None
    }
    assert "-m/--multirun" in _error(overrides=["optim.lr=1e-3,2e-3"])
    assert "cannot be deleted" in _error(overrides=["~optim.epochs"])


def test_output_dir_precedence(tmp_path):
    assert build_config(config_name="train").train.output_dir == "./outputs/train"
    assert build_config(config_name="train", output_dir=tmp_path).train.output_dir == str(tmp_path)
    assert build_config(overrides=["experiment=train", "train.output_dir=/r"]).train.output_dir == "/r"
    assert build_config(config_name="official_vitl16_im1k").train.output_dir == "./output"  # set by the recipe


def test_save_config_round_trip(tmp_path):
    cfg = build_config(USER_YAML, ["optim.epochs=3"], tmp_path / "run")
    path = save_config(cfg, tmp_path / "run" / "config.yaml")
    again = build_config(path)
    assert config_to_container(again) == config_to_container(cfg)


def test_dataset_strings():
    assert parse_dataset_string("ImageNet:split=TRAIN:root=/d:extra=/e").root == "/d/train"
    assert parse_dataset_string("builtin:shapes").name == "shapes"
    assert parse_dataset_string("TxtList:path=/l.txt").path == "/l.txt"
    with pytest.raises(ConfigError, match="needs ':root=DIR'"):
        parse_dataset_string("ImageNet:split=TRAIN")
    with pytest.raises(ConfigError, match="missing option"):
        parse_dataset_string("TxtList:root=/x")


# ------------------------------------------------------------------------------------------------ presets
@pytest.mark.parametrize("name", list_presets())
def test_every_preset_composes(name):
    cfg = build_config(config_name=name)
    assert cfg.train.output_dir
    assert build_config(overrides=[f"experiment={name}"]) == cfg


def test_presets_listed_and_mirrored():
    assert {"train", "dinov3_vitlarge_pretrain", "official_vitl16_im1k", "cifar10_vits4"} <= set(list_presets())
    cpu = build_config(config_name="train")
    assert cpu.student.arch == "vit_pico" and cpu.train.dataset_path == "builtin:shapes" and not cpu.train.compile
    mirror = REPO / "configs"
    if mirror.is_dir():
        ours = {str(p.relative_to(PACKAGE_CONFIG_DIR)): p.read_bytes() for p in PACKAGE_CONFIG_DIR.rglob("*.yaml")}
        theirs = {str(p.relative_to(mirror)): p.read_bytes() for p in mirror.rglob("*.yaml")}
        assert ours == theirs, "configs/ differs from dinobridge/configs/: cp -r dinobridge/configs/. configs/"


# ------------------------------------------------------------------------------------------------ launch
def _record(into):
    return lambda cfg: into.append(cfg)


def test_multirun_expands_sweeps_into_distinct_dirs(tmp_path, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    argv = ["-m", "optim.lr=1e-3,2e-3", "train.seed=0,1", "--output-dir", str(tmp_path)]
    runs, again = [], []
    assert launch(argv, _record(runs)) == 0
    assert launch(argv, _record(again), write_config=False) == 0
    assert {(c.optim.lr, c.train.seed) for c in runs} == {(1e-3, 0), (1e-3, 1), (2e-3, 0), (2e-3, 1)}
    dirs = [c.train.output_dir for c in runs]
    assert len(set(dirs)) == 4 and dirs == [c.train.output_dir for c in again]  # deterministic
    assert dirs[0] == str(tmp_path / "0_optim.lr=0.001_train.seed=0")
    for c in runs:
        assert Path(c.train.output_dir).parent == tmp_path
        assert build_config(Path(c.train.output_dir) / "config.yaml").train.seed == c.train.seed


def test_official_launch_form(tmp_path, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    runs = []
    argv = ["--config-file", str(USER_YAML), "--output-dir", str(tmp_path / "out"), "--no-resume",
            "optim.epochs=3", "--checkpoint_dir", str(tmp_path / "ck")]  # fmt: skip
    assert launch(argv, _record(runs)) == 0
    (cfg,) = runs
    assert cfg.train.output_dir == str(tmp_path / "out") and cfg.train.resume is False and cfg.optim.epochs == 3
    assert cfg.checkpointing.dir == str(tmp_path / "ck") and cfg.student.ffn_layer == "swiglu64"
    assert (tmp_path / "out" / "config.yaml").is_file()


def test_only_rank_zero_writes_the_config(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    runs = []
    assert launch(["--output-dir", str(tmp_path / "r1")], _record(runs)) == 0
    assert len(runs) == 1 and runs[0].train.output_dir == str(tmp_path / "r1")
    assert not (tmp_path / "r1" / "config.yaml").exists()


def test_launch_presets_and_errors(capsys):
    runs = []
    assert launch(["experiment=cifar10_vits4", "--print-config"], _record(runs)) == 0 and runs == []
    assert "arch: vit_small" in capsys.readouterr().out
    assert launch(["--config-name", "cifar10_vits4", "--print-config"], _record(runs)) == 0
    assert launch(["--help"], _record(runs)) == 0
    assert "dinov3_vitlarge_pretrain" in capsys.readouterr().out
    for argv in (["optim.lrr=1"], ["optim.lr=1e-3,2e-3"], ["--bogus"], ["--config-name", "nope"]):
        assert launch(argv, _record(runs)) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("dinobridge train: error: ")
    assert runs == []


def test_launch_returns_2_on_user_error_from_run_fn(tmp_path, capsys):
    from dinobridge.errors import DataError

    def run(cfg):
        raise DataError("train.dataset_path: no images found under /nowhere")

    assert launch(["--output-dir", str(tmp_path), "--print-config"], run) == 0
    assert launch(["--output-dir", str(tmp_path)], run, write_config=False) == 2
    assert "no images found" in capsys.readouterr().err
