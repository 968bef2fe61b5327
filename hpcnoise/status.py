"""What ``hpcnoise sweep status`` reports: a sweep's cells grouped by table, and the states of their run
directories counted (the command: hpcnoise.cli.sweep)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from hpcnoise.runstate import LOCK_NAME, STATES
from hpcnoise.sweepfile import SweepError, read_cells


@dataclass
class _Group:
    """What ``status`` reports on together: one table of a sweep file, or the other run directories."""

    title: str
    noun: str  # "cell" | "run"
    entries: list[tuple[str, Path, str]]  # (index or relative path, run directory, run name or "")


def status_groups(target: Path) -> list[_Group]:
    if not target.exists():
        raise SweepError(f"{str(target)!r} does not exist (give a sweep file or a directory of runs)")
    files = [target] if not target.is_dir() else sorted(target.glob("*.sweep.jsonl"))
    groups: list[_Group] = []
    named: set[Path] = set()
    for path in files:
        by_table: dict[str, list[tuple[str, Path, str]]] = {}
        for cell in read_cells(path):
            entry = (str(cell["index"]), cell["run_dir"], cell["run_dir"].name)
            by_table.setdefault(str(cell.get("table") or "?"), []).append(entry)
            named.add(cell["run_dir"].resolve())
        groups += [_Group(f"table {table} ({path})", "cell", entries) for table, entries in by_table.items()]
    if target.is_dir():
        others = [d for d in find_run_dirs(target) if d.resolve() not in named]
        if others:
            title = f"{'other ' if files else ''}run directories under {target}"
            if not files:
                title += " (no *.sweep.jsonl there: cells never started are not known)"
            groups.append(_Group(title, "run", [(d.relative_to(target).as_posix(), d, "") for d in others]))
        if not groups:
            raise SweepError(f"{str(target)!r} holds no sweep files (*.sweep.jsonl) and no run directories")
    return groups


def find_run_dirs(root: Path) -> list[Path]:
    """The run directories under ``root``, itself included (holding config.json, diverged.json, a checkpoint
    or .lock), sorted; run directories are not descended, nor directories whose name starts with '.'."""
    marks = {"config.json", "diverged.json", "checkpoint.pt", "checkpoint.prev.pt", LOCK_NAME}
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        if marks.intersection(filenames):
            found.append(Path(dirpath))
            dirnames.clear()
            continue
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
    return sorted(found)


def counts_text(states: list[str]) -> str:
    """How many of ``states`` are in each state, e.g. "3 finished, 1 running, 0 preempted, ..."."""
    return ", ".join(f"{states.count(s)} {s}" for s in STATES)
