"""Training checkpoints: atomic writes, retention, exact resume, teacher exports.

Layout under `<output_dir>`:
  ckpt/<iteration:08d>.pth          training state after `iteration` completed steps (latest = highest number)
  ckpt/<iteration:08d>_keep.pth     long-term copies (every `checkpointing.keep_every` iterations and every
                                    `train.saveckp_freq` epochs); never pruned
  eval/training_<it>/teacher_checkpoint.pth   {"teacher": {backbone.*, dino_head.*, ibot_head.*}} (official layout)
  teacher_backbone.pth              the final teacher backbone, flat official hub layout (`load_pretrained` reads both)

A file is written to `<name>.tmp` and renamed, so a kill mid-save never leaves a broken latest checkpoint.
State: model (student, teacher, balancers), optimizer, iteration, RNG states of every rank (python, numpy, torch,
accelerator), a fingerprint of the model-defining config (resuming with a different model is refused).
"""

from __future__ import annotations

import logging
import os
import random
import re
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist

from dinobridge.errors import UserError

log = logging.getLogger("dinobridge")

_CKPT = re.compile(r"^(\d{8})(_keep)?\.pth$")
# config sections whose values decide the shapes of the saved state
FINGERPRINT_KEYS = (
    "student.arch", "student.patch_size", "student.in_chans", "student.ffn_layer", "student.ffn_ratio",
    "student.n_storage_tokens", "student.qkv_bias", "student.proj_bias", "student.ffn_bias", "student.mask_k_bias",
    "student.norm_layer", "student.layerscale", "student.untie_cls_and_patch_norms",
    "student.untie_global_and_local_cls_norm", "dino.head_n_prototypes", "dino.head_hidden_dim",
    "dino.head_bottleneck_dim", "dino.head_nlayers", "ibot.head_n_prototypes", "ibot.head_hidden_dim",
    "ibot.head_bottleneck_dim", "ibot.head_nlayers", "train.centering", "MODEL.META_ARCHITECTURE",
)


def config_fingerprint(cfg: Any) -> dict[str, Any]:
    out = {}
    for key in FINGERPRINT_KEYS:
        node = cfg
        for part in key.split("."):
            node = node.get(part) if node is not None and hasattr(node, "get") else None
        out[key] = node
    return out


def atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _gather_rng() -> list[dict[str, Any]]:
    if dist.is_available() and dist.is_initialized():
        states: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(states, rng_state())
        return states
    return [rng_state()]


class Checkpointer:
    """Saves and restores the training state in `directory` (`checkpointing.dir`, default `<output_dir>/ckpt`);
    rank 0 writes, every rank reads."""

    def __init__(self, directory: str | os.PathLike, max_to_keep: int = 3, keep_every: Optional[int] = None,
                 rank: int = 0, world_size: int = 1) -> None:
        self.dir = Path(directory)
        self.max_to_keep = max(int(max_to_keep), 1)
        self.keep_every = keep_every
        self.rank, self.world_size = rank, world_size

    # ------------------------------------------------------------------ listing
    def checkpoints(self) -> list[tuple[int, Path]]:
        """Regular checkpoints (iteration, path), oldest first."""
        if not self.dir.is_dir():
            return []
        found = []
        for p in self.dir.iterdir():
            m = _CKPT.match(p.name)
            if m and not m.group(2):
                found.append((int(m.group(1)), p))
        return sorted(found)

    def latest(self) -> Optional[Path]:
        found = self.checkpoints()
        return found[-1][1] if found else None

    # ------------------------------------------------------------------ save
    def save(self, iteration: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer, cfg: Any,
             keep: bool = False, save_student: bool = True, extra: Optional[dict[str, Any]] = None) -> Optional[Path]:
        """Write the state after `iteration` completed steps (collective: every rank must call it)."""
        rngs = _gather_rng()
        if self.rank != 0:
            return None
        self.dir.mkdir(parents=True, exist_ok=True)
        model_state = model.state_dict()
        if not save_student:
            model_state = {k: v for k, v in model_state.items() if not k.startswith("student.")}
        state = {
            "iteration": iteration,
            "model": model_state,
            "optimizer": optimizer.state_dict(),
            "rng": rngs,
            "world_size": self.world_size,
            "fingerprint": config_fingerprint(cfg),
            "extra": extra or {},
        }
        path = self.dir / f"{iteration:08d}.pth"
        atomic_save(state, path)
        if keep:
            keep_path = self.dir / f"{iteration:08d}_keep.pth"
            try:
                os.link(path, keep_path)  # hard link: no extra space
            except OSError:
                atomic_save(state, keep_path)
        self._prune()
        return path

    def _prune(self) -> None:
        found = self.checkpoints()
        for _, p in found[: max(len(found) - self.max_to_keep, 0)]:
            p.unlink(missing_ok=True)

    # ------------------------------------------------------------------ load
    def load(self, model: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer], cfg: Any,
             path: Optional[Path] = None) -> Optional[dict[str, Any]]:
        """Restore the latest (or given) checkpoint; returns its dict (with "iteration") or None when there is none.

        A checkpoint that cannot be read is skipped for the one before it (with a warning). A checkpoint made with a
        different model configuration raises UserError naming the differing keys.
        """
        candidates = [path] if path is not None else [p for _, p in reversed(self.checkpoints())]
        for p in candidates:
            try:
                state = torch.load(p, map_location="cpu", weights_only=False)
            except Exception as e:  # truncated or corrupt file
                log.warning("checkpoint %s is unreadable (%s: %s); trying the previous one", p, type(e).__name__, e)
                continue
            self._check_fingerprint(state, cfg, p)
            model_state = state["model"]
            missing_student = not any(k.startswith("student.") for k in model_state)
            if missing_student:  # checkpointing.save_student = false: student restarts from the teacher
                model_state = dict(model_state)
                for k, v in list(model_state.items()):
                    if k.startswith("teacher."):
                        model_state["student." + k[len("teacher."):]] = v
                log.warning("%s has no student weights (checkpointing.save_student=false): the student restarts "
                            "from the teacher, so this resume is not exact", p)
            model.load_state_dict(model_state)
            if optimizer is not None and not missing_student:
                optimizer.load_state_dict(state["optimizer"])
            rngs = state.get("rng") or []
            if len(rngs) == self.world_size:
                set_rng_state(rngs[self.rank])
            elif rngs:
                log.warning("checkpoint was written by %d ranks, resuming on %d: RNG streams are re-seeded",
                            len(rngs), self.world_size)
            return state
        return None

    @staticmethod
    def _check_fingerprint(state: dict[str, Any], cfg: Any, path: Path) -> None:
        saved, now = state.get("fingerprint") or {}, config_fingerprint(cfg)
        diff = [f"{k}: checkpoint {saved.get(k)!r} vs config {now.get(k)!r}"
                for k in now if k in saved and saved.get(k) != now.get(k)]
        if diff:
            raise UserError(
                f"cannot resume from {path}: the config describes a different model ({'; '.join(diff)}); "
                "use another --output-dir or --no-resume")


def export_teacher(model: Any, output_dir: str | os.PathLike, iteration: int, final: bool = False) -> Path:
    """Write eval/training_<it>/teacher_checkpoint.pth (and, when `final`, teacher_backbone.pth); rank 0 only."""
    out = Path(output_dir)
    path = out / "eval" / f"training_{iteration}" / "teacher_checkpoint.pth"
    path.parent.mkdir(parents=True, exist_ok=True)
    export = model.teacher_export()
    atomic_save(export, path)
    if final:
        backbone = {k[len("backbone."):]: v for k, v in export["teacher"].items() if k.startswith("backbone.")}
        atomic_save(backbone, out / "teacher_backbone.pth")
    return path
