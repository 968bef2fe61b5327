"""Starting ranks under the real launchers (horovodrun, mpirun) from a test, and the worker scripts they run."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent  # the venv's bin: horovodrun, hpcnoise
HELPERS = Path(__file__).resolve().parent  # the worker scripts: HELPERS / "dist_worker.py", ...


def launcher_cmd(launcher: str, np: int) -> list[str]:
    """The command prefix that starts ``np`` local ranks (launcher 'none': no prefix, one plain process)."""
    if launcher == "horovodrun":
        return [str(BIN / "horovodrun"), "-np", str(np), "-H", f"localhost:{np}"]
    if launcher == "mpirun":
        return ["mpirun", "-np", str(np), "--bind-to", "none"]
    if launcher == "none":
        return []
    raise ValueError(launcher)


def needs_launcher(launcher: str) -> None:
    if launcher == "horovodrun" and not (BIN / "horovodrun").exists():
        pytest.fail("horovodrun not installed: run jobs/install.sh")
    if launcher == "mpirun" and shutil.which("mpirun") is None:
        pytest.fail("mpirun not installed: run jobs/install.sh")


def run_launched(launcher: str, np: int, args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``python ARGS`` under a launcher with np ranks (launcher 'none': one plain process)."""
    needs_launcher(launcher)
    cmd = launcher_cmd(launcher, np) + [sys.executable, *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=os.environ.copy())
