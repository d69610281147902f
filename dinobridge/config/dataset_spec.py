"""Dataset strings (`train.dataset_path`, `evaluation.knn_train`, `evaluation.knn_val`): parse and normalise.

Forms (colon-separated, options are `key=value`):
  builtin:NAME[:key=value...]        a built-in offline dataset, e.g. "builtin:shapes:n=5000" (options go to its
                                     builder: n, num_classes, size, seed, split); "Shapes:..." is an alias
  ImageFolder:root=DIR[:cache=FILE]  every image under DIR, searched recursively (cache: file-list cache)
  TxtList:path=FILE[:root=DIR][:ratio=R][:seed=S]
                                     one image path per line; relative entries are resolved against DIR
                                     (default: FILE's folder); ratio subsamples (< 1) or repeats (> 1)
  DIR or FILE.txt                    an existing folder or .txt list (same as the two forms above)
  ImageNet:split=SPLIT:root=DIR[:extra=...]
                                     the official DINOv3 form, mapped to ImageFolder:root=DIR/<split> with SPLIT in
                                     TRAIN | VAL | TEST (-> train | val | test); `extra` is ignored.
On the command line quote a value that contains '=' only if you sweep over it; `key=ImageFolder:root=DIR` works as is.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Mapping

from dinobridge.errors import ConfigError

_OPTIONS = {"ImageFolder": ({"root"}, {"root", "cache"}), "TxtList": ({"path"}, {"path", "root", "ratio", "seed"})}
_ALIASES = {"imagefolder": "ImageFolder", "txtlist": "TxtList", "txt": "TxtList", "imagenet": "ImageNet",
            "builtin": "builtin"}
_SPEC_SPLIT = re.compile(r":(?=[A-Za-z_][A-Za-z0-9_]*=)")  # split at ':' only before 'key=' (paths may hold ':')
_IMAGENET_SPLITS = {"TRAIN": "train", "VAL": "val", "TEST": "test"}


@dataclass(frozen=True)
class DatasetSpec:
    """A parsed dataset string. kind: "builtin" | "ImageFolder" | "TxtList" (ImageNet strings are mapped to
    ImageFolder). name: the built-in dataset's name (builtin only). options: the `key=value` options (root, path, ...).
    text: the original string."""

    kind: str
    text: str
    name: str | None = None
    options: Mapping[str, str] = field(default_factory=dict)

    @property
    def root(self) -> str | None:
        return self.options.get("root")

    @property
    def path(self) -> str | None:
        return self.options.get("path")


def _split_options(parts: list[str], text: str, key: str) -> dict[str, str]:
    options: dict[str, str] = {}
    for part in parts:
        name, sep, value = part.partition("=")
        if not sep or not name or not value:
            raise ConfigError(f"{key}: expected 'key=value' options after the dataset kind, got {part!r} in {text!r}")
        if name in options:
            raise ConfigError(f"{key}: option {name!r} given twice in {text!r}")
        options[name] = value
    return options


def parse_dataset_string(text: str, key: str = "train.dataset_path", require_root: bool = True) -> DatasetSpec:
    """Parse a dataset string (forms in the module docstring) into a DatasetSpec; raise ConfigError naming `key`.

    With `require_root=False` an official "ImageNet:split=..." string without `root=` is accepted (kind "ImageNet",
    not resolvable): config validation uses this so that official recipes load; building the data requires the root.
    """
    if not isinstance(text, str) or not text.strip():
        example = "'builtin:shapes' or 'ImageFolder:root=DIR'"
        raise ConfigError(f"{key}: expected a dataset string such as {example}, got {text!r}")
    text = text.strip()
    kind, _, rest = text.partition(":")
    parts = _SPEC_SPLIT.split(rest) if rest else []
    if kind.lower() in ("shapes", "proceduralshapes"):  # alias of builtin:shapes
        kind, parts = "builtin", ["shapes", *parts]
    kind = _ALIASES.get(kind.lower(), kind)
    if kind not in _OPTIONS and kind not in ("builtin", "ImageNet"):
        path = os.path.expanduser(text)
        if os.path.isdir(path) or (":" not in text and not path.lower().endswith(".txt") and ("/" in text or "\\" in text)):
            return DatasetSpec("ImageFolder", text, options={"root": path})
        if path.lower().endswith(".txt"):
            return DatasetSpec("TxtList", text, options={"path": path})
    if kind == "builtin":
        if not parts or not parts[0] or "=" in parts[0]:
            raise ConfigError(f"{key}: expected 'builtin:NAME[:key=value...]' (e.g. 'builtin:shapes'), got {text!r}")
        return DatasetSpec("builtin", text, name=parts[0], options=_split_options(parts[1:], text, key))
    if kind in _OPTIONS:
        required, allowed = _OPTIONS[kind]
        options = _split_options(parts, text, key)
        unknown, missing = set(options) - allowed, required - set(options)
        if unknown or missing:
            problem = f"unknown option(s) {sorted(unknown)}" if unknown else f"missing option(s) {sorted(missing)}"
            usage = "ImageFolder:root=DIR" if kind == "ImageFolder" else "TxtList:path=FILE[:root=DIR][:ratio=R]"
            raise ConfigError(f"{key}: {problem} in {text!r}; expected '{usage}'")
        return DatasetSpec(kind, text, options=options)
    if kind == "ImageNet":
        options = _split_options(parts, text, key)
        unknown = set(options) - {"split", "root", "extra"}
        split = options.get("split", "")
        if unknown or split not in _IMAGENET_SPLITS:
            raise ConfigError(
                f"{key}: expected 'ImageNet:split=TRAIN|VAL|TEST:root=DIR', got {text!r}"
                + (f" (unknown option(s) {sorted(unknown)})" if unknown else "")
            )
        if "root" not in options:
            if require_root:
                raise ConfigError(f"{key}: {text!r} needs ':root=DIR' (the ImageNet folder holding train/ and val/)")
            return DatasetSpec("ImageNet", text, options=options)
        root = os.path.join(options["root"], _IMAGENET_SPLITS[split])
        return DatasetSpec("ImageFolder", text, options={"root": root})
    raise ConfigError(
        f"{key}: unknown dataset kind {kind!r} in {text!r}; expected builtin:NAME, ImageFolder:root=DIR, "
        "TxtList:path=FILE or ImageNet:split=TRAIN:root=DIR"
    )
