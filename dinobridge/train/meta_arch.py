"""SSLMetaArch: student and EMA teacher (backbone + DINO head + iBOT head), teacher targets, objectives.

One step, top to bottom (`forward`):
  teacher (no grad, eval) on the global crops -> DINO head on CLS, iBOT head on the patches the student sees masked
  -> balancer (Sinkhorn-Knopp | softmax centering | DTCH) -> targets
  student on [global crops (masked) + add-on views, local crops] in one call -> DINO head on every CLS, iBOT head on
  masked patches -> objectives (DINO, iBOT, KoLeo, Gram, add-ons) -> weighted sum
The train loop does backward, clipping, the optimizer step and the EMA update (`update_teacher`).

`MODEL.META_ARCHITECTURE: SSLResizeShuffle` is this same class with the add-on objectives of
`resize_shuffle_augmentor` registered (Crop-Resize, PatchRoll, bridge; reference addons_and_devices.md §2.2-2.5).
An add-on is registered only if its weight schedule is ever > 0; the views (Crop-Resize, PatchRoll) exist only with
`crops.use_resize_shuffle_augmentor: true`. Each add-on may add one view of global-crop size, made on the device
from the global crops of the batch and concatenated with them in the student call (no extra teacher forward); an
add-on whose weight is 0 at an iteration adds nothing that iteration. The bridge module is `student["bridge"]`
(trained by the optimizer, no teacher copy, skipped by the EMA).
"""

from __future__ import annotations

import logging
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

from dinobridge.balancing import build_balancer
from dinobridge.errors import ConfigError
from dinobridge.models import ARCHS, build_vit, load_pretrained
from dinobridge.models.checkpoint import extract_backbone_state_dict, load_state_dict_file
from dinobridge.models.heads import DINOHead
from dinobridge.objectives import (
    AddonObjective,
    BridgeObjective,
    CropResizeObjective,
    DINOObjective,
    GramObjective,
    IBOTObjective,
    KoLeoObjective,
    PatchBridge,
    PatchRollObjective,
    SSLStep,
    ViewContext,
    ViewRequest,
    view_generator,
)
from dinobridge.train.monitors import target_stats
from dinobridge.train.schedules import ADDON_WEIGHT_KEYS, build_weight_schedule

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


def _rows(out: dict[str, Any], start: int, stop: int) -> dict[str, Any]:
    """Rows [start, stop) of every tensor of a backbone output dict (views, no copy)."""
    return {k: (v[start:stop] if torch.is_tensor(v) and v.ndim > 0 else v) for k, v in out.items()}


class SSLMetaArch(nn.Module):
    """DINOv3 self-supervised learning: student, EMA teacher, balancers and objectives (+ the ResizeShuffle add-ons).

    `forward(batch, teacher_temp, iteration, epoch, extras)` -> (loss, logs); the caller runs backward.
    Build it anywhere (also under `torch.device("meta")`), move it, then call `init_weights()`.
    `resize_shuffle`: register the add-on objectives; None = `MODEL.META_ARCHITECTURE == "SSLResizeShuffle"`.
    """

    def __init__(self, cfg: Any, resize_shuffle: Optional[bool] = None) -> None:
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
        self._ema_pairs: Optional[tuple[list[Tensor], list[Tensor]]] = None  # update_teacher's cache
        if resize_shuffle is None:
            resize_shuffle = cfg.get("MODEL") is not None and cfg.MODEL.get("META_ARCHITECTURE") == "SSLResizeShuffle"
        self._register_addons(cfg, bool(resize_shuffle))

    def _register_addons(self, cfg: Any, enabled: bool) -> None:
        """Crop-Resize / PatchRoll / bridge objectives whose weight schedule is ever > 0 (reference §2.5)."""
        rs = cfg.get("resize_shuffle_augmentor")
        if rs is None:
            return
        epoch_len = int(cfg.train.OFFICIAL_EPOCH_LENGTH)
        total = int(cfg.optim.epochs) * epoch_len
        scheds = {k: build_weight_schedule(rs[k], epoch_len, total, f"resize_shuffle_augmentor.{k}")
                  for k in ADDON_WEIGHT_KEYS if rs.get(k) is not None}
        on = {k: k in scheds and scheds[k].max() > 0 for k in ADDON_WEIGHT_KEYS}
        if not any(on.values()):
            return
        if not enabled:
            log.warning("resize_shuffle_augmentor weights are > 0 but MODEL.META_ARCHITECTURE=%s: the add-on losses "
                        "are off (use SSLResizeShuffle)", cfg.MODEL.META_ARCHITECTURE)
            return
        rp, ps, bp, bg = ("resize_paste_loss_weight", "patch_shuffle_loss_weight", "bridge_patchshuffle_weight",
                          "bridge_global_weight")
        views = bool(cfg.crops.get("use_resize_shuffle_augmentor", False))
        if not views and (on[rp] or on[ps] or on[bp]):
            log.warning("crops.use_resize_shuffle_augmentor=false: no Crop-Resize / PatchRoll views, so "
                        "resize_paste_loss_weight, patch_shuffle_loss_weight and bridge_patchshuffle_weight are off")
        if rs.get("bridge_direction", "patch_to_cls") != "patch_to_cls" or rs.get("bridge_teacher_ema", False):
            raise ConfigError("resize_shuffle_augmentor.bridge_direction: only 'patch_to_cls' (with "
                              "bridge_teacher_ema=false) is implemented")
        patch = int(rs.get("patch_size") or cfg.student.patch_size)
        seed = int(cfg.train.seed)
        crops = cfg.crops
        try:
            if views and on[rp]:
                self.objectives["resize_paste"] = CropResizeObjective(
                    rs, scheds[rp], seed, patch, tuple(crops.rgb_mean), tuple(crops.rgb_std))
            if views and (on[ps] or on[bp]):
                self.objectives["patch_roll"] = PatchRollObjective(
                    rs, {k: scheds[k] for k in (ps, bp) if on[k]}, seed, patch,
                    mask_circular_shift=bool(cfg.ibot.get("mask_random_circular_shift", False)))
            bridge_keys = [k for k in (bg, bp) if on[k] and (k == bg or views)]
            if bridge_keys:
                grid = int(crops.global_crops_size) // patch
                with torch.random.fork_rng(devices=[]):  # construction-time init draws are discarded (init_weights)
                    self.student["bridge"] = PatchBridge(
                        self.student.backbone.embed_dim, str(rs.get("bridge_pool", "attn")),
                        rs.get("bridge_hidden_dim"), grid=(grid, grid))
                gate = rs.get("bridge_gate_ibot_loss_below")
                if gate is not None and "ibot" not in self.objectives:
                    raise ConfigError("resize_shuffle_augmentor.bridge_gate_ibot_loss_below: needs the iBOT loss "
                                      "(ibot.loss_weight > 0) or null")
                self.objectives["bridge"] = BridgeObjective({k: scheds[k] for k in bridge_keys}, patch, gate)
        except ValueError as e:
            raise ConfigError(f"resize_shuffle_augmentor: {e}") from None

    # ------------------------------------------------------------------ init
    @torch.no_grad()
    def init_weights(self) -> None:
        """Official init of the student, optional pretrained weights, then teacher = student."""
        self.student.backbone.init_weights()
        self.student.dino_head.init_weights()
        self.student.ibot_head.init_weights()
        if "bridge" in self.student:  # own generator: the add-on leaves the global RNG stream as it was
            self.student.bridge.init_weights(view_generator(int(self.cfg.train.seed), 0, 0, "bridge_init"))
        for m in (self.dino_balancer, self.ibot_balancer):
            for b in m.buffers():
                b.zero_()
        s = self.cfg.student
        if s.get("pretrained_weights"):
            load_pretrained(self.student.backbone, s.pretrained_weights)
            log.info("student backbone initialised from %s", s.pretrained_weights)
        if s.get("resume_from_teacher_chkpt"):
            self._load_teacher_export(s.resume_from_teacher_chkpt)
        self.teacher.load_state_dict(self._student_shared().state_dict())
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
        step.terms = logs  # add-ons may read the terms of the objectives before them (bridge gate)
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
        requests = self._view_requests(g_crops, masks, n_global, B, iteration, extras)

        teacher_global, dino_targets, ibot_targets, view_targets = self._teacher_targets(
            g_crops, mask_indices, batch["n_masked_patches"], teacher_temp, n_global, B, requests)
        if self.gram_teacher is not None or "gram" in self.objectives:
            extras = dict(extras)
            extras["gram_teacher_patches"] = self._gram_patches(g_crops, teacher_global)

        # the add-on views join the global crops: one student call, same-size crops in one batch
        g_in, g_masks = g_crops, masks
        if requests:
            g_in = torch.cat([g_crops] + [r.images.to(g_crops.dtype) for r in requests.values()])
            g_masks = torch.cat([masks] + [masks.new_zeros((r.images.shape[0], masks.shape[1])) if r.masks is None
                                           else r.masks.to(masks.dtype) for r in requests.values()])
        inputs, input_masks = [g_in], [g_masks]
        if n_local:
            inputs.append(l_crops)
            input_masks.append(None)
        outs = self.student.backbone.forward_features(inputs, input_masks)
        s_all, s_local = outs[0], (outs[1] if n_local else None)
        s_global = _rows(s_all, 0, n_g_b) if requests else s_all
        views: dict[str, dict[str, Any]] = {}
        start = n_g_b
        for name, r in requests.items():
            n = r.images.shape[0]
            views[name] = {"request": r, "out": _rows(s_all, start, start + n), "dino": None, "ibot": None,
                           "ibot_targets": view_targets.get(name)}
            start += n

        # DINO head on every CLS (global, local, views that ask), iBOT head on masked + requested view patches
        cls_parts = [s_global["x_norm_clstoken"]] + ([s_local["x_norm_clstoken"]] if s_local is not None else [])
        cls_views = [name for name, r in requests.items() if r.dino_cls]
        cls_parts += [views[name]["out"]["x_norm_clstoken"] for name in cls_views]
        cls = cls_parts[0] if len(cls_parts) == 1 else torch.cat(cls_parts)
        logits = self.student.dino_head(cls)
        s_dino_global = logits[:n_g_b].view(n_global, B, -1)
        s_dino_local = logits[n_g_b:n_g_b + n_l_b].view(n_local, B, -1) if n_local else None
        start = n_g_b + n_l_b
        for name in cls_views:
            n = requests[name].images.shape[0]
            views[name]["dino"] = logits[start:start + n]
            start += n
        patch_parts, patch_views = [], []
        if ibot_targets is not None:
            patch_parts.append(s_global["x_norm_patchtokens"].flatten(0, 1)[mask_indices])
        for name, r in requests.items():
            if r.student_patches is not None:
                tokens = views[name]["out"]["x_norm_patchtokens"].flatten(0, 1)
                patch_parts.append(tokens[r.student_patches.to(tokens.device)])
                patch_views.append(name)
        s_ibot = None
        if patch_parts:
            ibot_logits = self.student.ibot_head(patch_parts[0] if len(patch_parts) == 1 else torch.cat(patch_parts))
            start = 0
            if ibot_targets is not None:
                start = patch_parts[0].shape[0]
                s_ibot = ibot_logits[:start]
            for name, part in zip(patch_views, patch_parts[len(patch_parts) - len(patch_views):]):
                views[name]["ibot"] = ibot_logits[start:start + part.shape[0]]
                start += part.shape[0]
        step = SSLStep(
            batch=batch, n_global=n_global, n_local=n_local, batch_size=B, student_global=s_global,
            student_local=s_local, student_dino_global=s_dino_global, student_dino_local=s_dino_local,
            student_ibot=s_ibot, teacher_global=teacher_global, dino_targets=dino_targets, ibot_targets=ibot_targets,
            teacher_temp=teacher_temp, iteration=iteration, epoch=epoch, extras=extras, views=views,
        )
        for objective in self.objectives.values():
            if isinstance(objective, AddonObjective):
                objective.student_forward(self.student, step)
        return step

    def _view_requests(self, g_crops: Tensor, masks: Tensor, n_global: int, B: int, iteration: int,
                       extras: dict[str, Any]) -> dict[str, ViewRequest]:
        """The add-ons' extra student views of this step ({} when no add-on is on)."""
        addons = [o for o in self.objectives.values() if isinstance(o, AddonObjective)]
        if not addons:
            return {}
        crops = self.cfg.crops
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        ctx = ViewContext(global_crops=g_crops, masks=masks, n_global=n_global, batch_size=B,
                          patch_size=int(self.student.backbone.patch_size), iteration=iteration, rank=rank,
                          mean=tuple(crops.rgb_mean), std=tuple(crops.rgb_std), extras=extras)
        requests = {}
        for o in addons:
            r = o.make_view(ctx)
            if r is not None:
                if r.images.shape[1:] != g_crops.shape[1:]:
                    raise ValueError(f"{o.name}: a view must have the global crops' shape {tuple(g_crops.shape[1:])}, "
                                     f"got {tuple(r.images.shape[1:])}")
                requests[o.name] = r
        return requests

    @torch.no_grad()
    def _teacher_targets(
        self, g_crops: Tensor, mask_indices: Tensor, n_masked: Tensor, teacher_temp: float, n_global: int, B: int,
        requests: Optional[dict[str, ViewRequest]] = None,
    ) -> tuple[dict[str, Any], Tensor, Optional[Tensor], dict[str, Tensor]]:
        t = self.teacher
        t.eval()
        out = t.backbone.forward_features(g_crops)
        dino_logits = t.dino_head(out["x_norm_clstoken"])
        dino_targets = self.dino_balancer(dino_logits, teacher_temp).view(n_global, B, -1)
        flat = out["x_norm_patchtokens"].flatten(0, 1)
        parts = [flat[mask_indices]] if "ibot" in self.objectives else []
        view_names = [n for n, r in (requests or {}).items() if r.teacher_patches is not None]
        parts += [flat[requests[n].teacher_patches.to(flat.device)] for n in view_names]
        ibot_targets, view_targets = None, {}
        if not parts:
            return out, dino_targets, ibot_targets, view_targets
        logits = t.ibot_head(parts[0] if len(parts) == 1 else torch.cat(parts))
        n_main = parts[0].shape[0] if "ibot" in self.objectives else 0
        start = n_main
        for name, part in zip(view_names, parts[len(parts) - len(view_names):]):
            m = part.shape[0]
            count = torch.full((), float(m), device=logits.device)
            # read-only: the view's targets see the same history as the iBOT targets and do not count in it
            view_targets[name] = self.ibot_balancer(logits[start:start + m], teacher_temp, n_samples=count,
                                                    update=False)
            start += m
        if "ibot" in self.objectives:
            ibot_targets = self.ibot_balancer(logits[:n_main], teacher_temp, n_samples=n_masked)
        return out, dino_targets, ibot_targets, view_targets

    @torch.no_grad()
    def _gram_patches(self, g_crops: Tensor, teacher_global: dict[str, Any]) -> Tensor:
        if self.gram_teacher is None:
            return teacher_global["x_norm_patchtokens"]
        self.gram_teacher.eval()
        return self.gram_teacher.forward_features(g_crops)["x_norm_patchtokens"]

    # ------------------------------------------------------------------ after the optimizer step
    @torch.no_grad()
    def update_teacher(self, momentum: float, apply: Optional[Tensor] = None) -> None:
        """EMA: teacher <- m * teacher + (1 - m) * student, over backbone and both heads (`ema_lerp_`; apply: a
        0-dim bool tensor, False leaves the teacher unchanged)."""
        from dinobridge.train.ema import ema_lerp_, ema_pairs

        first = next(self.teacher.parameters(), None)
        if self._ema_pairs is None or next(iter(self._ema_pairs[0]), None) is not first:
            # paired by name once; again if the parameters were replaced (FSDP2 sharding, a new submodule)
            self._ema_pairs = ema_pairs(self.teacher, self._student_shared())
        ema_lerp_(self._ema_pairs, momentum, apply)

    def _student_shared(self) -> nn.Module:
        """The student submodules that have a teacher copy (student-only add-ons such as the bridge left out)."""
        if set(self.student.keys()) == set(self.teacher.keys()):
            return self.student
        return nn.ModuleDict({k: self.student[k] for k in self.teacher.keys()})

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
    if name in ("SSLMetaArch", "SSLResizeShuffle"):  # one class; SSLResizeShuffle registers the add-on objectives
        return SSLMetaArch(cfg, resize_shuffle=name == "SSLResizeShuffle")
    raise ConfigError(f"MODEL.META_ARCHITECTURE: unknown {name!r}; expected SSLMetaArch or SSLResizeShuffle")
