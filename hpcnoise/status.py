"""``hpcnoise sweep status``: a sweep's cells by the state of their run directories (see hpcnoise.sweep)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from hpcnoise.runstate import LOCK_NAME, STATES, run_state, state_detail
from hpcnoise.sweepfile import SweepError, read_cells, sweep_parser


@dataclass
class _Group:
    """What ``status`` reports on together: one table of a sweep file, or the other run directories."""

    title: str
    noun: str  # "cell" | "run"
    entries: list[tuple[str, Path, str]]  # (index or relative path, run directory, run name or "")


def _status_groups(target: Path) -> list[_Group]:
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


def _counts_text(states: list[str]) -> str:
    """How many of ``states`` are in each state, e.g. "3 finished, 1 running, 0 preempted, ..."."""
    return ", ".join(f"{states.count(s)} {s}" for s in STATES)


def cmd_status(argv: list[str]) -> int:
    p = sweep_parser(
        prog="hpcnoise sweep status",
        description="Count a sweep's cells by state: finished, running, preempted, diverged, failed, not started.",
    )
    p.add_argument("target", type=Path, help="a sweep file, or a directory of runs holding *.sweep.jsonl files")
    p.add_argument("--list", action="store_true", help="also one line per cell: index, state, run name, detail")
    args = p.parse_args(argv)
    groups = _status_groups(args.target)  # all input checked before anything is printed
    everything: list[str] = []
    for group in groups:
        states = [run_state(run_dir) for _, run_dir, _ in group.entries]
        everything += states
        n = len(states)
        print(f"{group.title}: {n} {group.noun}{'s' if n != 1 else ''}: {_counts_text(states)}")
        if args.list:
            id_width = max(len(i) for i, _, _ in group.entries)
            name_width = max(len(name) for _, _, name in group.entries)
            for (i, run_dir, name), state in zip(group.entries, states):
                line = f"  {i:>{id_width}}  {state:<11}" + (f"  {name:<{name_width}}" if name_width else "")
                print((line + "  " + state_detail(run_dir, state)).rstrip())
    if len(groups) > 1:
        print(f"total: {len(everything)}: {_counts_text(everything)}")
    return 0
