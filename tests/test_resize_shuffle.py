"""ResizeShuffle add-ons (reference addons_and_devices.md §2.2, §2.3, §2.5, §2.6): the Crop-Resize view and loss,
the PatchRoll view, selection masks and losses, and the meta-architecture contract (views join the one student call,
no extra teacher forward; with every add-on weight 0 the run is the plain SSLMetaArch bit for bit)."""

from __future__ import annotations

import copy
import functools
import math
import random

import numpy as np
import pytest
import torch
from torch import nn

from dinobridge.config import build_config
from dinobridge.data.collate import collate_multicrop
from dinobridge.data.masking import BlockMaskGenerator
from dinobridge.objectives import SSLStep, ViewContext, ViewRequest, view_generator
from dinobridge.objectives.crop_resize import (
    CropResizeObjective,
    crop_resize_paste,
    draw_paste_params,
    paste_background,
)
from dinobridge.objectives.patch_roll import (
    PatchRollObjective,
    draw_shifts,
    inverse_permutation,
    local_shuffle_permutation,
    permute_patches,
    roll_permutation,
    selection_masks,
)
from dinobridge.train.meta_arch import SSLMetaArch, build_meta_arch
from dinobridge.train.optim import apply_schedule, build_optimizer, build_param_groups
from dinobridge.train.schedules import build_schedules
from test_train import TINY

RS = "resize_shuffle_augmentor"
ALL_ON = [f"{RS}.resize_paste_loss_weight=0.5", f"{RS}.patch_shuffle_loss_weight=1.0",
          f"{RS}.bridge_global_weight=0.25", f"{RS}.bridge_patchshuffle_weight=0.25"]
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg(extra=(), arch="SSLResizeShuffle"):  # noqa: B006
    return build_config(None, [*TINY, f"MODEL.META_ARCHITECTURE={arch}", "crops.use_resize_shuffle_augmentor=true",
                               *extra], config_name="train")


def _batch(seed: int, B: int = 4, prob: float = 0.5) -> dict:
    gen = torch.Generator().manual_seed(seed)
    samples = [{"global_crops": [torch.randn(3, 16, 16, generator=gen) for _ in range(2)],
                "local_crops": [torch.randn(3, 8, 8, generator=gen) for _ in range(2)]} for _ in range(B)]
    return collate_multicrop(samples, mask_generator=BlockMaskGenerator(4), rng=np.random.default_rng(seed),
                             mask_sample_probability=prob)


def _model(cfg, seed: int = 0) -> SSLMetaArch:
    torch.manual_seed(seed)
    m = build_meta_arch(cfg)
    m.init_weights()
    m.student.train()
    m.teacher.eval()
    return m


def _patches(x: torch.Tensor, p: int) -> torch.Tensor:
    """[n, C, H, W] -> [n, N, C*p*p] row-major patches."""
    n, c, h, w = x.shape
    return x.reshape(n, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5).reshape(n, (h // p) * (w // p), -1)


def _step(dino_targets, extras, views, B) -> SSLStep:
    return SSLStep(batch={}, n_global=2, n_local=0, batch_size=B, student_global={}, student_local=None,
                   student_dino_global=torch.zeros(2, B, 1), student_dino_local=None, student_ibot=None,
                   teacher_global={}, dino_targets=dino_targets, ibot_targets=None, teacher_temp=0.07, iteration=0,
                   epoch=0.0, extras=extras, views=views)


# ---------------------------------------------------------------------------------------------- Crop-Resize
def test_crop_resize_shape_grid_box_and_background():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(16, 3, 64, 64)
    params = draw_paste_params(16, 64, 64, gen, grid=16, crop_prob=0.7, roll_prob=0.5, split_prob=0.5)
    bg = paste_background(params, "random", MEAN, STD)
    y = crop_resize_paste(x, params, bg, grid=16)
    assert y.shape == x.shape
    for i, p in enumerate(params):
        assert p.y0 % 16 == 0 and p.x0 % 16 == 0 and p.ph % 16 == 0 and p.pw % 16 == 0 and p.ph >= 16
        assert p.y0 + p.ph <= 64 and p.x0 + p.pw <= 64
        outside = p.uncovered_tokens(64, 64, 16)
        assert len(outside) == 16 - (p.ph // 16) * (p.pw // 16)
        toks = _patches(y[i:i + 1], 16)[0, outside].reshape(len(outside), 3, -1)
        expect = ((torch.tensor(p.rgb) - torch.tensor(MEAN)) / torch.tensor(STD))[None, :, None]
        assert torch.equal(toks, expect.expand_as(toks))  # exactly the normalised background colour
        inside = y[i, :, p.y0:p.y0 + p.ph, p.x0:p.x0 + p.pw]
        assert not torch.equal(inside, expect[0, :, :, None].expand_as(inside))


def test_crop_resize_identity_and_resize_commutes_with_normalisation():
    gen = torch.Generator().manual_seed(1)
    raw = torch.rand(4, 3, 64, 64)
    params = draw_paste_params(4, 64, 64, gen, grid=16, crop_prob=0.0, scale=(1.0, 1.0))
    assert torch.equal(crop_resize_paste(raw, params, torch.zeros(4, 3), 16), raw)
    # resize + paste on normalised crops == normalise(resize + paste on raw [0, 1] crops)
    params = draw_paste_params(4, 64, 64, torch.Generator().manual_seed(2), grid=16)
    m, s = torch.tensor(MEAN)[None, :, None, None], torch.tensor(STD)[None, :, None, None]
    raw_bg = torch.tensor([p.rgb for p in params])
    on_raw = crop_resize_paste(raw, params, raw_bg, 16)
    on_norm = crop_resize_paste((raw - m) / s, params, paste_background(params, "random", MEAN, STD), 16)
    torch.testing.assert_close(on_norm, (on_raw - m) / s, atol=1e-5, rtol=0)


def test_crop_resize_streams_are_seeded_per_rank_and_iteration():
    def draw(rank, it):
        return draw_paste_params(8, 64, 64, view_generator(0, rank, it, "resize_paste"), grid=16)

    assert draw(0, 5) == draw(0, 5)
    assert draw(0, 5) != draw(1, 5) and draw(0, 5) != draw(0, 6)


def test_crop_resize_loss_is_cross_entropy_bounded_by_target_entropy():
    B, K, tau = 4, 8, 0.1
    q = torch.softmax(torch.randn(2, B, K, dtype=torch.float64) * 3, dim=-1)
    rs = _cfg([f"{RS}.resize_paste_loss_weight=0.5"])[RS]
    obj = CropResizeObjective(rs, None, 0, 4, MEAN, STD)
    src = torch.tensor([0, 5, 2, 7])  # rows g*B + b
    target = q.reshape(2 * B, K)[src]
    entropy = -(target * target.log()).sum(-1).mean()

    def loss(logits):
        view = {"request": ViewRequest(images=torch.zeros(B, 3, 16, 16), meta={"src": src}), "dino": logits}
        return obj(_step(q.float(), {obj.KEY: 0.5}, {obj.name: view}, B))

    exact, logs = loss((tau * target.log()).float())
    assert abs(exact.item() - 0.5 * entropy.item()) < 1e-5 and abs(logs["resize_paste_loss"] - entropy) < 1e-5
    s = torch.randn(B, K, dtype=torch.float64)
    oracle = -(target * torch.log_softmax(s / tau, -1)).sum(-1).mean()
    other, logs = loss(s.float())
    assert abs(logs["resize_paste_loss"].item() - oracle.item()) < 1e-5 and oracle > entropy
    assert abs(other.item() - 0.5 * oracle.item()) < 1e-5
    assert loss(s.float())[0].item() > 0 and obj(_step(q.float(), {obj.KEY: 0.0}, {}, B))[0].item() == 0.0


# ---------------------------------------------------------------------------------------------- PatchRoll
def test_roll_permutation_is_exact_token_permutation():
    h = w = 4
    x = torch.randn(6, 3, 64, 64)
    shifts = draw_shifts(6, h, w, 5, torch.Generator().manual_seed(0))
    perm = torch.stack([roll_permutation(h, w, dr, dc) for dr, dc in shifts.tolist()])
    inv = inverse_permutation(perm)
    for i in range(6):
        assert torch.equal(perm[i].sort().values, torch.arange(16))
        assert torch.equal(inv[i][perm[i]], torch.arange(16))
    y = permute_patches(x, inv, 16)
    for i, (dr, dc) in enumerate(shifts.tolist()):
        assert torch.equal(y[i], torch.roll(x[i], (dr * 16, dc * 16), dims=(-2, -1)))
    assert torch.equal(_patches(y, 16).gather(1, perm[..., None].expand(-1, -1, 768)), _patches(x, 16))
    embed = nn.Conv2d(3, 8, 16, 16)
    with torch.no_grad():
        e_x, e_y = (embed(t).flatten(2).transpose(1, 2) for t in (x, y))
    assert torch.equal(e_y, e_x.gather(1, inv[..., None].expand(-1, -1, 8)))  # PatchEmbed(roll x) = PatchEmbed(x)[inv]
    assert torch.equal(roll_permutation(h, w, 0, 0), torch.arange(16))
    assert torch.equal(roll_permutation(h, w, 4, -8), torch.arange(16))


def test_shifts_skip_identity_and_local_shuffle_is_a_local_bijection():
    gen = torch.Generator().manual_seed(0)
    s = draw_shifts(2000, 4, 4, 5, gen)
    assert s.abs().max() <= 5 and not (((s[:, 0] % 4) == 0) & ((s[:, 1] % 4) == 0)).any()
    assert (((draw_shifts(2000, 4, 4, 5, gen, allow_zero=True) % 4) == 0).all(dim=1)).any()
    perm = local_shuffle_permutation(8, 8, 2, 0.25, gen)
    assert torch.equal(perm.sort().values, torch.arange(64))
    moved = (perm != torch.arange(64)).nonzero().flatten()
    assert 0 < len(moved) <= 4 * 4  # inside 4 of the 16 cells
    assert ((perm[moved] // 8) // 2 == (moved // 8) // 2).all() and ((perm[moved] % 8) // 2 == (moved % 8) // 2).all()


def test_selection_masks_counts_ratios_and_circular_shift():
    for B, prob in ((8, 0.5), (7, 0.5), (5, 1.0), (1, 0.5)):
        for shift in (False, True):
            m = selection_masks(B, 14, 14, prob, (0.05, 0.15), torch.Generator().manual_seed(B), shift)
            rows = m.any(dim=1)
            assert rows.sum().item() == math.floor(B * prob)
            assert (m.sum(dim=1) <= int(196 * 0.15)).all()
        a = selection_masks(B, 14, 14, prob, (0.05, 0.15), torch.Generator().manual_seed(3), False)
        b = selection_masks(B, 14, 14, prob, (0.05, 0.15), torch.Generator().manual_seed(3), True)
        assert sorted(a.sum(1).tolist()) == sorted(b.sum(1).tolist())


@functools.lru_cache(maxsize=None)
def _roll_cfg(use_all: bool):
    return _cfg([f"{RS}.patch_shuffle_loss_weight=1.0", f"{RS}.use_all_shift_mask={str(use_all).lower()}",
               f"{RS}.patch_shuffle_patch_probability=1.0", f"{RS}.patch_shuffle_patch_min_max=[0.3,0.6]"])[RS]


def _roll_objective(use_all: bool, **kw) -> PatchRollObjective:
    return PatchRollObjective(_roll_cfg(use_all), {"patch_shuffle_loss_weight": None}, seed=0, patch_size=16, **kw)


def _ctx(it: int, B: int = 4) -> ViewContext:
    gen = torch.Generator().manual_seed(it)
    masks = torch.rand(2 * B, 16, generator=gen) < 0.5
    return ViewContext(global_crops=torch.randn(2 * B, 3, 64, 64, generator=gen), masks=masks, n_global=2,
                       batch_size=B, patch_size=16, iteration=it, rank=0, mean=MEAN, std=STD,
                       extras={"patch_shuffle_loss_weight": 1.0})


def test_selection_without_all_shift_mask_avoids_student_input_mask():
    overlaps = 0
    for it in range(5):
        r = _roll_objective(False).make_view(_ctx(it))
        assert r.masks is not None and not (r.meta["selection"] & r.masks.cpu()).any()
        r_all = _roll_objective(True).make_view(_ctx(it))
        overlaps += int((r_all.meta["selection"] & r_all.masks.cpu()).any())
        # the student input mask is the source crop's mask moved with its content
        ctx = _ctx(it)
        src, inv = r.meta["src"], r.meta["inv"]
        assert torch.equal(r.masks, ctx.masks[src].gather(1, inv))
        assert torch.equal(r.images, permute_patches(ctx.global_crops[src], inv, 16))
    assert overlaps > 0  # with use_all_shift_mask the selection does overlap the masked tokens
    assert torch.equal(_roll_objective(True).make_view(_ctx(3)).images, _roll_objective(True).make_view(_ctx(3)).images)
    ctx0 = _ctx(0)
    ctx0.extras = {"patch_shuffle_loss_weight": 0.0}
    assert _roll_objective(True).make_view(ctx0) is None


class _TokenwiseEncoder(nn.Module):
    """Permutation-equivariant stand-in for the ViT: patch embedding + token-wise MLP, no positions; CLS = mean."""

    def __init__(self, dim: int, patch: int) -> None:
        super().__init__()
        self.patch_size, self.embed_dim = patch, dim
        self.proj = nn.Conv2d(3, dim, patch, patch)
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.Tanh())
        self.mask_token = nn.Parameter(torch.randn(dim))

    def _one(self, x, m):
        t = self.proj(x).flatten(2).transpose(1, 2)
        if m is not None:
            t = torch.where(m[..., None], self.mask_token.to(t.dtype), t)
        t = self.mlp(t)
        return {"x_norm_clstoken": t.mean(1), "x_norm_patchtokens": t, "masks": m}

    def forward_features(self, x, masks=None):
        if torch.is_tensor(x):
            return self._one(x, masks)
        return [self._one(a, b) for a, b in zip(x, masks or [None] * len(x))]


def test_patch_roll_alignment_with_equivariant_encoder_gives_target_entropy():
    cfg = _cfg([f"{RS}.patch_shuffle_loss_weight=1.0", f"{RS}.patch_shuffle_ibot_mask=false",
                f"{RS}.patch_shuffle_patch_probability=1.0", f"{RS}.patch_shuffle_patch_min_max=[0.3,0.6]",
                "train.centering=softmax_center", "dino.koleo_loss_weight=0", "dino.koleo_cls_loss_weight=null"])
    m = _model(cfg)
    torch.manual_seed(1)
    m.student["backbone"] = _TokenwiseEncoder(32, 4)
    m.teacher["backbone"] = copy.deepcopy(m.student.backbone)
    B, N = 4, 16
    batch = _batch(3)
    with torch.no_grad():
        step = m.compute_step(batch, teacher_temp=0.1, iteration=0, epoch=0.0, extras={})
        view = step.views["patch_roll"]
        meta = view["request"].meta
        t_tok = m.teacher.backbone.forward_features(batch["global_crops"])["x_norm_patchtokens"]
        sel = meta["selection"].flatten().nonzero().flatten()
        rows, cols = sel // N, sel % N
        aligned = t_tok[meta["src"][rows], meta["inv"][rows, cols]]
        t_logits = m.teacher.ibot_head(aligned)
        torch.testing.assert_close(view["ibot"], t_logits, atol=1e-5, rtol=1e-5)  # student token j <-> teacher inv[j]
        torch.testing.assert_close(view["ibot_targets"], torch.softmax(t_logits / 0.1, -1), atol=1e-6, rtol=1e-5)
        _, logs = m.objectives["patch_roll"](step)
    q = view["ibot_targets"].double()
    w = 1.0 / meta["selection"].sum(1).double()
    entropy = (-(q * q.log()).sum(-1) * w[rows]).sum() / B
    assert abs(logs["patch_shuffle_patch_loss"].item() - entropy.item()) < 1e-5
    # misaligned (perm instead of inv): strictly larger than the entropy
    wrong = m.teacher.ibot_head(t_tok[meta["src"][rows], meta["perm"][rows, cols]]).detach()
    ce = -(torch.softmax(wrong.double() / 0.1, -1) * torch.log_softmax(view["ibot"].double() / 0.1, -1)).sum(-1)
    assert (ce * w[rows]).sum() / B > entropy + 1e-3


# ---------------------------------------------------------------------------------------------- meta-architecture
def _run(cfg, steps: int = 3, seed: int = 0):
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)
    m = _model(cfg, seed)
    calls = {"student": [], "teacher": []}
    m.student.backbone.patch_embed.register_forward_hook(lambda mod, i, o: calls["student"].append(i[0].shape[0]))
    m.teacher.backbone.patch_embed.register_forward_hook(lambda mod, i, o: calls["teacher"].append(i[0].shape[0]))
    opt = build_optimizer(build_param_groups(m.student, cfg), cfg, "cpu", fused=False)
    sched = build_schedules(cfg, 4, 4, 4)
    logs_all = []
    for it in range(steps):
        apply_schedule(opt, 1e-3, 0.04, 1e-3)
        opt.zero_grad(set_to_none=True)
        loss, logs = m(_batch(it), teacher_temp=0.07, iteration=it, extras=sched.extras(it), monitors=True)
        loss.backward()
        opt.step()
        m.update_teacher(0.9)
        logs_all.append({k: v.item() for k, v in logs.items()})
    rng = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    return m, logs_all, calls, rng


def test_all_addon_weights_zero_equal_the_plain_meta_arch():
    plain, logs_p, calls_p, rng_p = _run(_cfg(arch="SSLMetaArch"))
    rs, logs_r, calls_r, rng_r = _run(_cfg())  # SSLResizeShuffle, views on, every add-on weight 0 (defaults)
    assert list(rs.objectives) == list(plain.objectives) and "bridge" not in rs.student
    assert list(rs.state_dict()) == list(plain.state_dict())
    assert logs_r == logs_p  # bit for bit
    assert calls_r == calls_p == {"student": [8, 8] * 3, "teacher": [8] * 3}
    assert torch.equal(rng_r[0], rng_p[0]) and np.array_equal(rng_r[1], rng_p[1]) and rng_r[2] == rng_p[2]
    for k, v in plain.state_dict().items():
        assert torch.equal(v, rs.state_dict()[k]), k


def test_inactive_addons_change_nothing_and_active_ones_join_the_one_student_call():
    later = [f"{RS}.{k}.zero_epochs=0.5" for k in ("resize_paste_loss_weight", "patch_shuffle_loss_weight",
                                                   "bridge_global_weight", "bridge_patchshuffle_weight")]
    _, logs_p, calls_p, rng_p = _run(_cfg(arch="SSLMetaArch"), steps=2)
    m, logs_r, calls_r, rng_r = _run(_cfg([*ALL_ON, *later]), steps=2)  # weights 0 for iterations 0-1
    assert list(m.objectives)[-3:] == ["resize_paste", "patch_roll", "bridge"] and "bridge" in m.student
    assert logs_r == logs_p and calls_r == calls_p  # built but inactive: same losses, same forwards
    assert torch.equal(rng_r[0], rng_p[0])  # building and initialising the bridge draws nothing from the global RNG
    # active from step 0: the two views (B rows each) join the 2B global crops; still one student, one teacher call
    m, logs, calls, _ = _run(_cfg(ALL_ON), steps=1)
    assert calls == {"student": [8 + 4 + 4, 8], "teacher": [8]}
    for key in ("resize_paste_loss", "patch_shuffle_cls_loss", "patch_shuffle_patch_loss", "bridge_global_loss",
                "bridge_patchshuffle_loss"):
        assert key in logs[0] and math.isfinite(logs[0][key]) and logs[0][key] > 0, key
    assert not any(k.startswith("bridge") for k in m.teacher.state_dict())


def test_no_teacher_gradient_and_dtch_read_only_for_roll_targets():
    cfg = _cfg([*ALL_ON, "dtch.enabled=true", "dtch.patch_hist_cache=1000",
                f"{RS}.patch_shuffle_patch_probability=1.0"])
    m = _model(cfg)
    batch = _batch(0)
    loss, _ = m(batch, teacher_temp=0.07, iteration=0)
    loss.backward()
    assert all(p.grad is None for p in m.teacher.parameters())
    # only the iBOT masked patches were pushed into the patch history, not the PatchRoll tokens
    assert m.ibot_balancer.n_hist.item() == pytest.approx(float(batch["n_masked_patches"]))
    assert m.dino_balancer.n_hist.item() == pytest.approx(8.0)


def test_views_need_the_augmentor_switch_and_the_resize_shuffle_arch():
    off = _model(_cfg([*ALL_ON, "crops.use_resize_shuffle_augmentor=false"]))
    assert [k for k in off.objectives if k not in ("dino", "ibot", "koleo")] == ["bridge"]  # global bridge only
    plain = _model(_cfg(ALL_ON, arch="SSLMetaArch"))
    assert list(plain.objectives) == ["dino", "ibot", "koleo"] and "bridge" not in plain.student
