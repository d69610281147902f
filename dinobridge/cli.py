"""The `dinobridge` command: `dinobridge <command> [args]`.

Each command lives in the module named after it and exposes `main(argv: list[str]) -> int`.
"""

from __future__ import annotations

import importlib
import sys
from typing import Optional

COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("dinobridge.train.loop", "self-supervised pretraining (Hydra overrides, --config-file, -m sweeps)"),
    "extract": ("dinobridge.features", "extract features (CLS, storage, patch tokens/maps) from a folder of images"),
    "eval": ("dinobridge.eval.cli", "evaluate frozen features: dinobridge eval knn | linear ..."),
    "viz": ("dinobridge.viz", "PCA and attention pictures of patch features"),
    "export": ("dinobridge.export", "export the teacher backbone: --format official | hf (transformers) | timm"),
}


def _usage() -> str:
    lines = ["usage: dinobridge <command> [args]", "", "commands:"]
    lines += [f"  {name:<10} {doc}" for name, (_, doc) in COMMANDS.items()]
    lines += ["", "`dinobridge <command> --help` shows the options of a command."]
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"dinobridge: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
