"""Shared test set-up: a private data cache, small configs, and launching under real MPI launchers."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hpcnoise.config import Config

BIN = Path(sys.executable).parent


def pytest_configure(config: pytest.Config) -> None:
    # Generated datasets go to a per-session cache that subprocesses (launched ranks) share.
    cache = Path(os.environ.get("HPCNOISE_TEST_DATA", "/tmp/hpcnoise-test-data"))
    os.environ["HPCNOISE_DATA"] = str(cache)
    # Open MPI refuses to run as root without these; tests only, never in shipped job scripts.
    os.environ.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
    os.environ.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    os.environ.setdefault("OMPI_MCA_rmaps_base_oversubscribe", "1")


def small_config(**changes: object) -> Config:
    """A seconds-long MNIST-1D config: 2048 train / 512 test samples, global batch 256."""
    base = dict(
        train_samples=2048,
        test_samples=512,
        batch_size=256,
        small_batch=64,
        epochs=2,
        lr=0.2,
        progress=False,
        threads=1,
    )
    base.update(changes)
    return Config(**base)  # type: ignore[arg-type]


def overrides(cfg: Config) -> list[str]:
    """--key=value arguments that rebuild ``cfg`` from the defaults."""
    out = []
    for key, value in cfg.to_dict().items():
        if value != getattr(Config(), key):
            text = ",".join(map(str, value)) if isinstance(value, tuple) else str(value)
            out.append(f"--{key}={text}")
    return out


def launcher_cmd(launcher: str, np: int) -> list[str]:
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
