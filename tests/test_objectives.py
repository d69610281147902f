import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from gloo_utils import with_free_port

from dinobridge.objectives import (
    DINOLoss,
    GramLoss,
    IBOTPatchLoss,
    KoLeoLoss,
    KoLeoLossDistributed,
    dino_pair_weights,
    masks_weight_from_masks,
    patch_koleo_loss,
    weighted_dino_loss,
    weighted_koleo_loss,
)


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _probs(*shape, seed=0):
    return torch.softmax(_randn(*shape, seed=seed) * 2, dim=-1)


# ---------------------------------------------------------------- DINO


def ref_dino(student, teacher, tau, ignore_diagonal):
    s_n, b_n, _ = student.shape
    t_n = teacher.shape[0]
    total, count = 0.0, 0
    for s in range(s_n):
        logp = torch.log_softmax(student[s].double() / tau, dim=-1)
        for t in range(t_n):
            if ignore_diagonal and s == t:
                continue
            for b in range(b_n):
                total += -(teacher[t, b].double() * logp[b]).sum().item()
                count += 1
    return total / count


@pytest.mark.parametrize("ignore_diagonal", [False, True])
@pytest.mark.parametrize("s_n", [2, 3])
def test_dino_loss_matches_float64(ignore_diagonal, s_n):
    student = _randn(s_n, 4, 16, seed=1).bfloat16()
    teacher = _probs(2, 4, 16, seed=2)
    loss = DINOLoss(0.1)(student, teacher, ignore_diagonal=ignore_diagonal)
    assert loss.dtype == torch.float32 and loss.ndim == 0
    assert loss.item() == pytest.approx(ref_dino(student, teacher, 0.1, ignore_diagonal), rel=1e-5)


def test_dino_loss_hand_made_pairs():
    # K=2, B=1. Student crop s has softmax(z/τ) = (a_s, 1-a_s); teacher crop t is one-hot on class t.
    a = [0.5, 0.25, 0.8]
    tau = 0.1
    student = torch.tensor([[[tau * math.log(x), tau * math.log(1 - x)]] for x in a])  # [3, 1, 2]
    teacher = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])  # [2, 1, 2]
    ce = [[-math.log(x), -math.log(1 - x)] for x in a]  # ce[s][t]
    loss = DINOLoss(tau)
    all_pairs = sum(ce[s][t] for s in range(3) for t in range(2)) / 6
    off_diag = (ce[0][1] + ce[1][0] + ce[2][0] + ce[2][1]) / 4  # denominator B·S·T - B·min(S,T) = 6 - 2
    assert loss(student, teacher, ignore_diagonal=False).item() == pytest.approx(all_pairs, rel=1e-5)
    assert loss(student, teacher, ignore_diagonal=True).item() == pytest.approx(off_diag, rel=1e-5)


def test_dino_loss_gradient_and_center_buffer():
    student = _randn(3, 2, 8, seed=3).requires_grad_()
    DINOLoss()(student, _probs(2, 2, 8), ignore_diagonal=True).backward()
    assert student.grad is not None and torch.isfinite(student.grad).all()
    assert list(DINOLoss(n_prototypes=8).state_dict()) == ["center"]
    assert list(DINOLoss().state_dict()) == []
    with pytest.raises(ValueError, match="no pairs"):
        DINOLoss()(_randn(1, 2, 8), _probs(1, 2, 8), ignore_diagonal=True)


def test_official_weighting():
    assert dino_pair_weights(2, 8, ignore_diagonal=True) == pytest.approx((16 / 18, 2 / 18))
    assert dino_pair_weights(2, 8, ignore_diagonal=False) == pytest.approx((16 / 20, 4 / 20))
    assert dino_pair_weights(2, 0, ignore_diagonal=True) == (0.0, 1.0)
    with pytest.raises(ValueError):
        dino_pair_weights(1, 0, ignore_diagonal=True)
    # local loss 3.0, global loss 1.5, local weight schedule 0.5, loss weight 2
    assert weighted_dino_loss(3.0, 1.5, 2, 8, True, local_weight=0.5, loss_weight=2.0) == pytest.approx(
        2.0 * (16 / 18 * 0.5 * 3.0 + 2 / 18 * 1.5)
    )
    assert weighted_koleo_loss(0.5, 2, 0.1) == pytest.approx(0.1)  # 0.1 · (sum over the 2 crops)


# ---------------------------------------------------------------- iBOT


def test_masks_weight_hand_made():
    masks = torch.tensor([[1, 1, 0], [0, 0, 0], [1, 0, 0]], dtype=torch.bool)
    torch.testing.assert_close(masks_weight_from_masks(masks), torch.tensor([0.5, 0.5, 1.0]))


def test_ibot_loss_matches_float64():
    masks = torch.tensor([[1, 1, 0, 1], [0, 0, 0, 0], [0, 1, 0, 0]], dtype=torch.bool)
    w = masks_weight_from_masks(masks)
    m = int(masks.sum())
    student = _randn(m, 10, seed=4).requires_grad_()
    teacher = _probs(m, 10, seed=5)
    loss = IBOTPatchLoss(0.1)(student, teacher, w, n_images=3)
    ref = 0.0
    for j in range(m):
        ce = (teacher[j].double() * torch.log_softmax(student[j].detach().double() / 0.1, dim=-1)).sum().item()
        ref += -w[j].item() * ce
    assert loss.item() == pytest.approx(ref / 3, rel=1e-5)  # the unmasked image counts in the denominator
    loss.backward()
    assert torch.isfinite(student.grad).all()
    assert list(IBOTPatchLoss(n_prototypes=10).state_dict()["center"].shape) == [1, 1, 10]


# ---------------------------------------------------------------- KoLeo


def ref_koleo_terms(x, topk=1):
    """Float64 oracle: -log(‖x̂_i - x̂_j + eps‖ + eps) for the topk most similar j != i."""
    x = x.double()
    x = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    terms = []
    for i in range(len(x)):
        sims = [(float(x[i] @ x[j]), j) for j in range(len(x)) if j != i]
        for _, j in sorted(sims, reverse=True)[:topk]:
            terms.append(-math.log(float((x[i] - x[j] + 1e-8).norm()) + 1e-8))
    return torch.tensor(terms, dtype=torch.float64)


def test_koleo_matches_float64_and_gate_disabled_is_plain():
    x = _randn(12, 6, seed=6)
    ref = ref_koleo_terms(x).mean().item()
    assert KoLeoLoss()(x).item() == pytest.approx(ref, rel=1e-5)
    assert KoLeoLoss(gate_threshold=None)(x.bfloat16()).item() == pytest.approx(
        ref_koleo_terms(x.bfloat16()).mean().item(), rel=1e-5
    )
    sets = _randn(3, 5, 6, seed=7)
    assert KoLeoLoss()(sets).item() == pytest.approx(
        sum(ref_koleo_terms(s).mean().item() for s in sets) / 3, rel=1e-5
    )
    with pytest.raises(ValueError, match="at least 2"):
        KoLeoLoss()(x[:1])


def test_koleo_gate_hand_computed():
    # unit vectors at 0°, 90°, 200°: nearest-neighbour chords √2, √2, 2·sin(55°)
    ang = [0.0, 90.0, 200.0]
    x = torch.tensor([[math.cos(math.radians(a)), math.sin(math.radians(a))] for a in ang])
    d = [math.sqrt(2), math.sqrt(2), 2 * math.sin(math.radians(55))]
    l = [-math.log(v) for v in d]
    thr = -0.4
    g = [1 / (1 + math.exp(-(v - thr) / 0.1)) for v in l]
    lg = [a * b for a, b in zip(l, g)]
    expected = 0.5 * sum(lg) / 3 + 0.5 * sum(lg) / max(sum(g), 1.0)
    assert KoLeoLoss(gate_threshold=thr)(x).item() == pytest.approx(expected, abs=1e-6)
    assert KoLeoLoss()(x).item() == pytest.approx(sum(l) / 3, abs=1e-6)
    xg = x.clone().requires_grad_()
    KoLeoLoss(gate_threshold=thr)(xg).backward()
    assert torch.isfinite(xg.grad).all() and xg.grad.abs().sum() > 0


def test_patch_koleo_chunks_reproducible():
    tokens = _randn(23, 8, seed=8)
    koleo = KoLeoLoss()
    a = patch_koleo_loss(tokens, 5, koleo, torch.Generator().manual_seed(3))
    b = patch_koleo_loss(tokens, 5, koleo, torch.Generator().manual_seed(3))
    assert a.item() == b.item()
    perm = torch.randperm(23, generator=torch.Generator().manual_seed(3))
    chunks = [tokens[perm[i * 5 : (i + 1) * 5]] for i in range(4)]  # 3 remaining tokens dropped
    assert a.item() == pytest.approx(sum(ref_koleo_terms(c).mean().item() for c in chunks) / 4, rel=1e-5)
    small = patch_koleo_loss(tokens[:4], 5, koleo, torch.Generator().manual_seed(0))
    assert small.item() == pytest.approx(ref_koleo_terms(tokens[:4]).mean().item(), rel=1e-5)


def test_koleo_distributed_single_process():
    x = _randn(10, 6, seed=9)
    assert KoLeoLossDistributed()(x).item() == pytest.approx(KoLeoLoss()(x).item(), rel=1e-6)
    assert KoLeoLossDistributed(topk=3)(x).item() == pytest.approx(ref_koleo_terms(x, topk=3).mean().item(), rel=1e-5)
    with pytest.raises(ValueError, match="group_size"):
        KoLeoLossDistributed(group_size=4)(x)




def _koleo_worker(rank, world, port, out_dir, x):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        b = x.shape[0] // world
        mine = x[rank * b : (rank + 1) * b].clone().requires_grad_()
        loss = KoLeoLossDistributed(topk=1)(mine)
        loss.backward()
        own_group = KoLeoLossDistributed(topk=1, group_size=b)(mine.detach())
        torch.save({"loss": loss.detach(), "grad": mine.grad, "own": own_group}, os.path.join(out_dir, f"k{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_koleo_distributed_two_processes_equal_concatenated(tmp_path):
    x = _randn(12, 5, seed=10)
    with_free_port(lambda port: mp.spawn(_koleo_worker, args=(2, port, str(tmp_path), x), nprocs=2, join=True))
    r = [torch.load(tmp_path / f"k{i}.pt") for i in range(2)]
    xs = x.clone().requires_grad_()
    single = KoLeoLoss()(xs)
    single.backward()
    # equal local batches: the mean of the per-rank losses is the loss of the concatenated batch
    assert (r[0]["loss"] + r[1]["loss"]).item() / 2 == pytest.approx(single.item(), rel=1e-6)
    # rank r's gradient is d(Σ_ranks L_r)/dx_r = world · d(L_single)/dx_r (autograd through the all-gather)
    torch.testing.assert_close(torch.cat([r[0]["grad"], r[1]["grad"]]), 2 * xs.grad, atol=1e-5, rtol=1e-5)
    for i in range(2):  # group_size = B: each rank only searches its own samples
        assert r[i]["own"].item() == pytest.approx(KoLeoLoss()(x[i * 6 : (i + 1) * 6]).item(), rel=1e-6)


# ---------------------------------------------------------------- Gram


def ref_gram(s, t, norm, img_level, mode):
    s, t = s.double(), t.double()
    if norm:
        s = s / s.norm(dim=-1, keepdim=True)
        t = t / t.norm(dim=-1, keepdim=True)
    if not img_level:
        s, t = s.reshape(1, -1, s.shape[-1]), t.reshape(1, -1, t.shape[-1])
    total, count = 0.0, 0
    for b in range(s.shape[0]):
        for i in range(s.shape[1]):
            for j in range(s.shape[1]):
                gs, gt = float(s[b, i] @ s[b, j]), float(t[b, i] @ t[b, j])
                if mode == "both":
                    gs, gt = max(gs, 0.0), max(gt, 0.0)
                elif mode == "teacher":
                    if gt < 0:
                        gs = max(gs, 0.0)
                        gt = 0.0
                total += (gs - gt) ** 2
                count += 1
    return total / count


@pytest.mark.parametrize(
    "norm,img_level,mode",
    [(True, True, None), (False, True, None), (True, False, None), (True, True, "both"), (True, True, "teacher")],
)
def test_gram_loss_matches_float64(norm, img_level, mode):
    s = _randn(2, 5, 4, seed=11).requires_grad_()
    t = _randn(2, 5, 4, seed=12).requires_grad_()
    loss_fn = GramLoss(apply_norm=norm, img_level=img_level, remove_neg=mode == "both",
                       remove_only_teacher_neg=mode == "teacher")
    loss = loss_fn(s, t)
    assert loss.item() == pytest.approx(ref_gram(s.detach(), t.detach(), norm, img_level, mode), rel=1e-5)
    loss.backward()
    assert s.grad is not None and t.grad is None


def test_gram_remove_only_teacher_neg_hand_made():
    # 1 image, 2 tokens (no norm). Teacher off-diagonal similarity -1; student -0.5 (both negative -> both zeroed)
    t = torch.tensor([[[1.0, 0.0], [-1.0, 0.0]]])
    s = torch.tensor([[[1.0, 0.0], [-0.5, 0.0]]])
    # diagonals: student (1, 0.25) vs teacher (1, 1); off-diagonal both 0 -> loss = (0.75²) / 4
    assert GramLoss(apply_norm=False, remove_only_teacher_neg=True)(s, t).item() == pytest.approx(0.75**2 / 4)
    # student positive where the teacher is negative: pushed towards 0
    s2 = torch.tensor([[[1.0, 0.0], [0.5, 0.0]]])
    assert GramLoss(apply_norm=False, remove_only_teacher_neg=True)(s2, t).item() == pytest.approx(
        (0.75**2 + 2 * 0.5**2) / 4
    )
    with pytest.raises(ValueError, match="exclusive"):
        GramLoss(remove_neg=True, remove_only_teacher_neg=True)
