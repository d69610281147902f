"""Make an ImageNet-sized JPEG folder for loader benchmarks by upscaling images of a class-folder dataset.

    python benchmarks/make_jpeg_folder.py SRC DST --n 6400 --size 400x300 --quality 90 --workers 8

SRC: a folder of class folders (e.g. CIFAR-10 ``train/``); DST gets the same class folders with `n` images in all
(taken round-robin over the classes), each resized bicubically to WIDTHxHEIGHT and saved as JPEG, so that decoding
costs what an ImageNet image does (~400 x 300 on average after the usual preprocessing). Also writes ``DST/list.txt``
(one absolute path per line: the txt-list dataset format).
"""

from __future__ import annotations

import argparse
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from PIL import Image

EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}


def _convert(job: tuple[str, str, int, int, int]) -> str:
    src, dst, w, h, quality = job
    with Image.open(src) as im:
        im.convert("RGB").resize((w, h), Image.BICUBIC).save(dst, quality=quality)
    return dst


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("src", type=Path)
    p.add_argument("dst", type=Path)
    p.add_argument("--n", type=int, default=6400, help="number of images to write")
    p.add_argument("--size", default="400x300", help="WIDTHxHEIGHT")
    p.add_argument("--quality", type=int, default=90)
    p.add_argument("--workers", type=int, default=8)
    args = p.parse_args(argv)
    try:
        w, h = (int(v) for v in args.size.lower().split("x"))
    except ValueError:
        p.error(f"--size: expected WIDTHxHEIGHT, got {args.size!r}")
    classes = sorted(d for d in args.src.iterdir() if d.is_dir()) if args.src.is_dir() else []
    if not classes:
        p.error(f"src: expected a folder of class folders, got {args.src}")
    files = {c.name: sorted(f for f in c.iterdir() if f.suffix.lower() in EXTS) for c in classes}
    jobs = []
    i = 0
    while len(jobs) < args.n and any(files.values()):
        name = classes[i % len(classes)].name
        if files[name]:
            src = files[name].pop(0)
            out = args.dst / name / (src.stem + ".jpg")
            jobs.append((str(src), str(out), w, h, args.quality))
        i += 1
    for c in classes:
        (args.dst / c.name).mkdir(parents=True, exist_ok=True)
    with ProcessPoolExecutor(args.workers) as pool:
        written = list(pool.map(_convert, jobs, chunksize=64))
    (args.dst / "list.txt").write_text("".join(str(Path(f).resolve()) + "\n" for f in written))
    print(f"wrote {len(written)} {w}x{h} JPEGs to {args.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
