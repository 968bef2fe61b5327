"""Sweeps: the cells of a table written to a file, one cell run per Slurm array task.

    hpcnoise sweep write TABLE --out FILE [--smoke] [--out_dir RUNS]
    hpcnoise sweep run FILE [--index I] [--key=value ...]
    hpcnoise sweep submit TABLE [--smoke] [--out_dir RUNS] [--file FILE] [--max-parallel N]
                          [--sbatch=OPTION ...] [--script PATH] [--dry-run] [--key=value ...]
    hpcnoise sweep status FILE_OR_RUNS_DIR [--list]

A sweep file holds one JSON line per cell of a table in ``hpcnoise.config.TABLES``:
``{"index": I, "table": NAME, "preset": ..., "run_name": ..., "config": {the complete Config}}``.
Every cell has a fixed run directory, ``config.out_dir/config.run_name`` (out_dir made absolute when the
file is written): the name is the preset, the seed and a digest of the cell's config, so that a
requeued array task finds its own run (and resumes it, or returns at once when it is finished) and a
changed cell never reuses an old run. ``run`` trains cell I (default: $SLURM_ARRAY_TASK_ID) under
whatever launcher started it; ``--key=value`` overrides apply to it on top of the file. ``submit``
writes the file (default RUNS/TABLE[-smoke].sweep.jsonl) and submits jobs/sweep.sbatch as a job array
with one task per cell, printing the sbatch command (``--dry-run``: only printing it).

A cell whose run directory is diverged (diverged.json, the loss became non-finite) is a result, not a
failure to retry: ``run`` prints one line saying so and exits 0, so that a resubmitted array does not
train it again. A run that diverges during ``run`` exits ``EXIT_DIVERGED`` (65); another job holding the
run directory, ``EXIT_LOCKED`` (73); a failed write, ``EXIT_IO`` (74); preemption, ``EXIT_PREEMPTED`` (75).

``status`` reads, never writes, and prints one line per table of a sweep file: how many of its cells are in
each state of their run directory (``run_state``, first match wins):
    finished      summary.json
    diverged      diverged.json: the loss became non-finite; not retried
    running       a job holds the flock on RUN_DIR/.lock (``lock_held``; the file alone means nothing)
    preempted     checkpoint.pt or checkpoint.prev.pt: stopped after a checkpoint; rerunning resumes it
    failed        config.json and none of the above: stopped before its first checkpoint
    not started   no run directory (or one without config.json)
``--list`` adds a line per cell: index, state, run name, and the final test error, where it diverged or the
epochs logged. Given a directory, it reports every sweep file ``DIR/*.sweep.jsonl`` in it (where ``submit``
writes them), then, as "other run directories", the run directories under DIR that no cell of those files
names (e.g. runs of cells since changed); a "total" line follows when there are several groups. A cell's
run directory is its config's out_dir/run_name, as ``run`` uses it (without ``run``'s overrides). The exit
status is 0 whatever the states are.

Bad input gets one line on stderr (from rank 0 only), exit status 2, and nothing written.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shlex
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from hpcnoise.config import Config, apply_overrides, check_values, config_from_dict
from hpcnoise.errors import (
    EXIT_DIVERGED,
    EXIT_IO,
    EXIT_LOCKED,
    EXIT_PREEMPTED,
    EXIT_USAGE,
    ConfigError,
    Diverged,
    Parser,
    Preempted,
    RunLocked,
    WriteFailed,
)
from hpcnoise.files import write_text_atomic
from hpcnoise.presets import TABLES

# Fields that say where and how a cell runs, not what it computes: left out of the run-name digest, so
# that e.g. another device or thread count finds the same run.
PLACEMENT_FIELDS = frozenset({"out_dir", "run_name", "device", "threads", "progress", "data_root", "preset"})
SWEEP_SCRIPT = Path(__file__).resolve().parent.parent / "jobs" / "sweep.sbatch"


class SweepError(ConfigError):
    """Bad input: the message is the one line the user sees."""


def _parser(prog: str, description: str) -> Parser:
    """argparse that raises SweepError (prefixed with the program) instead of printing usage and exiting."""
    return Parser(prog=prog, description=description, error_type=SweepError, prefix_prog=True)


def run_name(cfg: Config) -> str:
    """Deterministic name of a cell's run: preset (or regime), seed and 8 hex digits of the config."""
    identity = {k: v for k, v in cfg.to_dict().items() if k not in PLACEMENT_FIELDS}
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:8]
    return f"{cfg.preset or cfg.dataset + '-' + cfg.regime}-s{cfg.seed}-{digest}"


def table_cells(table: str, smoke: bool, out_dir: str | None) -> list[Config]:
    """The table's cells, each with an absolute out_dir and a deterministic run_name."""
    if table not in TABLES:
        raise SweepError(f"unknown table {table!r}; valid: {', '.join(sorted(TABLES))}")
    cells = []
    for cfg in TABLES[table](smoke):
        cfg = replace(cfg, out_dir=str(Path(out_dir if out_dir is not None else cfg.out_dir).absolute()))
        cells.append(replace(cfg, run_name=cfg.run_name or run_name(cfg)))
    names = [c.run_name for c in cells]
    if len(set(names)) != len(names):
        raise SweepError(f"table {table!r} has cells with the same run_name; give them distinct configs")
    return cells


def cell_lines(table: str, cells: list[Config]) -> list[str]:
    return [
        json.dumps(
            {"index": i, "table": table, "preset": c.preset, "run_name": c.run_name, "config": c.to_dict()},
            sort_keys=True,
        )
        for i, c in enumerate(cells)
    ]


def write_file(path: Path, lines: list[str]) -> None:
    """Write the sweep file atomically (temporary file in the same directory, fsync, rename)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, "".join(line + "\n" for line in lines))
    except OSError as e:
        raise SweepError(f"cannot write {str(path)!r}: {e.strerror}") from e


def _read_lines(path: Path) -> list[str]:
    try:
        return path.read_text().splitlines()
    except OSError as e:
        raise SweepError(f"cannot read sweep file {str(path)!r}: {e.strerror}") from e
    except UnicodeDecodeError as e:
        raise SweepError(f"{str(path)!r} is not a sweep file (not text: {e.reason})") from e


def _parse_cell(path: Path, lines: list[str], index: int) -> dict[str, Any]:
    try:
        cell = json.loads(lines[index])
    except ValueError as e:
        raise SweepError(f"{str(path)!r} line {index + 1} is not JSON: {e}") from e
    if not isinstance(cell, dict) or cell.get("index") != index or not isinstance(cell.get("config"), dict):
        raise SweepError(f"{str(path)!r} line {index + 1} is not cell {index} of a sweep file")
    return cell


def read_cell(path: Path, index: int) -> dict[str, Any]:
    """Line ``index`` of a sweep file, checked."""
    lines = _read_lines(path)
    if not 0 <= index < len(lines):
        raise SweepError(f"index {index} out of range: {str(path)!r} has {len(lines)} cells (0-{len(lines) - 1})")
    return _parse_cell(path, lines, index)


def read_cells(path: Path) -> list[dict[str, Any]]:
    """Every cell of a sweep file, checked, each with ``run_dir`` (a Path: config.out_dir / run_name) added."""
    lines = _read_lines(path)
    if not lines:
        raise SweepError(f"{str(path)!r} holds no cells (an empty file, not a sweep file)")
    cells = []
    for index in range(len(lines)):
        cell = _parse_cell(path, lines, index)
        cfg = cell["config"]
        name = cfg.get("run_name") or cell.get("run_name")
        if not isinstance(name, str) or not name or not isinstance(cfg.get("out_dir"), str):
            raise SweepError(f"{str(path)!r} line {index + 1}: cell {index} has no run_name and out_dir")
        cells.append({**cell, "run_dir": Path(cfg["out_dir"]) / name})
    return cells


# --- the state of a run directory --------------------------------------------------------------------------
STATES = ("finished", "running", "preempted", "diverged", "failed", "not started")
LOCK_NAME = ".lock"  # hpcnoise.rundir.RunDir.lock_path


def lock_held(run_dir: Path) -> bool:
    """Whether a process holds the flock on RUN_DIR/.lock, i.e. a job is running in the directory.

    Rank 0 of a running job holds an exclusive ``flock`` on RUN_DIR/.lock for the whole run; the file may
    stay after the run, and the kernel drops the lock of a process that dies, so only a held lock means
    running. The probe never blocks and never creates the file: it opens the file read-only and tries a
    non-blocking lock, which fails (BlockingIOError) exactly when the job's exclusive lock is held, and
    otherwise releases it at once (closing the descriptor). It asks for a *shared* lock: that conflicts with
    the job's exclusive lock just as an exclusive one would, but not with another probe (two ``status``
    calls at once do not see each other as running), and a read-only descriptor may take it on every file
    system (NFS emulates flock with fcntl locks, whose exclusive kind needs a writable descriptor). A job
    that tries to take its lock in the microseconds a probe holds it is refused as locked (EXIT_LOCKED).
    A missing or unopenable lock file, or a file system without locks: False.
    """
    try:
        fd = os.open(run_dir / LOCK_NAME, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:  # no lock support here: cannot tell
        return False
    finally:
        os.close(fd)  # releases the probe's lock when it got one
    return False


def run_state(run_dir: Path) -> str:
    """The state of a cell's run directory, one of ``STATES``, decided in this order:

    finished: summary.json; diverged: diverged.json (the loss became non-finite; not retried); running: a
    job holds RUN_DIR/.lock (``lock_held``); preempted: checkpoint.pt or checkpoint.prev.pt (stopped after
    a checkpoint, by preemption or the time limit; rerunning resumes it); failed: config.json and none of
    the above (it stopped before its first checkpoint, or its checkpoints are gone); not started: no such
    directory, or one without config.json or a checkpoint.
    """
    if (run_dir / "summary.json").exists():
        return "finished"
    if (run_dir / "diverged.json").exists():
        return "diverged"
    if lock_held(run_dir):
        return "running"
    if (run_dir / "checkpoint.pt").exists() or (run_dir / "checkpoint.prev.pt").exists():
        return "preempted"
    if (run_dir / "config.json").exists():
        return "failed"
    return "not started"


def _json_object(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def diverged_text(run_dir: Path) -> str:
    """One line on where a diverged run diverged, from its diverged.json."""
    data = _json_object(run_dir / "diverged.json")
    if data is None:
        return "diverged (diverged.json unreadable)"
    message = " ".join(str(data.get("message") or "").split())
    return f"diverged in epoch {data.get('epoch', '?')}" + (f": {message}" if message else "")


def state_detail(run_dir: Path, state: str) -> str:
    """What ``status --list`` prints after a cell's state: the final test error, where it diverged, or how
    many epochs are logged."""
    if state == "finished":
        error = (_json_object(run_dir / "summary.json") or {}).get("final_test_error")
        if isinstance(error, (int, float)) and not isinstance(error, bool):
            return f"final test error {100.0 * error:.2f}%"
        return ""
    if state == "diverged":
        return diverged_text(run_dir).removeprefix("diverged ")
    if state == "not started":
        return ""
    try:
        n = sum(1 for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip())
    except (OSError, UnicodeDecodeError):
        n = 0
    return f"{n} epoch{'s' if n != 1 else ''} logged"


def cmd_write(argv: list[str]) -> int:
    p = _parser(prog="hpcnoise sweep write", description="Write the cells of a table as a sweep file.")
    p.add_argument("table", help=f"one of: {', '.join(sorted(TABLES))}")
    p.add_argument("--out", type=Path, required=True, help="the sweep file to write")
    p.add_argument("--smoke", action="store_true", help="the presets' seconds-long smoke variants")
    p.add_argument("--out_dir", "--out-dir", default=None, help="where the runs go (default: each cell's out_dir)")
    args = p.parse_args(argv)
    cells = table_cells(args.table, args.smoke, args.out_dir)
    write_file(args.out, cell_lines(args.table, cells))
    print(
        f"hpcnoise: wrote {len(cells)} cells of table {args.table!r} to {args.out}; submit with\n"
        f"  sbatch --array=0-{len(cells) - 1} jobs/sweep.sbatch {shlex.quote(str(args.out))}"
    )
    return 0


def cmd_run(argv: list[str]) -> int:
    p = _parser(prog="hpcnoise sweep run", description="Train one cell of a sweep file.")
    p.add_argument("file", type=Path)
    p.add_argument("--index", type=int, default=None, help="the cell (default: $SLURM_ARRAY_TASK_ID)")
    args, overrides = p.parse_known_args(argv)
    index = args.index
    if index is None:
        task = os.environ.get("SLURM_ARRAY_TASK_ID", "")
        if not task.isdigit():
            raise SweepError("no --index given and SLURM_ARRAY_TASK_ID is not set (not a job array task)")
        index = int(task)
    cell = read_cell(args.file, index)
    cfg = apply_overrides(config_from_dict(cell["config"]), overrides)
    run_dir = Path(cfg.out_dir) / cfg.run_name
    if cfg.run_name and (run_dir / "diverged.json").exists() and not (run_dir / "summary.json").exists():
        # A result, not a failure: exit 0 so that the array task is done (train itself would refuse it too).
        what = diverged_text(run_dir)
        _say(f"hpcnoise: cell {index} ({run_dir}) {what}; not rerun, counted as done", rank0_only=True, err=False)
        return 0
    check_values(cfg)
    from hpcnoise.train import train  # torch and Horovod load only once the input is known good

    try:
        train(cfg)  # checks the workload (models, device) before joining the launcher's world
    except Preempted as e:
        _say(f"hpcnoise: {e}; rerun the same command to resume", rank0_only=True)
        return EXIT_PREEMPTED
    except Diverged as e:
        _say(f"hpcnoise: {e}", rank0_only=True)
        return EXIT_DIVERGED
    except RunLocked as e:
        _say(f"hpcnoise: {e}", rank0_only=True)
        return EXIT_LOCKED
    except WriteFailed as e:
        _say(f"hpcnoise: {e}", rank0_only=True)
        return EXIT_IO
    return 0


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
    p = _parser(
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


def cmd_submit(argv: list[str]) -> int:
    p = _parser(prog="hpcnoise sweep submit", description="Write a table's sweep file and submit it as a job array.")
    p.add_argument("table", help=f"one of: {', '.join(sorted(TABLES))}")
    p.add_argument("--smoke", action="store_true", help="the presets' seconds-long smoke variants")
    p.add_argument("--out_dir", "--out-dir", default=None, help="where the runs go (default: each cell's out_dir)")
    p.add_argument("--file", type=Path, default=None, help="the sweep file (default: RUNS/TABLE[-smoke].sweep.jsonl)")
    p.add_argument(
        "--max-parallel", type=int, default=0, help="at most N cells running at once (sbatch --array=...%%N)"
    )
    p.add_argument(
        "--sbatch",
        action="append",
        default=[],
        metavar="OPTION",
        help="one more sbatch option, e.g. --sbatch=--partition=gpu (repeatable)",
    )
    p.add_argument("--script", type=Path, default=SWEEP_SCRIPT, help=f"the batch script (default {SWEEP_SCRIPT})")
    p.add_argument("--dry-run", action="store_true", help="print the sbatch command without running it")
    args, overrides = p.parse_known_args(argv)
    bad = [o for o in overrides if not (o.startswith("--") and "=" in o)]
    if bad:
        raise SweepError(f"unexpected argument {bad[0]!r}; cell overrides are --key=value")
    apply_overrides(Config(), overrides)  # unknown keys and bad values fail here, before anything is written
    if args.max_parallel < 0:
        raise SweepError(f"--max-parallel must be >= 0, got {args.max_parallel}")
    if not args.script.is_file():
        raise SweepError(f"batch script {str(args.script)!r} not found; pass --script=PATH/jobs/sweep.sbatch")
    cells = table_cells(args.table, args.smoke, args.out_dir)
    for cell in cells:  # out-of-range values, as each task will see them
        check_values(apply_overrides(cell, overrides))
    path = args.file or Path(cells[0].out_dir) / f"{args.table}{'-smoke' if args.smoke else ''}.sweep.jsonl"
    array = f"0-{len(cells) - 1}" + (f"%{args.max_parallel}" if args.max_parallel else "")
    cmd = [
        "sbatch",
        f"--array={array}",
        f"--job-name=hpcnoise-{args.table}",
        *args.sbatch,
        str(args.script),
        str(path.absolute()),
        *overrides,
    ]
    if not args.dry_run:
        write_file(path, cell_lines(args.table, cells))
    print(shlex.join(cmd), flush=True)
    if args.dry_run:
        return 0
    try:
        return subprocess.run(cmd, check=False).returncode
    except FileNotFoundError as e:
        raise SweepError("sbatch not found: submit from a Slurm login node (or use --dry-run)") from e


def _say(msg: str, rank0_only: bool = False, err: bool = True) -> None:
    """Print to stderr (``err``) or stdout; with ``rank0_only``, only on the launcher's rank 0 (costs loading torch)."""
    if rank0_only:
        from hpcnoise.comm import launcher_rank  # lazy: torch

        if launcher_rank() != 0:
            return
    print(msg, file=sys.stderr if err else sys.stdout, flush=True)


COMMANDS: dict[str, Callable[[list[str]], int]] = {
    "write": cmd_write,
    "run": cmd_run,
    "submit": cmd_submit,
    "status": cmd_status,
}


def main(argv: list[str]) -> int:
    """``hpcnoise sweep ...``; returns the exit status."""
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    try:
        if argv[0] not in COMMANDS:
            raise SweepError(f"unknown sweep command {argv[0]!r}; valid: {', '.join(COMMANDS)}")
        return COMMANDS[argv[0]](argv[1:])
    except ConfigError as e:  # SweepError included
        # only `run` is started by a launcher (the others print at once, without loading torch for the rank)
        _say(f"hpcnoise: error: {e}", rank0_only=argv[0] == "run")
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
