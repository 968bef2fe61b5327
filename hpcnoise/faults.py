"""Fault injection for the reliability tests: kill this process at a named point of a run.

``HPCNOISE_FAULT=POINT:N[:RANK]`` makes the process of rank RANK (default 0) kill itself with SIGKILL
the N-th time (1-based) it reaches POINT. Points:
- ``step``: inside a step, after its collective and before its update;
- ``evaluate``: at the start of an evaluation;
- ``epoch-end``: after an epoch's files are written;
- ``checkpoint-staged``: the new checkpoint is complete under its temporary name;
- ``checkpoint-swapped``: the old one has become checkpoint.prev.pt, the new one is not yet in place.
Unset, ``reached`` costs one environment lookup. A malformed value is bad input like any other: one
line, exit 2, nothing written (``check``, called by hpcnoise.lifecycle.open_run before anything is).
"""

from __future__ import annotations

import os
import re
import signal

from hpcnoise.comm import launcher_rank
from hpcnoise.errors import ConfigError

POINTS = ("step", "evaluate", "epoch-end", "checkpoint-staged", "checkpoint-swapped")
_counts: dict[str, int] = {}


def _plan() -> tuple[str, int, int] | None:
    """HPCNOISE_FAULT as (point, N, rank), None when unset; ConfigError, one line, when malformed."""
    spec = os.environ.get("HPCNOISE_FAULT")
    if not spec:
        return None
    valid = f"POINT:N[:RANK] with N >= 1 and RANK >= 0 (default 0), POINT one of {', '.join(POINTS)}"
    parsed = re.fullmatch(r"([^:]*):([0-9]+)(?::([0-9]+))?", spec)
    if parsed is None or int(parsed[2]) < 1:
        raise ConfigError(f"HPCNOISE_FAULT={spec!r} is malformed; valid: {valid}")
    if parsed[1] not in POINTS:
        raise ConfigError(f"HPCNOISE_FAULT point {parsed[1]!r} unknown; valid: {valid}")
    return parsed[1], int(parsed[2]), int(parsed[3] or 0)


def check() -> None:
    """ConfigError (one line) if HPCNOISE_FAULT is set but malformed; called before a run writes anything."""
    _plan()


def reached(point: str) -> None:
    """Called at each fault point; dies here when HPCNOISE_FAULT says so."""
    plan = _plan()
    if plan is None or plan[0] != point:
        return
    _counts[point] = _counts.get(point, 0) + 1
    if _counts[point] == plan[1] and launcher_rank() == plan[2]:
        os.kill(os.getpid(), signal.SIGKILL)
