"""SSLMetaArch: student and EMA teacher (backbone + DINO head + iBOT head), teacher targets, objectives.

One step, top to bottom (`forward`):
  teacher (no grad, eval) on the global crops -> DINO head on CLS, iBOT head on the patches the student sees masked
  -> balancer (Sinkhorn-Knopp | softmax centering | DTCH) -> targets
  student on [global crops (masked), local crops] in one call -> DINO head on every CLS, iBOT head on masked patches
  -> objectives (DINO, iBOT, KoLeo, Gram, add-ons) -> weighted sum
The train loop does backward, clipping, the optimizer step and the EMA update (`update_teacher`).
"""

from __future__ import annotations

import logging
from typing import Any, Optional

import torch
from torch import Tensor, nn

from dinobridge.balancing import build_balancer
from dinobridge.errors import ConfigError
from dinobridge.models import ARCHS, build_vit, load_pretrained
from dinobridge.models.checkpoint import extract_backbone_state_dict, load_state_dict_file
from dinobridge.models.heads import DINOHead
from dinobridge.objectives import DINOObjective, GramObjective, IBOTObjective, KoLeoObjective, SSLStep
from dinobridge.train.monitors import target_stats

log = logging.getLogger("dinobridge")

N_GLOBAL_CROPS = 2  # DINOv3 always uses two global crops

# student.* keys that are forwarded to the ViT as they are
_VIT_KEYS = (
    "patch_size", "in_chans", "ffn_layer", "qkv_bias", "proj_bias", "ffn_bias", "mask_k_bias", "norm_layer",
    "n_storage_tokens", "untie_cls_and_patch_norms", "untie_global_and_local_cls_norm", "pos_embed_rope_base",
    "pos_embed_rope_min_period", "pos_embed_rope_max_period", "pos_embed_rope_normalize_coords",
    "pos_embed_rope_shift_coords", "pos_embed_rope_jitter_coords", "pos_embed_rope_rescale_coords",
    "pos_embed_rope_dtype",
)


def build_backbone(student_cfg: Any, teacher: bool = False) -> nn.Module:
    """The ViT described by the `student:` config block (the teacher: no drop path, no patch drop)."""
    kwargs = {k: student_cfg[k] for k in _VIT_KEYS if k in student_cfg}
    ratio = student_cfg.get("ffn_ratio")
    preset_ratio = ARCHS.get(student_cfg.arch, {}).get("ffn_ratio", 4.0)
    if ratio is not None and not (float(ratio) == 4.0 and preset_ratio != 4.0):
        # the official default 4.0 counts as "unset" for presets with another ratio (vit_so400m, vit_7b)
        kwargs["ffn_ratio"] = float(ratio)
    kwargs["layerscale"] = student_cfg.get("layerscale")
    kwargs["drop_path_rate"] = 0.0 if teacher else float(student_cfg.get("drop_path_rate", 0.0))
    kwargs["patch_drop"] = 0.0 if teacher else float(student_cfg.get("patch_drop", 0.0) or 0.0)
    try:
        return build_vit(student_cfg.arch, **kwargs)
    except ValueError as e:  # an invalid student.* value
        raise ConfigError(f"student: {e}") from None


def _head(embed_dim: int, head_cfg: Any) -> DINOHead:
    return DINOHead(embed_dim, n_prototypes=head_cfg.head_n_prototypes, hidden_dim=head_cfg.head_hidden_dim,
                    bottleneck_dim=head_cfg.head_bottleneck_dim, nlayers=head_cfg.head_nlayers,
                    norm_last_layer=bool(head_cfg.get("head_norm_last_layer", False)))


def koleo_weights(dino_cfg: Any) -> tuple[float, float, Optional[float], Optional[float]]:
    """(cls weight, patch weight, cls gate threshold, patch gate threshold) from the official and user keys."""
    cls_w = dino_cfg.get("koleo_cls_loss_weight")
    cls_w = float(dino_cfg.koleo_loss_weight if cls_w is None else cls_w)
    patch_w = float(dino_cfg.get("koleo_patch_loss_weight") or 0.0)
    cls_gate = float(dino_cfg.koleo_cls_gate_threshold) if dino_cfg.get("koleo_cls_gate_enabled") else None
    patch_gate = float(dino_cfg.koleo_patch_gate_threshold) if dino_cfg.get("koleo_patch_gate_enabled") else None
    return cls_w, patch_w, cls_gate, patch_gate


class SSLMetaArch(nn.Module):
    """DINOv3 self-supervised learning: student, EMA teacher, balancers and objectives.

    `forward(batch, teacher_temp, iteration, epoch, extras)` -> (loss, logs); the caller runs backward.
    Build it anywhere (also under `torch.device("meta")`), move it, then call `init_weights()`.
    """

    def __init__(self, cfg: Any) -> None:
        super().__init__()
        self.cfg = cfg
        self.student = nn.ModuleDict({"backbone": build_backbone(cfg.student)})
        self.teacher = nn.ModuleDict({"backbone": build_backbone(cfg.student, teacher=True)})
        dim = self.student.backbone.embed_dim
        for side in (self.student, self.teacher):
            side["dino_head"] = _head(dim, cfg.dino)
            side["ibot_head"] = _head(dim, cfg.ibot)
        self.teacher.requires_grad_(False)

        use_dtch = bool(cfg.get("dtch") is not None and cfg.dtch.enabled)
        try:
            if use_dtch:  # DTCH-SK replaces train.centering's balancer for both targets (reference §2.1)
                from dinobridge.balancing import build_dtch_balancer

                self.dino_balancer = build_dtch_balancer(cfg.dtch, cfg.dino.head_n_prototypes, "cls")
                self.ibot_balancer = build_dtch_balancer(cfg.dtch, cfg.ibot.head_n_prototypes, "patch")
            else:
                self.dino_balancer = build_balancer(cfg.train.centering, n_prototypes=cfg.dino.head_n_prototypes)
                self.ibot_balancer = build_balancer(cfg.train.centering, n_prototypes=cfg.ibot.head_n_prototypes)
        except (KeyError, ValueError) as e:
            raise ConfigError(f"{'dtch' if use_dtch else 'train.centering'}: {e}") from None

        self.objectives = nn.ModuleDict()
        if cfg.dino.loss_weight:
            self.objectives["dino"] = DINOObjective(cfg.dino.loss_weight, cfg.dino.global_ignore_diagonal)
        if cfg.ibot.loss_weight:
            self.objectives["ibot"] = IBOTObjective(cfg.ibot.loss_weight)
        cls_w, patch_w, cls_gate, patch_gate = koleo_weights(cfg.dino)
        if cls_w or patch_w:
            self.objectives["koleo"] = KoLeoObjective(
                cls_w, patch_w, cls_gate, patch_gate, distributed=bool(cfg.dino.koleo_loss_distributed),
                topk=int(cfg.dino.koleo_topk), group_size=cfg.dino.get("koleo_distributed_loss_group_size"),
                seed=int(cfg.train.seed),
            )
        self.gram_teacher: Optional[nn.Module] = None
        if cfg.gram.use_loss:
            g = cfg.gram
            self.objectives["gram"] = GramObjective(
                g.loss_weight, g.tokens_used, apply_norm=g.normalized, img_level=g.img_level,
                remove_neg=g.remove_neg, remove_only_teacher_neg=g.remove_only_teacher_neg)
            if not g.ema_teacher:
                self.gram_teacher = build_backbone(cfg.student, teacher=True).requires_grad_(False)
        self.n_gram_updates = 0

    # ------------------------------------------------------------------ init
    @torch.no_grad()
    def init_weights(self) -> None:
        """Official init of the student, optional pretrained weights, then teacher = student."""
        self.student.backbone.init_weights()
        self.student.dino_head.init_weights()
        self.student.ibot_head.init_weights()
        for m in (self.dino_balancer, self.ibot_balancer):
            for b in m.buffers():
                b.zero_()
        s = self.cfg.student
        if s.get("pretrained_weights"):
            load_pretrained(self.student.backbone, s.pretrained_weights)
            log.info("student backbone initialised from %s", s.pretrained_weights)
        if s.get("resume_from_teacher_chkpt"):
            self._load_teacher_export(s.resume_from_teacher_chkpt)
        self.teacher.load_state_dict(self.student.state_dict())
        if self.gram_teacher is not None:
            if self.cfg.gram.get("ckpt"):
                load_pretrained(self.gram_teacher, self.cfg.gram.ckpt)
            else:
                self.gram_teacher.load_state_dict(self.teacher.backbone.state_dict())

    def _load_teacher_export(self, path: str) -> None:
        raw = load_state_dict_file(path)
        sd = raw.get("teacher", raw) if isinstance(raw.get("teacher", None), dict) else raw
        for name in ("dino_head", "ibot_head"):
            part = {k[len(name) + 1:]: v for k, v in sd.items() if k.startswith(name + ".")}
            if part:
                self.student[name].load_state_dict(part)
        self.student.backbone.load_state_dict(extract_backbone_state_dict(sd))
        log.info("student initialised from teacher checkpoint %s", path)

    # ------------------------------------------------------------------ step
    def forward(
        self,
        batch: dict[str, Any],
        teacher_temp: float,
        iteration: int = 0,
        epoch: float = 0.0,
        extras: Optional[dict[str, Any]] = None,
        monitors: bool = False,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """One step's weighted loss and logged terms; `monitors` adds the collapse statistics of the teacher targets
        (cheap, but not free at K = 65536, so the loop asks for them only on logging steps)."""
        step = self.compute_step(batch, teacher_temp, iteration, epoch, extras or {})
        total = step.student_dino_global.new_zeros((), dtype=torch.float32)
        logs: dict[str, Tensor] = {}
        for objective in self.objectives.values():
            loss, terms = objective(step)
            total = total + loss.float()
            logs.update(terms)
        logs["total_loss"] = total.detach()
        if monitors:
            logs.update(target_stats(step.dino_targets, "dino_target"))
            if step.ibot_targets is not None:
                logs.update(target_stats(step.ibot_targets, "ibot_target"))
        return total, logs

    def compute_step(
        self, batch: dict[str, Any], teacher_temp: float, iteration: int, epoch: float, extras: dict[str, Any]
    ) -> SSLStep:
        g_crops, l_crops = batch["global_crops"], batch.get("local_crops")
        n_g_b = g_crops.shape[0]
        n_l_b = 0 if l_crops is None else l_crops.shape[0]
        n_global = N_GLOBAL_CROPS
        B = n_g_b // n_global
        n_local = n_l_b // B if B else 0
        masks, mask_indices = batch["masks"], batch["mask_indices"]

        teacher_global, dino_targets, ibot_targets = self._teacher_targets(
            g_crops, mask_indices, batch["n_masked_patches"], teacher_temp, n_global, B)
        if self.gram_teacher is not None or "gram" in self.objectives:
            extras = dict(extras)
            extras["gram_teacher_patches"] = self._gram_patches(g_crops, teacher_global)

        inputs, input_masks = [g_crops], [masks]
        if n_local:
            inputs.append(l_crops)
            input_masks.append(None)
        outs = self.student.backbone.forward_features(inputs, input_masks)
        s_global, s_local = outs[0], (outs[1] if n_local else None)
        cls = s_global["x_norm_clstoken"] if s_local is None else torch.cat(
            (s_global["x_norm_clstoken"], s_local["x_norm_clstoken"]))
        logits = self.student.dino_head(cls)
        s_dino_global = logits[:n_g_b].view(n_global, B, -1)
        s_dino_local = logits[n_g_b:].view(n_local, B, -1) if n_local else None
        s_ibot = None
        if ibot_targets is not None:
            patches = s_global["x_norm_patchtokens"].flatten(0, 1)[mask_indices]
            s_ibot = self.student.ibot_head(patches)
        return SSLStep(
            batch=batch, n_global=n_global, n_local=n_local, batch_size=B, student_global=s_global,
            student_local=s_local, student_dino_global=s_dino_global, student_dino_local=s_dino_local,
            student_ibot=s_ibot, teacher_global=teacher_global, dino_targets=dino_targets, ibot_targets=ibot_targets,
            teacher_temp=teacher_temp, iteration=iteration, epoch=epoch, extras=extras,
        )

    @torch.no_grad()
    def _teacher_targets(
        self, g_crops: Tensor, mask_indices: Tensor, n_masked: Tensor, teacher_temp: float, n_global: int, B: int
    ) -> tuple[dict[str, Any], Tensor, Optional[Tensor]]:
        t = self.teacher
        t.eval()
        out = t.backbone.forward_features(g_crops)
        dino_logits = t.dino_head(out["x_norm_clstoken"])
        dino_targets = self.dino_balancer(dino_logits, teacher_temp).view(n_global, B, -1)
        ibot_targets = None
        if "ibot" in self.objectives:
            patches = out["x_norm_patchtokens"].flatten(0, 1)[mask_indices]
            ibot_logits = t.ibot_head(patches)
            ibot_targets = self.ibot_balancer(ibot_logits, teacher_temp, n_samples=n_masked)
        return out, dino_targets, ibot_targets

    @torch.no_grad()
    def _gram_patches(self, g_crops: Tensor, teacher_global: dict[str, Any]) -> Tensor:
        if self.gram_teacher is None:
            return teacher_global["x_norm_patchtokens"]
        self.gram_teacher.eval()
        return self.gram_teacher.forward_features(g_crops)["x_norm_patchtokens"]

    # ------------------------------------------------------------------ after the optimizer step
    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """EMA: teacher <- m * teacher + (1 - m) * student, over backbone and both heads."""
        from dinobridge.train.ema import ema_update

        ema_update(self.teacher, self.student, momentum)

    @torch.no_grad()
    def maybe_update_gram_teacher(self, iteration: int) -> bool:
        """Refresh the Gram teacher from the EMA teacher at `gram.it_load_ema_teacher` and then every
        `gram.update_frequency` iterations from `gram.it_first_update` (at most `gram.max_updates` times)."""
        if self.gram_teacher is None:
            return False
        g = self.cfg.gram
        due = iteration == g.it_load_ema_teacher
        if g.rep_update and iteration >= g.it_first_update and iteration > 0:
            due = due or (iteration - g.it_first_update) % g.update_frequency == 0
        if due and (g.max_updates is None or self.n_gram_updates < g.max_updates):
            self.gram_teacher.load_state_dict(self.teacher.backbone.state_dict())
            self.n_gram_updates += 1
            return True
        return False

    def teacher_export(self) -> dict[str, dict[str, Tensor]]:
        """{"teacher": {backbone.*, dino_head.*, ibot_head.*}}: the official teacher-checkpoint layout."""
        return {"teacher": {k: v.detach().cpu() for k, v in self.teacher.state_dict().items()}}


def build_meta_arch(cfg: Any) -> SSLMetaArch:
    """`MODEL.META_ARCHITECTURE` -> the meta-architecture."""
    name = cfg.MODEL.META_ARCHITECTURE
    if name == "SSLMetaArch":
        return SSLMetaArch(cfg)
    if name == "SSLResizeShuffle":
        raise ConfigError(
            "MODEL.META_ARCHITECTURE=SSLResizeShuffle: the ResizeShuffle add-ons are not available in this version; "
            "use MODEL.META_ARCHITECTURE=SSLMetaArch (and dtch.enabled=false)")
    raise ConfigError(f"MODEL.META_ARCHITECTURE: unknown {name!r}; expected SSLMetaArch or SSLResizeShuffle")
