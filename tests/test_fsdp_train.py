"""FSDP2 training on CPU (gloo, 2 ranks): the shared train step equals the 1-process step on the same global batch,
the real loop runs end to end with sharded (DCP) checkpoints, resumes from them exactly, and a checkpoint resumes on
another world size (2 -> 1 and 1 -> 2 ranks) by resharding.

One `mp.spawn` runs all 2-rank work (the step comparison, then three loop runs); the tests check what it left."""

from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from dinobridge.config import build_config
from dinobridge.data.collate import MultiCropCollator
from dinobridge.distributed.device import select_device
from dinobridge.distributed.setup import DistInfo

WORLD, B, STEPS = 2, 4, 3
COMMON = [
    "student.arch=vit_test", "student.patch_size=4", "crops.global_crops_size=16", "crops.local_crops_size=8",
    "crops.local_crops_number=2", "train.num_workers=0", "train.OFFICIAL_EPOCH_LENGTH=4", "optim.epochs=1",
    "dino.head_n_prototypes=32", "ibot.head_n_prototypes=32", "dino.head_hidden_dim=32", "ibot.head_hidden_dim=32",
    "dino.head_bottleneck_dim=16", "ibot.head_bottleneck_dim=16", "evaluation.knn_at_end=false",
    "evaluation.knn_period=0", "train.progress_bar=false", "train.log_period=1", "MODEL.DEVICE=cpu",
    "compute_precision.param_dtype=fp32", "compute_precision.reduce_dtype=fp32", "train.compile=false",
    "train.deterministic=true", "train.tensorboard=false",
    # pinned to the official values, so that the tolerances below do not move with the default preset's tuning
    "student.layerscale=1e-5", "dino.head_norm_last_layer=false", "ibot.head_norm_last_layer=false",
    "teacher.momentum_teacher=0.99",
]
# the step comparison: no drop path (no RNG draws), no KoLeo (per-rank by design), no warm-up (real updates)
STEP_CFG = [*COMMON, "student.drop_path_rate=0.0", "dino.koleo_loss_weight=0", "dino.koleo_cls_loss_weight=null",
            "optim.warmup_epochs=0", "optim.freeze_last_layer_epochs=0"]
# the sharded step runs under both strategies, with both kinds of activation checkpointing (numerics unchanged)
VARIANTS = {
    "full_shard_selective_ac": ["compute_precision.sharding_strategy=FULL_SHARD", "train.checkpointing=true"],
    "shard_grad_op_full_ac": ["compute_precision.sharding_strategy=SHARD_GRAD_OP", "train.checkpointing=true",
                              "train.checkpointing_full=true"],
}
# the loop runs: drop path and KoLeo on, so exact resume also needs the per-rank RNG states
LOOP_CFG = [*COMMON, "student.drop_path_rate=0.1", "train.batch_size_per_gpu=4", "checkpointing.period=1",
            "checkpointing.max_to_keep=2", "checkpointing.keep_every=2", "evaluation.eval_period_iterations=2"]


def _cfg(extra: list[str], out: Path | None = None):
    return build_config(None, extra, None if out is None else str(out), config_name="train")


# ---------------------------------------------------------------------------------------------- fixed batches
def _rank_batch(step: int, rank: int) -> dict:
    """Rank `rank`'s half of step `step`'s fixed global batch (random crops, masks from MultiCropCollator)."""
    g = torch.Generator().manual_seed(1000 * step + rank)
    samples = [{"global_crops": [torch.randn(3, 16, 16, generator=g) for _ in range(2)],
                "local_crops": [torch.randn(3, 8, 8, generator=g) for _ in range(2)]} for _ in range(B)]
    return MultiCropCollator.for_crops(16, 4, seed=7, rank=rank)(samples, batch_index=step)


def _global_batch(step: int) -> dict:
    """Both rank halves as one batch of 2B samples (crop-major layout; masks, indices and weights rebuilt)."""
    parts = [_rank_batch(step, r) for r in range(WORLD)]

    def merge(key: str) -> torch.Tensor:
        xs = [p[key] for p in parts]
        n_crops = xs[0].shape[0] // B
        return torch.cat([x.view(n_crops, B, *x.shape[1:]) for x in xs], dim=1).flatten(0, 1)

    masks = merge("masks")
    idx = masks.flatten().nonzero().flatten()
    weight = (1.0 / masks.sum(-1).clamp(min=1).float())[idx // masks.shape[1]]
    return {"global_crops": merge("global_crops"), "local_crops": merge("local_crops"), "masks": masks,
            "mask_indices": idx, "masks_weight": weight, "n_masked_patches": torch.tensor([idx.numel()]),
            "upperbound": sum(p["upperbound"] for p in parts)}


def _run_steps(batch_size: int, world: int, batch_of, extra: list[str] = ()) -> tuple[list[float], dict, bool]:  # noqa: B006
    """build_training + STEPS x Training.step; (losses averaged over ranks, full teacher state on rank 0, fsdp)."""
    from dinobridge.train.checkpoint import full_state_dict
    from dinobridge.train.step import build_training

    torch.manual_seed(0)
    cfg = _cfg([*STEP_CFG, f"train.batch_size_per_gpu={batch_size}", *extra])
    rank = torch.distributed.get_rank() if world > 1 else 0
    training = build_training(cfg, select_device("cpu"), DistInfo(rank, world, rank, world, rank == 0, world > 1))
    losses = [training.step(batch_of(it), it).loss.item() for it in range(STEPS)]
    return losses, full_state_dict(training.model.teacher), training.fsdp


# ---------------------------------------------------------------------------------------------- 2-rank worker
def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _worker(rank: int, ports: list[int], root: str) -> None:
    from dinobridge.distributed.setup import init_distributed
    from dinobridge.train.checkpoint import Checkpointer, full_state_dict
    from dinobridge.train.loop import train
    from dinobridge.train.step import build_training

    torch.set_num_threads(1)
    root_p = Path(root)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(WORLD),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(ports[0]))
    device = select_device("cpu")
    info = init_distributed(device)

    # (a) the shared step, sharded, on this rank's half of the fixed global batches
    steps = {name: _run_steps(B, WORLD, lambda it: _rank_batch(it, rank), extra) for name, extra in VARIANTS.items()}
    # (c) a single-file checkpoint of a 1-process run, loaded into a sharded model (1 -> 2 ranks)
    cfg = _cfg(LOOP_CFG)
    torch.manual_seed(123)  # a different init, so the load must overwrite it
    training = build_training(cfg, device, info)
    state = Checkpointer(root_p / "single" / "ckpt", rank=rank, world_size=WORLD).load(
        training.model, training.optimizer, cfg)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    optim = get_optimizer_state_dict(training.model, training.optimizer,
                                     options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    loaded = full_state_dict(training.model)
    if rank == 0:
        torch.save({"steps": steps, "iteration": state["iteration"],
                    "model_12": loaded, "optim_12": optim["state"]}, root_p / "worker.pt")
    del training

    # (b) the real loop: 4 iterations straight; 2 then resumed to 4 (a copy at 2 is left for the 2 -> 1 test)
    train(_cfg(LOOP_CFG, root_p / "straight"))  # ends with destroy_process_group
    os.environ["MASTER_PORT"] = str(ports[1])
    train(_cfg([*LOOP_CFG, "train.max_iter=2"], root_p / "split"))
    if rank == 0:
        shutil.copytree(root_p / "split" / "ckpt", root_p / "reshard21" / "ckpt")
    os.environ["MASTER_PORT"] = str(ports[2])
    train(_cfg(LOOP_CFG, root_p / "split"))


def _metrics(run: Path) -> dict[int, dict]:
    out: dict[int, dict] = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        entry = json.loads(line)
        out[entry["iteration"]] = entry
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """1-process reference steps and a 1-process 2-iteration loop run, then every 2-rank run (one spawn)."""
    from dinobridge.train.loop import train

    root = tmp_path_factory.mktemp("fsdp")
    ref_losses, ref_teacher, ref_fsdp = _run_steps(2 * B, 1, _global_batch)
    train(_cfg([*LOOP_CFG, "train.max_iter=2"], root / "single"))
    mp.spawn(_worker, args=(_free_ports(3), str(root)), nprocs=WORLD, join=True)
    worker = torch.load(root / "worker.pt", weights_only=False)
    return {"root": root, "ref_losses": ref_losses, "ref_teacher": ref_teacher, "ref_fsdp": ref_fsdp,
            "worker": worker}


# ---------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_two_rank_fsdp_steps_match_one_process_global_batch(runs, variant):
    losses, teacher, fsdp = runs["worker"]["steps"][variant]
    assert fsdp and not runs["ref_fsdp"]
    ref = runs["ref_losses"]
    assert all(torch.isfinite(torch.tensor(ref))) and ref[0] != ref[-1]
    for s, (got, want) in enumerate(zip(losses, ref)):
        assert got == pytest.approx(want, rel=1e-5), (s, got, want)
    assert teacher.keys() == runs["ref_teacher"].keys()
    for k, want in runs["ref_teacher"].items():
        got = teacher[k]
        assert not hasattr(got, "to_local") and got.shape == want.shape, k
        assert (got - want).abs().max().item() <= 1e-5 * max(1.0, want.abs().max().item()), (k, variant)


def test_loop_writes_sharded_checkpoints_and_exports(runs):
    run = runs["root"] / "straight"
    m = _metrics(run)
    assert sorted(m) == [1, 2, 3, 4] and all(e["total_loss"] == e["total_loss"] for e in m.values())
    ckpt = run / "ckpt"
    assert sorted(p.name for p in ckpt.iterdir()) == ["00000002_keep", "00000003", "00000004", "00000004_keep"]
    for d in ckpt.iterdir():
        names = {p.name for p in d.iterdir()}
        assert {".metadata", "meta.pt", "rank00000.pt", "rank00001.pt"} <= names, (d, names)
        meta = torch.load(d / "meta.pt", weights_only=False)
        assert meta["world_size"] == WORLD and meta["iteration"] == int(d.name[:8])
    from dinobridge.models import load_pretrained
    from dinobridge.train.meta_arch import build_backbone

    cfg = _cfg(LOOP_CFG)
    for f in ("teacher_backbone.pth", "eval/training_0/teacher_checkpoint.pth", "eval/training_4/teacher_checkpoint.pth"):
        load_pretrained(build_backbone(cfg.student, teacher=True), run / f)  # full, unsharded official layout


def test_resume_from_sharded_checkpoint_is_exact(runs):
    straight, split = runs["root"] / "straight", runs["root"] / "split"
    a, b = _metrics(straight), _metrics(split)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for it in a:
        assert a[it]["total_loss"] == b[it]["total_loss"], (it, a[it]["total_loss"], b[it]["total_loss"])
    sa, sb = torch.load(straight / "teacher_backbone.pth"), torch.load(split / "teacher_backbone.pth")
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_sharded_checkpoint_resumes_on_one_process(runs, capsys):
    """2 -> 1 ranks: DCP reshards model and optimizer into the unsharded model; the loop goes on with a warning."""
    from dinobridge.train.checkpoint import Checkpointer
    from dinobridge.train.loop import train
    from dinobridge.train.step import build_training

    root = runs["root"]
    cfg = _cfg(LOOP_CFG)
    torch.manual_seed(123)
    training = build_training(cfg, select_device("cpu"), DistInfo())
    state = Checkpointer(root / "reshard21" / "ckpt").load(training.model, training.optimizer, cfg)
    assert state["iteration"] == 2 and state["world_size"] == WORLD
    teacher = torch.load(root / "split" / "eval" / "training_2" / "teacher_checkpoint.pth")["teacher"]
    got = training.model.teacher.state_dict()
    assert got.keys() == teacher.keys() and all(torch.equal(got[k], teacher[k]) for k in teacher)
    steps = {float(s["step"]) for s in training.optimizer.state.values()}
    trainable = [p for p in training.model.student.parameters() if p.requires_grad]
    assert steps == {2.0} and len(training.optimizer.state) == len(trainable)

    summary = train(_cfg(LOOP_CFG, root / "reshard21"))
    assert summary["iteration"] == 4 and sorted(_metrics(root / "reshard21")) == [3, 4]
    log = (root / "reshard21" / "log.txt").read_text()
    assert "written by 2 rank(s), resuming on 1" in log
    assert (root / "reshard21" / "ckpt" / "00000004.pth").is_file()  # unsharded again: single-file checkpoints


def test_single_file_checkpoint_loads_into_sharded_model(runs):
    """1 -> 2 ranks: the full single-file state is sharded over the ranks (model and optimizer, by name)."""
    w = runs["worker"]
    saved = torch.load(runs["root"] / "single" / "ckpt" / "00000002.pth", weights_only=False)
    assert w["iteration"] == 2 and saved["iteration"] == 2
    assert w["model_12"].keys() == saved["model"].keys()
    for k, want in saved["model"].items():
        assert torch.equal(w["model_12"][k], want), k
    names = {i: "student." + n for g in saved["optimizer"]["param_groups"] for i, n in zip(g["params"], g["param_names"])}
    assert len(w["optim_12"]) == len(names)
    for i, s in saved["optimizer"]["state"].items():
        got = w["optim_12"][names[i]]
        assert torch.equal(got["exp_avg"], s["exp_avg"]) and torch.equal(got["exp_avg_sq"], s["exp_avg_sq"]), names[i]
