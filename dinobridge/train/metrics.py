"""Training logs: a tqdm bar (rank 0), tensorboard scalars and images, `metrics.jsonl`, plus step timing.

Everything is written by rank 0 only. Scalars are averaged over ranks before logging by the caller.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor
from tqdm import tqdm


class StepTimer:
    """Splits wall time into data wait and compute; gives images/s and data-wait %."""

    def __init__(self) -> None:
        self.t_last = time.perf_counter()
        self.data_s = 0.0
        self.total_s = 0.0
        self.images = 0

    def data_ready(self) -> None:
        self.data_s += time.perf_counter() - self.t_last

    def step_done(self, images: int) -> None:
        now = time.perf_counter()
        self.total_s += now - self.t_last
        self.t_last = now
        self.images += images

    def skip(self) -> None:
        """Exclude the time since the last step (logging, evaluation) from both data wait and compute."""
        self.t_last = time.perf_counter()

    def summary(self) -> dict[str, float]:
        """Averages since the last call (then reset)."""
        total = max(self.total_s, 1e-9)
        out = {"img_per_s": self.images / total, "data_wait_pct": 100.0 * self.data_s / total}
        self.data_s = self.total_s = 0.0
        self.images = 0
        return out


class MetricLogger:
    """tqdm bar + tensorboard + metrics.jsonl, active on rank 0 only."""

    def __init__(self, output_dir: str | Path, start_iter: int, max_iter: int, is_main: bool,
                 tensorboard: bool = True, progress_bar: bool = True) -> None:
        self.is_main = is_main
        self.writer = None
        self.bar: Optional[tqdm] = None
        self.jsonl = None
        if not is_main:
            return
        out = Path(output_dir)
        self.jsonl = open(out / "metrics.jsonl", "a", buffering=1)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(out / "tensorboard"), purge_step=start_iter)
        if progress_bar:
            self.bar = tqdm(total=max_iter, initial=start_iter, desc="train", dynamic_ncols=True, smoothing=0.1)

    def log(self, iteration: int, scalars: dict[str, float]) -> None:
        """Write scalars for `iteration` to tensorboard and metrics.jsonl."""
        if not self.is_main:
            return
        clean = {k: (float(v) if v is not None else None) for k, v in scalars.items()}
        if self.writer is not None:
            for k, v in clean.items():
                if v is not None and math.isfinite(v):
                    self.writer.add_scalar(k, v, iteration)
        self.jsonl.write(json.dumps({"iteration": iteration, **clean}) + "\n")

    @property
    def images_enabled(self) -> bool:
        """True when `add_images` writes anything (rank 0 with tensorboard on)."""
        return self.writer is not None

    def add_images(self, iteration: int, tag: str, images: Tensor) -> bool:
        """Write pictures under `tag` at `iteration` to tensorboard; False (nothing written) when it is off.

        images: one picture [3, H, W] or several [N, 3, H, W] (shown side by side by tensorboard); uint8 in 0..255 or
        floating point in [0, 1] (clamped).
        """
        if not self.images_enabled:
            return False
        if not isinstance(images, Tensor) or images.dim() not in (3, 4) or images.shape[-3] != 3:
            shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise ValueError(f"images: expected a tensor [3, H, W] or [N, 3, H, W], got {shape}")
        x = images.detach().cpu()
        x = x.float().div(255.0) if x.dtype == torch.uint8 else x.float().clamp(0.0, 1.0)
        if x.dim() == 3:
            self.writer.add_image(tag, x, iteration, dataformats="CHW")
        else:
            self.writer.add_images(tag, x, iteration, dataformats="NCHW")
        return True

    def progress(self, n: int, postfix: dict[str, Any]) -> None:
        if self.bar is not None:
            self.bar.update(n)
            self.bar.set_postfix(postfix, refresh=False)

    def write(self, message: str) -> None:
        """A line that does not break the bar."""
        if not self.is_main:
            return
        if self.bar is not None:
            self.bar.write(message)
        else:
            print(message, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
        if self.jsonl is not None:
            self.jsonl.close()
