"""Tests for dinobridge.supervision: losses vs float64 formulas, frozen teacher, warm-up, pooling, gathering."""

from __future__ import annotations

import os
import sys
import types

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from gloo_utils import with_free_port

import dinobridge
from dinobridge.supervision import (
    SAT493M_MEAN,
    CosineAlignLoss,
    FrozenTeacher,
    LinearWarmup,
    NormalizedMSELoss,
    SemanticSupervision,
    StudentProjection,
    VICRegAlignLoss,
    pool_patch_tokens,
)


class TinyBackbone(nn.Module):
    """Fake DINO backbone: patchify conv + dropout + LayerNorm, official forward_features keys."""

    def __init__(self, dim: int = 16, patch: int = 4) -> None:
        super().__init__()
        self.patch_size, self.embed_dim = patch, dim
        self.proj = nn.Conv2d(3, dim, patch, patch)
        self.drop = nn.Dropout(0.5)
        self.cls = nn.Parameter(torch.randn(dim))
        self.norm = nn.LayerNorm(dim)

    def forward_features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        t = self.drop(self.proj(x).flatten(2).transpose(1, 2))  # [B, N, D]
        return {"x_norm_clstoken": self.norm(t.mean(1) + self.cls), "x_norm_patchtokens": self.norm(t)}


# ---------------------------------------------------------------- float64 references (from the formulas)
def cos_ref(s, t):
    s, t = s.double(), t.double()
    return (1 - (s * t).sum(-1) / (s.norm(dim=-1) * t.norm(dim=-1))).mean()


def nmse_ref(s, t, mean=None, std=None, eps=1e-5, batch=False):
    s, t = s.double(), t.double()
    s, t = s / s.norm(dim=-1, keepdim=True), t / t.norm(dim=-1, keepdim=True)
    if batch:
        n = s.shape[0]
        sd = lambda x: ((x - x.mean(0)) ** 2).sum(0).div(n - 1).sqrt()  # noqa: E731
        s = (s - s.mean(0)) / (sd(s) + eps)
        t = (t - t.mean(0)) / (sd(t) + eps)
    elif mean is not None:
        s, t = (s - mean) / (std + eps), (t - mean) / (std + eps)
    return ((s - t) ** 2).mean()


def vicreg_ref(y, g, wi=25.0, wv=10.0, wc=0.5, gamma=1.0, eps=1e-4):
    y, g = y.double(), g.double()
    n, d = y.shape
    inv = ((y - g) ** 2).mean()
    std = (((y - y.mean(0)) ** 2).mean(0) + eps).sqrt()
    var = torch.clamp(gamma - std, min=0).mean()
    yc = y - y.mean(0)
    c = yc.T @ yc / (n - 1)
    cov = ((c**2).sum() - (torch.diagonal(c) ** 2).sum()) / d**2
    return wi * inv + wv * var + wc * cov


# ---------------------------------------------------------------- losses
def test_cosine_loss_matches_reference():
    torch.manual_seed(0)
    for shape in [(8, 16), (4, 3, 16)]:
        s, t = torch.randn(shape, requires_grad=True), torch.randn(shape)
        out = CosineAlignLoss()(s, t)
        assert out.dtype == torch.float32
        torch.testing.assert_close(out.double(), cos_ref(s.detach(), t), rtol=1e-5, atol=1e-6)
        out.backward()
        assert s.grad is not None and s.grad.abs().sum() > 0
    # identical directions -> 0, and half-precision inputs still computed in float32
    x = torch.randn(5, 16)
    assert CosineAlignLoss()(x.bfloat16(), 3 * x.bfloat16()).item() == pytest.approx(0.0, abs=1e-5)


def test_normalized_mse_plain_and_batch_whitening():
    torch.manual_seed(1)
    s, t = torch.randn(10, 12) + 0.3, torch.randn(10, 12) - 0.2
    torch.testing.assert_close(NormalizedMSELoss()(s, t).double(), nmse_ref(s, t), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(
        NormalizedMSELoss(whiten="batch")(s, t).double(), nmse_ref(s, t, batch=True), rtol=1e-4, atol=1e-6
    )
    with pytest.raises(ValueError, match="whiten"):
        NormalizedMSELoss(whiten="zca")
    with pytest.raises(ValueError, match="at least 2"):
        NormalizedMSELoss(whiten="batch")(s[:1], t[:1])


def test_normalized_mse_running_whitening():
    torch.manual_seed(2)
    d, m = 12, 0.5
    loss = NormalizedMSELoss(whiten="running", dim=d, momentum=m)
    batches = [(torch.randn(9, d), torch.randn(9, d) + 1.0) for _ in range(2)]

    def stats(t):
        t = t.double()
        t = t / t.norm(dim=-1, keepdim=True)
        return t.mean(0), t.var(0, unbiased=True)

    mean, var = stats(batches[0][1])  # first update copies
    out = loss(*batches[0])
    torch.testing.assert_close(out.double(), nmse_ref(*batches[0], mean, var.sqrt()), rtol=1e-4, atol=1e-6)
    bm, bv = stats(batches[1][1])
    mean, var = (1 - m) * mean + m * bm, (1 - m) * var + m * bv
    out = loss(*batches[1])
    torch.testing.assert_close(out.double(), nmse_ref(*batches[1], mean, var.sqrt()), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(loss.running_var.double(), var, rtol=1e-4, atol=1e-7)
    # eval mode: the statistics are used, not updated; a single sample is allowed
    loss.eval()
    before = loss.running_mean.clone()
    loss(torch.randn(1, d), torch.randn(1, d) + 5)
    assert torch.equal(before, loss.running_mean) and int(loss.num_updates) == 2
    # a single-sample training batch does not update (no variance estimate)
    loss.train()
    loss(torch.randn(1, d), torch.randn(1, d))
    assert int(loss.num_updates) == 2


def test_vicreg_matches_reference_and_grad():
    torch.manual_seed(3)
    y = (0.5 * torch.randn(12, 6)).requires_grad_()
    g = torch.randn(12, 6)
    out = VICRegAlignLoss()(y, g)
    y64 = y.detach().double().requires_grad_()
    ref = vicreg_ref(y64, g)
    torch.testing.assert_close(out.double(), ref.detach(), rtol=1e-5, atol=1e-6)
    out.backward()
    ref.backward()
    torch.testing.assert_close(y.grad.double(), y64.grad, rtol=1e-4, atol=1e-6)
    terms = VICRegAlignLoss().terms(y, g)
    assert set(terms) == {"inv", "var", "cov"} and terms["var"] > 0  # std < gamma: variance term active


# ---------------------------------------------------------------- teacher
def _sup(**kw) -> SemanticSupervision:
    torch.manual_seed(0)
    return SemanticSupervision(FrozenTeacher(TinyBackbone()), student_dim=10, **kw)


def test_teacher_frozen_no_grad_and_stays_eval():
    sup = _sup(loss="vicreg", warmup_steps=0, patch_grid=2, student_patch_dim=3)
    model = nn.ModuleDict({"student": nn.Linear(7, 10), "sup": sup})
    model.train()
    teacher = sup.teacher
    assert not teacher.training and all(not m.training for m in teacher.modules())
    assert sup.projection.training  # the rest follows train()
    teacher.requires_grad_(True)
    assert all(not p.requires_grad for p in teacher.parameters())

    x = torch.randn(4, 3, 16, 16, requires_grad=True)
    t1, t2 = teacher(x), teacher(x)
    assert torch.equal(t1.cls, t2.cls)  # dropout off: eval mode
    assert not t1.cls.requires_grad and not t1.patch.requires_grad
    assert t1.cls.shape == (4, 16) and t1.patch.shape == (4, 16, 16) and t1.grid == (4, 4)

    out = sup(model["student"](torch.randn(4, 7)), x, student_patch=torch.randn(4, 3, 8, 8))
    out["loss"].backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None for p in sup.projection.parameters())
    assert all(p.grad is not None for p in sup.patch_projection.parameters())
    assert model["student"].weight.grad is not None and x.grad is None
    assert not out["cls"].requires_grad and {"inv", "var", "cov", "patch", "weight"} <= set(out)


def test_teacher_normalize_dtype_and_errors():
    teacher = FrozenTeacher(TinyBackbone().to(torch.bfloat16))
    out = teacher(torch.rand(2, 3, 16, 16))  # float32 input cast to the backbone dtype
    assert out.cls.dtype == torch.bfloat16
    x = torch.ones(1, 3, 2, 2)
    y = teacher.normalize(x)
    expected = torch.tensor([(1 - 0.485) / 0.229, (1 - 0.456) / 0.224, (1 - 0.406) / 0.225])
    torch.testing.assert_close(y[0, :, 0, 0], expected)
    with pytest.raises(TypeError, match="forward_features"):
        FrozenTeacher(nn.Linear(2, 2))


def test_from_hub_uses_hub_constructor(monkeypatch):
    calls = {}

    def tiny_vit(weights=None, **kw):
        calls["weights"], calls["kw"] = weights, kw
        return TinyBackbone()

    fake = types.ModuleType("dinobridge.hub")
    fake.tiny_vit = tiny_vit
    monkeypatch.setitem(sys.modules, "dinobridge.hub", fake)
    monkeypatch.setattr(dinobridge, "hub", fake, raising=False)
    t = FrozenTeacher.from_hub("tiny_vit", weights="/w/dinov3_vitl16_pretrain_sat493m-eadcf0ff.pth", foo=1)
    assert calls == {"weights": "/w/dinov3_vitl16_pretrain_sat493m-eadcf0ff.pth", "kw": {"foo": 1}}
    assert t.mean == SAT493M_MEAN and t.patch_size == 4 and t.embed_dim == 16
    assert all(not p.requires_grad for p in t.parameters())
    with pytest.warns(UserWarning, match="randomly initialised"):
        FrozenTeacher.from_hub("tiny_vit")
    with pytest.raises(ValueError, match="no constructor"):
        FrozenTeacher.from_hub("nope", weights="x.pth")


def test_hf_adapter_dinov3_layout():
    transformers = pytest.importorskip("transformers")
    from dinobridge.supervision import HFBackboneAdapter

    cfg = transformers.DINOv3ViTConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        patch_size=4, num_register_tokens=2, image_size=16,
    )
    torch.manual_seed(0)
    model = transformers.DINOv3ViTModel(cfg).eval()
    teacher = FrozenTeacher(HFBackboneAdapter(model))
    x = torch.randn(2, 3, 16, 24)
    out = teacher(x)
    ref = model(pixel_values=x).last_hidden_state
    assert out.grid == (4, 6) and out.patch.shape == (2, 24, 32) and teacher.embed_dim == 32
    torch.testing.assert_close(out.cls, ref[:, 0])
    torch.testing.assert_close(out.patch, ref[:, 3:])  # skip CLS + 2 registers


# ---------------------------------------------------------------- warm-up and pooling
def test_warmup_schedule():
    w = LinearWarmup(0.2, 5000)
    assert [w(s) for s in (-3, 0, 1250, 2500, 5000, 10**6)] == pytest.approx([0, 0, 0.05, 0.1, 0.2, 0.2])
    assert LinearWarmup(0.3, 0)(0) == 0.3
    torch.testing.assert_close(w.at(torch.tensor(2500)), torch.tensor(0.1))
    with pytest.raises(ValueError, match="warmup_steps"):
        LinearWarmup(0.2, -1)

    sup = _sup(weight=0.5, warmup_steps=4, patch_grid=2, student_patch_dim=3, patch_weight=0.25, cls_weight=2.0)
    sup.train()
    x, s, p = torch.randn(3, 3, 16, 16), torch.randn(3, 10), torch.randn(3, 3, 4, 4)
    weights = []
    for _ in range(6):  # internal counter: steps 1..6
        out = sup(s, x, student_patch=p)
        weights.append(out["weight"].item())
        torch.testing.assert_close(out["loss"], out["weight"] * (2.0 * out["cls"] + 0.25 * out["patch"]))
    assert weights == pytest.approx([0.125, 0.25, 0.375, 0.5, 0.5, 0.5])
    assert sup.state_dict()["num_steps"].item() == 6
    assert sup(s, x, student_patch=p, step=2)["weight"].item() == pytest.approx(0.25)
    assert sup(s, x, student_patch=p, step=0)["loss"].item() == 0.0


def test_pooled_patch_alignment_shapes_and_values():
    torch.manual_seed(4)
    b, h, w, d = 2, 4, 6, 5
    tok = torch.randn(b, h * w, d)
    pooled = pool_patch_tokens(tok, (h, w), (2, 3))
    assert pooled.shape == (b, 6, d)
    grid = tok.double().reshape(b, h, w, d)
    cells = [grid[:, 2 * i : 2 * i + 2, 2 * j : 2 * j + 2].mean((1, 2)) for i in range(2) for j in range(3)]
    ref = torch.stack(cells, 1)  # row-major cells
    torch.testing.assert_close(pooled.double(), ref)
    with pytest.raises(ValueError, match="grid"):
        pool_patch_tokens(tok, (5, 5), 2)

    sup = _sup(patch_grid=2, student_patch_dim=3, warmup_steps=0)
    x = torch.randn(2, 3, 16, 24)  # 4 x 6 teacher grid
    t_out = sup.teacher(x)
    assert t_out.grid == (4, 6) and t_out.pooled_patches(2).shape == (2, 4, 16)
    s = torch.randn(2, 10)
    out_map = sup(s, x, student_patch=torch.randn(2, 3, 8, 8))
    out_tok = sup(s, teacher_out=t_out, student_patch=torch.randn(2, 64, 3))  # square tokens [B, N, C]
    for out in (out_map, out_tok):
        assert out["patch"].shape == () and 0 <= out["patch"].item() <= 2
    with pytest.raises(ValueError, match="student_patch"):
        sup(s, x)
    assert StudentProjection(3, 16, hidden_dim=8)(torch.randn(2, 4, 3)).shape == (2, 4, 16)
    with pytest.raises(ValueError, match="loss"):
        _sup(loss="l1")


# ---------------------------------------------------------------- distributed gathering (2 gloo ranks)
def _data():
    g = torch.Generator().manual_seed(5)
    return 0.5 * torch.randn(8, 6, generator=g), torch.randn(8, 6, generator=g)


def _worker(rank: int, world: int, port: int, path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        y, g = _data()
        n = y.shape[0] // world
        y_loc = y[rank * n : (rank + 1) * n].clone().requires_grad_()
        loss = VICRegAlignLoss()(y_loc, g[rank * n : (rank + 1) * n])
        loss.backward()
        mse = NormalizedMSELoss(whiten="running", dim=6)
        mse(y_loc.detach(), g[rank * n : (rank + 1) * n])
        torch.save({"loss": loss.detach(), "grad": y_loc.grad, "rmean": mse.running_mean, "rvar": mse.running_var},
                   f"{path}.{rank}")
    finally:
        dist.destroy_process_group()




def test_vicreg_gather_across_two_ranks_matches_single_process(tmp_path):
    world = 2
    with_free_port(lambda port: mp.spawn(_worker, args=(world, port, str(tmp_path / "r")), nprocs=world, join=True))
    y, g = _data()
    y64 = y.double().requires_grad_()
    ref = vicreg_ref(y64, g)
    ref.backward()
    single = VICRegAlignLoss()(y, g)  # 1 process on the whole batch
    t = g.double() / g.double().norm(dim=-1, keepdim=True)
    n = y.shape[0] // world
    for rank in range(world):
        r = torch.load(f"{tmp_path / 'r'}.{rank}")
        torch.testing.assert_close(r["loss"], single, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(r["loss"].double(), ref.detach(), rtol=1e-5, atol=1e-6)
        # every rank backpropagates the same global loss: local grad = world x d(global loss)/d(local rows)
        expected = world * y64.grad[rank * n : (rank + 1) * n]
        torch.testing.assert_close(r["grad"].double(), expected, rtol=1e-4, atol=1e-6)
        # running whitening statistics are all-reduced: both ranks see the whole-batch statistics
        torch.testing.assert_close(r["rmean"].double(), t.mean(0), rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(r["rvar"].double(), t.var(0), rtol=1e-4, atol=1e-6)
