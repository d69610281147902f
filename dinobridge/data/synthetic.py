"""Built-in procedural dataset: scenes of a few shapes whose class is (shape, texture), rendered on the fly.

`ProceduralShapes` is the offline default data source (``builtin:shapes``): no files, no downloads, deterministic.

Class c is the pair ``(shape, texture) = (c % 5, c // 5)`` over 5 shapes (disk, square, triangle, cross, ring) and
4 textures (solid, stripes, dots, checker), so up to 20 classes, all pairs distinct; the default 10 classes are the
5 shapes x {solid, stripes}. An image shows 2-4 objects, all of its class (same shape, same texture), one per cell of
a 2x2 grid. Everything else is a nuisance drawn at random per image and per object:

* background: one colour of random hue whose luminance L_bg is uniform in [0, 1];
* each object: its own fill colour of random hue whose luminance is at least ``LUMA_GAP`` away from L_bg (so every
  object stands out in grey-scale too), its size, its position inside its cell, the texture period and phase;
  the texture is drawn as holes (what lies underneath, normally the background, shows through);
* which cells are used (and so how many objects).

Hence the mean colour carries no class information and kNN on pixels stays near chance (~17% on 10 classes), while
the classes are easy for a learned, colour-invariant representation of shape and texture: with the default preset
(`dinobridge train`) the kNN accuracy of the trained teacher (~32%) is about twice that at initialisation (~16%).

Image ``i`` of a split is a pure function of ``(seed, split, i)`` (its own numpy generator); labels are balanced:
``label(i) = i % num_classes``. A 64 px image renders in ~0.6 ms.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

SHAPES = ("disk", "square", "triangle", "cross", "ring")
TEXTURES = ("solid", "stripes", "dots", "checker")
MAX_CLASSES = len(SHAPES) * len(TEXTURES)
_SPLITS = {"train": 0, "val": 1}
_TAG = 0x5A4F  # decorrelates these streams from other users of the same seed
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)  # Rec. 601 luminance weights


def class_shape_texture(label: int) -> tuple[int, int]:
    """(shape id, texture id) of class `label` (all 20 pairs distinct; classes 0-9 use textures 0-1)."""
    return label % len(SHAPES), label // len(SHAPES) % len(TEXTURES)


def _shape_mask(shape: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Boolean inside-mask of a unit-size shape in its local frame (u, v: [H, W] float32); extent <= 1.3."""
    # sizes chosen so that all shapes cover a similar area (in units of radius^2): area is a weak class cue
    if shape == 0:  # disk
        return u * u + v * v <= 0.72
    if shape == 1:  # square
        return np.maximum(np.abs(u), np.abs(v)) <= 0.75
    if shape == 2:  # equilateral triangle, circumradius 1.3
        s3 = math.sqrt(3.0)
        return (v <= 0.65) & (s3 * u - v <= 1.3) & (-s3 * u - v <= 1.3)
    if shape == 3:  # plus-shaped cross
        au, av = np.abs(u), np.abs(v)
        return ((au <= 0.33) & (av <= 1.0)) | ((av <= 0.33) & (au <= 1.0))
    r2 = u * u + v * v
    return (r2 <= 1.0) & (r2 >= 0.3025)  # ring, radii 0.55 and 1


def _texture_mask(texture: int, u: np.ndarray, v: np.ndarray, freq: float, phase: float) -> np.ndarray | None:
    """Where the texture punches holes in the fill (None for solid); `freq` periods per unit length."""
    if texture == 0:
        return None
    a, b = u * np.float32(freq) + np.float32(phase), v * np.float32(freq) + np.float32(phase)
    if texture == 1:  # horizontal stripes
        return (b - np.floor(b)) < 0.5
    if texture == 2:  # dots
        fa, fb = a - np.floor(a) - 0.5, b - np.floor(b) - 0.5
        return fa * fa + fb * fb <= 0.09
    return ((np.floor(a) + np.floor(b)) % 2.0) == 0.0  # checker


def _colour_with_luma(rng: np.random.Generator, luma: float) -> np.ndarray:
    """A random-hue RGB colour in [0, 1]^3 with exactly the given luminance."""
    c = rng.random(3).astype(np.float32)
    lc = float(c @ _LUMA)
    if luma <= lc:  # darken towards black
        return c * np.float32(luma / max(lc, 1e-6))
    return c + np.float32((luma - lc) / max(1.0 - lc, 1e-6)) * (1.0 - c)  # lighten towards white


def _far_luma(rng: np.random.Generator, luma: float, gap: float) -> float:
    """A luminance uniform over [0, 1] minus (luma - gap, luma + gap) (needs gap <= 0.5)."""
    below, above = max(0.0, luma - gap), max(0.0, 1.0 - luma - gap)
    if rng.random() * (below + above) < below:
        return float(rng.uniform(0.0, luma - gap))
    return float(rng.uniform(luma + gap, 1.0))


class ProceduralShapes:
    """Procedural shapes x textures classification images (see the module docstring).

    Args:
        n: number of images (the dataset length).
        num_classes: 1..20 classes.
        size: image side in pixels.
        seed: base seed; split: "train" or "val" (disjoint random streams).

    ``ds[i]`` -> (PIL RGB image [size x size], int label); ``ds.render(i)`` -> uint8 array [size, size, 3].
    The generator's constants are class attributes (coordinates: the image spans [-1, 1], each grid cell is 1 wide).
    """

    OBJECTS = (2, 4)  # objects per image, inclusive range (one per 2x2 grid cell)
    RADIUS = (0.25, 0.4)  # object radius (shape extent ~radius)
    POSITION = 0.8  # the centre stays `POSITION * radius` inside its cell
    LUMA_GAP = 0.4  # |L_fill - L_bg| >= LUMA_GAP
    FREQ = (1.5, 2.0)  # texture periods per unit radius (stripes 2-4 px wide at 64 px)

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
        self._coords = (np.arange(self.size, dtype=np.float32) + 0.5) * (2.0 / self.size) - 1.0

    def __len__(self) -> int:
        return self.n

    def __repr__(self) -> str:
        return (f"ProceduralShapes(n={self.n}, num_classes={self.num_classes}, size={self.size}, "
                f"seed={self.seed}, split={self.split!r})")  # fmt: skip

    def label(self, index: int) -> int:
        return int(index) % self.num_classes

    def _pixel_range(self, lo: float, hi: float) -> slice:
        """Pixels whose centre lies in [lo, hi] (a slice of rows or columns)."""
        a = max(0, int(math.floor((lo + 1.0) * self.size / 2.0)))
        b = min(self.size, int(math.ceil((hi + 1.0) * self.size / 2.0)) + 1)
        return slice(a, max(a, b))

    def render(self, index: int) -> np.ndarray:
        """uint8 image [size, size, 3] of sample `index` (pure function of seed, split, index)."""
        if not 0 <= index < self.n:
            raise IndexError(f"index: expected 0 <= index < {self.n}, got {index}")
        rng = np.random.default_rng([self.seed, _TAG, _SPLITS[self.split], int(index)])
        shape, texture = class_shape_texture(self.label(index))
        bg_luma = float(rng.random())
        bg = _colour_with_luma(rng, bg_luma)
        img = np.empty((self.size, self.size, 3), np.float32)
        img[:] = bg
        k = int(rng.integers(self.OBJECTS[0], self.OBJECTS[1] + 1))
        for cell in rng.permutation(4)[:k]:
            radius = float(rng.uniform(*self.RADIUS))
            lim = max(0.0, 0.5 - radius * self.POSITION)
            cx = float(cell % 2) - 0.5 + float(rng.uniform(-lim, lim))
            cy = float(cell // 2) - 0.5 + float(rng.uniform(-lim, lim))
            fill = _colour_with_luma(rng, _far_luma(rng, bg_luma, self.LUMA_GAP))
            freq, phase = float(rng.uniform(*self.FREQ)), float(rng.random())
            # render inside the object's bounding box only (shapes reach <= 1.3 radius from the centre)
            rows, cols = self._pixel_range(cy - 1.3 * radius, cy + 1.3 * radius), \
                self._pixel_range(cx - 1.3 * radius, cx + 1.3 * radius)  # fmt: skip
            inv_r = np.float32(1.0 / radius)
            u = ((self._coords[cols] - np.float32(cx)) * inv_r)[None, :]
            v = ((self._coords[rows] - np.float32(cy)) * inv_r)[:, None]
            u, v = np.broadcast_arrays(u, v)
            inside = _shape_mask(shape, u, v)
            holes = _texture_mask(texture, u, v, freq, phase)
            if holes is not None:
                inside &= ~holes
            img[rows, cols][inside] = fill
        return (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)

    def load(self, index: int) -> tuple[Image.Image, int, int]:
        """(image, label, n_skipped=0): the robust-loading protocol of dinobridge datasets (never fails)."""
        return Image.fromarray(self.render(index), "RGB"), self.label(index), 0

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        return Image.fromarray(self.render(index), "RGB"), self.label(index)
