"""benchmarks/multi_gpu.py, the tools of the multi-GPU runs: rank shares of a fixed global batch, loss comparison,
the weak-scaling table, the per-rank balancer hash and metrics reading; `steps` end to end in one CPU process.
(The 2-rank version of `steps` needs torchrun: the same comparison runs under mp.spawn in tests/test_fsdp_train.py.)"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from dinobridge.config import build_config

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
try:
    import multi_gpu
finally:
    sys.path.pop(0)

TINY = ["student.arch=vit_test", "student.patch_size=4", "crops.global_crops_size=16", "crops.local_crops_size=8",
        "crops.local_crops_number=2", "dino.head_n_prototypes=32", "ibot.head_n_prototypes=32",
        "dino.head_hidden_dim=32", "ibot.head_hidden_dim=32", "dino.head_bottleneck_dim=16",
        "ibot.head_bottleneck_dim=16", "MODEL.DEVICE=cpu", "compute_precision.param_dtype=fp32",
        "train.compile=false", "student.drop_path_rate=0.0", "optim.warmup_epochs=0"]


def test_rank_shares_partition_the_global_batch():
    cfg = build_config(None, TINY, config_name="train")
    batch = multi_gpu.synthetic_global_batch(cfg, step=3, global_batch=6)
    again = multi_gpu.synthetic_global_batch(cfg, step=3, global_batch=6)
    assert torch.equal(batch["global_crops"], again["global_crops"]) and torch.equal(batch["masks"], again["masks"])
    assert not torch.equal(batch["global_crops"], multi_gpu.synthetic_global_batch(cfg, 4, 6)["global_crops"])
    shares = [multi_gpu.rank_share(batch, r, 3) for r in range(3)]
    for key in ("global_crops", "local_crops", "masks"):
        n_crops = batch[key].shape[0] // 6
        rebuilt = torch.cat([s[key].view(n_crops, 2, *s[key].shape[1:]) for s in shares], dim=1).flatten(0, 1)
        assert torch.equal(rebuilt, batch[key]), key
    for s in shares:  # indices and weights as the collator defines them, for the share
        m = s["masks"]
        assert torch.equal(s["mask_indices"], m.flatten().nonzero().flatten())
        assert int(s["n_masked_patches"]) == int(m.sum())
        if m.any():
            per_image = m.sum(-1)[s["mask_indices"] // m.shape[1]].float()
            torch.testing.assert_close(s["masks_weight"], 1.0 / per_image)
    with pytest.raises(ValueError, match="multiple of the world size 4"):
        multi_gpu.rank_share(batch, 0, 4)


def test_compare_and_scaling_tables():
    assert multi_gpu.compare_losses([1.0, 2.0], [1.0, 2.2]) == pytest.approx((0.2, 0.2 / 2.2))
    rows = multi_gpu.scaling_rows([
        {"world": 4, "img_per_s": 360.0, "peak_mem_gib": 30.0, "device": "H200"},
        {"world": 1, "img_per_s": 100.0, "peak_mem_gib": 31.0, "device": "H200"},
    ])  # fmt: skip
    assert [r["world"] for r in rows] == [1, 4]
    assert rows[1]["per_gpu"] == pytest.approx(90.0) and rows[1]["efficiency"] == pytest.approx(0.9)
    assert rows[0]["peak_gib"] == 31.0


def _rank_file(path: Path, hist: torch.Tensor) -> None:
    torch.save({"rng": {}, "buffers": {"dino_balancer.hist": hist, "dino_balancer.ptr": torch.tensor(3),
                                       "student.other": torch.randn(2)}}, path)


def test_balancer_hash_per_rank(tmp_path, capsys):
    run = tmp_path / "run"
    for it in (10, 20):
        (run / "ckpt" / f"{it:08d}").mkdir(parents=True)
    (run / "ckpt" / "00000010.pth").write_bytes(b"")  # a single-file checkpoint is not a sharded directory
    latest = run / "ckpt" / "00000020"
    assert multi_gpu.latest_sharded_checkpoint(run) == latest
    hist = torch.rand(8)
    for r in range(2):
        _rank_file(latest / f"rank{r:05d}.pt", hist.clone())  # the non-balancer buffer differs per rank
    hashes = multi_gpu.balancer_hashes(latest)
    assert set(hashes) == {0, 1} and hashes[0] == hashes[1]
    assert multi_gpu.main(["dtch-hash", str(run)]) == 0 and "identical on 2 ranks" in capsys.readouterr().out
    changed = hist.clone()
    changed[5] += 1e-6
    _rank_file(latest / "rank00001.pt", changed)
    assert multi_gpu.main(["dtch-hash", str(run)]) == 1 and "DIFFERENT" in capsys.readouterr().out
    with pytest.raises(FileNotFoundError, match="sharded checkpoint"):
        multi_gpu.latest_sharded_checkpoint(tmp_path / "empty")


def test_resume_compare_reads_metrics(tmp_path, capsys):
    for name, losses in (("a", [3.0, 2.5, 2.0]), ("b", [3.0, 2.5, 2.0])):
        (tmp_path / name).mkdir()
        lines = [json.dumps({"iteration": i + 1, "total_loss": v}) for i, v in enumerate(losses)]
        lines.append(json.dumps({"iteration": 3, "knn": 10.0}))  # records without a loss are skipped
        (tmp_path / name / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    assert multi_gpu.metric_losses(tmp_path / "a") == {1: 3.0, 2: 2.5, 3: 2.0}
    assert multi_gpu.main(["resume-compare", str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    assert "EXACT" in capsys.readouterr().out
    (tmp_path / "b" / "metrics.jsonl").write_text(json.dumps({"iteration": 2, "total_loss": 2.6}) + "\n")
    assert multi_gpu.main(["resume-compare", str(tmp_path / "a"), str(tmp_path / "b")]) == 1


def test_steps_in_one_process_writes_losses(tmp_path, capsys):
    out = tmp_path / "one.json"
    assert multi_gpu.main(["steps", "--config-name", "train", "--global-batch", "4", "--steps", "2", "--out",
                           str(out), *TINY]) == 0  # fmt: skip
    data = json.loads(out.read_text())
    assert data["world"] == 1 and data["global_batch"] == 4 and len(data["losses"]) == 2
    assert all(torch.isfinite(torch.tensor(data["losses"])))
    assert data["losses"][0] != data["losses"][1]  # a new batch and updated weights


def test_run_summary_flags_non_finite_losses(tmp_path, capsys):
    recs = [{"iteration": 10, "total_loss": 5.0, "dino_loss": 4.0, "img_per_s": 100.0, "peak_memory_gib": 2.0},
            {"iteration": 20, "total_loss": 4.0, "dino_loss": 3.0, "img_per_s": 120.0, "peak_memory_gib": 2.5},
            {"iteration": 20, "knn": 50.0}]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    s = multi_gpu.run_summary(tmp_path)
    assert s == {"iteration": 20, "img_per_s": 110.0, "peak_gib": 2.5, "losses": {"total_loss": 4.0, "dino_loss": 3.0},
                 "finite": True}
    assert multi_gpu.main(["run-summary", str(tmp_path)]) == 0 and "median 110.0 img/s" in capsys.readouterr().out
    recs[1]["dino_loss"] = float("nan")
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    assert multi_gpu.main(["run-summary", str(tmp_path)]) == 1 and "NOT FINITE" in capsys.readouterr().out
