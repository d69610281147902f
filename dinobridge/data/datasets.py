"""Training image sources: class folders, txt lists, ratio mixtures, the built-in shapes, and the spec parser.

Every dataset maps an index to ``(PIL RGB image, int label)`` (label -1 when unknown) and also implements
``load(index) -> (image, label, n_skipped)``, the robust-loading protocol the train loader uses:

* Robust loading: a file that cannot be opened or decoded (missing, truncated, not an image, ...) is replaced by the
  next index's image (``index + 1``, wrapping), deterministically; ``n_skipped`` counts the replaced files, the
  loader sums it per batch (``batch["data_skipped"]``), and each bad file is logged once per process on the
  ``dinobridge.data`` logger. After 50 consecutive failures a `DataError` is raised instead of looping on.
* Memory: file lists are stored as one byte buffer + offsets (`PathTable`), not as a list of Python strings, so
  DataLoader workers forked from the main process do not copy them page by page through reference counting.

Dataset specs (`build_dataset`), ``<Name>[:key=value]*`` as in DINOv3 (names case-insensitive):

* ``builtin:shapes[:n=20000][:num_classes=10][:size=64][:seed=0][:split=train]`` (also ``Shapes:...``):
  the procedural `ProceduralShapes` (offline default, no files).
* ``ImageFolder:root=DIR[:cache=FILE]``: `ImageFolderDataset` (class sub-folders, or a flat folder).
* ``TxtList:path=FILE[:root=DIR][:ratio=1.0][:seed=0]``: `TxtListDataset` (relative entries resolved against DIR,
  default FILE's folder).
* ``ImageNet:split=TRAIN|VAL|TEST:root=DIR[:extra=...]``: the official spec, read as an ImageFolder over
  ``DIR/train`` (``val``, ``test``); ``extra`` (the official precomputed metadata) is not needed and ignored. The
  official flat ``val`` folder gives label -1.
* A bare existing directory or ``.txt`` file is accepted as ImageFolder / TxtList.

`build_train_dataset(cfg)` uses the ``data:`` mapping when it is non-empty (see `MixtureDataset` for what
``dataset_ratio`` means), else ``train.dataset_path``; with ``train.cache_dataset`` true, folder scans are cached
under ``<train.output_dir>/cache/`` (the official flag picks one of two samplers; dinobridge has a single sampler
with O(1) resume, see `sampler.py`, so the flag is used for the file-list cache instead).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Sequence

import numpy as np
from PIL import Image

from dinobridge.data.synthetic import ProceduralShapes
from dinobridge.errors import DataError, UserError

logger = logging.getLogger("dinobridge.data")

IMAGE_EXTENSIONS = frozenset({"jpg", "jpeg", "png", "bmp", "webp", "tif", "tiff"})
MAX_CONSECUTIVE_FAILURES = 50
TXT_CHECK_ALL_LIMIT = 200_000  # longer txt lists: check a random sample of entries at construction
TXT_CHECK_SAMPLE = 20_000
_CACHE_VERSION = 1


# ---------------------------------------------------------------------------------------------- helpers
class PathTable:
    """An immutable list of strings stored as one uint8 buffer + int64 offsets (fork-friendly, compact)."""

    def __init__(self, strings: Sequence[str] = ()) -> None:
        encoded = [s.encode("utf-8", "surrogateescape") for s in strings]
        self.offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum(np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded)), out=self.offsets[1:])
        self.blob = np.frombuffer(b"".join(encoded), dtype=np.uint8) if encoded else np.zeros(0, np.uint8)

    @classmethod
    def from_arrays(cls, blob: np.ndarray, offsets: np.ndarray) -> "PathTable":
        table = cls.__new__(cls)
        table.blob, table.offsets = np.asarray(blob, np.uint8), np.asarray(offsets, np.int64)
        return table

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> str:
        start, end = self.offsets[i], self.offsets[i + 1]
        return self.blob[start:end].tobytes().decode("utf-8", "surrogateescape")


def ratio_indices(n: int, ratio: float, seed: int) -> np.ndarray | None:
    """Indices realising `ratio` over n items: None for 1.0 (all, in order).

    ``ratio = k + f`` (k integer, 0 <= f < 1) keeps every item k times plus a seeded random subset of ``round(f * n)``
    items (in their original order), so the result has ``k * n + round(f * n)`` entries: < 1 subsamples, > 1 repeats.
    """
    ratio = float(ratio)
    if ratio == 1.0:
        return None
    k = int(np.floor(ratio))
    extra = int(round((ratio - k) * n))
    parts = [np.arange(n, dtype=np.int64)] * k
    if extra:
        perm = np.random.default_rng([int(seed), 0x5E1EC7, n]).permutation(n)
        parts.append(np.sort(perm[:extra]))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def _check_ratio(ratio: Any, key: str) -> float:
    try:
        value = float(ratio)
    except (TypeError, ValueError):
        raise DataError(f"{key}: expected a number >= 0, got {ratio!r}") from None
    if not np.isfinite(value) or value < 0:
        raise DataError(f"{key}: expected a number >= 0, got {ratio!r}")
    return value


def load_rgb(path: str) -> Image.Image:
    """Open and fully decode an image file as RGB (raises on missing / corrupt / truncated files)."""
    with Image.open(path) as img:
        return img.convert("RGB")


def load_sample(dataset: Any, index: int, logged: set | None = None) -> tuple[Any, int, int]:
    """(image, label, n_skipped) of `index` in any map-style dataset.

    Uses ``dataset.load`` when present (dinobridge datasets); otherwise ``dataset[index]`` with the same skip-to-next
    rule (items that are ``(image, label)`` pairs give that label, other items label -1). `logged` (a set of indices)
    makes the fallback log each failing index once.
    """
    load = getattr(dataset, "load", None)
    if callable(load):
        return load(index)
    n = len(dataset)
    last: Exception | None = None
    for attempt in range(min(MAX_CONSECUTIVE_FAILURES, n)):
        j = (index + attempt) % n
        try:
            item = dataset[j]
        except UserError:
            raise
        except Exception as exc:  # noqa: BLE001 - any decoding failure is a skip
            last = exc
            if logged is None or j not in logged:
                logger.warning("skipping unreadable sample %d of %s (%s: %s)", j, type(dataset).__name__,
                               type(exc).__name__, exc)  # fmt: skip
                if logged is not None:
                    logged.add(j)
            continue
        if isinstance(item, tuple) and len(item) == 2:
            image, label = item
            try:
                label = int(label)
            except (TypeError, ValueError):
                label = -1
            return image, label, attempt
        return item, -1, attempt
    raise DataError(
        f"{type(dataset).__name__}: {min(MAX_CONSECUTIVE_FAILURES, n)} consecutive samples failed to load from "
        f"index {index} (last error: {type(last).__name__}: {last})"
    )


# ---------------------------------------------------------------------------------------------- file datasets
class FileImageDataset:
    """Images from a `PathTable` of files (joined to `root` when given) with int labels; robust `load`.

    Subclasses fill ``self.paths`` (PathTable), ``self.labels`` (int32 array), ``self.root`` and ``self.name``.
    """

    paths: PathTable
    labels: np.ndarray
    root: str = ""
    name: str = "dataset"

    def _init_state(self) -> None:
        self.num_skipped = 0  # files replaced in this process (the loader reports per-batch counts)
        self._logged: set[str] = set()  # failing files already logged by this process

    def __len__(self) -> int:
        return len(self.paths)

    def path(self, index: int) -> str:
        rel = self.paths[index]
        return os.path.join(self.root, rel) if self.root else rel

    def label(self, index: int) -> int:
        return int(self.labels[index])

    def load(self, index: int) -> tuple[Image.Image, int, int]:
        """(image, label, n_skipped): unreadable files are replaced by the next index's (see the module docstring)."""
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"index: expected 0 <= index < {n}, got {index}")
        index %= n
        last: Exception | None = None
        for attempt in range(min(MAX_CONSECUTIVE_FAILURES, n)):
            j = (index + attempt) % n
            try:
                image = load_rgb(self.path(j))
            except Exception as exc:  # noqa: BLE001 - PIL raises many types for corrupt files
                last = exc
                path = self.path(j)
                if path not in self._logged:
                    self._logged.add(path)
                    logger.warning("skipping unreadable image %s (%s: %s); using the next one instead",
                                   path, type(exc).__name__, exc)  # fmt: skip
                continue
            self.num_skipped += attempt
            return image, self.label(j), attempt
        raise DataError(
            f"{self.name}: {min(MAX_CONSECUTIVE_FAILURES, n)} consecutive images failed to load starting at "
            f"{self.path(index)} (last error: {type(last).__name__}: {last})"
        )

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        image, label, _ = self.load(index)
        return image, label


def _is_image_name(name: str) -> bool:
    stem, dot, ext = name.rpartition(".")
    return bool(dot and stem) and not name.startswith(".") and ext.lower() in IMAGE_EXTENSIONS


def _scan_tree(top: str, rel_prefix: str, out: list[str]) -> None:
    """Append the image files under `top` (recursive, symlink loops avoided) as paths relative to the scan root."""
    stack = [(top, rel_prefix)]
    seen: set[tuple[int, int]] = set()
    while stack:
        directory, rel = stack.pop()
        try:
            st = os.stat(directory)
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            with os.scandir(directory) as it:
                entries = list(it)
        except OSError as exc:
            logger.warning("cannot list %s (%s); skipped", directory, exc)
            continue
        for entry in entries:
            name = entry.name
            try:
                is_dir = entry.is_dir()
            except OSError:
                continue
            if is_dir:
                if not name.startswith("."):
                    stack.append((entry.path, rel + name + "/"))
            elif _is_image_name(name):
                out.append(rel + name)


def _folder_signature(root: str) -> str:
    """Cheap change detector for the cache: names and mtimes of the root and its direct entries."""
    h = hashlib.sha1()
    h.update(f"{os.path.abspath(root)}|{os.stat(root).st_mtime_ns}".encode("utf-8", "surrogateescape"))
    with os.scandir(root) as it:
        for entry in sorted(it, key=lambda e: e.name):
            try:
                h.update(f"|{entry.name}:{entry.stat().st_mtime_ns}".encode("utf-8", "surrogateescape"))
            except OSError:
                continue
    return h.hexdigest()


def scan_image_folder(root: str) -> tuple[list[str], list[int], list[str]]:
    """(relative paths, labels, class names) of an image folder, sorted and deterministic.

    Class layout: every non-hidden direct sub-folder of `root` is a class (sorted names -> labels 0..C-1) holding
    images at any depth; images directly in `root` get label -1. A folder without sub-folders is flat (all -1).
    Hidden files / folders (name starting with '.') are ignored; extensions: IMAGE_EXTENSIONS, any case.
    """
    with os.scandir(root) as it:
        entries = sorted(it, key=lambda e: e.name)
    classes = [e.name for e in entries if not e.name.startswith(".") and e.is_dir()]
    paths = sorted(e.name for e in entries if not e.is_dir() and _is_image_name(e.name))
    labels = [-1] * len(paths)
    for label, cls in enumerate(classes):
        found: list[str] = []
        _scan_tree(os.path.join(root, cls), cls + "/", found)
        if not found:
            logger.warning("class folder %s holds no images", os.path.join(root, cls))
        found.sort()
        paths.extend(found)
        labels.extend([label] * len(found))
    return paths, labels, classes


class ImageFolderDataset(FileImageDataset):
    """Images under `root`: ``root/<class>/**/*.{jpg,jpeg,png,bmp,webp,tif,tiff}`` or a flat folder (label -1).

    Args:
        root: the folder (see `scan_image_folder` for the layout rules).
        cache_file: optional ``.npz`` path holding the scanned file list; reused when its root and signature (the
            mtimes of `root` and its direct entries) match, rewritten otherwise. A change deep inside a class folder
            that does not touch the class folder's own mtime is not detected: delete the cache file then.
        key: config key named in error messages.

    Scanning uses ``os.scandir`` only (no image is opened): a few seconds per million files on a local disk.
    """

    def __init__(self, root: str, cache_file: str | None = None, key: str = "root") -> None:
        root = os.path.expanduser(str(root))
        self.name = f"{key}={root}"
        if not os.path.isdir(root):
            raise DataError(f"{key}: expected an existing image folder, got {root!r} (not a directory)")
        self.root = root
        loaded = self._load_cache(cache_file) if cache_file else None
        if loaded is None:
            paths, labels, classes = scan_image_folder(root)
            self.paths = PathTable(paths)
            self.labels = np.asarray(labels, dtype=np.int32)
            self.classes = classes
            if cache_file and len(paths):
                self._save_cache(cache_file)
        if len(self.paths) == 0:
            exts = "/".join(sorted(IMAGE_EXTENSIONS))
            raise DataError(f"{key}: no images ({exts}) found under {root!r}")
        self._init_state()

    def __repr__(self) -> str:
        return f"ImageFolderDataset(root={self.root!r}, images={len(self)}, classes={len(self.classes)})"

    def _load_cache(self, cache_file: str) -> bool | None:
        if not os.path.isfile(cache_file):
            return None
        try:
            with np.load(cache_file, allow_pickle=False) as z:
                if int(z["version"]) != _CACHE_VERSION or str(z["root"]) != os.path.abspath(self.root):
                    return None
                if str(z["signature"]) != _folder_signature(self.root):
                    logger.info("file-list cache %s is stale; rescanning %s", cache_file, self.root)
                    return None
                self.paths = PathTable.from_arrays(z["blob"], z["offsets"])
                self.labels = z["labels"].astype(np.int32)
                self.classes = [str(c) for c in z["classes"]]
        except Exception as exc:  # noqa: BLE001 - a broken cache is rebuilt
            logger.warning("ignoring unreadable file-list cache %s (%s)", cache_file, exc)
            return None
        return True

    def _save_cache(self, cache_file: str) -> None:
        tmp = f"{cache_file}.tmp{os.getpid()}"
        try:
            os.makedirs(os.path.dirname(os.path.abspath(cache_file)), exist_ok=True)
            with open(tmp, "wb") as f:
                np.savez(
                    f, version=_CACHE_VERSION, root=os.path.abspath(self.root), signature=_folder_signature(self.root),
                    blob=self.paths.blob, offsets=self.paths.offsets, labels=self.labels,
                    classes=np.asarray(self.classes, dtype=str),
                )  # fmt: skip
            os.replace(tmp, cache_file)  # atomic: concurrent ranks may write the same file
        except OSError as exc:
            logger.warning("cannot write file-list cache %s (%s); continuing without it", cache_file, exc)
            if os.path.exists(tmp):
                os.remove(tmp)


_INT_RE = re.compile(r"-?\d+")


def _split_label(line: str, where: str) -> tuple[str, int]:
    """'path<TAB>label' / 'path label' (integer label) -> (path, label); otherwise (line, -1)."""
    if "\t" in line:
        path, _, label = line.rpartition("\t")
        label = label.strip()
        if not _INT_RE.fullmatch(label):
            raise DataError(f"{where}: expected 'PATH<TAB>LABEL' with an integer label, got {line!r}")
        return path.strip(), int(label)
    path, sep, label = line.rpartition(" ")
    if sep and path.strip() and _INT_RE.fullmatch(label):
        return path.strip(), int(label)
    return line, -1


def _exists_many(paths: Sequence[str]) -> list[bool]:
    """os.path.exists over many paths; threads hide the latency of network file systems."""
    def check(chunk: Sequence[str]) -> list[bool]:
        return [os.path.exists(p) for p in chunk]

    if len(paths) < 8192:
        return check(paths)
    chunks = [paths[i : i + 4096] for i in range(0, len(paths), 4096)]
    with ThreadPoolExecutor(max_workers=16) as pool:
        return [ok for part in pool.map(check, chunks) for ok in part]


class TxtListDataset(FileImageDataset):
    """Images listed in a text file, one per line.

    Line format: ``PATH``, ``PATH<TAB>LABEL`` or ``PATH LABEL`` (LABEL an integer; a line whose last space-separated
    token is not an integer is a path, so paths may contain spaces). Relative paths are relative to `root` (default:
    the txt file's folder); ``~`` is expanded; blank lines and lines starting with ``#`` are ignored. Missing label: -1.

    Args:
        path: the txt file.
        dataset_ratio: 1.0 = every line once; < 1 keeps a seeded random subset of ``round(ratio * n)`` lines (in file
            order); > 1 repeats: ``k + f`` -> every line k times plus a seeded subset of ``round(f * n)``
            (see `ratio_indices`). The subset is fixed for the run (a function of `seed`).
        seed: seed of the subset.
        check_files: "all" checks every kept entry with os.path.exists at construction; "sample" checks a seeded
            random sample of 20,000 entries; "none" checks nothing; "auto" (default) = "all" up to 200,000 entries,
            else "sample". Missing files raise a one-line `DataError` naming the first ones and the count; a missing
            file not caught by the sample is skipped at load time like a corrupt one.
        key: config key named in error messages.
        root: folder that relative entries are resolved against (default: the txt file's folder).
    """

    def __init__(
        self,
        path: str,
        dataset_ratio: float = 1.0,
        seed: int = 0,
        check_files: str = "auto",
        key: str = "path",
        root: str | None = None,
    ) -> None:
        path = os.path.expanduser(str(path))
        self.name, self.txt_path, self.root = f"{key}={path}", path, ""
        if check_files not in ("auto", "all", "sample", "none"):
            raise ValueError(f"check_files: expected auto, all, sample or none, got {check_files!r}")
        ratio = _check_ratio(dataset_ratio, f"{key} dataset_ratio")
        if not os.path.isfile(path):
            raise DataError(f"{key}: expected an existing txt list of image paths, got {path!r} (no such file)")
        base = os.path.abspath(os.path.expanduser(root)) if root else os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(base):
            raise DataError(f"{key}: root {base!r} for the relative entries of {path!r} is not a directory")
        paths, labels = [], []
        try:
            with open(path, encoding="utf-8", errors="surrogateescape") as f:
                for lineno, raw in enumerate(f, 1):
                    line = raw.strip()
                    if not line or line.startswith("#"):
                        continue
                    p, label = _split_label(line, f"{path}:{lineno}")
                    p = os.path.expanduser(p)
                    paths.append(p if os.path.isabs(p) else os.path.join(base, p))
                    labels.append(label)
        except OSError as exc:
            raise DataError(f"{key}: cannot read {path!r} ({exc})") from None
        if not paths:
            raise DataError(f"{key}: {path!r} lists no image paths (expected one path per line)")
        keep = ratio_indices(len(paths), ratio, seed)
        if keep is not None:
            if len(keep) == 0:
                raise DataError(f"{key}: dataset_ratio={ratio} keeps no entry of the {len(paths)} in {path!r}")
            paths = [paths[i] for i in keep]
            labels = [labels[i] for i in keep]
        self._check_exists(paths, check_files, key)
        self.paths = PathTable(paths)
        self.labels = np.asarray(labels, dtype=np.int32)
        self._init_state()

    def __repr__(self) -> str:
        return f"TxtListDataset(path={self.txt_path!r}, images={len(self)})"

    def _check_exists(self, paths: list[str], mode: str, key: str) -> None:
        if mode == "none":
            return
        unique = list(dict.fromkeys(paths))  # repeats (ratio > 1) checked once, order kept
        if mode == "sample" or (mode == "auto" and len(unique) > TXT_CHECK_ALL_LIMIT):
            if len(unique) > TXT_CHECK_SAMPLE:
                pick = np.sort(np.random.default_rng(0).choice(len(unique), TXT_CHECK_SAMPLE, replace=False))
                unique = [unique[i] for i in pick]
        exists = _exists_many(unique)
        missing = [p for p, ok in zip(unique, exists) if not ok]
        if missing:
            shown = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
            raise DataError(
                f"{key}: {len(missing)} of {len(unique)} checked image files listed in {self.txt_path!r} do not "
                f"exist: {shown}"
            )


# ---------------------------------------------------------------------------------------------- mixture
class MixtureDataset:
    """Several datasets mixed by ratio into one index space.

    Source s contributes ``round(ratio_s * len(s))`` entries: ratio 1 = each image once per pass over the mixture,
    0.5 = a seeded half of it (the same half for the whole run), 2 = each image twice, 1.3 = once plus a seeded
    30 %, 0 = source disabled (`ratio_indices`). The mixture's length is the sum of the contributions, so a
    shuffled pass over it (one sampler epoch) draws from the sources in proportion to ``ratio_s * len(s)``.
    Labels are the sources' own (they are not made unique across sources).

    Args:
        sources: name -> map-style dataset (a dinobridge dataset or any dataset returning (image, label)).
        ratios: name -> ratio (missing names: 1.0), or None for all 1.0.
        seed: seed of the subsets.
    """

    def __init__(self, sources: Mapping[str, Any], ratios: Mapping[str, float] | None = None, seed: int = 0) -> None:
        if not sources:
            raise DataError("data: expected at least one data source, got none")
        ratios = dict(ratios or {})
        unknown = sorted(set(ratios) - set(sources))
        if unknown:
            raise DataError(f"data: ratios given for unknown sources {unknown}; sources are {sorted(sources)}")
        self.names = list(sources)
        self.sources = [sources[name] for name in self.names]
        self.ratios = [_check_ratio(ratios.get(name, 1.0), f"data.{name}.dataset_ratio") for name in self.names]
        self._index_maps: list[np.ndarray | None] = []
        sizes = []
        for i, (name, src, ratio) in enumerate(zip(self.names, self.sources, self.ratios)):
            n = len(src)
            if n == 0:
                raise DataError(f"data.{name}: the source is empty")
            index_map = ratio_indices(n, ratio, seed + 7919 * i)
            self._index_maps.append(index_map)
            sizes.append(n if index_map is None else len(index_map))
        self.counts = dict(zip(self.names, sizes))
        self._ends = np.cumsum(sizes, dtype=np.int64)
        if self._ends[-1] == 0:
            raise DataError(f"data: the dataset ratios {dict(zip(self.names, self.ratios))} select no image")
        self._logged: list[set] = [set() for _ in self.sources]  # failing indices already logged, per source

    def __len__(self) -> int:
        return int(self._ends[-1])

    def __repr__(self) -> str:
        return f"MixtureDataset({self.counts})"

    def locate(self, index: int) -> tuple[int, int]:
        """(source number, index inside that source) of mixture entry `index`."""
        if not 0 <= index < len(self):
            raise IndexError(f"index: expected 0 <= index < {len(self)}, got {index}")
        s = int(np.searchsorted(self._ends, index, side="right"))
        local = index - (int(self._ends[s - 1]) if s else 0)
        index_map = self._index_maps[s]
        return s, local if index_map is None else int(index_map[local])

    def load(self, index: int) -> tuple[Any, int, int]:
        """(image, label, n_skipped); failures are replaced inside the source (see `load_sample`)."""
        s, local = self.locate(index)
        return load_sample(self.sources[s], local, self._logged[s])

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image, label, _ = self.load(index)
        return image, label


# ---------------------------------------------------------------------------------------------- spec parsing
_SPEC_HELP = (
    "expected builtin:shapes[:n=N], ImageFolder:root=DIR, TxtList:path=FILE[:ratio=R], "
    "ImageNet:split=TRAIN:root=DIR, or an existing folder / .txt file"
)


def _typed(kwargs: dict[str, str], name: str, cast: type, default: Any, key: str) -> Any:
    if name not in kwargs:
        return default
    try:
        return cast(kwargs[name])
    except ValueError:
        raise DataError(f"{key}: {name}={kwargs[name]!r} is not a valid {cast.__name__}") from None


def _expect_keys(kwargs: dict[str, str], allowed: Sequence[str], required: Sequence[str], key: str, spec: str) -> None:
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise DataError(f"{key}: unknown option(s) {unknown} in {spec!r} (allowed: {', '.join(allowed)})")
    missing = [k for k in required if not kwargs.get(k)]
    if missing:
        raise DataError(f"{key}: {spec!r} needs {', '.join(k + '=...' for k in missing)}")


def _folder_cache_file(cache_dir: str | None, root: str) -> str | None:
    if not cache_dir:
        return None
    digest = hashlib.sha1(os.path.abspath(root).encode("utf-8", "surrogateescape")).hexdigest()[:16]
    return os.path.join(cache_dir, f"filelist_{digest}.npz")


def build_dataset(spec: str, key: str = "train.dataset_path", cache_dir: str | None = None, seed: int = 0) -> Any:
    """Dataset from a dataset string (grammar: `dinobridge.config.dataset_spec`); a one-line error naming `key`.

    `cache_dir`: where folder scans are cached (None: no cache); `seed`: default seed of ratio subsets.
    """
    from dinobridge.config.dataset_spec import parse_dataset_string
    from dinobridge.errors import ConfigError

    try:
        parsed = parse_dataset_string(spec, key)
    except ConfigError as e:
        raise DataError(str(e)) from None
    opts = dict(parsed.options)
    if parsed.kind == "builtin":
        if parsed.name not in ("shapes", "proceduralshapes"):
            raise DataError(f"{key}: unknown built-in dataset {parsed.name!r} in {spec!r}; expected builtin:shapes")
        _expect_keys(opts, ("n", "num_classes", "size", "seed", "split"), (), key, spec)
        try:
            return ProceduralShapes(
                n=_typed(opts, "n", int, 20000, key), num_classes=_typed(opts, "num_classes", int, 10, key),
                size=_typed(opts, "size", int, 64, key), seed=_typed(opts, "seed", int, 0, key),
                split=opts.get("split", "train").lower(),
            )  # fmt: skip
        except ValueError as exc:
            raise DataError(f"{key}: {spec!r}: {exc}") from None
    if parsed.kind == "ImageFolder":
        root = os.path.expanduser(opts["root"])
        return ImageFolderDataset(root, opts.get("cache") or _folder_cache_file(cache_dir, root), key=f"{key} root")
    if parsed.kind == "TxtList":
        return TxtListDataset(
            os.path.expanduser(opts["path"]), dataset_ratio=_typed(opts, "ratio", float, 1.0, key),
            seed=_typed(opts, "seed", int, seed, key), key=f"{key} path", root=opts.get("root") or None,
        )  # fmt: skip
    raise DataError(f"{key}: unknown dataset {spec!r}; {_SPEC_HELP}")


def _get(node: Any, name: str, default: Any = None) -> Any:
    if node is None:
        return default
    if isinstance(node, Mapping):
        return node.get(name, default)
    return getattr(node, name, default)


_SOURCE_KEYS = ("txt_path", "root", "dataset_path")


def build_train_dataset(cfg: Any) -> Any:
    """The training dataset of a config (DictConfig, dataclass or nested dicts); call it before building models.

    ``data:`` (a mapping name -> {txt_path | root | dataset_path, dataset_ratio}) wins when non-empty: one source of
    ratio 1 is returned as is, otherwise a `MixtureDataset` seeded with ``train.seed``. Else ``train.dataset_path``
    (a spec for `build_dataset`). Raises `DataError` (one line naming the key) for missing / empty / unknown data.
    """
    train = _get(cfg, "train")
    seed = int(_get(train, "seed", 0) or 0)
    cache_dir = None
    output_dir = _get(train, "output_dir")
    if _get(train, "cache_dataset", False) and output_dir:
        cache_dir = os.path.join(str(output_dir), "cache")
    data = _get(cfg, "data")
    if data:
        if not isinstance(data, Mapping):
            raise DataError(f"data: expected a mapping name -> {{txt_path | root, dataset_ratio}}, got {data!r}")
        sources, ratios = {}, {}
        for name, entry in data.items():
            key = f"data.{name}"
            if not isinstance(entry, Mapping):
                raise DataError(f"{key}: expected a mapping with one of {', '.join(_SOURCE_KEYS)}, got {entry!r}")
            unknown = sorted(set(entry) - {*_SOURCE_KEYS, "dataset_ratio"})
            if unknown:
                raise DataError(f"{key}: unknown key(s) {unknown}; expected {', '.join(_SOURCE_KEYS)}, dataset_ratio")
            given = [k for k in _SOURCE_KEYS if entry.get(k)]
            if len(given) != 1:
                raise DataError(f"{key}: expected exactly one of {', '.join(_SOURCE_KEYS)}, got {given or 'none'}")
            ratios[name] = _check_ratio(entry.get("dataset_ratio", 1.0), f"{key}.dataset_ratio")
            value = str(entry[given[0]])
            if given[0] == "txt_path":
                sources[name] = TxtListDataset(value, seed=seed, key=f"{key}.txt_path")
            elif given[0] == "root":
                root = os.path.expanduser(value)
                sources[name] = ImageFolderDataset(root, _folder_cache_file(cache_dir, root), key=f"{key}.root")
            else:
                sources[name] = build_dataset(value, key=f"{key}.dataset_path", cache_dir=cache_dir, seed=seed)
        if len(sources) == 1 and next(iter(ratios.values())) == 1.0:
            return next(iter(sources.values()))
        return MixtureDataset(sources, ratios, seed=seed)
    spec = _get(train, "dataset_path")
    if not spec:
        raise DataError(
            "train.dataset_path: expected a dataset spec (e.g. builtin:shapes, ImageFolder:root=DIR, "
            f"TxtList:path=FILE) or a non-empty data: mapping, got {spec!r}"
        )
    return build_dataset(str(spec), key="train.dataset_path", cache_dir=cache_dir, seed=seed)
