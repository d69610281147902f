"""The training loop, read top to bottom: set up, resume, then per iteration

    batch -> schedules -> student/teacher forward + objectives -> backward -> clip -> step -> EMA -> log/checkpoint

`train(cfg)` runs one job; `main(argv)` is `dinobridge train` / `python -m dinobridge.train` / `torchrun -m ...`.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from dinobridge.config import save_config
from dinobridge.data.augmentation import MultiCropAugmentation
from dinobridge.data.collate import MultiCropCollator
from dinobridge.data.datasets import build_train_dataset
from dinobridge.data.loader import build_train_loader, multicrop_config
from dinobridge.distributed.comm import broadcast_module
from dinobridge.distributed.device import select_device
from dinobridge.distributed.parallelize import compile_blocks
from dinobridge.distributed.setup import cleanup_distributed, init_distributed, seed_everything, set_deterministic
from dinobridge.errors import UserError
from dinobridge.train.checkpoint import Checkpointer, export_teacher
from dinobridge.train.meta_arch import build_meta_arch
from dinobridge.train.metrics import MetricLogger, StepTimer
from dinobridge.train.monitors import rankme
from dinobridge.train.optim import apply_schedule, build_optimizer, build_param_groups, clip_grad_norms
from dinobridge.train.schedules import build_schedules

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


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    nb = device.type == "cuda"
    return {k: (v.to(device, non_blocking=nb) if torch.is_tensor(v) else v) for k, v in batch.items()}


def _mean_over_ranks(values: dict[str, float], device: torch.device) -> dict[str, float]:
    if not (dist.is_available() and dist.is_initialized()) or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64 if device.type in ("cpu", "cuda") else torch.float32,
                     device=device)
    dist.all_reduce(t)
    t /= dist.get_world_size()
    return dict(zip(keys, t.tolist()))


def _all_reduce_grads(params: list[torch.nn.Parameter]) -> None:
    """Average gradients over ranks (replicated data parallelism; FSDP2 replaces this at scale)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[offset: offset + n].view_as(g))
        offset += n


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
    global_batch = B * world
    epoch_len = int(cfg.train.OFFICIAL_EPOCH_LENGTH)
    total_iter = int(cfg.optim.epochs) * epoch_len  # the schedules span the whole recipe
    max_iter = min(int(cfg.train.max_iter), total_iter) if cfg.train.get("max_iter") else total_iter  # stop early

    # ---------------------------------------------------------------- model, optimizer, schedules
    with torch.device("meta"):
        model = build_meta_arch(cfg)
    model.to_empty(device=device.device)
    model.init_weights()
    broadcast_module(model)  # ranks seed differently: every rank starts from rank 0's initialisation
    model.student.train()
    model.teacher.eval()
    params = [p for p in model.student.parameters() if p.requires_grad]
    optimizer = build_optimizer(build_param_groups(model.student, cfg), cfg, device.type)
    schedules = build_schedules(cfg, epoch_len, total_iter, global_batch)
    if cfg.train.compile and device.compile_default:
        compile_blocks(model.student.backbone)
        compile_blocks(model.teacher.backbone)
    elif cfg.train.compile:
        log.info("train.compile=true: torch.compile is skipped on %s", device.type)

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
    augment = MultiCropAugmentation(multicrop_config(cfg))
    collate = MultiCropCollator.for_crops(
        int(cfg.crops.global_crops_size), int(cfg.student.patch_size),
        mask_ratio_min_max=tuple(cfg.ibot.mask_ratio_min_max),
        mask_sample_probability=float(cfg.ibot.mask_sample_probability),
        mask_random_circular_shift=bool(cfg.ibot.mask_random_circular_shift),
        seed=int(cfg.train.seed), rank=rank,
    )
    loader = build_train_loader(
        dataset, augment, collate, batch_size=B, rank=rank, world_size=world, seed=int(cfg.train.seed),
        start_iter=start_iter, num_workers=int(cfg.train.num_workers), pin_memory=device.type == "cuda",
    )

    if is_main and start_iter == 0:
        export_teacher(model, out, 0)  # the model at initialisation, for the final kNN comparison

    # ---------------------------------------------------------------- loop
    logger = MetricLogger(out, start_iter, max_iter, is_main, bool(cfg.train.tensorboard), bool(cfg.train.progress_bar))
    timer = StepTimer()
    autocast = device.autocast()
    clip = cfg.optim.clip_grad
    log_period = max(int(cfg.train.log_period), 1)
    period = int(ckpt_cfg.period)
    eval_period = int(cfg.evaluation.eval_period_iterations)
    keep_every = ckpt_cfg.get("keep_every")
    keep_epochs = cfg.train.get("saveckp_freq")
    knn_period = int(cfg.evaluation.get("knn_period") or 0)
    bad_steps, last, skipped, held = 0, {}, 0, None
    it = start_iter
    data_iter = iter(loader)
    try:
        while it < max_iter:
            batch = next(data_iter)
            timer.data_ready()
            skipped += int(batch.pop("data_skipped", 0) or 0)
            batch = _to_device(batch, device.device)
            if held is None:  # a fixed batch for RankMe of the teacher's CLS embeddings
                held = batch["global_crops"][: 2 * B]
            s = schedules.at(it)
            apply_schedule(optimizer, s.lr, s.wd, s.last_layer_lr)
            optimizer.zero_grad(set_to_none=True)
            with autocast:
                log_step = (it + 1) % log_period == 0 or it + 1 == max_iter
                loss, terms = model(batch, teacher_temp=s.teacher_temp, iteration=it, epoch=it / epoch_len,
                                    extras=schedules.extras(it), monitors=log_step)
            loss.backward()
            _all_reduce_grads(params)
            norms = clip_grad_norms(model.student, clip)

            loss_value = loss.detach()
            if world > 1:
                dist.all_reduce(loss_value)
            if not torch.isfinite(loss_value):
                bad_steps += 1
                logger.write(f"iteration {it}: non-finite loss ({loss_value.item()}), step skipped "
                             f"({bad_steps}/{cfg.train.nan_max_consecutive} consecutive)")
                if bad_steps >= int(cfg.train.nan_max_consecutive):
                    raise UserError(
                        f"loss was NaN/Inf for {bad_steps} consecutive iterations (last: {it}); the last good "
                        f"checkpoint in {checkpointer.dir} is intact. Lower optim.lr or check the data.")
                optimizer.zero_grad(set_to_none=True)
                it += 1
                continue
            bad_steps = 0
            optimizer.step()
            model.update_teacher(s.momentum)
            model.maybe_update_gram_teacher(it)
            it += 1
            timer.step_done(global_batch)

            if log_step:
                scalars = {k: float(v) for k, v in terms.items()}
                scalars.update({f"{k}_grad_norm": float(v) for k, v in norms.items()})
                scalars = _mean_over_ranks(scalars, device.device)
                scalars.update(s.as_dict())
                scalars.update(schedules.extras(it - 1))
                scalars.update(timer.summary())
                scalars["data_skipped"] = skipped
                with torch.no_grad(), autocast:
                    scalars["teacher_rankme"] = rankme(model.teacher.backbone.forward_features(held)["x_norm_clstoken"])
                peak = device.peak_memory_allocated()
                if peak is not None:
                    scalars["peak_memory_gib"] = peak / 2**30
                logger.log(it, scalars)
                last = scalars
            logger.progress(1, {"loss": f"{float(loss_value) / world:.3f}", "lr": f"{s.lr:.2e}",
                                "img/s": f"{last.get('img_per_s', 0):.0f}"})
            epoch_end = it % epoch_len == 0
            keep = bool((keep_every and it % int(keep_every) == 0)
                        or (keep_epochs and epoch_end and (it // epoch_len) % int(keep_epochs) == 0))
            if it % period == 0 or it == max_iter or keep:
                checkpointer.save(it, model, optimizer, cfg, keep=keep, save_student=bool(ckpt_cfg.save_student),
                                  extra={"n_gram_updates": model.n_gram_updates})
            if is_main and (it % eval_period == 0 or it == max_iter):
                export_teacher(model, out, it, final=it == max_iter)
            if is_main and knn_period and it % knn_period == 0 and it < max_iter:
                res = _online_knn(cfg, model, device)
                if res:
                    logger.log(it, {f"knn/top1_k{k}": v for k, v in res.items()})
                    logger.write(f"iteration {it}: kNN top-1 " + ", ".join(f"k={k}: {v:.2f}%" for k, v in res.items()))
            timer.skip()  # logging, checkpoints and evaluation count neither as data wait nor as compute
    finally:
        logger.close()

    summary: dict[str, Any] = {"iteration": it, "output_dir": str(out), "last": last}
    if is_main and bool(cfg.evaluation.get("knn_at_end", False)) and it >= max_iter:
        summary["knn"] = _final_knn(cfg, model, device, out)
    if distinfo.world_size > 1:
        dist.barrier()
    cleanup_distributed()
    return summary


def _online_knn(cfg: Any, model: Any, device: Any) -> dict[int, float]:
    from dinobridge.eval.extract import make_eval_transform
    from dinobridge.eval.knn_report import knn_accuracy, knn_datasets

    size = int(cfg.crops.global_crops_size)
    datasets = knn_datasets(cfg, make_eval_transform(size, int(cfg.student.patch_size), resize_size=size))
    return {} if datasets is None else knn_accuracy(model.teacher.backbone, cfg, device, datasets, progress=False)


def _final_knn(cfg: Any, model: Any, device: Any, out: Path) -> dict[str, Any]:
    """kNN of the trained teacher and of the same model at initialisation (eval/training_0)."""
    from dinobridge.eval.knn_report import knn_report
    from dinobridge.models import load_pretrained
    from dinobridge.train.meta_arch import build_backbone

    init_path = out / "eval" / "training_0" / "teacher_checkpoint.pth"
    init = None
    if init_path.is_file():
        init = build_backbone(cfg.student, teacher=True)
        load_pretrained(init, init_path)
    return knn_report(cfg, model, device, init_backbone=init)


def main(argv: Optional[list[str]] = None) -> int:
    """`dinobridge train [--config-file F] [--output-dir D] [--no-resume] [key=value ...] [-m sweeps]`."""
    from dinobridge.config import launch

    argv = list(sys.argv[1:] if argv is None else argv)

    def run(cfg: Any) -> dict[str, Any]:
        return train(cfg, resume=bool(cfg.train.get("resume", True)))

    try:
        return launch(argv, run)
    except UserError as e:
        print(f"dinobridge train: error: {e}", file=sys.stderr)
        return 2
