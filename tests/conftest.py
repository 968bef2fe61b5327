"""Pytest set-up: a private data cache, Open MPI settings for launched ranks, and the timeout of quick tests.

The helpers that tests import (small_config, run_launched, the worker scripts, ...) live in tests/helpers/.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# A quick test (one not marked slow) that runs longer than this has hung; slow tests keep setup.cfg's --timeout.
QUICK_TIMEOUT_S = 300


def pytest_configure(config: pytest.Config) -> None:
    # Generated datasets go to a per-session cache that subprocesses (launched ranks) share.
    cache = Path(os.environ.get("HPCNOISE_TEST_DATA", "/tmp/hpcnoise-test-data"))
    os.environ["HPCNOISE_DATA"] = str(cache)
    # Open MPI refuses to run as root without these; tests only, never in shipped job scripts.
    os.environ.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
    os.environ.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    os.environ.setdefault("OMPI_MCA_rmaps_base_oversubscribe", "1")
    # Launched ranks run worker scripts that import the test helpers (tests.helpers.regimes registers the
    # tests' own regime): the repository's root goes on their import path.
    root = str(Path(__file__).resolve().parent.parent)
    paths = os.environ.get("PYTHONPATH", "").split(os.pathsep)
    if root not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([root, *filter(None, paths)])


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("slow") is None and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(QUICK_TIMEOUT_S))
