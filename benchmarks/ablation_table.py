"""Collect the kNN results of a sweep (e.g. the `cifar10_ablation` preset) into one Markdown table.

    python benchmarks/ablation_table.py runs/ablation

Reads every ``<sweep dir>/<job>/knn.json`` (written at the end of each job) and the job's ``config.yaml`` (for the
ablation option, iterations and batch), and prints one row per job: kNN top-1 of the trained teacher for each k and at
initialisation, plus the final loss terms and img/s from ``metrics.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml


def _last_metrics(job: Path) -> dict:
    path = job / "metrics.jsonl"
    if not path.is_file():
        return {}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "total_loss" in r]
    return rows[-1] if rows else {}


def _variant(job: Path, cfg: dict) -> str:
    name = job.name.split("_", 1)[-1] if "_" in job.name else job.name
    return name.replace("ablation=", "")


def collect(sweep: Path) -> list[dict]:
    rows = []
    for job in sorted(p for p in sweep.iterdir() if p.is_dir()):
        knn_file = job / "knn.json"
        if not knn_file.is_file():
            continue
        knn = json.loads(knn_file.read_text())
        cfg = yaml.safe_load((job / "config.yaml").read_text()) if (job / "config.yaml").is_file() else {}
        last = _last_metrics(job)
        rows.append({"variant": _variant(job, cfg), "knn": knn, "iteration": last.get("iteration"),
                     "img_per_s": last.get("img_per_s"), "total_loss": last.get("total_loss")})
    return rows


def markdown(rows: list[dict]) -> str:
    ks = sorted({k for r in rows for k in r["knn"].get("trained", {})}, key=int)
    head = "| variant | " + " | ".join(f"kNN k={k}" for k in ks) + " | at init (k=" + (ks[0] if ks else "-") + \
        ") | iterations | img/s | final loss |"
    lines = [head, "|" + "---|" * (len(ks) + 5)]
    for r in rows:
        trained = r["knn"].get("trained", {})
        init = r["knn"].get("init", {})
        cells = [f"{trained[k]:.2f}" if k in trained else "-" for k in ks]
        init_cell = f"{init[ks[0]]:.2f}" if ks and ks[0] in init else "-"
        img = f"{r['img_per_s']:.0f}" if r["img_per_s"] else "-"
        loss = f"{r['total_loss']:.3f}" if r["total_loss"] is not None else "-"
        lines.append(f"| {r['variant']} | " + " | ".join(cells) + f" | {init_cell} | {r['iteration']} | {img} | {loss} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("sweep", type=Path, help="the --output-dir of the sweep")
    args = p.parse_args(argv)
    if not args.sweep.is_dir():
        p.error(f"sweep: not a directory: {args.sweep}")
    rows = collect(args.sweep)
    if not rows:
        p.error(f"sweep: no <job>/knn.json under {args.sweep} (did the jobs finish?)")
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
