"""The training loop, read top to bottom: set up, build (`build_training`), resume, then per iteration

    batch -> `Training.step` (schedules, forward, backward, clip, AdamW, EMA; see train/step.py) -> log/checkpoint/eval

Distributed: under torchrun with > 1 rank the model is FSDP2-sharded (unless compute_precision.sharding_strategy is
NO_SHARD), checkpoints are sharded DCP directories, and teacher exports / kNN gather the full teacher to rank 0;
every rank runs the same calls (collectives), only rank 0 writes.

`train(cfg)` runs one job; `main(argv)` is `dinobridge train` / `python -m dinobridge.train` / `torchrun -m ...`.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Optional

import torch
import torch.distributed as dist

from dinobridge.config import save_config
from dinobridge.data.datasets import build_train_dataset
from dinobridge.data.loader import DevicePrefetcher, build_training_data
from dinobridge.distributed.device import select_device
from dinobridge.distributed.parallelize import eager_blocks, fsdp_enabled
from dinobridge.distributed.setup import cleanup_distributed, init_distributed, seed_everything, set_deterministic
from dinobridge.errors import UserError
from dinobridge.train.checkpoint import Checkpointer, export_teacher, full_state_dict
from dinobridge.train.metrics import MetricLogger, StepTimer
from dinobridge.train.monitors import rankme
from dinobridge.train.online_eval import OnlineEvaluator
from dinobridge.train.preemption import StopSignal
from dinobridge.train.step import NonFiniteGuard, build_training

log = logging.getLogger("dinobridge")


# ---------------------------------------------------------------------------------------------- helpers
def _check_output_dir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write_test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise UserError(f"train.output_dir: cannot write to {path} ({e.strerror or e})") from None


def _mean_over_ranks(values: dict[str, float], device: torch.device) -> dict[str, float]:
    if not (dist.is_available() and dist.is_initialized()) or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64 if device.type in ("cpu", "cuda") else torch.float32,
                     device=device)
    dist.all_reduce(t)
    t /= dist.get_world_size()
    return dict(zip(keys, t.tolist()))


# ---------------------------------------------------------------------------------------------- train
def train(cfg: Any, resume: bool = True) -> dict[str, Any]:
    """Train one job described by `cfg`; returns a summary (final iteration, last losses, kNN results)."""
    # ---------------------------------------------------------------- setup: device, ranks, run dir, data
    device = select_device(str(cfg.MODEL.DEVICE))
    distinfo = init_distributed(device)
    is_main = distinfo.is_main
    out = Path(cfg.train.output_dir)
    file_log: Optional[logging.Handler] = None
    if is_main:
        _check_output_dir(out)
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        file_log = logging.FileHandler(out / "log.txt")
        file_log.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        log.addHandler(file_log)
        save_config(cfg, out / "config.yaml")
    try:
        return _train(cfg, resume, device, distinfo, out)
    finally:
        if file_log is not None:  # several jobs in one process (sweeps, tests) each get their own log.txt
            log.removeHandler(file_log)
            file_log.close()


def _train(cfg: Any, resume: bool, device: Any, distinfo: Any, out: Path) -> dict[str, Any]:
    rank, world, is_main = distinfo.rank, distinfo.world_size, distinfo.is_main
    set_deterministic(bool(cfg.train.deterministic))
    seed_everything(int(cfg.train.seed), rank)
    log.info("device %s, rank %d/%d", device.name, rank, world)

    dataset = build_train_dataset(cfg)  # data errors surface before any model is built
    for key in ("student.pretrained_weights", "student.resume_from_teacher_chkpt", "gram.ckpt"):
        section, name = key.split(".")
        value = cfg[section].get(name)
        if value and not Path(value).exists():
            raise UserError(f"{key}: file not found: {value}")
    B = int(cfg.train.batch_size_per_gpu)

    # ---------------------------------------------------------------- model, optimizer, schedules, resume
    training = build_training(cfg, device, distinfo)  # FSDP2-sharded when world > 1 (see dinobridge/train/step.py)
    model, optimizer, schedules = training.model, training.optimizer, training.schedules
    epoch_len, total_iter, global_batch = training.epoch_len, training.total_iter, training.global_batch
    max_iter = min(int(cfg.train.max_iter), total_iter) if cfg.train.get("max_iter") else total_iter  # stop early

    ckpt_cfg = cfg.checkpointing
    checkpointer = Checkpointer(ckpt_cfg.get("dir") or out / "ckpt", ckpt_cfg.max_to_keep, ckpt_cfg.get("keep_every"),
                                rank, world)
    start_iter = 0
    if resume:
        state = checkpointer.load(model, optimizer, cfg)
        if state is not None:
            start_iter = int(state["iteration"])
            model.n_gram_updates = int(state.get("extra", {}).get("n_gram_updates", 0))
            log.info("resumed from iteration %d (%s)", start_iter, checkpointer.latest())
    if start_iter >= max_iter:
        log.info("training already complete (%d/%d iterations) in %s", start_iter, max_iter, out)

    # ---------------------------------------------------------------- data
    data = build_training_data(cfg, dataset, rank, world, start_iter, pin_memory=device.type == "cuda")

    if start_iter == 0:  # the model at initialisation, for the final kNN comparison (collective under FSDP)
        export_teacher(model, out, 0, write=is_main)

    # ---------------------------------------------------------------- loop
    logger = MetricLogger(out, start_iter, max_iter, is_main, bool(cfg.train.tensorboard), bool(cfg.train.progress_bar))
    timer = StepTimer()
    log_period = max(int(cfg.train.log_period), 1)
    period = int(ckpt_cfg.period)
    eval_period = int(cfg.evaluation.eval_period_iterations)
    keep_every = ckpt_cfg.get("keep_every")
    keep_epochs = cfg.train.get("saveckp_freq")
    online_eval = OnlineEvaluator(cfg, device, is_main)
    last, skipped, held, stopped_by = {}, 0, None, None
    guard = NonFiniteGuard(int(cfg.train.nan_max_consecutive), logger.write, checkpointer.dir)
    it = start_iter

    def save(keep: bool = False) -> None:
        checkpointer.save(it, model, optimizer, cfg, keep=keep, save_student=bool(ckpt_cfg.save_student),
                          extra={"n_gram_updates": model.n_gram_updates, "global_batch": global_batch})

    data_iter = DevicePrefetcher(iter(data.loader), device.device, data.device_augment)  # batches on the device
    stop_signal = StopSignal().install()  # SIGTERM / SIGUSR1: save after this step and leave (train/preemption.py)
    try:
        while it < max_iter:
            batch = next(data_iter)
            timer.data_ready()
            skipped += int(batch.pop("data_skipped", 0) or 0)
            if held is None:  # a fixed batch for RankMe of the teacher's CLS embeddings
                held = batch["global_crops"][: 2 * B]
            log_step = (it + 1) % log_period == 0 or it + 1 == max_iter
            step = training.step(batch, it, monitors=log_step)
            guard.push(it, step)  # reads the previous step's verdict, so the host does not wait for this step
            s = schedules.at(it)
            it += 1
            epoch_end = it % epoch_len == 0
            keep = bool((keep_every and it % int(keep_every) == 0)
                        or (keep_epochs and epoch_end and (it // epoch_len) % int(keep_epochs) == 0))
            saved = it % period == 0 or it == max_iter or keep
            exported = it % eval_period == 0 or it == max_iter
            evaluated = online_eval.scheduled(it, max_iter)
            if (log_step or saved or exported or evaluated) and not guard.settle():
                continue  # a non-finite loss: the update was skipped and nothing is logged or saved
            timer.step_done(global_batch)

            if log_step:
                scalars = {k: float(v) for k, v in step.terms.items()}
                scalars.update({f"{k}_grad_norm": float(v) for k, v in step.grad_norms.items()})
                scalars = _mean_over_ranks(scalars, device.device)
                scalars.update(s.as_dict())
                scalars.update(schedules.extras(it - 1))
                scalars.update(timer.summary())
                scalars["data_skipped"] = skipped
                with torch.no_grad(), training.autocast, eager_blocks():
                    scalars["teacher_rankme"] = rankme(model.teacher.backbone.forward_features(held)["x_norm_clstoken"])
                peak = device.peak_memory_allocated()
                if peak is not None:
                    scalars["peak_memory_gib"] = peak / 2**30
                logger.log(it, scalars)
                last = scalars
            # the loss of the last logged step: reading this step's would make the host wait for the device
            logger.progress(1, {"loss": f"{last.get('total_loss', float('nan')):.3f}", "lr": f"{s.lr:.2e}",
                                "img/s": f"{last.get('img_per_s', 0):.0f}"})
            if saved:
                save(keep)
            if exported:
                export_teacher(model, out, it, final=it == max_iter, write=is_main)
            if evaluated:  # kNN / linear probe / pictures (rank 0)
                backbone = teacher_backbone_for_eval(model, cfg, device, is_main)  # collective under FSDP
                if backbone is not None:
                    with eager_blocks():
                        online_eval(it, max_iter, backbone, logger)
            stopped_by = stop_signal.requested(device.device) if it < max_iter else None
            if stopped_by is not None:
                good = saved or guard.settle()
                if not saved and good:
                    save()
                where = ("checkpoint saved in" if good else
                         "this step's loss was not finite, so nothing was saved; the last good checkpoint is in")
                logger.write(f"stopped by signal {stopped_by} at iteration {it}/{max_iter}; {where} "
                             f"{checkpointer.dir}; run the same command to resume")
                break
            timer.skip()  # logging, checkpoints and evaluation count neither as data wait nor as compute
    finally:
        stop_signal.restore()
        logger.close()

    summary: dict[str, Any] = {"iteration": it, "output_dir": str(out), "last": last, "stopped_by": stopped_by}
    if bool(cfg.evaluation.get("knn_at_end", False)) and it >= max_iter:
        backbone = teacher_backbone_for_eval(model, cfg, device, is_main)  # collective under FSDP
        if is_main:
            with eager_blocks():
                summary["knn"] = _final_knn(cfg, backbone, device, out)
    if distinfo.world_size > 1:
        dist.barrier()
    cleanup_distributed()
    return summary


def teacher_backbone_for_eval(model: Any, cfg: Any, device: Any, is_main: bool) -> Optional[torch.nn.Module]:
    """The teacher backbone as a plain module for evaluation on rank 0 (None on the other ranks).

    Replicated model: the live teacher backbone. FSDP2: the full weights are gathered to rank 0 (collective: every
    rank must call this) and loaded into a fresh unsharded backbone in eval mode.
    """
    if not fsdp_enabled(model.teacher):
        return model.teacher.backbone if is_main else None
    from dinobridge.train.meta_arch import build_backbone

    state = full_state_dict(model.teacher.backbone)
    if not is_main:
        return None
    backbone = build_backbone(cfg.student, teacher=True)
    backbone.load_state_dict(state)
    return backbone.to(device.device).eval()


def _final_knn(cfg: Any, backbone: torch.nn.Module, device: Any, out: Path) -> dict[str, Any]:
    """kNN of the trained teacher backbone and of the same model at initialisation (eval/training_0)."""
    from dinobridge.eval.knn_report import knn_report
    from dinobridge.models import load_pretrained
    from dinobridge.train.meta_arch import build_backbone

    init_path = out / "eval" / "training_0" / "teacher_checkpoint.pth"
    init = None
    if init_path.is_file():
        init = build_backbone(cfg.student, teacher=True)
        load_pretrained(init, init_path)
    trained = SimpleNamespace(teacher=SimpleNamespace(backbone=backbone))  # knn_report reads model.teacher.backbone
    results = knn_report(cfg, trained, device, init_backbone=init)
    if results:  # {"trained": {k: top-1 %}, "init": {...}} for sweeps and tables (benchmarks/ablation_table.py)
        (out / "knn.json").write_text(json.dumps({name: {str(k): v for k, v in r.items()} for name, r in results.items()}))
    return results


def main(argv: Optional[list[str]] = None) -> int:
    """`dinobridge train [--config-file F] [--output-dir D] [--no-resume] [key=value ...] [-m sweeps]`."""
    from dinobridge.config import launch

    argv = list(sys.argv[1:] if argv is None else argv)

    def run(cfg: Any) -> dict[str, Any]:
        summary = train(cfg, resume=bool(cfg.train.get("resume", True)))
        if summary.get("stopped_by") is not None:  # pre-empted: no further sweep jobs; exit 128 + signal
            raise _Stopped(int(summary["stopped_by"]))
        return summary

    try:
        return launch(argv, run)
    except UserError as e:
        print(f"dinobridge train: error: {e}", file=sys.stderr)
        return 2
    except _Stopped as stop:
        return 128 + stop.signum


class _Stopped(Exception):
    def __init__(self, signum: int):
        super().__init__(f"stopped by signal {signum}")
        self.signum = signum
