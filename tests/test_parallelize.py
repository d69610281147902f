"""Activation checkpointing keeps names and gradients; config errors of `parallelize_meta_arch`.

The 2-rank FSDP2 equality with a 1-process run on the global batch (FULL_SHARD + selective checkpointing,
SHARD_GRAD_OP + full checkpointing) runs through the shared train step in tests/test_fsdp_train.py."""

from __future__ import annotations


import pytest
import torch

from dinobridge.config import build_config
from dinobridge.data.collate import MultiCropCollator
from dinobridge.distributed.device import select_device
from dinobridge.distributed.parallelize import (
    apply_activation_checkpointing,
    parallelize_meta_arch,
    parse_dtype,
)
from dinobridge.errors import ConfigError
from dinobridge.train.meta_arch import SSLMetaArch

# tests/test_train.py's TINY with fp32 everywhere, no drop path (no RNG draws) and no KoLeo: the official KoLeo is
# per-rank (its 2-rank mean is not the global-batch KoLeo), so it is switched off for the equality test.
TINY = [
    "student.arch=vit_test", "student.patch_size=4", "student.drop_path_rate=0.0",
    "crops.global_crops_size=16", "crops.local_crops_size=8", "crops.local_crops_number=2",
    "train.batch_size_per_gpu=4", "train.num_workers=0", "train.OFFICIAL_EPOCH_LENGTH=4", "optim.epochs=1",
    "dino.head_n_prototypes=32", "ibot.head_n_prototypes=32", "dino.head_hidden_dim=32", "ibot.head_hidden_dim=32",
    "dino.head_bottleneck_dim=16", "ibot.head_bottleneck_dim=16", "evaluation.knn_at_end=false",
    "evaluation.knn_period=0", "train.progress_bar=false", "train.log_period=1", "MODEL.DEVICE=cpu",
    "compute_precision.param_dtype=fp32", "compute_precision.reduce_dtype=fp32", "train.compile=false",
    "dino.koleo_loss_weight=0", "dino.koleo_cls_loss_weight=null",
]
B, TEACHER_TEMP = 4, 0.07


def _cfg(extra: list[str] = ()):  # noqa: B006
    return build_config(None, [*TINY, *extra], config_name="train")


def _rank_batch(step: int, rank: int) -> dict:
    """Rank `rank`'s half of the fixed global batch of `step`: random crops + masks from MultiCropCollator."""
    g = torch.Generator().manual_seed(1000 * step + rank)
    samples = [{"global_crops": [torch.randn(3, 16, 16, generator=g) for _ in range(2)],
                "local_crops": [torch.randn(3, 8, 8, generator=g) for _ in range(2)]} for _ in range(B)]
    collate = MultiCropCollator.for_crops(16, 4, seed=7, rank=rank)
    return collate(samples, batch_index=step)


def _build(cfg) -> SSLMetaArch:
    torch.manual_seed(0)
    model = SSLMetaArch(cfg)
    model.init_weights()
    model.student.train()
    model.teacher.eval()
    return model


@pytest.mark.parametrize("full", [False, True])
def test_activation_checkpointing_keeps_names_and_gradients(full: bool):
    cfg = _cfg()
    plain, ckpt = _build(cfg), _build(cfg)
    apply_activation_checkpointing(ckpt.student.backbone.blocks, full=full)
    assert [n for n, _ in plain.named_parameters()] == [n for n, _ in ckpt.named_parameters()]
    assert plain.state_dict().keys() == ckpt.state_dict().keys()
    batch = _rank_batch(0, 0)
    grads = []
    for m in (plain, ckpt):
        loss, _ = m(batch, teacher_temp=TEACHER_TEMP)
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in m.student.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="already checkpointed"):
        apply_activation_checkpointing(ckpt.student.backbone.blocks)


@pytest.mark.parametrize("policy, recomputes_addmm", [("official", True), ("matmuls", False)])
def test_selective_policy_decides_which_matmuls_are_recomputed(policy: str, recomputes_addmm: bool):
    """The backward of a checkpointed block re-runs the ops its policy does not save: under "official" (DINOv3's
    list) the biased Linears' `addmm` runs again, under "matmuls" it is saved; gradients are the same either way."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountAddmm(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            CountAddmm.n += int(func is torch.ops.aten.addmm.default)
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    block = _build(_cfg()).student.backbone.blocks[0]
    x = torch.randn(2, 9, block.norm1.weight.shape[0], requires_grad=True)
    reference = torch.autograd.grad(block(x).square().sum(), x)[0]
    apply_activation_checkpointing(torch.nn.ModuleList([block]), policy=policy)
    y = block(x).square().sum()
    with CountAddmm():
        (grad,) = torch.autograd.grad(y, x)
    assert (CountAddmm.n > 0) == recomputes_addmm, CountAddmm.n
    torch.testing.assert_close(grad, reference, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: torch.compile is skipped on CPU")
def test_compiled_jobs_in_one_process_keep_their_own_policy():
    """Two jobs in one process (a sweep) with compile on and different checkpointing policies: the second must not
    reuse the first's compiled block (dynamo guards do not see the policy). Measured by the bytes the block saves."""
    def saved_bytes(policy: str) -> int:
        cfg = _cfg(["train.compile=true", "train.checkpointing=true", f"train.checkpointing_policy={policy}",
                    "MODEL.DEVICE=cuda"])
        model = _build(cfg).cuda()
        parallelize_meta_arch(model, cfg, select_device("cuda"), 1)
        block = model.student.backbone.blocks[0]
        x = torch.randn(64, 65, block.norm1.weight.shape[0], device="cuda", requires_grad=True)
        total = 0

        def pack(t):
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            block(x).sum().backward()
        return total

    official, matmuls = saved_bytes("official"), saved_bytes("matmuls")
    assert matmuls > official, (official, matmuls)


def test_unknown_checkpointing_policy_is_a_config_error():
    with pytest.raises(ConfigError, match="train.checkpointing_policy"):
        _cfg(["train.checkpointing_policy=everything"])
    with pytest.raises(ConfigError, match="train.checkpointing_policy"):
        apply_activation_checkpointing(torch.nn.ModuleList([torch.nn.Linear(2, 2)]), policy="everything")


def test_config_errors_and_dtypes():
    assert parse_dtype("bf16", "k") is torch.bfloat16 and parse_dtype("fp32", "k") is torch.float32
    with pytest.raises(ConfigError, match="compute_precision.param_dtype"):
        parse_dtype("int8", "compute_precision.param_dtype")
    cfg = _cfg()
    cfg.compute_precision.sharding_strategy = "HYBRID"
    with pytest.raises(ConfigError, match="sharding_strategy"):
        parallelize_meta_arch(_build(_cfg()), cfg, select_device("cpu"), 1)
    with pytest.raises(ValueError, match="no process group"):
        parallelize_meta_arch(_build(_cfg()), _cfg(), select_device("cpu"), 2)


def test_cudagraphs_are_skipped_with_a_reason_where_unsafe(caplog):
    """train.cudagraphs needs CUDA, compile and no activation checkpointing; elsewhere one log line says why."""
    import logging

    cfg = _cfg(["train.cudagraphs=true", "train.compile=true"])
    with caplog.at_level(logging.INFO, logger="dinobridge"):
        parallelize_meta_arch(_build(cfg), cfg, select_device("cpu"), 1)
    assert "CUDA graphs are skipped (cpu is not CUDA)" in caplog.text


def test_eager_blocks_adds_no_compiled_variants():
    """Forwards outside the train step (monitors, online evaluation) run the compiled blocks eagerly: a new batch size
    and no-grad mode inside `eager_blocks()` capture no graph; the same call outside captures one."""
    import torch._dynamo

    from dinobridge.distributed.parallelize import eager_blocks
    from dinobridge.models.vision_transformer import build_vit

    torch._dynamo.reset()
    model = build_vit("vit_test", patch_size=4, img_size=16)
    for blk in model.blocks:
        blk.compile(backend="eager")  # compile_blocks' inductor, minus the C++ build on this CPU
    counters = torch._dynamo.utils.counters["stats"]
    model(torch.randn(2, 3, 16, 16)).sum().backward()  # the "train step" variant
    graphs = counters["unique_graphs"]
    assert graphs > 0
    with torch.no_grad(), eager_blocks():
        y = model(torch.randn(5, 3, 16, 16))
    assert counters["unique_graphs"] == graphs and y.shape[0] == 5
    with torch.no_grad():
        model(torch.randn(5, 3, 16, 16))
    assert counters["unique_graphs"] > graphs
    torch._dynamo.reset()


def test_compile_scope_resolution(caplog):
    import logging

    from dinobridge.distributed.parallelize import compile_scope

    assert compile_scope("auto", cudagraphs=True, sharded=False) == "stack"
    assert compile_scope("auto", cudagraphs=False, sharded=False) == "blocks"
    assert compile_scope("stack", cudagraphs=False, sharded=False) == "stack"
    with caplog.at_level(logging.INFO, logger="dinobridge"):
        assert compile_scope("stack", cudagraphs=False, sharded=True) == "blocks"
    assert "compiled per block instead (FSDP2 shards each block)" in caplog.text
    with pytest.raises(ConfigError, match="train.compile_scope: expected one of auto, blocks, stack, got 'model'"):
        compile_scope("model", cudagraphs=False, sharded=False)
    with pytest.raises(ConfigError, match="train.compile_scope"):
        _cfg(["train.compile_scope=model"])


def test_compile_stack_is_one_graph_with_the_same_outputs(monkeypatch):
    """`compile_stack` runs the block stack as one compiled graph per forward (per-block compilation runs one per
    block); outputs, gradients and state-dict keys are those of the eager model."""
    import torch._dynamo

    from dinobridge.distributed.parallelize import compile_blocks, compile_stack
    from dinobridge.models.vision_transformer import build_vit

    calls: list[int] = []

    def counting_backend(gm, example_inputs):  # eager execution (no C++ build on this CPU), counting graph calls
        def run(*args):
            calls.append(1)
            return gm.forward(*args)
        return run

    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real_compile(fn, backend=counting_backend))
    x = torch.randn(2, 3, 16, 16)
    graph_calls = {}
    for scope, compile_fn in (("stack", compile_stack), ("blocks", compile_blocks)):
        torch.manual_seed(0)
        ref = build_vit("vit_test", patch_size=4, img_size=16)
        model = build_vit("vit_test", patch_size=4, img_size=16)
        model.load_state_dict(ref.state_dict())
        torch._dynamo.reset()
        compile_fn(model)
        calls.clear()
        out = model(x)
        graph_calls[scope] = len(calls)
        out.sum().backward()
        expected = ref(x)
        expected.sum().backward()
        torch.testing.assert_close(out, expected)
        torch.testing.assert_close(model.blocks[0].attn.qkv.weight.grad, ref.blocks[0].attn.qkv.weight.grad)
        assert list(model.state_dict()) == list(ref.state_dict())
    assert graph_calls == {"stack": 1, "blocks": len(ref.blocks)}, graph_calls
    torch._dynamo.reset()
