"""Built-in procedural dataset: coloured shapes whose class is (shape, texture), rendered on the fly.

`ProceduralShapes` is the offline default data source (``builtin:shapes``): no files, no downloads, deterministic.

Class c is the pair ``(shape, texture)`` with ``shape = c % 6`` and ``texture = (c // 6 + c) % 4`` over
6 shapes (disk, square, triangle, flower, cross, ring) and 4 textures (solid, stripes, dots, checker), so up to 24
classes, all pairs distinct; with the default 10 classes some classes share a shape and differ only by texture
(and vice versa). Everything else is a nuisance drawn at random per image: foreground / pattern / background colours
(independent uniform RGB; so the mean colour carries no class information), background gradient and noise, shape
position, scale and rotation, texture period, phase and orientation. A randomly initialised network (or kNN on pixels)
is therefore near chance while the classes are easy for a learned, colour-invariant representation.

Image ``i`` of a split is a pure function of ``(seed, split, i)`` (its own numpy generator); labels are balanced:
``label(i) = i % num_classes``. A 64 px image renders in ~0.2 ms.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

SHAPES = ("disk", "square", "triangle", "flower", "cross", "ring")
TEXTURES = ("solid", "stripes", "dots", "checker")
MAX_CLASSES = len(SHAPES) * len(TEXTURES)
_SPLITS = {"train": 0, "val": 1}
_TAG = 0x5A4E  # decorrelates these streams from other users of the same seed


def class_shape_texture(label: int) -> tuple[int, int]:
    """(shape id, texture id) of class `label` (all 24 pairs distinct)."""
    return label % len(SHAPES), (label // len(SHAPES) + label) % len(TEXTURES)


def _shape_mask(shape: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Boolean inside-mask of a unit-size shape in its local frame (u, v: [S, S] float32)."""
    # sizes chosen so that all shapes cover ~2.2 (in units of radius^2): area is not a class cue
    if shape == 0:  # disk
        return u * u + v * v <= 0.72
    if shape == 1:  # square
        return np.maximum(np.abs(u), np.abs(v)) <= 0.75
    if shape == 2:  # equilateral triangle, circumradius 1.3
        s3 = math.sqrt(3.0)
        return (v <= 0.65) & (s3 * u - v <= 1.3) & (-s3 * u - v <= 1.3)
    r = np.sqrt(u * u + v * v)
    if shape == 3:  # five-petal flower / rounded star
        phi = np.arctan2(v, u)
        return r <= 0.78 + 0.42 * np.cos(5.0 * phi)
    if shape == 4:  # plus-shaped cross
        au, av = np.abs(u), np.abs(v)
        return ((au <= 0.33) & (av <= 1.0)) | ((av <= 0.33) & (au <= 1.0))
    return (r <= 1.0) & (r >= 0.55)  # ring


def _texture_mask(texture: int, u: np.ndarray, v: np.ndarray, freq: float, phase: float) -> np.ndarray | None:
    """Where the pattern colour replaces the fill colour (None for solid)."""
    if texture == 0:
        return None
    a, b = u * freq + phase, v * freq + phase
    if texture == 1:  # stripes
        return (a - np.floor(a)) < 0.5
    if texture == 2:  # dots
        fa, fb = a - np.floor(a) - 0.5, b - np.floor(b) - 0.5
        return fa * fa + fb * fb <= 0.09
    return ((np.floor(a) + np.floor(b)) % 2.0) == 0.0  # checker


class ProceduralShapes:
    """Procedural shapes x textures classification images (see the module docstring).

    Args:
        n: number of images (the dataset length).
        num_classes: 1..24 classes.
        size: image side in pixels.
        seed: base seed; split: "train" or "val" (disjoint random streams).

    ``ds[i]`` -> (PIL RGB image [size x size], int label); ``ds.render(i)`` -> uint8 array [size, size, 3].
    """

    def __init__(self, n: int = 20000, num_classes: int = 10, size: int = 64, seed: int = 0, split: str = "train"):
        if int(n) != n or n <= 0:
            raise ValueError(f"n: expected a positive int, got {n}")
        if not 1 <= num_classes <= MAX_CLASSES:
            raise ValueError(f"num_classes: expected 1..{MAX_CLASSES}, got {num_classes}")
        if int(size) != size or size < 8:
            raise ValueError(f"size: expected an int >= 8, got {size}")
        if split not in _SPLITS:
            raise ValueError(f"split: expected one of {sorted(_SPLITS)}, got {split!r}")
        if seed < 0:
            raise ValueError(f"seed: expected a non-negative int, got {seed}")
        self.n, self.num_classes, self.size = int(n), int(num_classes), int(size)
        self.seed, self.split = int(seed), split
        self.classes = [f"{SHAPES[s]}/{TEXTURES[t]}" for s, t in map(class_shape_texture, range(self.num_classes))]
        # pixel-centre coordinates in [-1, 1]
        coords = (np.arange(self.size, dtype=np.float32) + 0.5) * (2.0 / self.size) - 1.0
        self._x = np.broadcast_to(coords[None, :], (self.size, self.size))
        self._y = np.broadcast_to(coords[:, None], (self.size, self.size))

    def __len__(self) -> int:
        return self.n

    def __repr__(self) -> str:
        return (f"ProceduralShapes(n={self.n}, num_classes={self.num_classes}, size={self.size}, "
                f"seed={self.seed}, split={self.split!r})")  # fmt: skip

    def label(self, index: int) -> int:
        return int(index) % self.num_classes

    def render(self, index: int) -> np.ndarray:
        """uint8 image [size, size, 3] of sample `index` (pure function of seed, split, index)."""
        if not 0 <= index < self.n:
            raise IndexError(f"index: expected 0 <= index < {self.n}, got {index}")
        rng = np.random.default_rng([self.seed, _TAG, _SPLITS[self.split], int(index)])
        shape, texture = class_shape_texture(self.label(index))
        S = self.size
        # nuisances: colours (fill far enough from the background), geometry, texture params
        bg = rng.random(3, dtype=np.float32)
        fill = rng.random(3, dtype=np.float32)
        for _ in range(8):
            if np.abs(fill - bg).sum() > 0.6:
                break
            fill = rng.random(3, dtype=np.float32)
        pattern = rng.random(3, dtype=np.float32)
        radius = rng.uniform(0.5, 0.85)
        cx, cy = rng.uniform(-1.0 + radius * 0.8, 1.0 - radius * 0.8, size=2)
        theta = rng.uniform(0.0, 2.0 * math.pi)
        freq = rng.uniform(2.0, 3.5)  # texture periods per shape radius
        phase = rng.random()
        tex_theta = rng.uniform(0.0, 2.0 * math.pi)
        grad = rng.uniform(-0.25, 0.25, size=(2, 3)).astype(np.float32)
        noise_amp = rng.uniform(0.0, 0.08)

        # background: colour + linear gradient + noise
        img = bg + self._x[..., None] * grad[0] + self._y[..., None] * grad[1]
        img += rng.standard_normal((S, S, 3), dtype=np.float32) * np.float32(noise_amp)
        # shape in its local frame
        c, s = math.cos(theta), math.sin(theta)
        dx, dy = self._x - np.float32(cx), self._y - np.float32(cy)
        inv_r = np.float32(1.0 / radius)
        u = (dx * np.float32(c) + dy * np.float32(s)) * inv_r
        v = (dy * np.float32(c) - dx * np.float32(s)) * inv_r
        inside = _shape_mask(shape, u, v)
        img[inside] = fill
        ct, st = np.float32(math.cos(tex_theta)), np.float32(math.sin(tex_theta))
        tex = _texture_mask(texture, u * ct + v * st, v * ct - u * st, freq, phase)
        if tex is not None:
            img[inside & tex] = pattern
        return (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)

    def load(self, index: int) -> tuple[Image.Image, int, int]:
        """(image, label, n_skipped=0): the robust-loading protocol of dinobridge datasets (never fails)."""
        return Image.fromarray(self.render(index), "RGB"), self.label(index), 0

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        return Image.fromarray(self.render(index), "RGB"), self.label(index)
