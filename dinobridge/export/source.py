"""Where the exported teacher backbone comes from: a run directory, or a weights file plus an architecture.

Run directory layout (written by `dinobridge train`, see dinobridge/train/checkpoint.py):
  config.yaml                                  the resolved config; `student:` describes the backbone
  teacher_backbone.pth                         the final teacher backbone (flat official layout), preferred
  eval/training_<it>/teacher_checkpoint.pth    {"teacher": {"backbone.*", ...}}, the newest <it> is used next
  ckpt/<it:08d>[_keep].pth                     training state {"model": {"teacher.backbone.*", ...}}, last resort
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from dinobridge.errors import UserError
from dinobridge.models.checkpoint import check_state_dict, load_pretrained

_EVAL_DIR = re.compile(r"^training_(\d+)$")
_CKPT = re.compile(r"^(\d{8})(_keep)?\.pth$")


def find_run_weights(run_dir: str | os.PathLike) -> Path:
    """The teacher weights of a run: teacher_backbone.pth, else the newest eval export, else the newest ckpt."""
    run = Path(run_dir)
    final = run / "teacher_backbone.pth"
    if final.is_file():
        return final
    evals = []
    if (run / "eval").is_dir():
        for d in (run / "eval").iterdir():
            m = _EVAL_DIR.match(d.name)
            if m and (d / "teacher_checkpoint.pth").is_file():
                evals.append((int(m.group(1)), d / "teacher_checkpoint.pth"))
    if evals:
        return max(evals)[1]
    ckpts = []
    if (run / "ckpt").is_dir():
        for p in (run / "ckpt").iterdir():
            m = _CKPT.match(p.name)
            if m:
                ckpts.append((int(m.group(1)), m.group(2) is None, p))  # prefer the regular file at equal iteration
    if ckpts:
        return max(ckpts)[2]
    raise UserError(f"--run: no teacher weights in {run} (looked for teacher_backbone.pth, "
                    "eval/training_*/teacher_checkpoint.pth and ckpt/*.pth)")


def _is_training_checkpoint(path: Path) -> bool:
    return path.parent.name == "ckpt" and _CKPT.match(path.name) is not None


def _load_training_checkpoint(model: nn.Module, path: Path) -> None:
    """Teacher backbone out of a training checkpoint {"model": {"teacher.backbone.*": ...}} (strict)."""
    try:
        # training checkpoints hold RNG states (numpy objects): not loadable with weights_only=True
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise UserError(f"could not read checkpoint {path}: {type(e).__name__}: {e}") from None
    sd = state.get("model", {}) if isinstance(state, dict) else {}
    prefix = "teacher.backbone."
    sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    if not sd:
        raise UserError(f"checkpoint {path} holds no teacher.backbone.* weights")
    check_state_dict(model, sd, source=f"teacher weights in {path}")
    model.load_state_dict(sd, strict=True)


def build_from_config(config_file: str | os.PathLike) -> nn.Module:
    """The teacher backbone architecture of a run config (random weights)."""
    from dinobridge.config import build_config
    from dinobridge.train.meta_arch import build_backbone

    path = Path(config_file)
    if not path.is_file():
        raise UserError(f"--config: config file not found: {path}")
    cfg = build_config(str(path))
    return build_backbone(cfg.student, teacher=True)


def load_teacher(
    run: Optional[str | os.PathLike] = None,
    weights: Optional[str | os.PathLike] = None,
    model_name: Optional[str] = None,
    config: Optional[str | os.PathLike] = None,
) -> tuple[nn.Module, Path]:
    """(backbone in eval mode with the weights loaded strictly, weights path).

    The architecture comes from exactly one of `run` (run/config.yaml), `config` (a config.yaml) or `model_name` (a
    hub entrypoint such as dinov3_vitl16); the weights from `weights`, else from the run directory.
    """
    given = [n for n, v in (("--run", run), ("--config", config), ("--model", model_name)) if v]
    if len(given) != 1:
        raise UserError("give exactly one of --run DIR, --config CONFIG.yaml or --model HUBNAME"
                        + (f" (got {', '.join(given)})" if given else ""))
    if run is not None:
        run_dir = Path(run)
        if not run_dir.is_dir():
            raise UserError(f"--run: run directory not found: {run_dir}")
        if not (run_dir / "config.yaml").is_file():
            raise UserError(f"--run: {run_dir} has no config.yaml (is it a dinobridge run directory?)")
        config = run_dir / "config.yaml"
        weights_path = Path(weights) if weights else find_run_weights(run_dir)
    else:
        if not weights:
            raise UserError(f"--weights is required with {given[0]}")
        weights_path = Path(weights)
    if not weights_path.is_file():
        raise UserError(f"--weights: file not found: {weights_path}")

    if model_name is not None:
        from dinobridge.hub import ENTRYPOINTS, build_hub_model

        if model_name not in ENTRYPOINTS:
            raise UserError(f"--model: unknown hub model {model_name!r}; expected one of {ENTRYPOINTS}")
        model = build_hub_model(model_name, weights_path)
    else:
        model = build_from_config(config)
        if _is_training_checkpoint(weights_path):
            _load_training_checkpoint(model, weights_path)
        else:
            load_pretrained(model, weights_path, strict=True)
    return model.eval(), weights_path
