"""The type check holds: mypy, with the setup.cfg configuration (strict everywhere, the modules listed there
relaxed only where their errors need it, each with its reason), passes on hpcnoise and analysis."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


# Slow tier: a cold mypy run (no .mypy_cache) over both packages and torch's stubs takes 15 s to a minute.
@pytest.mark.slow
def test_mypy_strict_passes() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "hpcnoise", "analysis"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, f"mypy exit status {result.returncode}:\n{result.stdout}{result.stderr}"
