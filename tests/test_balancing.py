import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from gloo_utils import with_free_port

from dinobridge.balancing import (
    Balancer,
    SinkhornKnopp,
    SoftmaxCenter,
    available_balancers,
    build_balancer,
    register_balancer,
)


def ref_sinkhorn(z: torch.Tensor, tau: float, n_iter: int, b_tot: float) -> torch.Tensor:
    """Float64 oracle of the official algorithm (no max subtraction; fp64 does not overflow here)."""
    q = torch.exp(z.double() / tau).T  # [K, n]
    k = q.shape[0]
    q = q / q.sum()
    for _ in range(n_iter):
        q = q / q.sum(dim=1, keepdim=True) / k
        q = q / q.sum(dim=0, keepdim=True) / b_tot
    return (q * b_tot).T


def _logits(n=24, k=32, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g) * scale


def test_sinkhorn_matches_float64_reference_and_rows_sum_to_one():
    z = _logits()
    for subtract_max in (True, False):
        p = SinkhornKnopp(n_iterations=3, subtract_max=subtract_max)(z, 0.1)
        assert p.dtype == torch.float32 and p.shape == z.shape
        torch.testing.assert_close(p.sum(dim=1), torch.ones(24))
        torch.testing.assert_close(p.double(), ref_sinkhorn(z, 0.1, 3, 24), atol=1e-6, rtol=1e-5)


def test_sinkhorn_max_subtraction_is_identical_and_avoids_overflow():
    z = _logits(scale=0.5)
    a = SinkhornKnopp(subtract_max=True)(z, 0.07)
    b = SinkhornKnopp(subtract_max=False)(z, 0.07)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    big = 5.0 + _logits(scale=0.2)  # z/τ ≈ 125 ± 20: exp overflows in fp32 without the shift
    assert not torch.isfinite(SinkhornKnopp(subtract_max=False)(big, 0.04)).all()
    safe = SinkhornKnopp()(big, 0.04)
    shifted = big.double() - big.double().max()  # shift is exact in the oracle
    torch.testing.assert_close(safe.double(), ref_sinkhorn(shifted, 0.04, 3, 24), atol=1e-6, rtol=1e-4)


def test_sinkhorn_converges_to_equipartition():
    n, k = 40, 16
    z = _logits(n, k, seed=3)
    p = SinkhornKnopp(n_iterations=200)(z, 0.5)
    torch.testing.assert_close(p.sum(dim=1), torch.ones(n))
    # every prototype receives n/K of the total mass (each sample has mass 1)
    assert (p.sum(dim=0) * k / n - 1).abs().max().item() < 1e-5
    # 3 iterations are not balanced yet: the test above is meaningful
    p3 = SinkhornKnopp(n_iterations=3)(z, 0.5)
    assert (p3.sum(dim=0) * k / n - 1).abs().max().item() > 1e-4


def test_sinkhorn_low_precision_input_and_n_samples():
    z = _logits().bfloat16()
    sk = SinkhornKnopp(n_prototypes=32)
    p = sk(z, 0.1)
    assert p.dtype == torch.float32 and not p.requires_grad
    torch.testing.assert_close(p.double(), ref_sinkhorn(z.float(), 0.1, 3, 24), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(sk(z, 0.1, n_samples=torch.tensor(24)), p)
    with pytest.raises(ValueError, match="K=16"):
        SinkhornKnopp(n_prototypes=16)(z, 0.1)
    with pytest.raises(ValueError, match="teacher_temp"):
        sk(z, 0.0)


def test_softmax_center_follows_ema():
    k = 8
    bal = SoftmaxCenter(n_prototypes=k, momentum=0.9)
    assert "center" in bal.state_dict()
    center = torch.zeros(1, k, dtype=torch.float64)
    for step in range(4):
        z = _logits(6 + step, k, seed=10 + step) + step
        p = bal(z, 0.2)
        ref = torch.softmax((z.double() - center) / 0.2, dim=-1)  # uses the centre of the previous batches
        torch.testing.assert_close(p.double(), ref, atol=1e-6, rtol=1e-5)
        center = 0.9 * center + 0.1 * z.double().mean(dim=0, keepdim=True)
        torch.testing.assert_close(bal.center.double(), center, atol=1e-6, rtol=1e-5)
    before = bal.center.clone()
    bal(z, 0.2, update=False)
    torch.testing.assert_close(bal.center, before)


def test_softmax_center_patch_mean_and_counts():
    k = 5
    x = _logits(3 * 4, k, seed=1).reshape(3, 4, k)
    bal = SoftmaxCenter(k, momentum=0.0)
    p = bal(x, 0.1)
    assert p.shape == (3, 4, k)
    torch.testing.assert_close(bal.center.double(), x.double().mean(dim=1).mean(dim=0, keepdim=True))
    bal2 = SoftmaxCenter(k, momentum=0.5)
    bal2.update(x[0], n_samples=torch.tensor(4))
    torch.testing.assert_close(bal2.center.double(), 0.5 * x[0].double().mean(dim=0, keepdim=True))


def test_build_balancer_registry():
    assert isinstance(build_balancer("sinkhorn_knopp", n_prototypes=4), SinkhornKnopp)
    for name in ("softmax", "centering"):
        b = build_balancer(name, n_prototypes=4, momentum=0.5)
        assert isinstance(b, SoftmaxCenter) and b.momentum == 0.5
    with pytest.raises(ValueError, match="unknown balancer 'nope'"):
        build_balancer("nope")

    @register_balancer("_test_uniform")
    class Uniform(Balancer):
        def _targets(self, logits, teacher_temp, n_samples):
            return torch.full_like(logits, 1.0 / logits.shape[-1])

    assert "_test_uniform" in available_balancers()
    torch.testing.assert_close(build_balancer("_test_uniform")(torch.zeros(2, 4), 0.1), torch.full((2, 4), 0.25))
    with pytest.raises(ValueError, match="already registered"):
        register_balancer("_test_uniform")(Uniform)


# ---------------------------------------------------------------- two gloo processes




def _worker(rank, world, port, out_dir, dino, ibot, counts):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        half = dino.shape[0] // world
        p_dino = SinkhornKnopp()(dino[rank * half : (rank + 1) * half], 0.05)
        start = sum(counts[:rank])
        mine = ibot[start : start + counts[rank]]
        p_ibot = SinkhornKnopp()(mine, 0.05, n_samples=torch.tensor(counts[rank]))
        center = SoftmaxCenter(ibot.shape[1], momentum=0.5)
        center.update(mine, n_samples=torch.tensor(counts[rank]))
        torch.save({"dino": p_dino, "ibot": p_ibot, "center": center.center}, os.path.join(out_dir, f"r{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_process_equals_one_process(tmp_path):
    dino = _logits(16, 32, seed=5)
    ibot = _logits(13, 32, seed=6)
    counts = [9, 4]  # unequal masked-patch counts per rank
    with_free_port(lambda port: mp.spawn(_worker, args=(2, port, str(tmp_path), dino, ibot, counts), nprocs=2,
                                         join=True))
    r = [torch.load(tmp_path / f"r{i}.pt") for i in range(2)]
    torch.testing.assert_close(torch.cat([r[0]["dino"], r[1]["dino"]]), SinkhornKnopp()(dino, 0.05), atol=1e-6, rtol=0)
    torch.testing.assert_close(torch.cat([r[0]["ibot"], r[1]["ibot"]]), SinkhornKnopp()(ibot, 0.05), atol=1e-6, rtol=0)
    torch.testing.assert_close(r[0]["ibot"].double(), ref_sinkhorn(ibot, 0.05, 3, 13)[:9], atol=1e-6, rtol=1e-5)
    single = SoftmaxCenter(32, momentum=0.5)
    single.update(ibot)
    for i in range(2):
        torch.testing.assert_close(r[i]["center"], single.center, atol=1e-6, rtol=0)
