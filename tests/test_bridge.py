"""Patch-to-CLS bridge (reference addons_and_devices.md §2.4, §2.6): shapes for any grid, zero output at init
(L = log K), gradients reach the bridge and the backbone but never the DINO head or the teacher, the EMA skips it,
and it is not built when its weights are 0."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from gloo_utils import with_free_port

from dinobridge.config import build_config
from dinobridge.data.collate import collate_multicrop
from dinobridge.data.masking import BlockMaskGenerator
from dinobridge.errors import ConfigError
from dinobridge.models.heads import DINOHead
from dinobridge.objectives.bridge import PatchBridge, detached_head_forward
from dinobridge.train.meta_arch import build_meta_arch
from test_train import TINY

RS = "resize_shuffle_augmentor"
BRIDGE_ON = ["MODEL.META_ARCHITECTURE=SSLResizeShuffle", "crops.use_resize_shuffle_augmentor=true",
             f"{RS}.bridge_global_weight=0.25", f"{RS}.bridge_patchshuffle_weight=0.25"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _model(extra=()):  # noqa: B006
    cfg = build_config(None, [*TINY, *extra], config_name="train")
    torch.manual_seed(0)
    m = build_meta_arch(cfg)
    m.init_weights()
    m.student.train()
    m.teacher.eval()
    return m


def _batch(seed: int = 0, B: int = 4) -> dict:
    gen = torch.Generator().manual_seed(seed)
    samples = [{"global_crops": [torch.randn(3, 16, 16, generator=gen) for _ in range(2)],
                "local_crops": [torch.randn(3, 8, 8, generator=gen) for _ in range(2)]} for _ in range(B)]
    return collate_multicrop(samples, mask_generator=BlockMaskGenerator(4), rng=np.random.default_rng(seed),
                             mask_sample_probability=0.5)


def test_shapes_for_any_grid_and_conv_full_for_its_grid_only():
    torch.manual_seed(0)
    attn = PatchBridge(24, "attn")
    attn.init_weights()
    with torch.no_grad():
        attn.proj.weight.normal_()
    for side in (14, 6, 32):  # N = 196, 36, 1024
        out = attn(torch.randn(3, side * side, 24), (side, side))
        assert out.shape == (3, 24) and torch.isfinite(out).all()
    full = PatchBridge(24, "conv_full", grid=(14, 14))
    full.init_weights()
    assert full.hidden_dim == 12 and full.proj.kernel_size == (14, 14)
    assert full(torch.randn(2, 196, 24), (14, 14)).shape == (2, 24)
    with pytest.raises(ValueError, match="14x14"):
        full(torch.randn(2, 36, 24), (6, 6))
    with pytest.raises(ValueError, match="tokens"):
        attn(torch.randn(2, 35, 24), (6, 6))
    assert torch.equal(full(torch.randn(2, 196, 24), (14, 14)), torch.zeros(2, 24))  # zero output layer


def test_detached_head_forward_equals_head_and_gives_no_head_gradient():
    torch.manual_seed(0)
    head = DINOHead(16, n_prototypes=32, hidden_dim=32, bottleneck_dim=8)
    head.init_weights()
    x = torch.randn(5, 16, requires_grad=True)
    out = detached_head_forward(head, x)
    torch.testing.assert_close(out, head(x))
    out.square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in head.parameters()) and all(p.requires_grad for p in head.parameters())


def test_zero_output_at_init_gives_log_k_and_the_ema_skips_the_bridge():
    m = _model(BRIDGE_ON)
    assert "bridge" in m.student and "bridge" not in m.teacher and "bridge" in m.objectives
    assert "patch_roll" in m.objectives  # makes the rolled view for bridge_patchshuffle_weight
    assert any(k.startswith("student.bridge.") for k in m.state_dict())
    loss, logs = m(_batch(), teacher_temp=0.07, iteration=0)
    for key in ("bridge_global_loss", "bridge_patchshuffle_loss"):
        assert abs(logs[key].item() - math.log(32)) < 1e-4, key  # K = 32 prototypes, uniform student
    assert "patch_shuffle_cls_loss" not in logs  # PatchRoll's own losses are off (weight 0)
    before = {k: v.clone() for k, v in m.teacher.state_dict().items()}
    with torch.no_grad():
        for p in m.student.parameters():
            p.add_(torch.randn_like(p))
    m.update_teacher(0.5)  # pairs backbone and heads only
    student = m.student.state_dict()
    for k, v in m.teacher.state_dict().items():
        torch.testing.assert_close(v, 0.5 * before[k] + 0.5 * student[k])


def test_gradients_reach_bridge_and_backbone_not_head_or_teacher():
    m = _model(BRIDGE_ON)
    batch = _batch(1)
    step = m.compute_step(batch, teacher_temp=0.07, iteration=0, epoch=0.0, extras={})
    loss, _ = m.objectives["bridge"](step)
    loss.backward()
    bridge = dict(m.student.bridge.named_parameters())
    assert bridge["proj.bias"].grad.abs().sum() > 0  # at init only the zero output layer learns
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in m.student.backbone.parameters())
    assert all(p.grad is None for p in m.student.dino_head.parameters())
    assert all(p.grad is None for p in m.teacher.parameters())
    # after a first step (output layer non-zero) the gradient reaches every bridge layer and the backbone
    m.zero_grad(set_to_none=True)
    with torch.no_grad():
        m.student.bridge.proj.weight.normal_(std=0.02)
        m.student.bridge.query.normal_()
    step = m.compute_step(batch, teacher_temp=0.07, iteration=1, epoch=0.0, extras={})
    m.objectives["bridge"](step)[0].backward()
    for name, p in m.student.bridge.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    bb = [p.grad.abs().sum() for p in m.student.backbone.blocks.parameters() if p.grad is not None]
    assert bb and sum(bb) > 0
    assert all(p.grad is None for p in m.student.dino_head.parameters())
    assert all(p.grad is None for p in m.teacher.parameters())


def test_loss_oracle_gate_and_weights():
    m = _model([*BRIDGE_ON, f"{RS}.bridge_gate_ibot_loss_below=0.001"])
    with torch.no_grad():
        m.student.bridge.proj.weight.normal_(std=0.5)
    step = m.compute_step(_batch(2), teacher_temp=0.07, iteration=0, epoch=0.0, extras={})
    out = step.views["bridge"]
    q = step.dino_targets.reshape(8, -1).double()
    oracle = -(q * torch.log_softmax(out["global"].double() / 0.1, -1)).sum(-1).mean()
    src = step.views["patch_roll"]["request"].meta["src"]
    oracle_r = -(q[src] * torch.log_softmax(out["roll"].double() / 0.1, -1)).sum(-1).mean()
    step.terms = {"ibot_loss": torch.tensor(2.0)}  # above the gate: no bridge loss this step
    loss, logs = m.objectives["bridge"](step)
    assert abs(logs["bridge_global_loss"].item() - oracle.item()) < 1e-5
    assert abs(logs["bridge_patchshuffle_loss"].item() - oracle_r.item()) < 1e-5
    assert loss.item() == 0.0 and logs["bridge_gate"].item() == 0.0
    step.terms = {"ibot_loss": torch.tensor(0.0)}
    loss, _ = m.objectives["bridge"](step)
    assert abs(loss.item() - 0.25 * (oracle + oracle_r).item()) < 1e-5
    step.extras = {"bridge_global_weight": 0.0, "bridge_patchshuffle_weight": 0.1}
    loss, logs = m.objectives["bridge"](step)
    assert abs(loss.item() - 0.1 * oracle_r.item()) < 1e-5


def test_not_built_when_weights_are_zero_and_options_checked():
    plain = _model(["MODEL.META_ARCHITECTURE=SSLResizeShuffle", "crops.use_resize_shuffle_augmentor=true"])
    ref = _model()
    assert "bridge" not in plain.student and list(plain.state_dict()) == list(ref.state_dict())
    conv = _model([*BRIDGE_ON, f"{RS}.bridge_pool=conv_full"])
    assert conv.student.bridge.pool == "conv_full" and conv.student.bridge.grid == (4, 4)
    with pytest.raises(ConfigError, match="bridge_direction"):
        _model([*BRIDGE_ON, f"{RS}.bridge_direction=cls_from_patch", f"{RS}.bridge_teacher_ema=true"])


def _fsdp_worker(rank: int, port: int, out_path: str) -> None:
    import os

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        head = DINOHead(8, n_prototypes=16, hidden_dim=16, bottleneck_dim=4)
        head.init_weights()
        ref = DINOHead(8, n_prototypes=16, hidden_dim=16, bottleneck_dim=4)
        ref.load_state_dict(head.state_dict())
        fully_shard(head, mesh=init_device_mesh("cpu", (2,)), reshard_after_forward=True)  # FULL_SHARD-like
        z, x = torch.randn(2, 8), torch.randn(3, 8, requires_grad=True)
        out = detached_head_forward(head, x)
        (head(z).sum() + out.square().sum()).backward()  # the DINO-loss use of the head + the bridge use
        ref(z).sum().backward()
        grads = [p.grad.full_tensor() for p in head.parameters()]
        if rank == 0:
            torch.save({"out": out.detach(), "ref_out": ref(x).detach(), "grads": grads,
                        "ref_grads": [p.grad for p in ref.parameters()], "x_grad": x.grad}, out_path)
    finally:
        dist.destroy_process_group()


def test_detached_head_under_fsdp2_gives_no_head_gradient(tmp_path):
    import torch.multiprocessing as mp

    with_free_port(lambda port: mp.spawn(_fsdp_worker, args=(port, str(tmp_path / "r.pt")), nprocs=2))
    r = torch.load(tmp_path / "r.pt")
    torch.testing.assert_close(r["out"], r["ref_out"])
    assert r["x_grad"].abs().sum() > 0
    for g, ref in zip(r["grads"], r["ref_grads"]):  # head gradients come from the DINO-loss use only
        torch.testing.assert_close(g, ref)


def test_checkpoint_without_student_keeps_the_bridge(tmp_path):
    """checkpointing.save_student=false drops the student weights the teacher mirrors, not the student-only bridge;
    the resumed student is the teacher plus the saved bridge."""
    from dinobridge.train.checkpoint import Checkpointer
    from dinobridge.train.optim import build_optimizer, build_param_groups

    model = _model(BRIDGE_ON)
    cfg = model.cfg
    with torch.no_grad():
        for p in model.student.bridge.parameters():
            p.add_(0.5)
        for p in model.student.backbone.parameters():
            p.add_(0.1)  # student != teacher, so a restart from the teacher is visible
    opt = build_optimizer(build_param_groups(model.student, cfg), cfg, "cpu")
    ckpt = Checkpointer(tmp_path, max_to_keep=2)
    ckpt.save(1, model, opt, cfg, save_student=False)
    fresh = _model(BRIDGE_ON)
    assert ckpt.load(fresh, None, cfg) is not None
    for (name, a), b in zip(model.student.bridge.state_dict().items(), fresh.student.bridge.state_dict().values()):
        assert torch.equal(a, b), name
    for (name, a), b in zip(model.teacher.backbone.state_dict().items(), fresh.student.backbone.state_dict().values()):
        assert torch.equal(a, b), name
