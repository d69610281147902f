"""Training checkpoints: atomic writes, retention, exact resume, teacher exports.

Layout under `<output_dir>`:
  ckpt/<iteration:08d>.pth          training state after `iteration` completed steps (latest = highest number);
                                    one file, written by rank 0 (single process, or replicated ranks)
  ckpt/<iteration:08d>/             the same state as a sharded `torch.distributed.checkpoint` (DCP) directory when
                                    the model is FSDP2-sharded: model + optimizer (`*.distcp`, `.metadata`), per-rank
                                    extras `rank<r>.pt` (RNG states, all buffers: balancer/DTCH state included) and
                                    `meta.pt` (iteration, world size, config fingerprint, loop extras)
  ckpt/<iteration:08d>_keep[.pth]   long-term copies (every `checkpointing.keep_every` iterations and every
                                    `train.saveckp_freq` epochs); never pruned
  eval/training_<it>/teacher_checkpoint.pth   {"teacher": {backbone.*, dino_head.*, ibot_head.*}} (official layout)
  teacher_backbone.pth              the final teacher backbone, flat official hub layout (`load_pretrained` reads both)

Atomicity: a file is written to `<name>.tmp` and renamed; a DCP checkpoint is written by all ranks into
`<iteration>.tmp/` and renamed by rank 0 after a barrier. A kill mid-save never leaves a broken latest checkpoint.
The data-sampler position is the iteration (the stream is a function of (seed, position), see data/loader.py).

Resuming reads either form into either kind of model (sharded or not). With the world size of the run that wrote
it the resume is exact. With another world size, model and optimizer are resharded by DCP (or distributed from the
full file), the RNG streams are re-seeded and the sample stream continues at iteration x the new global batch, so
the resume is not exact (a warning says so). A sharded checkpoint needs a filesystem shared by all nodes.
"""

from __future__ import annotations

import logging
import os
import random
import re
import shutil
import warnings
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist

from dinobridge.distributed.parallelize import fsdp_enabled
from dinobridge.errors import UserError

log = logging.getLogger("dinobridge")

_CKPT = re.compile(r"^(\d{8})(_keep)?(\.pth)?$")
_META, _RANK = "meta.pt", "rank{:05d}.pt"
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


def _dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def _barrier() -> None:
    if _dist():
        dist.barrier()


def _gather_rng() -> list[dict[str, Any]]:
    if _dist():
        states: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(states, rng_state())
        return states
    return [rng_state()]


def _local(t: torch.Tensor) -> torch.Tensor:
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


def full_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """`module.state_dict()` with whole tensors on the CPU. Collective when `module` is FSDP2-sharded: every rank
    must call it, and only rank 0 receives the tensors (the other ranks get {})."""
    if fsdp_enabled(module):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().cpu() for k, v in module.state_dict().items()}


def _optimizer_state_by_name(opt_state: dict[str, Any]) -> dict[str, Any]:
    """A single-file optimizer state (keyed by parameter index) -> keyed by model FQN ("student." + group param
    name), the form `set_optimizer_state_dict` takes."""
    index_to_fqn: dict[int, str] = {}
    groups = []
    for g in opt_state["param_groups"]:
        names = g.get("param_names")
        if names is None or len(names) != len(g["params"]):
            raise UserError("checkpoint optimizer state has no parameter names; resume it with the world size and "
                            "sharding_strategy that wrote it")
        fqns = ["student." + n for n in names]
        index_to_fqn.update(zip(g["params"], fqns))
        groups.append({**g, "params": fqns})
    return {"state": {index_to_fqn[i]: s for i, s in opt_state["state"].items()}, "param_groups": groups}


def _copy_teacher_to_student(model: torch.nn.Module) -> None:
    from dinobridge.train.ema import paired_parameters

    with torch.no_grad():
        for _, pt, ps in paired_parameters(model.teacher, model.student):
            _local(ps).copy_(_local(pt))


def without_student_copies(model_state: dict[str, Any]) -> dict[str, Any]:
    """`checkpointing.save_student=false`: drop the student weights that the teacher mirrors (they restart from the
    teacher on resume); student-only modules (e.g. the bridge of the add-ons) are kept."""
    return {k: v for k, v in model_state.items()
            if not (k.startswith("student.") and "teacher." + k[len("student."):] in model_state)}


class Checkpointer:
    """Saves and restores the training state in `directory` (`checkpointing.dir`, default `<output_dir>/ckpt`).

    Single file when the model is replicated (rank 0 writes), a DCP directory when it is FSDP2-sharded (every rank
    writes its shards). `save` and `load` are collective in a distributed run: every rank must call them."""

    def __init__(self, directory: str | os.PathLike, max_to_keep: int = 3, keep_every: Optional[int] = None,
                 rank: int = 0, world_size: int = 1) -> None:
        self.dir = Path(directory)
        self.max_to_keep = max(int(max_to_keep), 1)
        self.keep_every = keep_every
        self.rank, self.world_size = rank, world_size

    # ------------------------------------------------------------------ listing
    def checkpoints(self) -> list[tuple[int, Path]]:
        """Regular checkpoints (iteration, path: a .pth file or a DCP directory), oldest first."""
        if not self.dir.is_dir():
            return []
        found = []
        for p in self.dir.iterdir():
            m = _CKPT.match(p.name)
            if m and not m.group(2) and (p.is_file() if m.group(3) else p.is_dir()):
                found.append((int(m.group(1)), p))
        return sorted(found)

    def latest(self) -> Optional[Path]:
        found = self.checkpoints()
        return found[-1][1] if found else None

    # ------------------------------------------------------------------ save
    def save(self, iteration: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer, cfg: Any,
             keep: bool = False, save_student: bool = True, extra: Optional[dict[str, Any]] = None) -> Optional[Path]:
        """Write the state after `iteration` completed steps (collective: every rank must call it). Returns the
        path on rank 0 (None elsewhere)."""
        if fsdp_enabled(model):
            return self._save_sharded(iteration, model, optimizer, cfg, keep, save_student, extra)
        rngs = _gather_rng()
        if self.rank != 0:
            return None
        self.dir.mkdir(parents=True, exist_ok=True)
        model_state = model.state_dict()
        if not save_student:
            model_state = without_student_copies(model_state)
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

    def _save_sharded(self, iteration: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer, cfg: Any,
                      keep: bool, save_student: bool, extra: Optional[dict[str, Any]]) -> Optional[Path]:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

        final = self.dir / f"{iteration:08d}"
        tmp = self.dir / f"{iteration:08d}.tmp"
        if self.rank == 0:
            self.dir.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)  # left by a run killed mid-save
            tmp.mkdir()
        _barrier()
        if save_student:
            model_sd, optim_sd = get_state_dict(model, optimizer)
            state: dict[str, Any] = {"model": model_sd, "optimizer": optim_sd}
        else:  # teacher (and balancers) only: such a checkpoint restarts the student from the teacher
            model_sd = get_model_state_dict(model)
            state = {"model": without_student_copies(model_sd)}
        dcp.save(state, checkpoint_id=str(tmp))
        buffers = {k: v.detach().cpu().clone() for k, v in model.named_buffers()}
        torch.save({"rng": rng_state(), "buffers": buffers}, tmp / _RANK.format(self.rank))
        if self.rank == 0:
            torch.save({"iteration": iteration, "world_size": self.world_size, "fingerprint": config_fingerprint(cfg),
                        "extra": extra or {}, "save_student": save_student, "format": "dcp"}, tmp / _META)
        _barrier()  # every rank's files are in tmp
        path = None
        if self.rank == 0:
            if final.exists():  # the same iteration saved again (a resumed run): replace it
                shutil.rmtree(final)
            os.replace(tmp, final)
            if keep:
                self._keep_copy(final, self.dir / f"{iteration:08d}_keep")
            self._prune()
            path = final
        _barrier()  # nobody goes on (and possibly saves again) before the rename
        return path

    @staticmethod
    def _keep_copy(src: Path, dst: Path) -> None:
        tmp = dst.with_name(dst.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        for f in src.iterdir():
            try:
                os.link(f, tmp / f.name)  # hard links: no extra space
            except OSError:
                shutil.copy2(f, tmp / f.name)
        if dst.exists():
            shutil.rmtree(dst)
        os.replace(tmp, dst)

    def _prune(self) -> None:
        found = self.checkpoints()
        for _, p in found[: max(len(found) - self.max_to_keep, 0)]:
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
        for p in self.dir.iterdir():  # leftovers of saves killed mid-write (no save is running now)
            if p.name.endswith(".tmp") and _CKPT.match(p.name[:-4]):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)

    # ------------------------------------------------------------------ load
    def load(self, model: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer], cfg: Any,
             path: Optional[Path] = None) -> Optional[dict[str, Any]]:
        """Restore the latest (or given) checkpoint; returns its dict (with "iteration", "extra", "world_size") or
        None when there is none. Collective for a sharded model or a DCP checkpoint.

        A checkpoint that cannot be read is skipped for the one before it (with a warning). A checkpoint made with a
        different model configuration raises UserError naming the differing keys.
        """
        candidates = [Path(path)] if path is not None else [p for _, p in reversed(self.checkpoints())]
        for p in candidates:
            if p.is_dir():
                state = self._load_sharded(p, model, optimizer, cfg)
                if state is not None:
                    return state
                continue
            try:
                state = torch.load(p, map_location="cpu", weights_only=False)
            except Exception as e:  # truncated or corrupt file
                log.warning("checkpoint %s is unreadable (%s: %s); trying the previous one", p, type(e).__name__, e)
                continue
            self._check_fingerprint(state, cfg, p)
            model_state = state["model"]
            missing_student = any(k.startswith("teacher.") and "student." + k[len("teacher."):] not in model_state
                                  for k in model_state)
            if missing_student:  # checkpointing.save_student = false: student restarts from the teacher
                model_state = dict(model_state)
                for k, v in list(model_state.items()):
                    if k.startswith("teacher."):
                        model_state["student." + k[len("teacher."):]] = v
                log.warning("%s has no student weights (checkpointing.save_student=false): the student restarts "
                            "from the teacher, so this resume is not exact", p)
            if fsdp_enabled(model):  # a full single-file state into a sharded model: every rank shards its copy
                from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

                opts = StateDictOptions(full_state_dict=True)
                if optimizer is not None and not missing_student:
                    set_state_dict(model, optimizer, model_state_dict=model_state,
                                   optim_state_dict=_optimizer_state_by_name(state["optimizer"]), options=opts)
                else:
                    from torch.distributed.checkpoint.state_dict import set_model_state_dict

                    set_model_state_dict(model, model_state, options=opts)
            else:
                model.load_state_dict(model_state)
                if optimizer is not None and not missing_student:
                    optimizer.load_state_dict(state["optimizer"])
            rngs = state.get("rng") or []
            self._restore_rng(rngs[self.rank] if len(rngs) == self.world_size else None, len(rngs) or None, p)
            return state
        return None

    def _load_sharded(self, p: Path, model: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer],
                      cfg: Any) -> Optional[dict[str, Any]]:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_state_dict,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        try:
            meta = torch.load(p / _META, map_location="cpu", weights_only=False)
        except Exception as e:  # incomplete directory
            log.warning("checkpoint %s is unreadable (%s: %s); trying the previous one", p, type(e).__name__, e)
            return None
        self._check_fingerprint(meta, cfg, p)
        has_student = bool(meta.get("save_student", True))
        if has_student and optimizer is not None:
            model_sd, optim_sd = get_state_dict(model, optimizer)
            state: dict[str, Any] = {"model": model_sd, "optimizer": optim_sd}
        else:
            model_sd = get_model_state_dict(model)
            if not has_student:
                model_sd = {k: v for k, v in model_sd.items() if not k.startswith("student.")}
            state = {"model": model_sd}
        try:
            with warnings.catch_warnings():  # one process reading a sharded checkpoint is intended here
                warnings.filterwarnings("ignore", message="torch.distributed is disabled")
                dcp.load(state, checkpoint_id=str(p), no_dist=not _dist())  # reshards when the world size differs
        except Exception as e:  # a damaged shard; DCP raises the same error on every rank
            log.warning("checkpoint %s is unreadable (%s: %s); trying the previous one", p, type(e).__name__, e)
            return None
        set_model_state_dict(model, state["model"], options=StateDictOptions(strict=has_student))
        if "optimizer" in state:
            set_optimizer_state_dict(model, optimizer, state["optimizer"])
        if not has_student:
            _copy_teacher_to_student(model)
            log.warning("%s has no student weights (checkpointing.save_student=false): the student restarts "
                        "from the teacher, so this resume is not exact", p)
        saved_world = int(meta.get("world_size", 0))
        extras = None
        if saved_world == self.world_size and (p / _RANK.format(self.rank)).is_file():
            extras = torch.load(p / _RANK.format(self.rank), map_location="cpu", weights_only=False)
            with torch.no_grad():
                for name, buf in model.named_buffers():
                    if name in extras["buffers"]:
                        buf.copy_(extras["buffers"][name])
        self._restore_rng(None if extras is None else extras["rng"], saved_world, p)
        return {**meta, "path": str(p)}

    def _restore_rng(self, rng: Optional[dict[str, Any]], saved_world: Optional[int], p: Path) -> None:
        if rng is not None:
            set_rng_state(rng)
        elif saved_world:
            log.warning("checkpoint %s was written by %d rank(s), resuming on %d: model and optimizer are resharded, "
                        "RNG streams are re-seeded and the sample stream continues at iteration x the new global "
                        "batch, so this resume is not exact", p, saved_world, self.world_size)

    @staticmethod
    def _check_fingerprint(state: dict[str, Any], cfg: Any, path: Path) -> None:
        saved, now = state.get("fingerprint") or {}, config_fingerprint(cfg)
        diff = [f"{k}: checkpoint {saved.get(k)!r} vs config {now.get(k)!r}"
                for k in now if k in saved and saved.get(k) != now.get(k)]
        if diff:
            raise UserError(
                f"cannot resume from {path}: the config describes a different model ({'; '.join(diff)}); "
                "use another --output-dir or --no-resume")


def export_teacher(model: Any, output_dir: str | os.PathLike, iteration: int, final: bool = False,
                   write: bool = True) -> Optional[Path]:
    """Write eval/training_<it>/teacher_checkpoint.pth (and, when `final`, teacher_backbone.pth).

    Collective when the model is FSDP2-sharded (the full teacher is gathered to rank 0): every rank calls it and
    only the one with `write` (rank 0) writes. Returns the path where written, else None.
    """
    if fsdp_enabled(model.teacher):
        export = {"teacher": full_state_dict(model.teacher)}
    elif write:
        export = model.teacher_export()
    else:
        return None
    if not write:
        return None
    out = Path(output_dir)
    path = out / "eval" / f"training_{iteration}" / "teacher_checkpoint.pth"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_save(export, path)
    if final:
        backbone = {k[len("backbone."):]: v for k, v in export["teacher"].items() if k.startswith("backbone.")}
        atomic_save(backbone, out / "teacher_backbone.pth")
    return path
