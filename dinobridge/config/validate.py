"""Cross-key and range checks run after merging; the first problem raises a one-line ConfigError naming the key.

Int-or-list keys (`crops.*_size`, `crops.global_local_crop_pairs_ratios`) are checked here because the schema types
them `Any`. Rules follow the official asserts where the official code has them (noted), plus range checks.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

from omegaconf import DictConfig, ListConfig, OmegaConf

from dinobridge.config.dataset_spec import parse_dataset_string
from dinobridge.config.schema import CHECKPOINTING_POLICIES, COMPILE_SCOPES, DEVICES
from dinobridge.errors import ConfigError

META_ARCHITECTURES = ("SSLMetaArch", "SSLResizeShuffle", "MultiDistillationMetaArch")
DTYPES = ("fp32", "fp16", "bf16")
SHARDING = ("SHARD_GRAD_OP", "FULL_SHARD", "NO_SHARD")
FFN_LAYERS = ("mlp", "swiglu", "swiglu32", "swiglu64", "swiglu128")
NORM_LAYERS = ("layernorm", "layernormbf16", "rmsnorm")
SCALING_RULES = ("sqrt_wrt_1024", "linear_wrt_256", "none")
CENTERINGS = ("sinkhorn_knopp", "sinkhorn", "softmax", "centering", "softmax_center")


def _fail(key: str, expected: str, value: Any) -> None:
    raise ConfigError(f"config key '{key}': expected {expected}, got {value!r}")


def _get(cfg: DictConfig, key: str) -> Any:
    node: Any = cfg
    for part in key.split("."):
        node = node[part]
    return node


def _check(cfg: DictConfig, key: str, ok: Any, expected: str) -> Any:
    """Fail unless `ok(value)` holds for the value at `key`; returns the value."""
    value = _get(cfg, key)
    if not ok(value):
        _fail(key, expected, value)
    return value


def _one_of(cfg: DictConfig, key: str, choices: Sequence[str]) -> None:
    _check(cfg, key, lambda v: v in choices, "one of " + ", ".join(repr(c) for c in choices))


def _positive(v: Any) -> bool:
    return v is not None and v > 0


def _non_negative(v: Any) -> bool:
    return v is not None and v >= 0


def _unit(v: Any) -> bool:
    return v is not None and 0 <= v <= 1


def _pair(cfg: DictConfig, key: str, low: float, high: float, strict: bool) -> None:
    """A [a, b] list with low <= a <= b <= high (a < b when strict)."""
    value = list(_get(cfg, key))
    ordered = len(value) == 2 and low <= value[0] and value[1] <= high
    ordered = ordered and (value[0] < value[1] if strict else value[0] <= value[1])
    if not ordered:
        _fail(key, f"[min, max] with {low} <= min {'<' if strict else '<='} max <= {high}", value)


def _int_or_list(value: Any) -> list | None:
    """The value as a list of entries (a number becomes a 1-list), or None if it is neither."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return [value]
    if isinstance(value, (list, tuple, ListConfig)):
        return list(value)
    return None


def _crop_sizes(cfg: DictConfig, key: str, patch: int, nullable: bool = False) -> list[int] | None:
    value = _get(cfg, key)
    if value is None and nullable:
        return None
    sizes = _int_or_list(value)
    expected = f"a positive multiple of student.patch_size={patch} or a list of them" + (" or null" if nullable else "")
    if not sizes or any(isinstance(s, bool) or not isinstance(s, int) or s <= 0 or s % patch for s in sizes):
        _fail(key, expected, value)
    return sizes


def _check_crops(cfg: DictConfig) -> None:
    patch = cfg.student.patch_size
    _pair(cfg, "crops.global_crops_scale", 0.0, 1.0, strict=False)
    _pair(cfg, "crops.local_crops_scale", 0.0, 1.0, strict=False)
    for key in ("crops.global_crops_scale", "crops.local_crops_scale"):
        _check(cfg, key, lambda v: v[0] > 0, "a minimum scale > 0")
    _check(cfg, "crops.local_crops_number", _non_negative, "an int >= 0")
    global_sizes = _crop_sizes(cfg, "crops.global_crops_size", patch)
    local_sizes = _crop_sizes(cfg, "crops.local_crops_size", patch)
    gram_sizes = _crop_sizes(cfg, "crops.gram_teacher_crops_size", patch, nullable=True)
    ratios = _int_or_list(cfg.crops.global_local_crop_pairs_ratios)
    if not ratios or any(isinstance(r, bool) or not isinstance(r, (int, float)) or r < 0 for r in ratios):
        _fail("crops.global_local_crop_pairs_ratios", "a number >= 0 or a list of them", ratios)
    lengths = {len(s) for s in (global_sizes, local_sizes, gram_sizes) if s is not None and len(s) > 1}
    if len(ratios) > 1:
        lengths.add(len(ratios))
    if len(lengths) > 1:
        raise ConfigError(
            "config keys 'crops.global_crops_size', 'crops.local_crops_size', 'crops.gram_teacher_crops_size' and "
            f"'crops.global_local_crop_pairs_ratios': lists must have the same length, got lengths {sorted(lengths)}"
        )
    if cfg.crops.localcrops_subset_of_globalcrops and max(local_sizes) > min(global_sizes):
        expected = "<= crops.global_crops_size with crops.localcrops_subset_of_globalcrops"
        _fail("crops.local_crops_size", expected, cfg.crops.local_crops_size)
    if cfg.crops.get("gpu_crops") and not cfg.crops.gpu_augmentation:
        _fail("crops.gpu_crops", "false unless crops.gpu_augmentation is true", True)
    if cfg.crops.get("gpu_crops") and cfg.crops.localcrops_subset_of_globalcrops:
        _fail("crops.gpu_crops", "false with crops.localcrops_subset_of_globalcrops (not supported together)", True)
    for key in ("crops.rgb_mean", "crops.rgb_std"):
        _check(cfg, key, lambda v: len(v) == 3, "3 values (R, G, B)")
    _check(cfg, "crops.rgb_std", lambda v: min(v) > 0, "values > 0")
    _check(cfg, "crops.teacher_to_student_resolution_scale", _positive, "a number > 0")
    _check(cfg, "crops.resize_shuffle_augmentor_switch", lambda v: v is None, "null (not configurable from YAML)")


def _check_v1_schedules(cfg: DictConfig) -> None:
    """Without a `schedules` block the v1 keys must be set."""
    optim_keys = ("lr", "min_lr", "warmup_epochs", "weight_decay", "weight_decay_end", "freeze_last_layer_epochs")
    teacher_keys = ("momentum_teacher", "final_momentum_teacher", "warmup_teacher_temp", "teacher_temp",
                    "warmup_teacher_temp_epochs")  # fmt: skip
    for key in [f"optim.{k}" for k in optim_keys] + [f"teacher.{k}" for k in teacher_keys]:
        if _get(cfg, key) is None:
            raise ConfigError(f"config key '{key}' is null: set it, or add a 'schedules' block (v2 schedules)")
    for key in [f"optim.{k}" for k in optim_keys] + ["teacher.warmup_teacher_temp_epochs"]:
        _check(cfg, key, _non_negative, "a number >= 0")
    for key in ("teacher.warmup_teacher_temp", "teacher.teacher_temp"):
        _check(cfg, key, _positive, "a temperature > 0")
    for key in ("teacher.momentum_teacher", "teacher.final_momentum_teacher"):
        _check(cfg, key, _unit, "a momentum in [0, 1]")


def _check_schedule(cfg: DictConfig, key: str, ok: Any, expected: str) -> None:
    for part in ("start", "peak", "end"):
        _check(cfg, f"{key}.{part}", ok, expected)
    for part in ("warmup_epochs", "cosine_epochs", "zero_epochs", "freeze_last_layer_epochs"):
        if part in _get(cfg, key) and _get(cfg, f"{key}.{part}") is not None:
            _check(cfg, f"{key}.{part}", _non_negative, "a number of epochs >= 0")


def _check_v2_schedules(cfg: DictConfig) -> None:
    _check_schedule(cfg, "schedules.lr", _non_negative, "a learning rate >= 0")
    _check_schedule(cfg, "schedules.weight_decay", _non_negative, "a weight decay >= 0")
    _check_schedule(cfg, "schedules.teacher_temp", _positive, "a temperature > 0")
    _check_schedule(cfg, "schedules.momentum", _unit, "a momentum in [0, 1]")


def _check_dataset(cfg: DictConfig) -> None:
    if cfg.train.dataset_path is None:
        if not cfg.data:
            raise ConfigError("config key 'train.dataset_path' is null and 'data' has no sources: set one of them")
    else:
        parse_dataset_string(cfg.train.dataset_path, "train.dataset_path", require_root=False)
    for name, source in cfg.data.items():
        if (source.txt_path is None) == (source.root is None):
            raise ConfigError(f"config key 'data.{name}': set exactly one of 'txt_path' or 'root'")
        _check(cfg, f"data.{name}.dataset_ratio", _positive, "a ratio > 0")
    for key in ("evaluation.knn_train", "evaluation.knn_val"):
        if _get(cfg, key) is not None:
            parse_dataset_string(_get(cfg, key), key, require_root=False)


def _check_heads_and_losses(cfg: DictConfig) -> None:
    for section in ("dino", "ibot"):
        for key in ("head_n_prototypes", "head_bottleneck_dim", "head_nlayers", "head_hidden_dim"):
            _check(cfg, f"{section}.{key}", _positive, "an int > 0")
        _check(cfg, f"{section}.loss_weight", _non_negative, "a weight >= 0")
    for key in ("koleo_loss_weight", "koleo_patch_loss_weight"):
        _check(cfg, f"dino.{key}", _non_negative, "a weight >= 0")
    _check(cfg, "dino.koleo_cls_loss_weight", lambda v: v is None or v >= 0, "a weight >= 0 or null")
    _check(cfg, "dino.koleo_distributed_replicas", lambda v: v == 0, "0 (official: no longer supported)")
    _check(cfg, "dino.koleo_topk", _positive, "an int >= 1")
    if not cfg.dino.koleo_loss_distributed:
        _check(cfg, "dino.koleo_topk", lambda v: v == 1, "1 unless dino.koleo_loss_distributed (official)")
    _check(cfg, "dino.koleo_distributed_loss_group_size", lambda v: v is None or v > 0, "an int > 0 or null")
    _check_schedule(cfg, "dino.local_loss_weight_schedule", _non_negative, "a weight >= 0")
    _check(cfg, "ibot.mask_sample_probability", _unit, "a probability in [0, 1]")
    _pair(cfg, "ibot.mask_ratio_min_max", 0.0, 1.0, strict=True)
    _check(cfg, "ibot.separate_head", lambda v: v is True, "true (official: the iBOT head is always separate)")
    _one_of(cfg, "gram.tokens_used", ("all", "masked", "unmasked"))
    if cfg.gram.loss_weight_schedule is not None:
        _check_schedule(cfg, "gram.loss_weight_schedule", _non_negative, "a weight >= 0")
    if cfg.gram.use_loss:
        g = cfg.gram
        if g.ema_teacher and g.ckpt is not None:
            raise ConfigError("config keys 'gram.ema_teacher' and 'gram.ckpt': set only one of them")
        if g.ckpt is None and not g.ema_teacher and g.it_load_ema_teacher < 0:
            _fail("gram.it_load_ema_teacher", "an iteration >= 0 when gram.ckpt is null", g.it_load_ema_teacher)
        if g.ema_teacher and g.rep_update:
            _fail("gram.rep_update", "false with gram.ema_teacher", g.rep_update)
        if g.tokens_used != "all" and g.img_level:
            _fail("gram.img_level", "false when gram.tokens_used is 'masked' or 'unmasked'", g.img_level)
        if not g.ema_teacher and cfg.crops.gram_teacher_crops_size is None:
            _fail("crops.gram_teacher_crops_size", "a size when gram.use_loss uses a gram teacher", None)


def _check_addons(cfg: DictConfig) -> None:
    rs = "resize_shuffle_augmentor"
    for key in ("resize_paste_loss_weight", "patch_shuffle_loss_weight",
                "bridge_patchshuffle_weight", "bridge_global_weight"):  # fmt: skip
        _check_schedule(cfg, f"{rs}.{key}", _non_negative, "a weight >= 0")
    for key in ("patch_shuffle_patch_weight", "patch_shuffle_cls_weight"):
        _check(cfg, f"{rs}.{key}", _non_negative, "a weight >= 0")
    for key in ("patch_shuffle_patch_probability", "patch_shuffle_cell_fraction", "resize_paste_crop_prob",
                "resize_paste_keep_aspect_prob", "resize_paste_roll_prob", "resize_paste_split_prob"):  # fmt: skip
        _check(cfg, f"{rs}.{key}", _unit, "a probability in [0, 1]")
    _pair(cfg, f"{rs}.patch_shuffle_patch_min_max", 0.0, 1.0, strict=False)
    _pair(cfg, f"{rs}.resize_paste_crop_scale", 0.0, 1.0, strict=False)
    _pair(cfg, f"{rs}.resize_paste_scale", 0.0, 1.0, strict=False)
    patch = cfg.student.patch_size
    _check(cfg, f"{rs}.patch_size", lambda v: v is None or v == patch, f"null or student.patch_size={patch}")
    _check(cfg, f"{rs}.patch_shuffle_max_shift", _positive, "an int >= 1")
    _check(cfg, f"{rs}.patch_shuffle_cell_size", _positive, "an int >= 1")
    _one_of(cfg, f"{rs}.patch_shuffle_mode", ("roll", "local_shuffle"))
    _one_of(cfg, f"{rs}.resize_paste_background", ("random", "mean", "zero"))
    _check(cfg, f"{rs}.resize_paste_n_views", lambda v: v in (1, 2), "1 or 2")
    _one_of(cfg, f"{rs}.resize_paste_target", ("same", "both"))
    _one_of(cfg, f"{rs}.bridge_pool", ("attn", "conv_full"))
    _check(cfg, f"{rs}.bridge_hidden_dim", lambda v: v is None or v > 0, "an int > 0 or null")
    _one_of(cfg, f"{rs}.bridge_direction", ("patch_to_cls", "cls_from_patch"))
    if cfg[rs].bridge_direction == "cls_from_patch" and not cfg[rs].bridge_teacher_ema:
        _fail(f"{rs}.bridge_teacher_ema", "true with bridge_direction 'cls_from_patch'", False)
    _check(cfg, f"{rs}.bridge_gate_ibot_loss_below", lambda v: v is None or v > 0, "a loss value > 0 or null")
    for key in ("cls_hist_cache", "patch_hist_cache"):
        _check(cfg, f"dtch.{key}", _non_negative, "a number of samples >= 0")
    _one_of(cfg, "dtch.history_mode", ("ema", "window"))
    _check(cfg, "dtch.soft_scale", lambda v: v >= 1, "a scale >= 1")
    _check(cfg, "dtch.power", lambda v: v is None or v > 0, "a power > 0 or null (= soft_scale)")
    _check(cfg, "dtch.hist_weight", _non_negative, "a weight >= 0")
    _check(cfg, "dtch.n_iterations", _positive, "an int >= 1")


def _check_model_and_optim(cfg: DictConfig) -> None:
    device = cfg.MODEL.DEVICE
    if not re.fullmatch(r"(auto|cpu|mps|(cuda|npu|xpu)(:\d+)?)", str(device)):
        _fail("MODEL.DEVICE", "one of " + ", ".join(DEVICES) + " (cuda/npu/xpu may take an index: 'cuda:1')", device)
    _one_of(cfg, "MODEL.META_ARCHITECTURE", META_ARCHITECTURES)
    _one_of(cfg, "compute_precision.param_dtype", DTYPES)
    _one_of(cfg, "compute_precision.reduce_dtype", DTYPES)
    _one_of(cfg, "compute_precision.sharding_strategy", SHARDING)
    _one_of(cfg, "train.checkpointing_policy", CHECKPOINTING_POLICIES)
    _one_of(cfg, "train.compile_scope", COMPILE_SCOPES)
    _check(cfg, "student.patch_size", _positive, "an int > 0")
    _check(cfg, "student.drop_path_rate", lambda v: 0 <= v < 1, "a rate in [0, 1)")
    _check(cfg, "student.n_storage_tokens", _non_negative, "an int >= 0")
    _one_of(cfg, "student.ffn_layer", FFN_LAYERS)
    _one_of(cfg, "student.norm_layer", NORM_LAYERS)
    _one_of(cfg, "student.pos_embed_rope_normalize_coords", ("min", "max", "separate"))
    _one_of(cfg, "student.pos_embed_rope_dtype", ("bf16", "fp16", "fp32"))
    _one_of(cfg, "optim.scaling_rule", SCALING_RULES)
    _check(cfg, "optim.epochs", _positive, "an int >= 1")
    _check(cfg, "optim.clip_grad", lambda v: v is None or v >= 0, "a norm >= 0 or null (0/null = off)")
    _check(cfg, "optim.layerwise_decay", lambda v: 0 < v <= 1, "a factor in (0, 1]")
    for key in ("adamw_beta1", "adamw_beta2"):
        _check(cfg, f"optim.{key}", lambda v: 0 <= v < 1, "a beta in [0, 1)")
    for key in ("patch_embed_lr_mult", "dino_head_wd_multiplier", "dino_head_lr_multiplier"):
        _check(cfg, f"optim.{key}", _non_negative, "a multiplier >= 0")
    _check(cfg, "optim.schedule_trunc_extra", lambda v: v is None or v >= 0, "a number >= 0 or null")


def _check_train_eval_ckpt(cfg: DictConfig) -> None:
    _check(cfg, "train.batch_size_per_gpu", _positive, "an int >= 1")
    _check(cfg, "train.num_workers", _non_negative, "an int >= 0")
    _check(cfg, "train.OFFICIAL_EPOCH_LENGTH", _positive, "an int >= 1")
    _check(cfg, "train.max_iter", lambda v: v is None or v >= 1, "an int >= 1 or null")
    _check(cfg, "train.log_period", _positive, "an int >= 1")
    _check(cfg, "train.nan_max_consecutive", _positive, "an int >= 1")
    _check(cfg, "train.output_dir", lambda v: bool(str(v).strip()), "a directory path")
    _one_of(cfg, "train.centering", CENTERINGS)
    _check(cfg, "evaluation.knn_period", _non_negative, "an iteration period >= 0 (0 = off)")
    _check(cfg, "evaluation.knn_k", lambda v: len(v) > 0 and min(v) > 0, "a non-empty list of ints > 0")
    _check(cfg, "evaluation.knn_temperature", _positive, "a temperature > 0")
    _check(cfg, "evaluation.eval_period_iterations", _non_negative, "an int >= 0")
    _check(cfg, "checkpointing.period", _positive, "an int >= 1")
    _check(cfg, "checkpointing.max_to_keep", _positive, "an int >= 1")
    _check(cfg, "checkpointing.keep_every", _positive, "an int >= 1")


def validate_config(cfg: DictConfig) -> None:
    """Run every check on a merged, resolved config; raise ConfigError on the first problem."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(f"config key '{missing[0]}' is required (no default; a schedule needs start, peak and end)")
    _check_model_and_optim(cfg)
    _check_heads_and_losses(cfg)
    _check_crops(cfg)
    _check_dataset(cfg)
    _check_train_eval_ckpt(cfg)
    _check_addons(cfg)
    if cfg.schedules is None:
        _check_v1_schedules(cfg)
    else:
        _check_v2_schedules(cfg)

