"""Device selection, process-group setup and launch scripts.

Most tests are *logic tests with an injected probe* (`InjectedProbe`): they check the decision table of
`select_device` without any real NPU/XPU/MPS/GPU, and are not hardware passes. The `test_real_*` tests use the real
probe and skip with a reason when that hardware is absent. The process-group tests run 2 real gloo processes.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import random
import stat
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from gloo_utils import with_free_port

from dinobridge.distributed.device import (
    COMPILE_SUPPORT,
    DIST_BACKENDS,
    DeviceInfo,
    TorchProbe,
    select_device,
)
from dinobridge.distributed.device import _main as _device_main
from dinobridge.distributed.setup import (
    DistInfo,
    cleanup_distributed,
    init_distributed,
    read_launch_env,
    seed_everything,
    set_deterministic,
)
from dinobridge.errors import ConfigError, UserError

REPO = Path(__file__).resolve().parents[1]
RUN_DIR = REPO / "run"
SCRIPTS = ["train_1node.sh", "train_multinode.sh", "npu_env.sh", "run_ssl_debug.sh"]


@dataclass
class InjectedProbe:
    """A fake `DeviceProbe` for logic tests: no real accelerator is touched."""

    counts: dict[str, int] = field(default_factory=dict)  # visible devices per accelerator type
    npu_importable: bool = True
    bf16: set[str] = field(default_factory=lambda: {"cuda", "npu", "xpu", "mps", "cpu"})
    fused: set[str] = field(default_factory=lambda: {"cuda", "npu", "xpu", "mps", "cpu"})

    def import_ok(self, module: str) -> bool:
        return module != "torch_npu" or self.npu_importable

    def is_available(self, device_type: str) -> bool:
        return self.counts.get(device_type, 0) > 0

    def device_count(self, device_type: str) -> int:
        return self.counts.get(device_type, 0)

    def bf16_supported(self, device_type: str) -> bool:
        return device_type in self.bf16

    def fused_adamw_ok(self, device_type: str) -> bool:
        return device_type in self.fused

    def device_name(self, device_type: str, index: int) -> str:
        return f"fake-{device_type}{index}"


def _select(requested="auto", counts=None, env=None, **kw) -> DeviceInfo:
    probe = kw.pop("probe", None) or InjectedProbe(counts=dict(counts or {}))
    return select_device(requested, probe=probe, env=dict(env or {}), **kw)


# ---- detection order and overrides (logic tests, injected probe) ------------------------------------------------
@pytest.mark.parametrize(
    "present, expected",
    [
        ({"cuda": 2, "npu": 8, "xpu": 1, "mps": 1}, "cuda"),
        ({"npu": 8, "xpu": 1, "mps": 1}, "npu"),
        ({"xpu": 1, "mps": 1}, "xpu"),
        ({"mps": 1}, "mps"),
        ({}, "cpu"),
    ],
)
def test_detection_order_injected_probe(present, expected):
    """Logic test with an injected probe (no real accelerators): auto picks cuda > npu > xpu > mps > cpu."""
    info = _select("auto", present)
    assert info.type == expected
    assert info.device_str.split(":")[0] == expected
    assert info.reason == f"auto-detected {expected}"


def test_npu_needs_torch_npu_injected_probe():
    """Logic test with an injected probe: an NPU runtime without an importable torch_npu is not an NPU."""
    probe = InjectedProbe(counts={"npu": 8}, npu_importable=False)
    assert select_device("auto", probe=probe, env={}).type == "cpu"


def test_cpu_request_forces_cpu_injected_probe():
    """Logic test with an injected probe: DEVICE=cpu wins over present accelerators."""
    info = _select("cpu", {"cuda": 4, "npu": 8})
    assert (info.type, info.index, info.backend) == ("cpu", None, "gloo")
    assert info.device == torch.device("cpu")


def test_named_present_accelerator_used_injected_probe():
    """Logic test with an injected probe: a requested accelerator that is present is used even if not first."""
    info = _select("xpu", {"cuda": 1, "xpu": 2}, env={"LOCAL_RANK": "1"})
    assert info.type == "xpu" and info.device_str == "xpu:1"
    assert "requested and available" in info.reason


def test_absent_named_accelerator_warns_and_uses_detected_injected_probe(caplog):
    """Logic test with an injected probe (no real NPU): config says cuda, machine has NPUs -> warning, npu used."""
    with caplog.at_level(logging.WARNING, logger="dinobridge"):
        info = _select("cuda", {"npu": 8})
    assert info.type == "npu" and info.backend == "hccl"
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and r.name == "dinobridge"]
    assert len(warnings) == 1
    assert "'cuda'" in warnings[0].getMessage() and "'npu'" in warnings[0].getMessage()


def test_absent_named_accelerator_falls_back_to_cpu_injected_probe(caplog):
    with caplog.at_level(logging.WARNING, logger="dinobridge"):
        info = _select("mps", {})
    assert info.type == "cpu"
    assert any("not available" in r.getMessage() for r in caplog.records)


def test_device_string_parsing_injected_probe():
    assert _select("GPU", {"cuda": 1}).type == "cuda"
    assert _select(" Cuda:1 ", {"cuda": 2}).index == 1
    with pytest.raises(ConfigError, match="MODEL.DEVICE.*tpu"):
        _select("tpu", {"cuda": 1})
    with pytest.raises(ConfigError, match="index"):
        _select("cuda:x", {"cuda": 1})


# ---- index mapping (logic tests, injected probe) ------------------------------------------------------------------
def test_local_rank_picks_index_injected_probe():
    assert _select("auto", {"cuda": 4}, env={"LOCAL_RANK": "3"}).device == torch.device("cuda", 3)
    # explicit argument beats the environment
    assert _select("auto", {"cuda": 4}, env={"LOCAL_RANK": "3"}, local_rank=2).index == 2
    # no LOCAL_RANK: the index of "type:N", else 0
    assert _select("cuda:1", {"cuda": 4}).index == 1
    assert _select("auto", {"cuda": 4}).index == 0
    # CPU / MPS have no ordinal
    assert _select("auto", {}, env={"LOCAL_RANK": "1"}).index is None


def test_ascend_visible_devices_mapping_injected_probe():
    """Logic test with an injected probe (no real NPU): ASCEND_RT_VISIBLE_DEVICES=4,5,6,7 -> torch sees npu:0..3;
    LOCAL_RANK indexes the visible list and the physical id is recorded."""
    env = {"ASCEND_RT_VISIBLE_DEVICES": "4,5,6,7", "LOCAL_RANK": "1"}
    info = _select("npu", {"npu": 4}, env=env)
    assert info.device_str == "npu:1" and info.index == 1
    assert info.physical_id == "5"
    assert "physical 5" in info.describe()
    with pytest.raises(UserError, match=r"LOCAL_RANK=4 .*4 npu .*ASCEND_RT_VISIBLE_DEVICES=4,5,6,7"):
        _select("npu", {"npu": 4}, env={**env, "LOCAL_RANK": "4"})


def test_bad_local_rank_injected_probe():
    with pytest.raises(UserError, match="LOCAL_RANK"):
        _select("auto", {"cuda": 1}, env={"LOCAL_RANK": "one"})
    with pytest.raises(UserError, match="LOCAL_RANK=1 but only 1 cuda"):
        _select("auto", {"cuda": 1}, env={"LOCAL_RANK": "1"})


# ---- capability tables (logic tests, injected probe) --------------------------------------------------------------
@pytest.mark.parametrize(
    "kind, backend", [("cuda", "nccl"), ("npu", "hccl"), ("xpu", "xccl"), ("mps", "gloo"), ("cpu", "gloo")]
)
def test_backend_map_injected_probe(kind, backend):
    counts = {} if kind == "cpu" else {kind: 1}
    assert DIST_BACKENDS[kind] == backend
    assert _select(kind, counts).backend == backend


@pytest.mark.parametrize(
    "kind, compile_ok, compile_default, fp64, fsdp",
    [
        ("cuda", True, True, True, True),
        ("npu", False, False, False, True),
        ("xpu", True, False, True, True),
        ("mps", False, False, False, False),
        ("cpu", True, False, True, False),
    ],
)
def test_capability_table_injected_probe(kind, compile_ok, compile_default, fp64, fsdp):
    info = _select(kind, {} if kind == "cpu" else {kind: 1})
    assert COMPILE_SUPPORT[kind] is compile_ok
    assert (info.supports_compile, info.compile_default) == (compile_ok, compile_default)
    assert info.supports_fp64 is fp64
    assert info.supports_fsdp is fsdp


def test_autocast_dtype_injected_probe():
    """bf16 where the probe reports it, fp16 (+ GradScaler) where not; CPU fp32 unless bf16 is asked for."""
    assert _select("auto", {"cuda": 1}).autocast_dtype == torch.bfloat16
    old_gpu = InjectedProbe(counts={"cuda": 1}, bf16={"cpu"})
    info = select_device("auto", probe=old_gpu, env={})
    assert info.autocast_dtype == torch.float16 and info.needs_grad_scaler and not info.has_bf16
    old_mac = InjectedProbe(counts={"mps": 1}, bf16={"cpu"})
    assert select_device("auto", probe=old_mac, env={}).autocast_dtype == torch.float16
    assert _select("npu", {"npu": 1}).autocast_dtype == torch.bfloat16
    cpu = _select("cpu")
    assert cpu.autocast_dtype is None and not cpu.needs_grad_scaler
    assert _select("cpu", cpu_bf16=True).autocast_dtype == torch.bfloat16


def test_fused_adamw_injected_probe():
    assert _select("cuda", {"cuda": 1}).supports_fused_adamw
    assert not _select("npu", {"npu": 1}).supports_fused_adamw  # off on NPU even when torch lists it
    no_fused = InjectedProbe(counts={"cuda": 1}, fused=set())
    assert not select_device("auto", probe=no_fused, env={}).supports_fused_adamw


def test_to_dict_plain_types_injected_probe():
    d = _select("npu", {"npu": 2}, env={"LOCAL_RANK": "1"}).to_dict()
    assert d["device"] == "npu:1" and d["autocast_dtype"] == "bfloat16" and d["backend"] == "hccl"


# ---- real probe on this machine -----------------------------------------------------------------------------------
def test_real_probe_matches_torch():
    """Real probe: the selection agrees with what torch itself reports on this machine."""
    info = select_device("auto", env={})
    if torch.cuda.is_available():
        expected = "cuda"
    elif hasattr(torch, "npu") and torch.npu.is_available():
        expected = "npu"
    elif hasattr(torch, "xpu") and torch.xpu.is_available():
        expected = "xpu"
    elif torch.backends.mps.is_available():
        expected = "mps"
    else:
        expected = "cpu"
    assert info.type == expected
    assert info.backend == DIST_BACKENDS[expected]
    if importlib.util.find_spec("torch_npu") is None:
        assert "torch_npu" not in sys.modules
        assert TorchProbe().is_available("npu") is False


def test_cpu_runtime_helpers():
    """Real CPU device: memory helpers report None, synchronize is a no-op, bf16 autocast works when asked."""
    info = select_device("cpu", env={})
    assert info.memory_allocated() is None and info.peak_memory_allocated() is None
    info.reset_peak_memory_stats()
    info.synchronize()
    info.empty_cache()
    a = torch.randn(4, 4)
    with info.autocast():
        assert (a @ a).dtype == torch.float32
    with select_device("cpu", cpu_bf16=True, env={}).autocast():
        assert (a @ a).dtype == torch.bfloat16


def _exercise_real_accelerator(kind: str) -> None:
    info = select_device(kind, env={})
    assert info.type == kind, info.reason
    info.set_current()
    info.reset_peak_memory_stats()
    x = torch.randn(256, 1024, device=info.device)  # 1 MiB
    info.synchronize()
    assert info.memory_allocated() >= x.numel() * 4
    assert info.peak_memory_allocated() >= x.numel() * 4
    with info.autocast():
        y = x @ x.T
    assert y.dtype == info.autocast_dtype
    ref = (x.double().cpu() @ x.double().cpu().T) if info.supports_fp64 else (x.cpu() @ x.cpu().T)
    torch.testing.assert_close(y.float().cpu(), ref.float(), rtol=2e-2, atol=0.5)
    del x, y
    info.synchronize()
    if kind in ("cuda", "npu", "xpu"):
        before = info.peak_memory_allocated()
        info.empty_cache()
        info.reset_peak_memory_stats()
        assert info.peak_memory_allocated() < before
        assert info.count >= 1 and info.physical_id is not None
    if kind == "cuda" and info.backend == "nccl":
        assert dist.is_nccl_available()
    assert kind in info.describe()


def _npu_present() -> bool:
    return importlib.util.find_spec("torch_npu") is not None and TorchProbe().is_available("npu")


@pytest.mark.parametrize(
    "kind, present",
    [
        ("cuda", lambda: torch.cuda.is_available()),
        ("npu", _npu_present),
        ("xpu", lambda: hasattr(torch, "xpu") and torch.xpu.is_available()),
        ("mps", lambda: torch.backends.mps.is_available()),
    ],
)
def test_real_hardware(kind, present):
    """Real hardware test: skipped (with the reason) when the device is absent; never faked."""
    if not present():
        pytest.skip(f"no {kind} device on this machine: the {kind} path is not validated by this run")
    _exercise_real_accelerator(kind)


# ---- process group setup ------------------------------------------------------------------------------------------
def test_init_distributed_single_process_no_group():
    info = init_distributed(select_device("cpu", env={}), env={})
    assert info == DistInfo(rank=0, world_size=1, local_rank=0, local_world_size=1, is_main=True, initialized=False)
    assert not dist.is_initialized()
    # torchrun with one process: no group either
    one = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}
    assert init_distributed(select_device("cpu", env={}), env=one).world_size == 1
    assert not dist.is_initialized()
    cleanup_distributed()  # no-op without a group


def test_init_distributed_always_group_single_process():
    """A 1-rank gloo group on request (no torchrun variables): created, usable, torn down."""
    try:
        info = init_distributed(select_device("cpu", env={}), timeout_s=60, always_group=True, env={})
        assert info == DistInfo(0, 1, 0, 1, True, True)
        assert dist.is_initialized() and dist.get_world_size() == 1 and dist.get_backend() == "gloo"
        t = torch.tensor([2.5])
        dist.all_reduce(t)
        assert t.item() == 2.5
        assert init_distributed(select_device("cpu", env={}), env={}).initialized  # idempotent
    finally:
        cleanup_distributed()
    assert not dist.is_initialized()


def _launch_env(**over: str) -> dict[str, str]:
    env = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29555"}
    env.update(over)
    return {k: v for k, v in env.items() if v != ""}


@pytest.mark.parametrize(
    "env, message",
    [
        (_launch_env(MASTER_ADDR=""), "WORLD_SIZE=2 is set but MASTER_ADDR is missing"),
        (_launch_env(MASTER_PORT=""), "MASTER_PORT is missing"),
        (_launch_env(MASTER_PORT="http"), "MASTER_PORT: expected a TCP port"),
        (_launch_env(RANK=""), "WORLD_SIZE is set but RANK is missing"),
        (_launch_env(RANK="2"), r"RANK=2 is out of range for WORLD_SIZE=2"),
        (_launch_env(WORLD_SIZE="two"), "WORLD_SIZE: expected an integer"),
        (_launch_env(LOCAL_RANK="2"), "LOCAL_RANK=2 is out of range for LOCAL_WORLD_SIZE=2"),
    ],
)
def test_launch_env_misconfiguration(env, message):
    with pytest.raises(UserError, match=message):
        read_launch_env(env)
    assert not dist.is_initialized()


def test_init_distributed_device_misconfiguration_injected_probe():
    """Logic test with an injected probe: more local ranks than devices, and MPS with 2 processes, fail early."""
    one_gpu = _select("cuda", {"cuda": 1})
    with pytest.raises(UserError, match=r"LOCAL_WORLD_SIZE=2 .*only 1 cuda"):
        init_distributed(one_gpu, env=_launch_env())
    mps = _select("mps", {"mps": 1})
    with pytest.raises(UserError, match="MPS has no collective backend"):
        init_distributed(mps, env=_launch_env())
    assert not dist.is_initialized()




def _dist_worker(local_rank: int, port: int, out_dir: str) -> None:
    os.environ.update({"RANK": str(local_rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(local_rank),
                       "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    device = select_device("cpu")
    info = init_distributed(device, timeout_s=60)
    try:
        again = init_distributed(device)  # idempotent
        t = torch.tensor([float(info.rank + 1)])
        dist.all_reduce(t)
        Path(out_dir, f"rank{info.rank}.txt").write_text(
            f"{info.rank} {info.world_size} {info.local_rank} {int(info.is_main)} {int(info.initialized)} "
            f"{dist.get_backend()} {t.item()} {int(again == info)}"
        )
    finally:
        cleanup_distributed()
    assert not dist.is_initialized()


def test_init_distributed_two_gloo_processes(tmp_path):
    # fork (no torch re-import in the children) unless an accelerator runtime is already initialised here
    fork_ok = sys.platform == "linux" and not torch.cuda.is_initialized()
    with_free_port(lambda port: mp.start_processes(_dist_worker, args=(port, str(tmp_path)), nprocs=2, join=True,
                                                   start_method="fork" if fork_ok else "spawn"))
    rows = sorted(p.read_text().split() for p in tmp_path.glob("rank*.txt"))
    assert rows == [
        ["0", "2", "0", "1", "1", "gloo", "3.0", "1"],
        ["1", "2", "1", "0", "1", "gloo", "3.0", "1"],
    ]


# ---- seeding and determinism --------------------------------------------------------------------------------------
def test_seed_everything():
    def draw():
        return random.random(), float(np.random.rand()), float(torch.rand(()))

    assert seed_everything(7, rank=3) == 10
    a = draw()
    seed_everything(7, rank=3)
    assert draw() == a
    seed_everything(7, rank=0)
    assert draw() != a
    with pytest.raises(UserError, match="train.seed"):
        seed_everything(-1)


def test_set_deterministic(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    prev = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
            torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    try:
        set_deterministic(True)
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.is_deterministic_algorithms_warn_only_enabled()
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        set_deterministic(False)
        assert not torch.are_deterministic_algorithms_enabled()
        assert not torch.backends.cudnn.deterministic and torch.backends.cudnn.benchmark
    finally:
        torch.use_deterministic_algorithms(prev[0], warn_only=prev[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = prev[2], prev[3]


# ---- launch scripts -----------------------------------------------------------------------------------------------
def _bash(args, env_extra=None, cwd=REPO):
    env = {k: v for k, v in os.environ.items()
           if k not in ("NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "NPROC", "LOG_RANK", "PYTHON")}
    env.update(env_extra or {})
    return subprocess.run(["bash", *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=30)


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_syntax_and_usage(script):
    path = RUN_DIR / script
    assert _bash(["-n", str(path)]).returncode == 0
    res = _bash([str(path), "-h"])
    assert res.returncode == 0 and res.stdout.startswith("usage:"), res.stderr
    assert "set -euo pipefail" in path.read_text()
    if script != "npu_env.sh":
        assert path.stat().st_mode & stat.S_IXUSR


@pytest.fixture
def fake_python(tmp_path) -> Path:
    """A stand-in interpreter that prints its argv (one per line) instead of launching torchrun."""
    fake = tmp_path / "python"
    fake.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@"\n')
    fake.chmod(0o755)
    return fake


def test_train_1node_command(fake_python):
    res = _bash([str(RUN_DIR / "train_1node.sh"), "--config-file", "a b.yaml"],
                {"PYTHON": str(fake_python), "NPROC": "4", "LOG_RANK": "0"})
    assert res.returncode == 0, res.stderr
    argv = res.stdout.splitlines()
    assert argv[:2] == ["-m", "torch.distributed.run"]
    assert "--standalone" in argv and "--nproc_per_node=4" in argv
    assert argv[argv.index("--local-ranks-filter") + 1] == "0"
    assert argv[-4:] == ["-m", "dinobridge.train", "--config-file", "a b.yaml"]
    bad = _bash([str(RUN_DIR / "train_1node.sh")], {"PYTHON": str(fake_python), "NPROC": "0"})
    assert bad.returncode == 2 and "NPROC" in bad.stderr


def test_train_1node_auto_nproc_uses_selector(capsys):
    """NPROC=auto asks dinobridge's selector (1 on a CPU-only machine), not torchrun's one-per-core default."""
    assert _device_main(["--nproc"]) == 0
    expected = select_device("auto", local_rank=0, env={})
    assert int(capsys.readouterr().out.strip()) == (expected.count if expected.type in ("cuda", "npu", "xpu") else 1)
    assert _device_main(["--device", "cpu"]) == 0
    assert capsys.readouterr().out.startswith("cpu (")


def test_train_multinode_command(fake_python):
    script = str(RUN_DIR / "train_multinode.sh")
    missing = _bash([script])
    assert missing.returncode == 2
    assert "NNODES NODE_RANK MASTER_ADDR" in missing.stderr
    bad = _bash([script], {"NNODES": "2", "NODE_RANK": "2", "MASTER_ADDR": "h"})
    assert bad.returncode == 2 and "NODE_RANK" in bad.stderr
    env = {"NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "10.0.0.1", "NPROC": "8", "PYTHON": str(fake_python)}
    argv = _bash([script, "x=1"], env).stdout.splitlines()
    for flag in ("--nnodes=2", "--node_rank=1", "--nproc_per_node=8", "--rdzv_backend=c10d",
                 "--rdzv_endpoint=10.0.0.1:29500", "--rdzv_id=dinobridge"):
        assert flag in argv
    assert argv[-3:] == ["-m", "dinobridge.train", "x=1"]


def test_run_ssl_debug_command(fake_python, tmp_path):
    script = str(RUN_DIR / "run_ssl_debug.sh")
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("MODEL: {}\n")
    env = {"PYTHON": str(fake_python), "ASCEND_TOOLKIT_HOME": str(tmp_path / "none")}
    argv = _bash([script, str(cfg), str(tmp_path / "out"), "train.seed=1"], env).stdout.splitlines()
    for flag in ("--nnodes=1", "--nproc_per_node=1", "--node_rank=0", "--master_addr=127.0.0.1",
                 "--master_port=40028"):
        assert flag in argv
    assert argv[-7:] == ["-m", "dinobridge.train", "--config-file", str(cfg), "--output-dir",
                         str(tmp_path / "out"), "train.seed=1"]
    assert _bash([script, str(tmp_path / "missing.yaml"), "out"], env).returncode == 2


def test_npu_env_defaults(tmp_path):
    """npu_env.sh keeps exported values, fills the seed's defaults, and sources set_env.sh when present."""
    toolkit = tmp_path / "toolkit"
    toolkit.mkdir()
    (toolkit / "set_env.sh").write_text("export FAKE_CANN_LOADED=yes\n")
    cmd = (f"source {RUN_DIR / 'npu_env.sh'} && "
           'echo "$ASCEND_RT_VISIBLE_DEVICES|$MASTER_ADDR|$MASTER_PORT|$HCCL_EXEC_TIMEOUT|$FAKE_CANN_LOADED|$-"')
    res = _bash(["-c", cmd], {"ASCEND_TOOLKIT_HOME": str(toolkit), "MASTER_PORT": "1234"})
    assert res.returncode == 0, res.stderr
    fields = res.stdout.strip().split("|")
    assert fields[:5] == ["0", "127.0.0.1", "1234", "1836", "yes"]
    assert "u" not in fields[5] and "e" not in fields[5]  # sourcing leaves the caller's shell options alone
