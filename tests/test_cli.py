"""`python -m dinobridge <command>` runs the same command table as the `dinobridge` console script."""

from __future__ import annotations

import subprocess
import sys


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dinobridge", *args], capture_output=True, text=True, timeout=120)


def test_module_entry_point_lists_the_commands_and_dispatches():
    usage = _run("--help")
    assert usage.returncode == 0
    for command in ("train", "extract", "eval", "viz", "export"):
        assert f"  {command} " in usage.stdout
    unknown = _run("evaluate")
    assert unknown.returncode == 2 and "unknown command 'evaluate'" in unknown.stderr
    linear = _run("eval", "linear", "--help")
    assert linear.returncode == 0 and "--weights" in linear.stdout
