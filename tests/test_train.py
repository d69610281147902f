"""The trainer end to end on CPU: tiny runs, the user's YAML, CIFAR-10 folders, exact resume after SIGKILL,
atomic checkpoints, and one-line errors for bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch

from dinobridge.train.loop import main as train_main

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
USER_YAML = SHARED / "fixtures" / "dinov3_vitlarge_pretrain.yaml"

TINY = [
    "student.arch=vit_test", "student.patch_size=4", "student.drop_path_rate=0.1",
    "crops.global_crops_size=16", "crops.local_crops_size=8", "crops.local_crops_number=2",
    "train.batch_size_per_gpu=4", "train.num_workers=0", "train.OFFICIAL_EPOCH_LENGTH=4", "optim.epochs=1",
    "dino.head_n_prototypes=32", "ibot.head_n_prototypes=32", "dino.head_hidden_dim=32", "ibot.head_hidden_dim=32",
    "dino.head_bottleneck_dim=16", "ibot.head_bottleneck_dim=16", "evaluation.knn_at_end=false",
    "evaluation.knn_period=0", "train.progress_bar=false", "train.log_period=1", "MODEL.DEVICE=cpu",
]


def metrics(run: Path) -> dict[int, dict]:
    """Last logged entry per iteration (a resumed run re-logs the iterations after its checkpoint)."""
    out: dict[int, dict] = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        entry = json.loads(line)
        out[entry["iteration"]] = entry
    return out


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    code = train_main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ---------------------------------------------------------------------------------------------- runs
def test_tiny_run_writes_logs_checkpoints_and_exports(tmp_path, capsys):
    code, out, err = run_cli(["--output-dir", str(tmp_path), *TINY, "evaluation.knn_at_end=true",
                              "evaluation.knn_k=[5]", "evaluation.knn_train_size=64", "evaluation.knn_val_size=32"],
                             capsys)
    assert code == 0, err
    m = metrics(tmp_path)
    assert sorted(m) == [1, 2, 3, 4]
    for key in ("total_loss", "dino_global_crops_loss", "dino_local_crops_loss", "ibot_loss", "koleo_loss", "lr",
                "wd", "momentum", "teacher_temp", "backbone_grad_norm", "img_per_s", "data_wait_pct",
                "dino_target_entropy", "ibot_target_entropy", "dino_target_prototypes_in_use", "teacher_rankme"):
        assert key in m[4] and m[4][key] == m[4][key], key  # present and not NaN
    assert (tmp_path / "ckpt" / "00000004.pth").is_file()
    assert (tmp_path / "config.yaml").is_file() and (tmp_path / "log.txt").is_file()
    assert any((tmp_path / "tensorboard").iterdir())
    assert "kNN top-1" in out and "trained" in out and "init" in out
    # the final teacher export loads into a backbone with load_pretrained
    from dinobridge.config import build_config
    from dinobridge.models import load_pretrained
    from dinobridge.train.meta_arch import build_backbone

    cfg = build_config(str(tmp_path / "config.yaml"))
    for f in ("teacher_backbone.pth", "eval/training_4/teacher_checkpoint.pth"):
        load_pretrained(build_backbone(cfg.student, teacher=True), tmp_path / f)


def test_user_yaml_trains_three_iterations_on_cpu(tmp_path, capsys):
    if not USER_YAML.is_file():
        pytest.skip("../shared/fixtures is not beside this checkout")
    _jpegs(tmp_path / "imgs", 10)
    listing = _write(tmp_path / "list.txt", "\n".join(str(p) for p in sorted((tmp_path / "imgs").iterdir())))
    run = tmp_path / "run"
    args = ["--config-file", str(USER_YAML), "--output-dir", str(run),
            "MODEL.META_ARCHITECTURE=SSLMetaArch", "dtch.enabled=false", f"data.imagenet_1k.txt_path={listing}",
            "train.max_iter=3", "train.compile=false",
            "train.checkpointing=false", "resize_shuffle_augmentor.patch_size=4", "crops.use_resize_shuffle_augmentor=false",
            *[a for a in TINY if not a.startswith(("optim.epochs", "train.OFFICIAL"))], "train.OFFICIAL_EPOCH_LENGTH=3"]
    code, _, err = run_cli(args, capsys)
    assert code == 0, err
    m = metrics(run)
    assert sorted(m) == [1, 2, 3]
    assert all(torch.isfinite(torch.tensor(e["total_loss"])) for e in m.values())
    assert m[3]["koleo_patch_loss"] == m[3]["koleo_patch_loss"]  # the user's patch KoLeo is on
    assert m[1]["lr"] == 0.0  # v2 schedule starts at 0


@pytest.fixture(scope="module")
def cifar_subset(tmp_path_factory):
    tarball = SHARED / "datasets" / "cifar10-jpg.tar.gz"
    if not tarball.is_file():
        pytest.skip("../shared/datasets/cifar10-jpg.tar.gz is not beside this checkout")
    root = tmp_path_factory.mktemp("cifar")
    wanted = {}
    with tarfile.open(tarball) as tar:
        for member in tar:
            parts = Path(member.name).parts
            if member.isfile() and len(parts) >= 3 and parts[-3] in ("train", "test"):
                key = (parts[-3], parts[-2])
                if wanted.get(key, 0) < 8:
                    wanted[key] = wanted.get(key, 0) + 1
                    dest = root / parts[-3] / parts[-2] / parts[-1]
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    dest.write_bytes(tar.extractfile(member).read())
            if len(wanted) == 20 and all(v >= 8 for v in wanted.values()):
                break
    return root


def test_cifar10_image_folder_with_patch4_recipe(tmp_path, capsys, cifar_subset):
    args = ["--output-dir", str(tmp_path), *TINY, f"train.dataset_path=ImageFolder:root={cifar_subset / 'train'}",
            "crops.global_crops_size=32", "crops.local_crops_size=16", "train.max_iter=3",
            "evaluation.knn_at_end=true", f"evaluation.knn_train=ImageFolder:root={cifar_subset / 'train'}",
            f"evaluation.knn_val=ImageFolder:root={cifar_subset / 'test'}", "evaluation.knn_k=[5]"]
    code, out, err = run_cli(args, capsys)
    assert code == 0, err
    assert sorted(metrics(tmp_path)) == [1, 2, 3]
    assert "kNN top-1" in out


def test_cifar10_20min_preset_trains_on_cpu(tmp_path, capsys, cifar_subset):
    # the H100 preset as published (GPU photometric augmentation, its schedules and heads), only sized down
    small = ["student.arch=vit_test", "train.batch_size_per_gpu=8", "train.num_workers=0", "train.max_iter=2",
             "train.progress_bar=false", "train.log_period=1", "MODEL.DEVICE=cpu", "evaluation.knn_period=0",
             "evaluation.knn_at_end=false", "train.compile=false"]
    args = ["--config-name", "cifar10_20min", "--output-dir", str(tmp_path), *small,
            f"train.dataset_path=ImageFolder:root={cifar_subset / 'train'}"]
    code, _, err = run_cli(args, capsys)
    assert code == 0, err
    m = metrics(tmp_path)
    assert sorted(m) == [1, 2] and all(torch.isfinite(torch.tensor(e["total_loss"])) for e in m.values())


# ---------------------------------------------------------------------------------------------- resume
def _train_cmd(out: Path, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "dinobridge.train", "--output-dir", str(out), *TINY, "train.deterministic=true",
            "train.OFFICIAL_EPOCH_LENGTH=8", "checkpointing.period=1", "checkpointing.max_to_keep=2", *extra]


def test_resume_after_sigkill_gives_identical_losses(tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    subprocess.run(_train_cmd(straight, []), check=True, env=env, capture_output=True, timeout=300)
    proc = subprocess.Popen(_train_cmd(killed, []), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (killed / "ckpt" / "00000004.pth").exists():
        assert proc.poll() is None and time.time() < deadline, "the run ended before its checkpoint at 4"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "ckpt" / "00000008.pth").exists()
    subprocess.run(_train_cmd(killed, []), check=True, env=env, capture_output=True, timeout=300)
    a, b = metrics(straight), metrics(killed)
    assert sorted(a) == sorted(b) == list(range(1, 9))
    for it in a:
        assert a[it]["total_loss"] == b[it]["total_loss"], (it, a[it]["total_loss"], b[it]["total_loss"])
    sa = torch.load(straight / "teacher_backbone.pth")
    sb = torch.load(killed / "teacher_backbone.pth")
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_sigterm_saves_after_the_step_and_resume_matches_a_straight_run(tmp_path, capsys, monkeypatch):
    """Pre-emption: SIGTERM (sent to this process while it logs iteration 3, i.e. mid-run, between checkpoints)
    makes the run save iteration 3, exit with 143 (128 + SIGTERM) and the same command then finishes the run with
    the losses and weights of an uninterrupted one."""
    import dinobridge.train.loop as loop

    args = [*TINY, "train.deterministic=true", "train.OFFICIAL_EPOCH_LENGTH=6", "checkpointing.period=4"]
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    assert run_cli(["--output-dir", str(straight), *args], capsys)[0] == 0

    original = loop.MetricLogger

    class SignallingLogger(original):
        def log(self, it, scalars):
            super().log(it, scalars)
            if it == 3:
                os.kill(os.getpid(), signal.SIGTERM)

    previous = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(loop, "MetricLogger", SignallingLogger)
    code, out, err = run_cli(["--output-dir", str(stopped), *args], capsys)
    assert code == 128 + signal.SIGTERM, err
    assert signal.getsignal(signal.SIGTERM) is previous  # the handler is restored
    assert sorted(metrics(stopped)) == [1, 2, 3]
    assert (stopped / "ckpt" / "00000003.pth").is_file()  # saved by the stop, not by the period (4)
    assert "stopped by signal" in (stopped / "log.txt").read_text() + out + err
    monkeypatch.setattr(loop, "MetricLogger", original)
    assert run_cli(["--output-dir", str(stopped), *args], capsys)[0] == 0
    a, b = metrics(straight), metrics(stopped)
    assert sorted(a) == sorted(b) == list(range(1, 7))
    for it in a:
        assert a[it]["total_loss"] == b[it]["total_loss"], (it, a[it]["total_loss"], b[it]["total_loss"])
    sa, sb = torch.load(straight / "teacher_backbone.pth"), torch.load(stopped / "teacher_backbone.pth")
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_kill_during_checkpoint_write_keeps_previous_loadable(tmp_path, monkeypatch):
    from omegaconf import OmegaConf

    from dinobridge.train import checkpoint as ck

    model = torch.nn.Linear(4, 4)
    opt = torch.optim.AdamW(model.parameters())
    cfg = OmegaConf.create({"student": {"arch": "x"}})
    cp = ck.Checkpointer(tmp_path, max_to_keep=3)
    cp.save(1, model, opt, cfg)
    real_save = torch.save

    def dying_save(obj, f, *a, **k):  # the process dies half-way through writing the temporary file
        Path(f).write_bytes(b"PK\x03\x04 truncated")
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(ck.torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        cp.save(2, model, opt, cfg)
    monkeypatch.setattr(ck.torch, "save", real_save)
    assert cp.latest().name == "00000001.pth"
    assert cp.load(model, opt, cfg)["iteration"] == 1
    # a latest file that is corrupt on disk (e.g. a full disk) falls back to the previous one
    (tmp_path / "00000003.pth").write_bytes(b"garbage")
    assert cp.load(model, opt, cfg)["iteration"] == 1


# ---------------------------------------------------------------------------------------------- bad input
def _one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], (n, lines[0])


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _jpegs(folder: Path, n: int, size: int = 24) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", (size, size), (i * 20 % 255, 80, 160)).save(folder / f"{i}.jpg")


BAD_CONFIG_CASES = [
    (["optim.lrr=0.1"], ["optim.lrr", "optim.lr"]),
    (["optim.lr=abc"], ["optim.lr", "float"]),
    (["student.arch=vit_smol", "train.max_iter=1"], ["vit_smol"]),
    (["crops.global_crops_size=30"], ["global_crops_size"]),
    (["ibot.mask_ratio_min_max=[0.6,0.2]"], ["mask_ratio_min_max"]),
    (["MODEL.META_ARCHITECTURE=SSLNope", "train.max_iter=1"], ["SSLNope"]),
    (["train.centering=banana", "train.max_iter=1"], ["banana"]),
    (["train.dataset_path=NotAThing:root=x"], ["NotAThing"]),
    (["student.pretrained_weights=/nonexistent/w.pth", "train.max_iter=1"], ["/nonexistent/w.pth"]),
]


@pytest.mark.parametrize("overrides,needles", BAD_CONFIG_CASES, ids=[c[0][0].split("=")[0] for c in BAD_CONFIG_CASES])
def test_bad_config_is_one_line_error(tmp_path, capsys, overrides, needles):
    code, _, err = run_cli(["--output-dir", str(tmp_path / "run"), *TINY, *overrides], capsys)
    _one_line_error(code, err, *needles)


def test_bad_files_are_one_line_errors(tmp_path, capsys):
    cases = []
    cases.append((["--config-file", str(tmp_path / "missing.yaml")], ["missing.yaml"]))
    bad_yaml = _write(tmp_path / "bad.yaml", "optim:\n  lr: [1, 2\n")
    cases.append((["--config-file", str(bad_yaml)], ["bad.yaml"]))
    cases.append(([f"train.dataset_path=ImageFolder:root={tmp_path / 'nope'}"], ["nope"]))
    (tmp_path / "empty").mkdir()
    cases.append(([f"train.dataset_path=ImageFolder:root={tmp_path / 'empty'}"], ["empty"]))
    listing = _write(tmp_path / "list.txt", f"{tmp_path / 'ghost1.jpg'}\n{tmp_path / 'ghost2.jpg'}\n")
    cases.append(([f"train.dataset_path=TxtList:path={listing}"], ["ghost1.jpg"]))
    blocker = _write(tmp_path / "blocker", "a file, not a directory")
    for extra, needles in cases:
        code, _, err = run_cli(["--output-dir", str(tmp_path / "run"), *TINY, *extra], capsys)
        _one_line_error(code, err, *needles)
    code, _, err = run_cli(["--output-dir", str(blocker / "sub"), *TINY], capsys)
    _one_line_error(code, err, "blocker")


def test_corrupt_jpeg_is_skipped_and_counted(tmp_path, capsys):
    data = tmp_path / "data" / "a"
    _jpegs(data, 12)
    (data / "5.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    code, _, err = run_cli(["--output-dir", str(tmp_path / "run"), *TINY,
                            f"train.dataset_path=ImageFolder:root={tmp_path / 'data'}", "train.max_iter=4"], capsys)
    assert code == 0, err
    m = metrics(tmp_path / "run")
    assert sum(e.get("data_skipped", 0) for e in m.values()) >= 1


def test_resume_with_incompatible_config_is_refused(tmp_path, capsys):
    run = tmp_path / "run"
    code, _, err = run_cli(["--output-dir", str(run), *TINY, "train.max_iter=1"], capsys)
    assert code == 0, err
    code, _, err = run_cli(["--output-dir", str(run), *TINY, "train.max_iter=2", "dino.head_n_prototypes=64"], capsys)
    _one_line_error(code, err, "dino.head_n_prototypes", "--no-resume")


def _run_with_poisoned_student(run, capsys) -> None:
    """Train 2 iterations into `run`, then poison the student in the latest checkpoint: every later loss is NaN."""
    code, _, err = run_cli(["--output-dir", str(run), *TINY, "train.max_iter=2", "checkpointing.period=1"], capsys)
    assert code == 0, err
    ckpt = run / "ckpt" / "00000002.pth"
    state = torch.load(ckpt, weights_only=False)
    for k, v in state["model"].items():
        if k.startswith("student.backbone.blocks") and v.is_floating_point():
            v.fill_(float("nan"))
    torch.save(state, ckpt)


def test_nan_loss_stops_with_message_and_keeps_last_checkpoint(tmp_path, capsys):
    run = tmp_path / "run"
    _run_with_poisoned_student(run, capsys)
    before = sorted(p.name for p in (run / "ckpt").iterdir())
    code, _, err = run_cli(["--output-dir", str(run), *TINY, "optim.epochs=2", "train.nan_max_consecutive=2"], capsys)
    _one_line_error(code, err, "NaN", "intact")
    assert sorted(p.name for p in (run / "ckpt").iterdir()) == before  # nothing saved over the last checkpoint
    from dinobridge.train.checkpoint import Checkpointer

    assert Checkpointer(run / "ckpt").latest() is not None


def test_stop_signal_after_a_non_finite_step_saves_nothing_and_says_so(tmp_path, capsys, monkeypatch):
    """A stop request right after a step whose loss was not finite (one not logged, so its verdict is read at the
    stop): nothing is saved over the last good checkpoint, and the line says so instead of "checkpoint saved"."""
    from dinobridge.train.preemption import StopSignal

    run = tmp_path / "run"
    _run_with_poisoned_student(run, capsys)
    before = {p.name: p.stat().st_mtime_ns for p in (run / "ckpt").iterdir()}
    monkeypatch.setattr(StopSignal, "requested", lambda self, device: 15)
    code, out, err = run_cli(["--output-dir", str(run), *TINY, "optim.epochs=2", "train.log_period=5",
                              "checkpointing.period=100", "train.nan_max_consecutive=10"], capsys)
    assert code == 128 + 15, err
    text = (run / "log.txt").read_text() + out + err
    assert "stopped by signal 15 at iteration 3/8; this step's loss was not finite, so nothing was saved" in text
    assert {p.name: p.stat().st_mtime_ns for p in (run / "ckpt").iterdir()} == before


def test_torchrun_two_processes_share_one_run_directory(tmp_path):
    """2 CPU processes (gloo) under torchrun, replicated (NO_SHARD; the FSDP2 default is tested in
    tests/test_fsdp_train.py): one run directory, only rank 0 writes logs and single-file checkpoints."""
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "dinobridge.train", "--output-dir", str(run), *TINY, "train.max_iter=2",
           "compute_precision.sharding_strategy=NO_SHARD"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(metrics(run)) == [1, 2]  # one writer: each iteration logged once
    assert (run / "ckpt" / "00000002.pth").is_file()
    state = torch.load(run / "ckpt" / "00000002.pth", weights_only=False)
    assert state["world_size"] == 2 and len(state["rng"]) == 2
    assert [p.name for p in run.iterdir() if p.name.startswith("config")] == ["config.yaml"]
