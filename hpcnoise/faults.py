"""Fault injection for the reliability tests: kill this process at a named point of a run.

``HPCNOISE_FAULT=POINT:N[:RANK]`` makes the process of rank RANK (default 0) kill itself with SIGKILL
the N-th time (1-based) it reaches POINT. Points:
- ``step``: inside a step, after its collective and before its update;
- ``evaluate``: at the start of an evaluation;
- ``epoch-end``: after an epoch's files are written;
- ``checkpoint-staged``: the new checkpoint is complete under its temporary name;
- ``checkpoint-swapped``: the old one has become checkpoint.prev.pt, the new one is not yet in place.
Unset, ``reached`` costs one environment lookup.
"""

from __future__ import annotations

import os
import signal

from hpcnoise.comm import launcher_rank

POINTS = ("step", "evaluate", "epoch-end", "checkpoint-staged", "checkpoint-swapped")
_counts: dict[str, int] = {}


def _plan() -> tuple[str, int, int] | None:
    spec = os.environ.get("HPCNOISE_FAULT")
    if not spec:
        return None
    point, count, *rank = spec.split(":")
    if point not in POINTS:
        raise ValueError(f"HPCNOISE_FAULT point {point!r} unknown; valid: {', '.join(POINTS)}")
    return point, int(count), int(rank[0]) if rank else 0


def reached(point: str) -> None:
    """Called at each fault point; dies here when HPCNOISE_FAULT says so."""
    plan = _plan()
    if plan is None or plan[0] != point:
        return
    _counts[point] = _counts.get(point, 0) + 1
    if _counts[point] == plan[1] and launcher_rank() == plan[2]:
        os.kill(os.getpid(), signal.SIGKILL)
