"""CPU throughput of `MultiCropAugmentation` (2 global 224 + 8 local 96 crops), JPEG decode included, one thread.

Data: the first --images CIFAR-10 JPEGs of the shared tarball, upscaled (bicubic) to --size (default 400x300) and
re-encoded as JPEG (quality 90) in a temporary directory that is deleted afterwards (nothing is written to the repo).

Rows (images/s on one core):
  pil+dinobridge     PIL decode + convert("RGB") -> MultiCropAugmentation
  tvio+dinobridge    torchvision.io.decode_jpeg (uint8 CHW tensor) -> MultiCropAugmentation
  pil+tv-v2-percrop  baseline: PIL decode -> per-crop torchvision.transforms.v2 pipelines on PIL images as in the
                     official recipe (RandomResizedCrop bicubic, flip, ColorJitter, grayscale, blur, solarize,
                     ToImage/ToDtype/Normalize)

With --gpu-augmentation (``crops.gpu_augmentation``), two more rows:
  tvio+dinobridge-geo+collate  the worker side: decode, crops, flips and all draws (uint8 crops + parameters), then
                     the collator (masks, crop-major stacking, photometric plan) per batch of --device-batch images
  device-photometric the device side: `DeviceAugmentation` on one collated batch (colour jitter, grayscale, blur,
                     solarize, normalisation), on CUDA when available, else on the CPU with one thread; images/s of
                     wall time (synchronised), median over repeats (the images/s/core columns then say "-" on CUDA)

Usage: python benchmarks/bench_augmentation.py [--tar PATH] [--images 64] [--seconds 5] [--rounds 2]
       [--gpu-augmentation] [--device-batch 64]
Prints a markdown table: | date | CPU | torch | pipeline | images/s/core | ms/image | images/s (wall) |; the per-core
figures use this process's CPU time (robust to other processes on the machine), the last column wall time.
"""

from __future__ import annotations

import argparse
import datetime
import io
import platform
import tarfile
import tempfile
import time
from pathlib import Path

import torch
import torchvision
from PIL import Image
from torchvision.io import decode_jpeg
from torchvision.transforms import v2

from dinobridge.data.augmentation import MultiCropAugmentation, MultiCropConfig
from dinobridge.data.collate import MultiCropCollator
from dinobridge.data.gpu_augmentation import DeviceAugmentation

DEFAULT_TAR = "/work/shared/datasets/cifar10-jpg.tar.gz"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def make_jpegs(tar_path: str, n: int, size: tuple[int, int], out_dir: Path) -> list[Path]:
    """Upscale the first n JPEGs of the tarball to `size` (w, h) and save them under out_dir."""
    paths: list[Path] = []
    with tarfile.open(tar_path, "r:gz") as tar:
        for member in tar:
            if not (member.isfile() and member.name.lower().endswith((".jpg", ".jpeg"))):
                continue
            data = tar.extractfile(member).read()  # type: ignore[union-attr]
            img = Image.open(io.BytesIO(data)).convert("RGB").resize(size, Image.BICUBIC)
            path = out_dir / f"{len(paths):05d}.jpg"
            img.save(path, quality=90)
            paths.append(path)
            if len(paths) == n:
                break
    if len(paths) < n:
        raise RuntimeError(f"--images: the tarball holds only {len(paths)} JPEGs, asked for {n}")
    return paths


def baseline_v2(cfg: MultiCropConfig):
    """Per-crop torchvision v2 pipelines on PIL images following the official recipe (effective probabilities)."""

    def blur(p: float):
        return v2.RandomApply([v2.GaussianBlur(cfg.blur_kernel_size, sigma=cfg.blur_sigma)], p=p)

    color = v2.Compose(
        [
            v2.RandomApply([v2.ColorJitter(cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue)], p=0.8),
            v2.RandomGrayscale(p=cfg.grayscale_prob),
        ]
    )
    norm = v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(cfg.rgb_mean, cfg.rgb_std)])
    flip = v2.RandomHorizontalFlip(0.5 if cfg.horizontal_flips else 0.0)
    bicubic = v2.InterpolationMode.BICUBIC
    rrc = v2.RandomResizedCrop
    geo_g = v2.Compose([rrc(cfg.global_crops_size, cfg.global_crops_scale, interpolation=bicubic), flip])
    geo_l = v2.Compose([rrc(cfg.local_crops_size, cfg.local_crops_scale, interpolation=bicubic), flip])
    g1 = v2.Compose([color, blur(cfg.global_crop_1_blur_prob), norm])
    solarize = v2.RandomSolarize(128, p=cfg.global_crop_2_solarize_prob)
    g2 = v2.Compose([color, blur(cfg.global_crop_2_blur_prob), solarize, norm])
    loc = v2.Compose([color, blur(cfg.local_crops_blur_prob), norm])

    def run(img):
        return [g1(geo_g(img)), g2(geo_g(img))] + [loc(geo_l(img)) for _ in range(cfg.local_crops_number)]

    return run


def measure(fn, paths: list[Path], seconds: float) -> tuple[float, float]:
    """(images per wall second, images per CPU second of this process) of fn(path) over repeated passes.

    The CPU-time rate is the per-core figure that is robust to other processes sharing the cores.
    """
    for p in paths[:8]:
        fn(p)
    count, start, cpu_start = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - start < seconds:
        for p in paths:
            fn(p)
        count += len(paths)
    return count / (time.perf_counter() - start), count / (time.process_time() - cpu_start)


def measure_batches(fn, paths: list[Path], batch: int, seconds: float) -> tuple[float, float]:
    """measure() for fn(list of paths) called on consecutive batches of `batch` paths (cycled)."""
    pool = paths * (batch // len(paths) + 1)  # at least max(batch, len(paths)) paths
    batches = [pool[i * batch : (i + 1) * batch] for i in range(max(1, len(paths) // batch))]
    fn(batches[0])
    count, start, cpu_start = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - start < seconds:
        for b in batches:
            fn(b)
        count += batch * len(batches)
    return count / (time.perf_counter() - start), count / (time.process_time() - cpu_start)


def measure_device(fn, batch: dict, n_images: int, seconds: float, cuda: bool) -> tuple[float, float]:
    """(images per wall second, images per CPU second; the latter NaN on CUDA) of fn(batch), median over repeats."""
    for _ in range(3):
        fn(batch)
    if cuda:
        torch.cuda.synchronize()
    walls, cpus, start = [], [], time.perf_counter()
    while time.perf_counter() - start < seconds or len(walls) < 5:
        t, c = time.perf_counter(), time.process_time()
        fn(batch)
        if cuda:
            torch.cuda.synchronize()
        walls.append(time.perf_counter() - t)
        cpus.append(time.process_time() - c)
    walls.sort()
    cpus.sort()
    cpu_rate = float("nan") if cuda else n_images / cpus[len(cpus) // 2]
    return n_images / walls[len(walls) // 2], cpu_rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tar", default=DEFAULT_TAR)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--width", type=int, default=400)
    parser.add_argument("--height", type=int, default=300)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds; the best one is reported")
    parser.add_argument("--no-baseline", action="store_true")
    parser.add_argument("--gpu-augmentation", action="store_true", help="add the worker-side and device-side rows")
    parser.add_argument("--device-batch", type=int, default=64, help="images per collated batch (--gpu-augmentation)")
    args = parser.parse_args()

    torch.set_num_threads(1)
    cfg = MultiCropConfig()  # 2 x 224 + 8 x 96, official probabilities
    aug = MultiCropAugmentation(cfg)

    def pil_aug(p: Path):
        with Image.open(p) as im:
            return aug(im.convert("RGB"))

    def tvio_aug(p: Path):
        return aug(decode_jpeg(torchvision.io.read_file(str(p))))

    runs = [("pil+dinobridge", pil_aug), ("tvio+dinobridge", tvio_aug)]
    if not args.no_baseline:
        base = baseline_v2(cfg)

        def pil_base(p: Path):
            with Image.open(p) as im:
                return base(im.convert("RGB"))

        runs.append(("pil+tv-v2-percrop", pil_base))

    geo = MultiCropAugmentation(cfg, gpu_augmentation=True)
    collate = MultiCropCollator.for_crops(cfg.global_crops_size, cfg.patch_size)
    cuda = torch.cuda.is_available()

    def geo_collate(batch_paths: list[Path]) -> dict:
        return collate([geo(decode_jpeg(torchvision.io.read_file(str(p)))) for p in batch_paths], batch_index=0)

    with tempfile.TemporaryDirectory(prefix="bench_aug_") as tmp:
        paths = make_jpegs(args.tar, args.images, (args.width, args.height), Path(tmp))
        # interleaved rounds, best round per pipeline: robust to other load on a shared machine
        results: dict[str, list[tuple[float, float]]] = {name: [] for name, _ in runs}
        if args.gpu_augmentation:
            results["tvio+dinobridge-geo+collate"] = []
        for _ in range(args.rounds):
            for name, fn in runs:
                results[name].append(measure(fn, paths, args.seconds))
            if args.gpu_augmentation:
                results["tvio+dinobridge-geo+collate"].append(
                    measure_batches(geo_collate, paths, args.device_batch, args.seconds)
                )
        rows = [(name, max(res, key=lambda r: r[1])) for name, res in results.items()]
        if args.gpu_augmentation:
            device = torch.device("cuda" if cuda else "cpu")
            batch = geo_collate((paths * (args.device_batch // len(paths) + 1))[: args.device_batch])
            batch = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}
            device_augment = DeviceAugmentation(geo.config)
            where = torch.cuda.get_device_name() if cuda else "cpu, 1 thread"
            label = f"device-photometric ({where}, B={args.device_batch})"
            rows.append((label, measure_device(device_augment, batch, args.device_batch, args.seconds, cuda)))

    date = datetime.date.today().isoformat()
    print(f"\n{args.images} JPEGs {args.width}x{args.height}, 2x{cfg.global_crops_size} + {cfg.local_crops_number}x"
          f"{cfg.local_crops_size} crops, 1 thread, best of {args.rounds} interleaved rounds of {args.seconds:g} s\n")
    print("| date | CPU | torch | pipeline | images/s/core (CPU time) | ms/image (CPU time) | images/s (wall) |")
    print("|---|---|---|---|---|---|---|")
    for name, (wall_ips, cpu_ips) in rows:
        per_core = "- | -" if cpu_ips != cpu_ips else f"{cpu_ips:.1f} | {1000.0 / cpu_ips:.2f}"  # NaN on CUDA
        print(f"| {date} | {cpu_model()} | {torch.__version__} | {name} | {per_core} | {wall_ips:.1f} |")


if __name__ == "__main__":
    main()
