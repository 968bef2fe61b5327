"""Behaviour unchanged by refactors: every regime's fixed-seed float64 run against the fingerprint committed
in tests/data/fingerprint.json (``python -m tests.helpers.fingerprint OUT.json`` wrote it, at the commit
before the restructuring of the regime, quantity and command registries). One entry was written again on
purpose since: ``diagf-gbn-cnn``, when exact convolution sums moved to the tap method
(hpcnoise.curvature.taps), which sums the same products in another order; its metrics moved by about
1e-15 relative, its parameter bits changed.

Metrics and diagnostics are compared to 1e-9 relative: a changed step, schedule or noise moves them by far
more. The parameter hash is compared only on the CPU model that wrote the file, because float64 BLAS
kernels (and so the last bits) differ between CPU models; there it must be identical.
"""

from __future__ import annotations

import json
import math
import platform
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.fingerprint import CASES, fingerprint

pytestmark = pytest.mark.slow  # twelve training runs: about two minutes on 2 cores

REFERENCE = Path(__file__).parent / "data" / "fingerprint.json"
REFERENCE_CPU = "AMD EPYC"  # the CPU model (lscpu) that wrote the reference


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _close(a: Any, b: Any, where: str) -> None:
    if isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{where}: keys {sorted(a)} != {sorted(b)}"
        for key in a:
            _close(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), f"{where}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b)):
            _close(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and isinstance(b, (int, float)):
        assert math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12) or (math.isnan(a) and math.isnan(b)), (
            f"{where}: {a!r} != {b!r}"
        )
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


@pytest.mark.parametrize("name", sorted(CASES))
def test_regime_matches_committed_fingerprint(name: str, tmp_path: Path) -> None:
    expected = json.loads(REFERENCE.read_text())[name]
    got = fingerprint(name, CASES[name], tmp_path)
    _close(got["metrics"], expected["metrics"], f"{name}.metrics")
    _close(got["diagnostics"], expected["diagnostics"], f"{name}.diagnostics")
    assert got["steps"] == expected["steps"]
    if _cpu_model().startswith(REFERENCE_CPU):
        assert got["params_sha256"] == expected["params_sha256"], f"{name}: final parameters differ in their bits"
