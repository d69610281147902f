"""The typed configuration schema: every key of the official DINOv3 `ssl_default_config.yaml` (reference §7) with its
official default, the keys of the user's dino_bridge YAML, and a few of our own (each marked "ours" below).

Deviations from the official defaults (all documented on the field):
  MODEL.DEVICE "auto" (official "cuda", unused there), train.dataset_path "builtin:shapes" (official
  "ImageNet:split=TRAIN", which needs a root), train.output_dir "./outputs/default" (official ".").
Keys the official code ignores are kept (so official recipes load) and marked "U" (unused by the official code).
Nullable keys are Optional; `Any` is used only for int-or-list keys (crop sizes, ratios), validated in validate.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from dinobridge.config.addons import DataSourceConfig, DtchConfig, ResizeShuffleAugmentorConfig
from dinobridge.config.schedules import ScheduleConfig, SchedulesConfig

DEVICES = ("auto", "cpu", "cuda", "npu", "xpu", "mps")
CHECKPOINTING_POLICIES = ("official", "matmuls")  # train.checkpointing_policy (see distributed/parallelize.py)
COMPILE_SCOPES = ("auto", "blocks", "stack")  # train.compile_scope (see distributed/parallelize.py)


@dataclass
class ModelConfig:
    """`MODEL.*`. META_ARCHITECTURE: "SSLMetaArch" (DINOv3) | "SSLResizeShuffle" (with the add-ons of
    `resize_shuffle_augmentor`) | "MultiDistillationMetaArch".
    DEVICE: "auto" (cuda > npu > xpu > mps > cpu, whatever is available) | "cpu" | "cuda" | "npu" | "xpu" | "mps",
    optionally with an index ("cuda:1"). Official default "cuda" (unused there); ours "auto".
    WEIGHTS: only used by the official broken --eval-only path. DTYPE: U."""

    META_ARCHITECTURE: str = "SSLMetaArch"
    DEVICE: str = "auto"
    WEIGHTS: str = ""
    DTYPE: str = "float32"


@dataclass
class ComputePrecisionConfig:
    """param_dtype: compute/collate dtype ("fp32" | "fp16" | "bf16"); reduce_dtype: gradient-reduction dtype;
    sharding_strategy: official asserts "SHARD_GRAD_OP" (also accepted: "FULL_SHARD", "NO_SHARD")."""

    param_dtype: str = "bf16"
    reduce_dtype: str = "fp32"
    sharding_strategy: str = "SHARD_GRAD_OP"


@dataclass
class DinoConfig:
    """DINO (CLS) loss, head and KoLeo.

    KoLeo weights: the CLS KoLeo weight is `koleo_cls_loss_weight` when it is set (user's key), else the official
    `koleo_loss_weight`. `koleo_patch_loss_weight` (user's key, default 0 = off) weights a KoLeo term on patch tokens.
    Gates (user's keys, default off): with `koleo_{cls,patch}_gate_enabled` the per-sample KoLeo terms l_i are
    weighted by g_i = sigmoid((l_i - threshold) / 0.1) and reduced as 0.5 * mean(l*g) + 0.5 * sum(l*g) / max(sum g, 1)
    (the public dino_bridge formula); threshold = `koleo_{cls,patch}_gate_threshold`.
    `koleo_distributed_loss_group_size`: null = the global batch. `koleo_distributed_replicas` must be 0 and
    `koleo_topk` must be 1 unless `koleo_loss_distributed` (official asserts). `head_norm_last_layer` (logged only by
    the official code) is honoured: true L2-normalises the prototype rows (DINOv1/v2 head, cosine logits).
    `koleo_distributed_loss_group_data`, `force_weight_norm`: U.
    `reweight_dino_local_loss`: weight the local-crop DINO loss by `local_loss_weight_schedule`.
    """

    loss_weight: float = 1.0
    global_ignore_diagonal: bool = True
    head_n_prototypes: int = 65536
    head_bottleneck_dim: int = 256
    head_norm_last_layer: bool = False
    head_nlayers: int = 3
    head_hidden_dim: int = 2048
    koleo_loss_weight: float = 0.1
    koleo_loss_distributed: bool = False
    koleo_topk: int = 1
    koleo_distributed_replicas: int = 0
    koleo_distributed_loss_group_size: Optional[int] = None
    koleo_distributed_loss_group_data: bool = True
    force_weight_norm: bool = False
    reweight_dino_local_loss: bool = False
    local_loss_weight_schedule: ScheduleConfig = field(
        default_factory=lambda: ScheduleConfig(start=0.5, peak=0.5, end=0.5, warmup_epochs=0.0)
    )
    # user's dino_bridge keys
    koleo_cls_loss_weight: Optional[float] = None
    koleo_patch_loss_weight: float = 0.0
    koleo_cls_gate_enabled: bool = False
    koleo_patch_gate_enabled: bool = False
    koleo_cls_gate_threshold: float = 0.0
    koleo_patch_gate_threshold: float = 0.0


def effective_koleo_cls_weight(dino: Any) -> float:
    """The CLS KoLeo weight actually used (`dino` = the `dino` section): `koleo_cls_loss_weight` if set, else the
    official `koleo_loss_weight`."""
    return float(dino.koleo_loss_weight if dino.koleo_cls_loss_weight is None else dino.koleo_cls_loss_weight)


@dataclass
class IbotConfig:
    """iBOT masked-patch loss and head. mask_ratio_min_max: 0 <= min < max <= 1. separate_head must be true
    (official asserts). head_norm_last_layer: as dino.head_norm_last_layer. force_masking_even_with_zero_weight: U."""

    loss_weight: float = 1.0
    mask_sample_probability: float = 0.5
    mask_ratio_min_max: List[float] = field(default_factory=lambda: [0.1, 0.5])
    mask_random_circular_shift: bool = False
    force_masking_even_with_zero_weight: bool = False
    separate_head: bool = True
    head_n_prototypes: int = 65536
    head_bottleneck_dim: int = 256
    head_norm_last_layer: bool = False
    head_nlayers: int = 3
    head_hidden_dim: int = 2048


@dataclass
class GramConfig:
    """Gram anchoring (reference §3.6). ckpt: `.pth` with a "teacher" key or a DCP dir; tokens_used: "all" | "masked"
    | "unmasked"; loss_weight_schedule: null = constant `loss_weight`."""

    use_loss: bool = False
    compute_stats: bool = False
    loss_weight: float = 1.0
    ema_teacher: bool = False
    ckpt: Optional[str] = None
    it_load_ema_teacher: int = -1
    rep_update: bool = True
    update_frequency: int = 50000
    it_first_update: int = 0
    max_updates: Optional[int] = None
    normalized: bool = True
    img_level: bool = False
    remove_neg: bool = False
    remove_only_teacher_neg: bool = False
    tokens_used: str = "all"
    global_teacher_resize_method: str = "bicubic"
    global_teacher_resize_antialias: bool = False
    loss_weight_schedule: Optional[ScheduleConfig] = None


@dataclass
class TrainConfig:
    """Training loop and data.

    dataset_path (official key; our default "builtin:shapes"; null = use the `data:` mapping). Forms:
      "builtin:shapes"                the built-in offline procedural dataset (no files needed)
      "ImageFolder:root=DIR"          every image under DIR (recursive)
      "TxtList:path=FILE"             one image path per line (relative to FILE's folder)
      "ImageNet:split=TRAIN:root=DIR" the official form: an ImageFolder over DIR/train (VAL -> DIR/val);
                                      `extra=` is accepted and ignored. See dinobridge.config.dataset_spec.
    output_dir: run directory (ours: default "./outputs/default"; official "."; --output-dir overrides it). The
      launcher's default is ./outputs/<preset name>.
    seed: seed of every random draw (data order, crops, masks, init). num_workers: DataLoader workers per process.
    OFFICIAL_EPOCH_LENGTH: iterations per "epoch" (the unit of every *_epochs key).
    checkpointing / checkpointing_full: activation checkpointing (selective / full). compile: torch.compile (skipped
      where unsupported). checkpointing_policy (ours): what selective checkpointing keeps: "official" (DINOv3's
      list: mm, scaled_mm, SDPA, reduce-scatter outputs) or "matmuls" (also addmm / bmm: faster, ~3x the memory).
      cache_dataset: official sampler switch (true -> sharded infinite sampler).
    reshuffle_sampler_perm (user's key): draw a new permutation of the dataset at every pass (true, the official
      behaviour) or reuse the first one (false).
    cudagraphs: CUDA graphs for the compiled blocks (one CUDA process without activation checkpointing; skipped
      with a log line otherwise; the step's variants (student crops, teacher no-grad) each compile and record once;
      evaluations and monitors run the blocks eagerly). compile_scope (ours): what one compiled graph covers:
      "blocks" (one per transformer block, as the official code; FSDP2 needs it), "stack" (all blocks as one graph:
      one call per forward instead of one per block, fewer host launches, longer compilation) or "auto" (stack
      where CUDA graphs apply, else blocks). saveckp_freq: keep a checkpoint every that many epochs.
    U (accepted, unused): data_config, monitor_gradient_norm, chunk_schedule, use_teacher_head,
      learn_from_teacher_tokens, sharded_eval_checkpoint, cell_augmentation, cell_augmentation_type.
    Ours: max_iter (null = optim.epochs * OFFICIAL_EPOCH_LENGTH; when set, training stops there but schedules keep
      their length), log_period (iterations between log lines), tensorboard, deterministic (deterministic kernels),
      nan_max_consecutive (abort after this many consecutive non-finite losses; each one skips its step),
      progress_bar, resume (resume from the latest checkpoint in the run directory; `--no-resume` sets it false).
    """

    batch_size_per_gpu: int = 64
    dataset_path: Optional[str] = "builtin:shapes"
    data_config: Any = None
    output_dir: str = "./outputs/default"
    saveckp_freq: int = 20
    seed: int = 0
    num_workers: int = 10
    OFFICIAL_EPOCH_LENGTH: int = 1250
    monitor_gradient_norm: bool = False
    chunk_schedule: List[Any] = field(default_factory=list)
    use_teacher_head: bool = True
    learn_from_teacher_tokens: bool = False
    centering: str = "sinkhorn_knopp"
    checkpointing: bool = False
    checkpointing_full: bool = False
    checkpointing_policy: str = "official"
    compile: bool = True
    cudagraphs: bool = False
    compile_scope: str = "auto"
    sharded_eval_checkpoint: bool = False
    cache_dataset: bool = False
    # keys of official recipes / the user's YAML that are not in the official default file
    reshuffle_sampler_perm: bool = True
    cell_augmentation: bool = False
    cell_augmentation_type: str = "hpa"
    # ours
    max_iter: Optional[int] = None
    log_period: int = 10
    tensorboard: bool = True
    deterministic: bool = False
    nan_max_consecutive: int = 2
    progress_bar: bool = True
    resume: bool = True


@dataclass
class StudentConfig:
    """Backbone. arch: a preset of dinobridge.models (vit_test, vit_pico, vit_tiny, vit_small, vit_base, vit_large,
    ..., vit_7b). ffn_layer: "mlp" | "swiglu" | "swiglu32" | "swiglu64" | "swiglu128". norm_layer: "layernorm" (eps
    1e-6) | "layernormbf16" (eps 1e-5) | "rmsnorm". layerscale: init value, null = no LayerScale.
    pos_embed_rope_normalize_coords: "min" | "max" | "separate". pos_embed_rope_rescale_coords: released models use 2.
    Unlike the official trainer, dinobridge honours ffn_ratio (4.0, the official default, means "the preset's ratio" for
    vit_so400m and vit_7b), in_chans, pos_embed_rope_dtype and patch_drop (train-time patch-token dropout of inputs
    without iBOT masks, i.e. the local crops). pos_embed_type is always rope for training."""

    arch: str = "vit_large"
    patch_size: int = 16
    drop_path_rate: float = 0.3
    layerscale: Optional[float] = 1.0e-05
    patch_drop: float = 0.0
    pretrained_weights: str = ""
    ffn_layer: str = "mlp"
    ffn_ratio: float = 4.0
    resume_from_teacher_chkpt: str = ""
    qkv_bias: bool = True
    proj_bias: bool = True
    ffn_bias: bool = True
    norm_layer: str = "layernorm"
    n_storage_tokens: int = 0
    mask_k_bias: bool = False
    untie_cls_and_patch_norms: bool = False
    untie_global_and_local_cls_norm: bool = False
    in_chans: int = 3
    pos_embed_type: str = "rope"
    pos_embed_rope_base: Optional[float] = 100.0
    pos_embed_rope_min_period: Optional[float] = None
    pos_embed_rope_max_period: Optional[float] = None
    pos_embed_rope_normalize_coords: str = "separate"
    pos_embed_rope_shift_coords: Optional[float] = None
    pos_embed_rope_jitter_coords: Optional[float] = None
    pos_embed_rope_rescale_coords: Optional[float] = None
    pos_embed_rope_dtype: str = "bf16"
    fp8_enabled: bool = False
    fp8_filter: str = "blocks"


@dataclass
class TeacherConfig:
    """EMA teacher (v1 schedules; ignored and nullable when `schedules` is set): momentum cosine
    momentum_teacher -> final_momentum_teacher; temperature linear warmup_teacher_temp -> teacher_temp over
    warmup_teacher_temp_epochs, then constant. in_chans: U."""

    momentum_teacher: Optional[float] = 0.992
    final_momentum_teacher: Optional[float] = 1.0
    warmup_teacher_temp: Optional[float] = 0.04
    teacher_temp: Optional[float] = 0.07
    warmup_teacher_temp_epochs: Optional[float] = 30.0
    in_chans: int = 3


@dataclass
class DistillationConfig:
    """Single-teacher distillation. checkpoint_path "ignore" = random teacher (testing)."""

    enabled: bool = False
    full_cfg_path: str = ""
    checkpoint_path: str = ""


@dataclass
class MultiDistillationConfig:
    """Multi-student distillation; `global_batch_size` and `students` only appear in official recipes."""

    enabled: bool = False
    global_batch_size: Optional[int] = None
    students: List[Any] = field(default_factory=list)


@dataclass
class HrftConfig:
    """High-resolution fine-tuning switch (U)."""

    enabled: bool = False
    checkpoint_path: str = ""


@dataclass
class OptimConfig:
    """AdamW and v1 schedules (the v1 keys may be null when `schedules` is set).

    lr is scaled at build time by scaling_rule: "sqrt_wrt_1024" (lr * 4 * sqrt(B_global / 1024)) | "linear_wrt_256"
    (lr * B_global / 256) | "none" (min_lr is never scaled in v1). Weight decay: cosine weight_decay ->
    weight_decay_end. clip_grad: per-submodule max grad norm, null or 0 = off. layerwise_decay: lr decay per block
    from the top. freeze_last_layer_epochs: heads' last layer frozen that long. schedule_trunc_extra: official
    truncated-cosine extension (null/0 = off). dino_head_lr_multiplier (user's key; official behaves as 1.0) and
    dino_head_wd_multiplier scale the lr / wd of the DINO head. optimizer, dump_fsdp_weights_path: U.
    """

    epochs: int = 100
    optimizer: str = "adamw"
    weight_decay: Optional[float] = 0.04
    weight_decay_end: Optional[float] = 0.4
    lr: Optional[float] = 0.001
    warmup_epochs: Optional[float] = 10.0
    min_lr: Optional[float] = 1.0e-06
    schedule_trunc_extra: Optional[float] = 0.0
    clip_grad: Optional[float] = 3.0
    freeze_last_layer_epochs: Optional[float] = 1.0
    scaling_rule: str = "sqrt_wrt_1024"
    patch_embed_lr_mult: float = 0.2
    dino_head_wd_multiplier: float = 1.0
    dino_head_lr_multiplier: float = 1.0
    layerwise_decay: float = 0.9
    multi_tensor_optim: bool = True
    dump_fsdp_weights_path: str = ""
    adamw_beta1: float = 0.9
    adamw_beta2: float = 0.999


@dataclass
class CropsConfig:
    """Multi-crop augmentation (reference §5.1). global_crops_size / local_crops_size: an int, or a list for
    multi-resolution training (one entry per resolution, chosen per batch with global_local_crop_pairs_ratios, a
    float or a list of the same length); sizes must be multiples of student.patch_size. local_crops_number >= 0 (the
    official code asserts > 0; with 0 the DINO loss uses the global crops only). gram_teacher_crops_size: null | int |
    list. teacher_to_student_resolution_scale: only changes the mask grid size.
    use_resize_shuffle_augmentor (user's key): make the auxiliary views of `resize_shuffle_augmentor`.
    resize_shuffle_augmentor_switch (user's key): must be null (in the public code a runtime object, never set from
    YAML). gpu_augmentation (ours): the loader workers still decode, crop, resize, flip and draw every random
    parameter (the same draws, so the same random stream and exact resume), but colour jitter, grayscale, blur,
    solarize and normalisation run batched on the accelerator (dinobridge.data.gpu_augmentation; same results as
    the CPU path up to float rounding); share_color_jitter stays in the workers. gpu_crops (ours; needs
    gpu_augmentation, refuses localcrops_subset_of_globalcrops): the workers only decode and draw (same draws) and
    ship whole uint8 images with the crop boxes; the accelerator crops, resizes and flips (dinobridge.data.gpu_crops;
    equal to the CPU crops up to +-1 in uint8). Batch memory grows with the image size: meant for small images.
    """

    global_crops_scale: List[float] = field(default_factory=lambda: [0.32, 1.0])
    local_crops_number: int = 8
    local_crops_scale: List[float] = field(default_factory=lambda: [0.05, 0.32])
    global_crops_size: Any = 224
    local_crops_size: Any = 96
    global_local_crop_pairs_ratios: Any = 1.0
    gram_teacher_crops_size: Any = None
    localcrops_subset_of_globalcrops: bool = False
    share_color_jitter: bool = False
    horizontal_flips: bool = True
    gram_teacher_no_distortions: bool = False
    rgb_mean: List[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    rgb_std: List[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    teacher_to_student_resolution_scale: float = 1.0
    use_resize_shuffle_augmentor: bool = False
    resize_shuffle_augmentor_switch: Any = None
    gpu_augmentation: bool = False
    gpu_crops: bool = False
    # photometric settings (ours; official values hard-coded in its DataAugmentationDINO). Blur probabilities are the
    # EFFECTIVE official ones: the official wrapper passes 1 - p, so its nominal 1.0 / 0.1 / 0.5 act as 0.0 / 0.9 / 0.5.
    color_jitter_prob: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    grayscale_prob: float = 0.2
    global_crop_1_blur_prob: float = 0.0
    global_crop_2_blur_prob: float = 0.9
    local_crops_blur_prob: float = 0.5
    global_crop_2_solarize_prob: float = 0.2


@dataclass
class EvalConfigFilesConfig:
    """`evaluation.config_files` (U)."""

    high_freq: str = "benchmark_high_frequency.yaml"
    low_freq: str = "benchmark_low_frequency.yaml"


@dataclass
class EvaluationConfig:
    """eval_period_iterations: period of teacher dumps (official). low_freq_every, config_files: U.
    Ours (online k-NN monitor): knn_period (iterations, 0 = off), knn_train / knn_val (dataset strings as
    train.dataset_path; null = the built-in train/val splits when the training data is built-in), knn_k (list of k),
    knn_temperature, knn_at_end (also evaluate once after the last iteration), knn_train_size / knn_val_size (images
    of the built-in splits).
    Ours (online linear probe, dinobridge.train.online_eval): linear_period (iterations, 0 = off) trains linear
    classifiers on the kNN train data's features (CLS and CLS + mean patch token) for linear_epochs epochs, one per
    learning rate of linear_lrs, and reports the best top-1 on the kNN val data.
    Ours (pictures to tensorboard): picture_period (iterations, 0 = off) writes, for a fixed set of picture_images
    images of the kNN val data (one per class first), the PCA map of the patch features and the last block's CLS
    attention."""

    eval_period_iterations: int = 12500
    low_freq_every: int = 5
    config_files: EvalConfigFilesConfig = field(default_factory=EvalConfigFilesConfig)
    knn_period: int = 0
    knn_train: Optional[str] = None
    knn_val: Optional[str] = None
    knn_k: List[int] = field(default_factory=lambda: [20, 200])
    knn_temperature: float = 0.07
    knn_at_end: bool = True
    knn_train_size: int = 2000  # images of the built-in train / val splits used for kNN
    knn_val_size: int = 1000
    linear_period: int = 0
    linear_lrs: List[float] = field(default_factory=lambda: [0.01, 0.1, 1.0, 10.0])
    linear_epochs: int = 10
    picture_period: int = 0
    picture_images: int = 4


@dataclass
class CheckpointingConfig:
    """Checkpoints (iterations): save every `period`, keep the last `max_to_keep` and every `keep_every`-th.
    save_student (user's key): also store the student (true, official) or only the teacher (false; such checkpoints
    cannot resume training). dir (ours): null = <train.output_dir>/ckpt (set by `--checkpoint_dir`)."""

    period: int = 3750
    max_to_keep: int = 3
    keep_every: int = 99999999999999999
    save_student: bool = True
    dir: Optional[str] = None


@dataclass
class Config:
    """The whole configuration. Section names are the official ones; `schedules` null = v1 schedules."""

    MODEL: ModelConfig = field(default_factory=ModelConfig)
    compute_precision: ComputePrecisionConfig = field(default_factory=ComputePrecisionConfig)
    dino: DinoConfig = field(default_factory=DinoConfig)
    ibot: IbotConfig = field(default_factory=IbotConfig)
    gram: GramConfig = field(default_factory=GramConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    distillation: DistillationConfig = field(default_factory=DistillationConfig)
    multidistillation: MultiDistillationConfig = field(default_factory=MultiDistillationConfig)
    hrft: HrftConfig = field(default_factory=HrftConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    crops: CropsConfig = field(default_factory=CropsConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    checkpointing: CheckpointingConfig = field(default_factory=CheckpointingConfig)
    schedules: Optional[SchedulesConfig] = None
    data: Dict[str, DataSourceConfig] = field(default_factory=dict)
    resize_shuffle_augmentor: ResizeShuffleAugmentorConfig = field(default_factory=ResizeShuffleAugmentorConfig)
    dtch: DtchConfig = field(default_factory=DtchConfig)
