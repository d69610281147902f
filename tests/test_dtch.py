"""DTCH-SK balancer (reference §2.1, property tests §2.6): reduction to Sinkhorn, marginals, closed form, history
modes, equivariance, limits, 2-process gloo equivalence, state round trip, dtypes, meta-architecture wiring."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from gloo_utils import with_free_port

from dinobridge.balancing import DTCHSinkhorn, SinkhornKnopp, available_balancers, build_balancer, build_dtch_balancer
from dinobridge.config.addons import DtchConfig


# ---------------------------------------------------------------- float64 oracles written from the formulas
def ref_sinkhorn(L: torch.Tensor, tau: float, n_iter: int) -> torch.Tensor:
    """DINOv2/DINOv3 sinkhorn_knopp_teacher in float64."""
    Q = torch.exp(L.double() / tau).T
    K, B = Q.shape
    Q = Q / Q.sum()
    for _ in range(n_iter):
        Q = Q / Q.sum(1, keepdim=True) / K
        Q = Q / Q.sum(0, keepdim=True) / B
    return (Q * B).T


def ref_dtch(L, tau, s=1.0, p=None, hist=None, n_hist=0.0, lam=1.0, n_iter=3) -> torch.Tensor:
    """DTCH-SK (§2.1.3) in float64: SK with a history pseudo-column of mass H/B, then power p."""
    p = s if p is None else p
    Z = L.double() / (s * tau)
    B, K = Z.shape
    Q = torch.exp(Z - Z.max()).T
    Q = Q / Q.sum()
    H = lam * n_hist
    hcol = (H / B) * hist.double() / n_hist if H > 0 else torch.zeros(K, dtype=torch.float64)
    tot = 1.0 + H / B
    for _ in range(n_iter):
        f = (tot / K) / (Q.sum(1) + hcol)
        Q = Q * f[:, None]
        hcol = hcol * f
        Q = Q / Q.sum(0, keepdim=True) / B
        if H > 0:
            hcol = hcol * ((H / B) / hcol.sum())
    q = (Q * B).T
    if p != 1.0:
        q = torch.softmax(p * torch.log(q), dim=-1)
    return q


def entropy(q: torch.Tensor) -> float:
    q = q.double()
    return float(-(q * torch.log(q.clamp_min(1e-300))).sum(-1).mean())


def _logits(n=16, k=64, seed=0, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g) * scale


def _set_history(bal: DTCHSinkhorn, hist: torch.Tensor) -> None:
    bal.hist.copy_(hist.float())
    bal.n_hist.fill_(float(hist.double().sum()))


TAU = 0.07


# ---------------------------------------------------------------- reduction, marginals, closed form
def test_empty_history_is_sinkhorn_bit_for_bit_and_matches_oracle():
    L = _logits()
    for n_iter in (1, 3, 10):
        q = DTCHSinkhorn(64, n_iterations=n_iter)(L, TAU)
        assert q.dtype == torch.float32 and q.shape == L.shape
        assert torch.equal(q, SinkhornKnopp(n_iterations=n_iter)(L, TAU))
        assert (q.double() - ref_sinkhorn(L, TAU, n_iter)).abs().max().item() <= 1e-6
    # the float64 DTCH oracle with an empty history is the SK oracle (1e-16 in the report)
    assert (ref_dtch(L, TAU) - ref_sinkhorn(L, TAU, 3)).abs().max().item() < 1e-13
    # with history on, step 0 is plain SK and step 1 is not
    bal = DTCHSinkhorn(64, hist_cache=1000)
    sk = SinkhornKnopp()
    assert torch.equal(bal(L, TAU), sk(L, TAU))
    assert not torch.allclose(bal(L, TAU), sk(L, TAU), atol=1e-3)


def test_matches_float64_oracle_with_history_scale_and_power():
    L = _logits(seed=1)
    hist = torch.rand(64, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 5 + 0.5
    for s, p, lam in ((1.0, None, 1.0), (2.0, None, 1.0), (2.0, 1.0, 0.5), (1.5, 3.0, 2.0)):
        bal = DTCHSinkhorn(64, soft_scale=s, power=p, hist_weight=lam)
        _set_history(bal, hist)
        q = bal(L, TAU, update=False)
        ref = ref_dtch(L, TAU, s=s, p=p, hist=hist, n_hist=float(hist.sum()), lam=lam)
        assert (q.double() - ref).abs().max().item() < 1e-5, (s, p, lam)
        torch.testing.assert_close(q.sum(-1), torch.ones(16), atol=1e-6, rtol=0)


def test_marginals():
    B, K = 40, 16
    L = _logits(B, K, seed=3, scale=1.0)
    q = DTCHSinkhorn(K, n_iterations=200)(L, 0.5)
    assert (q.sum(1) - 1).abs().max().item() < 1e-6
    assert (q.sum(0) / (B / K) - 1).abs().max().item() < 1e-5  # H = 0: equipartition over the batch
    # with a history: the WINDOW (batch + pseudo-column of mass H, distribution ∝ ĥ ⊙ u) is balanced, not the batch
    hist = torch.linspace(1.0, 4.0, K, dtype=torch.float64)
    hist = hist / hist.sum() * 60.0  # H = 60 samples
    bal = DTCHSinkhorn(K, n_iterations=300)
    _set_history(bal, hist)
    q = bal(L, 0.5, update=False).double()
    assert (q.sum(1) - 1).abs().max().item() < 1e-6
    log_u = torch.log(q) - L.double() / 0.5  # per-sample constant + log u
    u = torch.exp(log_u[0] - log_u[0].max())
    hist_part = 60.0 * hist * u / (hist * u).sum()
    window = q.sum(0) + hist_part
    assert (window / ((B + 60.0) / K) - 1).abs().max().item() < 1e-4
    assert (q.sum(0) / (B / K) - 1).abs().max().item() > 1e-2  # the batch itself is not forced to equipartition


def test_closed_form_dual_temperature():
    L = _logits(seed=4)
    hist = torch.rand(64, generator=torch.Generator().manual_seed(5)) + 0.2
    for s in (1.5, 2.0, 3.0):
        soft = DTCHSinkhorn(64, soft_scale=s, power=1.0)
        sharp = DTCHSinkhorn(64, soft_scale=s)  # p = s
        for b in (soft, sharp):
            _set_history(b, hist * 50)
        q1 = soft(L, TAU, update=False).double()
        qs = sharp(L, TAU, update=False).double()
        log_u = torch.log(q1) - L.double() / (s * TAU)
        log_u = log_u - log_u.mean(dim=1, keepdim=True)
        assert (log_u - log_u[0]).abs().max().item() < 1e-4  # log u is the same for every sample
        closed = torch.softmax(L.double() / TAU + s * log_u[0], dim=-1)
        assert (qs - closed).abs().max().item() < 1e-5


def test_scale_and_power_sharpness():
    L = _logits(32, 64, seed=6)
    h = lambda **kw: entropy(DTCHSinkhorn(64, **kw)(L, TAU))  # noqa: E731
    # balancing in soft space gives softer targets; the power sharpens them again, monotonically in p
    assert h(soft_scale=2.0, power=1.0) > h(soft_scale=1.0) + 0.1
    ents = [h(soft_scale=2.0, power=p) for p in (1.0, 1.5, 2.0, 3.0)]
    assert all(a > b for a, b in zip(ents, ents[1:])), ents
    # with a huge uniform history the balancing vanishes: p = 1 gives the soft teacher, p = s the teacher at τ
    uniform = torch.full((64,), 1e7 / 64)
    for p, temp in ((1.0, 2.0 * TAU), (2.0, TAU)):
        bal = DTCHSinkhorn(64, soft_scale=2.0, power=p)
        _set_history(bal, uniform)
        ref = torch.softmax(L.double() / temp, dim=-1)
        assert (bal(L, TAU, update=False).double() - ref).abs().max().item() < 1e-5


# ---------------------------------------------------------------- history and its limits
def test_huge_uniform_history_gives_softmax_and_no_flattening():
    L = _logits(16, 64, seed=7)
    bal = DTCHSinkhorn(64)
    _set_history(bal, torch.full((64,), 1e7 / 64))
    assert (bal(L, TAU, update=False).double() - torch.softmax(L.double() / TAU, -1)).abs().max().item() < 1e-5

    B, K = 8, 4096
    L = _logits(B, K, seed=0)
    sk = entropy(SinkhornKnopp()(L, TAU))
    teacher = entropy(torch.softmax(L.double() / TAU, -1))
    bal = DTCHSinkhorn(K, hist_cache=40000, history_mode="window")
    for i in range(50):  # a real history: 40000 samples of the same logit distribution, pushed 800 at a time
        bal.update(_logits(800, K, seed=100 + i), teacher_temp=TAU)
    assert bal.n_hist.item() == 40000 and bal.ring.shape[0] == 50
    dtch = entropy(bal(L, TAU, update=False))
    assert sk > 6.0 and dtch < 0.5 * sk and dtch < 1.1 * teacher, (sk, dtch, teacher)


def test_monotone_correction():
    L = _logits(16, 32, seed=8)
    base = torch.rand(32, generator=torch.Generator().manual_seed(9)) * 10 + 5
    j = 3
    masses = []
    for extra in (0.0, 5.0, 20.0, 80.0):
        hist = base.clone()
        hist[j] += extra
        bal = DTCHSinkhorn(32)
        _set_history(bal, hist)
        masses.append(bal(L, TAU, update=False)[:, j].sum().item())
    assert all(a > b for a, b in zip(masses, masses[1:])), masses


def test_equivariance():
    L = _logits(12, 32, seed=10)
    hist = torch.rand(32, generator=torch.Generator().manual_seed(11)) * 3 + 1
    g = torch.Generator().manual_seed(12)
    ps, pk = torch.randperm(12, generator=g), torch.randperm(32, generator=g)

    def run(logits, h):
        bal = DTCHSinkhorn(32, soft_scale=2.0)
        _set_history(bal, h)
        return bal(logits, TAU, update=False)

    q = run(L, hist)
    torch.testing.assert_close(run(L[ps], hist), q[ps], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(run(L[:, pk], hist[pk]), q[:, pk], atol=1e-6, rtol=1e-5)


def test_large_history_limit_is_the_one_step_prior():
    L = _logits(8, 32, seed=13)
    h_hat = torch.rand(32, generator=torch.Generator().manual_seed(14), dtype=torch.float64) + 0.1
    h_hat = h_hat / h_hat.sum()
    prior = torch.softmax(L.double() / TAU, -1) / h_hat
    prior = prior / prior.sum(-1, keepdim=True)
    errs = []
    for ratio in (1e2, 1e4, 1e6):
        bal = DTCHSinkhorn(32)
        _set_history(bal, h_hat * ratio * 8)
        errs.append((bal(L, TAU, update=False).double() - prior).abs().max().item())
    assert errs[0] > errs[1] > errs[2] and errs[2] < 1e-4, errs


def test_ema_history_decays_geometrically():
    K, n_cap = 16, 100
    bal = DTCHSinkhorn(K, hist_cache=n_cap, history_mode="ema", soft_scale=2.0)
    hist, n_hist = torch.zeros(K, dtype=torch.float64), 0.0
    for step, n in enumerate((10, 10, 25, 4)):
        L = _logits(n, K, seed=20 + step)
        bal(L, TAU)
        c = torch.softmax(L.double() / (2.0 * TAU), -1).sum(0)  # pre-balance soft demand in sample units
        gamma = 1.0 - n / n_cap
        hist, n_hist = gamma * hist + c, gamma * n_hist + n
        torch.testing.assert_close(bal.hist.double(), hist, atol=1e-5, rtol=1e-5)
        assert abs(bal.n_hist.item() - n_hist) < 1e-4
    # a constant batch: n_hist -> N_cap (1 - γ^t), and an old contribution decays by γ per step
    bal = DTCHSinkhorn(K, hist_cache=n_cap)
    one_hot = torch.full((10, K), -1e4)
    one_hot[:, 0] = 0.0  # every sample puts its whole demand on prototype 0
    bal(one_hot, TAU)
    for t in range(1, 6):
        bal(torch.zeros(10, K), TAU)  # uniform demand afterwards
        expected = 10 * 0.9**t + sum(10 / K * 0.9**i for i in range(t))
        assert abs(bal.hist[0].item() - expected) < 1e-4
        assert abs(bal.n_hist.item() - n_cap * (1 - 0.9 ** (t + 1))) < 1e-4
    # the over-used prototype gets less mass than without that history
    L = _logits(10, K, seed=30)
    fresh = DTCHSinkhorn(K, hist_cache=n_cap)
    _set_history(fresh, torch.full((K,), bal.n_hist.item() / K))
    assert bal(L, TAU, update=False)[:, 0].sum() < fresh(L, TAU, update=False)[:, 0].sum()


def test_window_history_forgets_after_its_slots_and_evicts_fifo():
    K = 8
    bal = DTCHSinkhorn(K, hist_cache=20, history_mode="window")  # B = 10 -> R = 2 slots
    demands = []
    for step in range(4):
        L = _logits(10, K, seed=40 + step)
        bal(L, TAU)
        demands.append(torch.softmax(L.double() / TAU, -1).sum(0))
        torch.testing.assert_close(bal.hist.double(), sum(demands[-2:]), atol=1e-5, rtol=1e-5)
        assert bal.n_hist.item() == 10 * min(step + 1, 2)
    assert bal.ring.shape == (2, K) and bal.filled.item() == 2
    # counts that vary: oldest slots go first until n_hist <= N_cap; the newest step always stays
    bal = DTCHSinkhorn(K, hist_cache=10, history_mode="window", window_slots=5)
    kept_expected = [[4], [4, 3], [4, 3, 2], [3, 2, 5], [6], [6, 0]]
    pushed = {}
    for step, n in enumerate((4, 3, 2, 5, 6, 0)):
        c = torch.rand(K, generator=torch.Generator().manual_seed(step), dtype=torch.float64)
        c = c / c.sum() * n
        pushed[n] = c
        bal.push(c.float(), torch.tensor(float(n)))
        want = [m for m in kept_expected[step] if m > 0]
        assert bal.n_hist.item() == sum(want) <= 10
        assert bal.filled.item() == len(want)
        torch.testing.assert_close(bal.hist.double(), sum(pushed[m] for m in want), atol=1e-6, rtol=1e-6)
        # slot order is FIFO: reading the ring from ptr onwards gives the kept counts oldest first
        order = [(bal.ptr.item() + i) % 5 for i in range(5)]
        assert [int(bal.ring_count[i].item()) for i in order if bal.ring_count[i] > 0] == want
    bal.push(torch.full((K,), 12.0 / K), torch.tensor(12.0))  # one step over the cap: kept alone
    assert bal.n_hist.item() == 12 and bal.filled.item() == 1


def test_zero_cache_and_read_only_keep_history_empty():
    L = _logits()
    bal = DTCHSinkhorn(64, hist_cache=0)
    for _ in range(2):
        assert torch.equal(bal(L, TAU), SinkhornKnopp()(L, TAU))
    assert bal.n_hist.item() == 0
    bal = DTCHSinkhorn(64, hist_cache=100)
    bal(L, TAU, update=False)
    assert bal.n_hist.item() == 0 and bal.hist.abs().sum().item() == 0


# ---------------------------------------------------------------- state, dtypes, registry
@pytest.mark.parametrize("mode", ["ema", "window"])
def test_state_dict_round_trip_reproduces_outputs(mode, tmp_path):
    K = 32
    bal = DTCHSinkhorn(K, hist_cache=30, history_mode=mode, soft_scale=1.5)
    for step in range(4):
        bal(_logits(10, K, seed=50 + step), TAU)
    path = tmp_path / "bal.pth"
    torch.save(bal.state_dict(), path)
    assert set(bal.state_dict()) == {"hist", "n_hist", "ring", "ring_count", "ptr", "filled"}
    assert all(v.dtype != torch.float64 for v in bal.state_dict().values())
    fresh = DTCHSinkhorn(K, hist_cache=30, history_mode=mode, soft_scale=1.5)  # window: ring not sized yet
    fresh.load_state_dict(torch.load(path))
    for step in range(3):
        n = 10 + step  # a different count than before: the restored ring keeps its size
        L = _logits(n, K, seed=60 + step)
        assert torch.equal(bal(L, TAU), fresh(L, TAU))
    for name, buf in bal.state_dict().items():
        assert torch.equal(buf, fresh.state_dict()[name]), name


def test_dtypes_and_no_grad():
    L = _logits()
    bal = DTCHSinkhorn(64, hist_cache=100, soft_scale=2.0)
    q = bal(L.bfloat16(), TAU)
    assert q.dtype == torch.float32 and bal.hist.dtype == torch.float32
    ref = DTCHSinkhorn(64, hist_cache=100, soft_scale=2.0)(L.bfloat16().float(), TAU)
    assert torch.equal(q, ref)
    Lg = L.clone().requires_grad_(True)
    out = DTCHSinkhorn(64)(Lg, TAU)
    assert not out.requires_grad and out.grad_fn is None
    with pytest.raises(ValueError, match="teacher_logits must be \\[n, 64\\]"):
        DTCHSinkhorn(64)(torch.zeros(4, 32), TAU)
    with pytest.raises(ValueError, match="history_mode"):
        DTCHSinkhorn(8, history_mode="ring")
    with pytest.raises(ValueError, match="soft_scale"):
        DTCHSinkhorn(8, soft_scale=0.5)


def test_registry_and_config_helper():
    assert "dtch" in available_balancers()
    assert isinstance(build_balancer("dtch", n_prototypes=8), DTCHSinkhorn)
    cfg = DtchConfig(enabled=True, cls_hist_cache=123, patch_hist_cache=456, history_mode="window",
                     soft_scale=2.0, power=None, hist_weight=0.5, n_iterations=5)
    cls, patch = build_dtch_balancer(cfg, 16, "cls"), build_dtch_balancer(cfg, 24, "patch")
    assert (cls.hist_cache, patch.hist_cache) == (123, 456)
    assert (cls.n_prototypes, patch.n_prototypes) == (16, 24)
    assert cls.history_mode == "window" and cls.power == 2.0 and cls.hist_weight == 0.5 and cls.n_iterations == 5
    with pytest.raises(ValueError, match="kind"):
        build_dtch_balancer(cfg, 8, "dino")


# ---------------------------------------------------------------- two gloo processes


def _run_steps(cls_bal, patch_bal, cls_steps, patch_steps, rank=0, world=1, counts=None):
    outs = []
    for step, (c, p) in enumerate(zip(cls_steps, patch_steps)):
        half = c.shape[0] // world
        q_cls = cls_bal(c[rank * half:(rank + 1) * half], TAU)
        if counts is None:
            q_patch = patch_bal(p, TAU, n_samples=torch.tensor([p.shape[0]]))
        else:
            n = counts[step]
            start = sum(n[:rank])
            q_patch = patch_bal(p[start:start + n[rank]], TAU, n_samples=torch.tensor([n[rank]]))
        outs.append((q_cls, q_patch))
    return outs


def _worker(rank, world, port, out_dir, cls_steps, patch_steps, counts):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    reduced_dtypes = []
    real = dist.all_reduce

    def spy(t, *args, **kwargs):
        reduced_dtypes.append(t.dtype)
        return real(t, *args, **kwargs)

    dist.all_reduce = spy
    try:
        cls_bal = DTCHSinkhorn(32, hist_cache=24, history_mode="ema", soft_scale=2.0)
        patch_bal = DTCHSinkhorn(16, hist_cache=20, history_mode="window", window_slots=4)
        outs = _run_steps(cls_bal, patch_bal, cls_steps, patch_steps, rank, world, counts)
        torch.save({"outs": outs, "cls": cls_bal.state_dict(), "patch": patch_bal.state_dict(),
                    "dtypes": reduced_dtypes}, os.path.join(out_dir, f"r{rank}.pt"))
    finally:
        dist.all_reduce = real
        dist.destroy_process_group()


def test_two_processes_equal_one_process_and_identical_history(tmp_path):
    steps = 5
    cls_steps = [_logits(12, 32, seed=70 + i, scale=0.5) for i in range(steps)]
    counts = [[7, 2], [3, 9], [5, 5], [0, 6], [8, 1]]  # unequal (and one empty) masked-patch counts per rank
    patch_steps = [_logits(sum(n), 16, seed=80 + i, scale=0.5) for i, n in enumerate(counts)]
    with_free_port(lambda port: mp.spawn(_worker, args=(2, port, str(tmp_path), cls_steps, patch_steps, counts),
                                         nprocs=2, join=True))
    r = [torch.load(tmp_path / f"r{i}.pt") for i in range(2)]
    # single process over the whole batch: per-rank caches x world size
    cls_bal = DTCHSinkhorn(32, hist_cache=48, history_mode="ema", soft_scale=2.0)
    patch_bal = DTCHSinkhorn(16, hist_cache=40, history_mode="window", window_slots=4)
    single = _run_steps(cls_bal, patch_bal, cls_steps, patch_steps)
    for step in range(steps):
        got_cls = torch.cat([r[0]["outs"][step][0], r[1]["outs"][step][0]])
        got_patch = torch.cat([r[0]["outs"][step][1], r[1]["outs"][step][1]])
        torch.testing.assert_close(got_cls, single[step][0], atol=1e-6, rtol=0)
        torch.testing.assert_close(got_patch, single[step][1], atol=1e-6, rtol=0)
    assert cls_bal.n_hist.item() > 0 and patch_bal.n_hist.item() > 0  # the history really was used
    for name in ("cls", "patch"):
        ref = (cls_bal if name == "cls" else patch_bal).state_dict()
        for key, buf in r[0][name].items():
            assert torch.equal(buf, r[1][name][key]), (name, key)  # bit-identical on both ranks
            torch.testing.assert_close(buf.double(), ref[key].double(), atol=1e-5, rtol=1e-5)
    for i in range(2):
        assert r[i]["dtypes"] and torch.float64 not in r[i]["dtypes"]


# ---------------------------------------------------------------- meta-architecture
def test_meta_arch_builds_dtch_balancers_and_runs():
    from dinobridge.config import build_config
    from dinobridge.data.collate import collate_multicrop
    from dinobridge.data.masking import BlockMaskGenerator
    from dinobridge.train.meta_arch import SSLMetaArch
    from test_train import TINY

    cfg = build_config(None, TINY + ["dtch.enabled=true", "dtch.cls_hist_cache=100", "dtch.patch_hist_cache=50",
                                     "dtch.history_mode=window", "dtch.soft_scale=2.0"], config_name="train")
    torch.manual_seed(0)
    model = SSLMetaArch(cfg)
    model.init_weights()
    for bal, cache in ((model.dino_balancer, 100), (model.ibot_balancer, 50)):
        assert isinstance(bal, DTCHSinkhorn) and bal.hist_cache == cache
        assert bal.history_mode == "window" and bal.soft_scale == 2.0 and bal.power == 2.0
    keys = model.state_dict().keys()
    assert "dino_balancer.hist" in keys and "ibot_balancer.ring" in keys

    B, g, lsz = 4, 16, 8
    gen = torch.Generator().manual_seed(1)
    samples = [{"global_crops": [torch.randn(3, g, g, generator=gen) for _ in range(2)],
                "local_crops": [torch.randn(3, lsz, lsz, generator=gen) for _ in range(2)]} for _ in range(B)]
    batch = collate_multicrop(samples, mask_generator=BlockMaskGenerator(g // 4), rng=np.random.default_rng(0),
                              mask_sample_probability=1.0)
    n_masked = int(batch["n_masked_patches"])
    assert n_masked > 0
    for it in range(2):
        loss, logs = model(batch, teacher_temp=0.07, iteration=it)
        assert torch.isfinite(loss) and "ibot_loss" in logs
    assert model.dino_balancer.n_hist.item() == 2 * (2 * B)
    slots = max(1, 50 // n_masked)  # window sized at the first push; the same batch twice
    assert model.ibot_balancer.n_hist.item() == n_masked * min(2, slots)

    plain = build_config(None, TINY, config_name="train")
    assert isinstance(SSLMetaArch(plain).dino_balancer, SinkhornKnopp)
