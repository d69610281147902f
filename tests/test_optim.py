"""Parameter groups (layer-wise decay, wd masks, head multipliers, fusion), AdamW, schedule writes, clipping, EMA."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.multiprocessing as mp
from omegaconf import OmegaConf
from torch import nn

from gloo_utils import with_free_port

from dinobridge.models import build_vit
from dinobridge.models.heads import DINOHead
from dinobridge.train.ema import ema_update
from dinobridge.train.optim import apply_schedule, build_optimizer, build_param_groups, clip_grad_norms

RHO = 0.9


def _optim_cfg(**kw):
    base = dict(
        layerwise_decay=RHO, patch_embed_lr_mult=0.2, multi_tensor_optim=False, dino_head_lr_multiplier=1.0,
        dino_head_wd_multiplier=1.0, adamw_beta1=0.9, adamw_beta2=0.99,
    )
    base.update(kw)
    return OmegaConf.create({"optim": base})


@pytest.fixture(scope="module")
def vitl_student():
    with torch.device("meta"):
        backbone = build_vit("vit_large", n_storage_tokens=4, untie_global_and_local_cls_norm=True, layerscale=1e-5)
        return nn.ModuleDict(
            dict(backbone=backbone, dino_head=DINOHead(1024, 4096), ibot_head=DINOHead(1024, 4096))
        )


def _by_name(groups):
    out = {}
    for g in groups:
        for n in g["param_names"]:
            assert n not in out, f"{n} appears twice"
            out[n] = g
    return out


def _small_student(seed=0):
    torch.manual_seed(seed)
    backbone = build_vit("vit_test", n_storage_tokens=2, layerscale=1e-5)
    return nn.ModuleDict(
        dict(
            backbone=backbone,
            dino_head=DINOHead(32, 16, hidden_dim=24, bottleneck_dim=8),
            ibot_head=DINOHead(32, 16, hidden_dim=24, bottleneck_dim=8),
        )
    )


def _init_heads(student):
    student.dino_head.init_weights()
    student.ibot_head.init_weights()


# ------------------------------------------------------------------------------------------------ groups
def test_vitl_layerwise_lr_multipliers(vitl_student):
    g = _by_name(build_param_groups(vitl_student, _optim_cfg()))
    tok = RHO**25
    assert tok == pytest.approx(0.07179, abs=1e-5)
    for n in ("cls_token", "storage_tokens", "mask_token"):
        assert g[f"backbone.{n}"]["lr_multiplier"] == pytest.approx(tok)
    assert g["backbone.patch_embed.proj.weight"]["lr_multiplier"] == pytest.approx(0.01436, abs=1e-5)
    assert g["backbone.patch_embed.proj.bias"]["lr_multiplier"] == pytest.approx(tok * 0.2)
    assert g["backbone.blocks.0.attn.qkv.weight"]["lr_multiplier"] == pytest.approx(0.07977, abs=1e-5)
    assert g["backbone.blocks.0.ls1.gamma"]["lr_multiplier"] == pytest.approx(RHO**24)
    assert g["backbone.blocks.11.norm2.weight"]["lr_multiplier"] == pytest.approx(RHO**13)
    assert g["backbone.blocks.23.mlp.fc2.weight"]["lr_multiplier"] == pytest.approx(0.9)
    assert g["backbone.norm.weight"]["lr_multiplier"] == 1.0
    assert g["backbone.local_cls_norm.weight"]["lr_multiplier"] == 1.0
    for head in ("dino_head", "ibot_head"):
        assert g[f"{head}.mlp.0.weight"]["lr_multiplier"] == 1.0
        assert g[f"{head}.last_layer.weight"]["lr_multiplier"] == 1.0
    n_params = sum(1 for p in vitl_student.parameters())
    assert len(g) == n_params


def test_vitl_weight_decay_and_last_layer_flags(vitl_student):
    g = _by_name(build_param_groups(vitl_student, _optim_cfg()))
    zero = [
        "backbone.patch_embed.proj.bias", "backbone.blocks.3.norm1.weight", "backbone.blocks.3.norm1.bias",
        "backbone.blocks.3.attn.qkv.bias", "backbone.blocks.3.ls1.gamma", "backbone.blocks.3.ls2.gamma",
        "backbone.norm.weight", "backbone.local_cls_norm.bias", "dino_head.mlp.0.bias", "ibot_head.mlp.4.bias",
    ]
    one = [
        "backbone.cls_token", "backbone.storage_tokens", "backbone.mask_token", "backbone.patch_embed.proj.weight",
        "backbone.blocks.3.attn.qkv.weight", "backbone.blocks.3.mlp.fc1.weight", "dino_head.mlp.2.weight",
        "dino_head.last_layer.weight", "ibot_head.last_layer.weight",
    ]
    for n in zero:
        assert g[n]["wd_multiplier"] == 0.0, n
    for n in one:
        assert g[n]["wd_multiplier"] == 1.0, n
    last = {n for n, d in g.items() if d["is_last_layer"]}
    assert last == {"dino_head.last_layer.weight", "ibot_head.last_layer.weight"}


def test_fused_group_count_and_head_multipliers(vitl_student):
    groups = build_param_groups(vitl_student, _optim_cfg(multi_tensor_optim=True))
    backbone = [g for g in groups if g["param_names"][0].startswith("backbone.")]
    assert len(backbone) == 52  # official, ViT-L backbone
    assert len(groups) == 52 + 3 + 3  # each head: weights, biases, prototypes
    assert sum(len(g["params"]) for g in groups) == sum(1 for _ in vitl_student.parameters())
    for g in groups:  # a fused group never mixes submodules
        assert len({n.split(".")[0] for n in g["param_names"]}) == 1

    g = _by_name(build_param_groups(vitl_student, _optim_cfg(dino_head_lr_multiplier=0.8, dino_head_wd_multiplier=0.5)))
    assert g["dino_head.mlp.0.weight"]["lr_multiplier"] == pytest.approx(0.8)
    assert g["dino_head.last_layer.weight"]["lr_multiplier"] == pytest.approx(0.8)
    assert g["dino_head.mlp.0.weight"]["wd_multiplier"] == pytest.approx(0.5)
    assert g["dino_head.last_layer.weight"]["wd_multiplier"] == pytest.approx(0.5)
    assert g["dino_head.mlp.0.bias"]["wd_multiplier"] == 0.0
    assert g["ibot_head.mlp.0.weight"]["lr_multiplier"] == 1.0  # iBOT head untouched
    assert g["ibot_head.mlp.0.weight"]["wd_multiplier"] == 1.0
    assert g["backbone.norm.weight"]["lr_multiplier"] == 1.0


def test_frozen_params_are_skipped():
    student = _small_student()
    student.backbone.mask_token.requires_grad_(False)
    names = _by_name(build_param_groups(student, _optim_cfg()))
    assert "backbone.mask_token" not in names and "backbone.cls_token" in names


# ------------------------------------------------------------------------------------------------ optimizer
def test_build_optimizer_and_apply_schedule():
    student = _small_student()
    _init_heads(student)
    cfg = _optim_cfg(multi_tensor_optim=True, dino_head_lr_multiplier=0.8)
    opt = build_optimizer(build_param_groups(student, cfg), cfg, "cpu")
    assert isinstance(opt, torch.optim.AdamW)
    assert opt.defaults["betas"] == (0.9, 0.99) and opt.defaults["eps"] == 1e-8
    assert opt.defaults["fused"] is True  # cpu has a fused AdamW kernel in torch >= 2.4
    lr, wd, llr = 1e-3, 0.04, 2e-4
    apply_schedule(opt, lr, wd, llr)
    n_blocks = len(student.backbone.blocks)
    for group in opt.param_groups:
        name = group["param_names"][0]
        sub, rel = name.split(".", 1)
        mult = 1.0
        if sub == "backbone":
            first = rel.split(".")[0]
            layer = 0 if first in ("cls_token", "storage_tokens", "mask_token", "patch_embed") else (
                int(rel.split(".")[1]) + 1 if first == "blocks" else n_blocks + 1
            )
            mult = RHO ** (n_blocks + 1 - layer) * (0.2 if first == "patch_embed" else 1.0)
        if sub == "dino_head":
            mult *= 0.8
        base = llr if "last_layer" in rel else lr
        assert group["lr"] == pytest.approx(base * mult), name
        no_wd = rel.endswith("bias") or "norm" in rel or "gamma" in rel
        assert group["weight_decay"] == pytest.approx(0.0 if no_wd else wd), name
    # one real step with the scheduled values; frozen prototypes (last_layer_lr = 0) stay put
    apply_schedule(opt, lr, wd, 0.0)
    before = student.dino_head.last_layer.weight.detach().clone()
    cls_before = student.backbone.cls_token.detach().clone()
    out = student.backbone(torch.randn(2, 3, 32, 32))
    (student.dino_head(out).sum() + student.ibot_head(out).sum()).backward()
    opt.step()
    assert torch.equal(student.dino_head.last_layer.weight, before)
    assert not torch.equal(student.backbone.cls_token, cls_before)

    opt_foreach = build_optimizer(build_param_groups(student, cfg), cfg, "cpu", fused=False)
    assert not opt_foreach.defaults.get("fused")


# ------------------------------------------------------------------------------------------------ clipping
def _set_random_grads(student, scales):
    torch.manual_seed(1)
    for name, module in student.items():
        for p in module.parameters():
            p.grad = torch.randn_like(p) * scales[name]


def _norm64(module):
    return torch.linalg.vector_norm(torch.cat([p.grad.double().flatten() for p in module.parameters()])).item()


def test_clip_grad_norms_per_submodule():
    student = _small_student()
    scales = {"backbone": 1.0, "dino_head": 1.0, "ibot_head": 1e-4}
    _set_random_grads(student, scales)
    expect = {n: _norm64(m) for n, m in student.items()}
    assert expect["ibot_head"] < 1.0 < expect["dino_head"]
    ibot_grads = [p.grad.clone() for p in student.ibot_head.parameters()]
    norms = clip_grad_norms(student, 1.0)
    assert set(norms) == {"backbone", "dino_head", "ibot_head"}
    for n in norms:
        assert norms[n].item() == pytest.approx(expect[n], rel=1e-5)
    assert _norm64(student.backbone) == pytest.approx(1.0, rel=1e-4)
    assert _norm64(student.dino_head) == pytest.approx(1.0, rel=1e-4)
    assert all(torch.equal(a, p.grad) for a, p in zip(ibot_grads, student.ibot_head.parameters()))

    # disabled: nothing returned, nothing changed; norms on demand without clipping
    _set_random_grads(student, scales)
    grads = [p.grad.clone() for p in student.parameters()]
    assert clip_grad_norms(student, 0.0) == {} and clip_grad_norms(student, None) == {}
    norms = clip_grad_norms(student, None, norm_when_disabled=True)
    assert norms["backbone"].item() == pytest.approx(_norm64(student.backbone), rel=1e-5)
    assert all(torch.equal(a, p.grad) for a, p in zip(grads, student.parameters()))


# ------------------------------------------------------------------------------------------------ EMA
def test_ema_update_matches_float64_formula():
    student = _small_student(0)
    _init_heads(student)
    teacher = copy.deepcopy(student)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p))
    student.backbone.rope_embed.periods.mul_(2.0)  # a buffer: must not be averaged
    t0 = {n: p.detach().double().clone() for n, p in teacher.named_parameters()}
    s0 = {n: p.detach().double().clone() for n, p in student.named_parameters()}
    buf0 = {n: b.clone() for n, b in teacher.named_buffers()}
    m = 0.9
    ema_update(teacher, student, m)
    for n, p in teacher.named_parameters():
        ref = m * t0[n] + (1 - m) * s0[n]
        assert torch.allclose(p.double(), ref, rtol=0, atol=1e-6), n
    for n, b in teacher.named_buffers():
        assert torch.equal(b, buf0[n]), n
    ema_update(teacher, student, 0.0)
    assert all(torch.equal(a, b) for a, b in zip(teacher.parameters(), student.parameters()))


def test_ema_update_mismatch_errors():
    a = nn.Sequential(nn.Linear(3, 4))
    with pytest.raises(ValueError, match="names differ"):
        ema_update(a, nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 4)), 0.9)
    with pytest.raises(ValueError, match="0.weight"):
        ema_update(a, nn.Sequential(nn.Linear(3, 5)), 0.9)
    with pytest.raises(ValueError, match="momentum"):
        ema_update(a, copy.deepcopy(a), 1.5)


# ------------------------------------------------------------------------------------------------ FSDP2 (2 ranks)


def _fsdp_worker(rank: int, world: int, port: int) -> None:
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        student = _small_student(0)
        _init_heads(student)
        teacher = copy.deepcopy(student)
        ref_student = copy.deepcopy(student)
        for s in (student, teacher):
            for k in s:
                fully_shard(s[k])
        torch.manual_seed(10)  # same data on both ranks -> same full gradient as the reference
        x = torch.randn(2, 3, 32, 32)

        def loss_of(model):
            out = model.backbone(x)
            return (model.dino_head(out) ** 2).sum() + (model.ibot_head(out) ** 2).sum() * 1e-6

        loss_of(student).backward()
        loss_of(ref_student).backward()
        expect = {n: _norm64(m) for n, m in ref_student.items()}
        max_norm = 0.5 * expect["dino_head"]
        norms = clip_grad_norms(student, max_norm)
        for n in expect:
            assert isinstance(norms[n], torch.Tensor) and not hasattr(norms[n], "to_local"), n
            assert norms[n].item() == pytest.approx(expect[n], rel=1e-4), n
        # FSDP averages gradients over ranks; identical data -> the full gradients equal the reference ones
        sq = sum(p.grad.to_local().double().pow(2).sum() for p in student.dino_head.parameters())
        dist.all_reduce(sq)
        assert sq.sqrt().item() == pytest.approx(min(max_norm, expect["dino_head"]), rel=1e-4)

        cfg = _optim_cfg(multi_tensor_optim=True)
        opt = build_optimizer(build_param_groups(student, cfg), cfg, "cpu")
        apply_schedule(opt, 1e-2, 0.04, 1e-2)
        opt.step()

        # EMA on the local shards (no collectives)
        t0 = {n: p.to_local().double().clone() for n, p in teacher.named_parameters()}
        s0 = {n: p.to_local().double().clone() for n, p in student.named_parameters()}
        assert any(not torch.equal(t0[n], s0[n]) for n in t0)
        ema_update(teacher, student, 0.75)
        for n, p in teacher.named_parameters():
            ref = 0.75 * t0[n] + 0.25 * s0[n]
            assert torch.allclose(p.to_local().double(), ref, rtol=0, atol=1e-6), n
    finally:
        dist.destroy_process_group()


def test_fsdp2_clip_optimizer_ema_two_ranks():
    with_free_port(lambda port: mp.spawn(_fsdp_worker, args=(2, port), nprocs=2, join=True))
