"""Sweeps: the cells of a table written to a file, one cell run per Slurm array task.

    hpcnoise sweep write TABLE --out FILE [--smoke] [--out_dir RUNS]
    hpcnoise sweep run FILE [--index I] [--key=value ...]
    hpcnoise sweep submit TABLE [--smoke] [--out_dir RUNS] [--file FILE] [--max-parallel N]
                          [--sbatch=OPTION ...] [--script PATH] [--dry-run] [--key=value ...]

A sweep file holds one JSON line per cell of a table in ``hpcnoise.config.TABLES``:
``{"index": I, "table": NAME, "preset": ..., "run_name": ..., "config": {the complete Config}}``.
Every cell has a fixed run directory, ``config.out_dir/config.run_name`` (out_dir made absolute when the
file is written): the name is the preset, the seed and a digest of the cell's config, so that a
requeued array task finds its own run (and resumes it, or returns at once when it is finished) and a
changed cell never reuses an old run. ``run`` trains cell I (default: $SLURM_ARRAY_TASK_ID) under
whatever launcher started it; ``--key=value`` overrides apply to it on top of the file. ``submit``
writes the file (default RUNS/TABLE[-smoke].sweep.jsonl) and submits jobs/sweep.sbatch as a job array
with one task per cell, printing the sbatch command (``--dry-run``: only printing it).

Bad input gets one line on stderr (from rank 0 only), exit status 2, and nothing written.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import subprocess
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from hpcnoise.config import Config, apply_overrides, config_from_dict
from hpcnoise.errors import EXIT_PREEMPTED, EXIT_USAGE, ConfigError, Parser, Preempted
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


def read_cell(path: Path, index: int) -> dict[str, Any]:
    """Line ``index`` of a sweep file, checked."""
    try:
        lines = path.read_text().splitlines()
    except OSError as e:
        raise SweepError(f"cannot read sweep file {str(path)!r}: {e.strerror}") from e
    if not 0 <= index < len(lines):
        raise SweepError(f"index {index} out of range: {str(path)!r} has {len(lines)} cells (0-{len(lines) - 1})")
    try:
        cell = json.loads(lines[index])
    except ValueError as e:
        raise SweepError(f"{str(path)!r} line {index + 1} is not JSON: {e}") from e
    if not isinstance(cell, dict) or cell.get("index") != index or not isinstance(cell.get("config"), dict):
        raise SweepError(f"{str(path)!r} line {index + 1} is not cell {index} of a sweep file")
    return cell


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
    from hpcnoise.comm import init  # torch and Horovod load only once the input is known good
    from hpcnoise.train import train

    try:
        train(cfg, init(cfg.device))
    except Preempted as e:
        _say(f"hpcnoise: {e}; rerun the same command to resume", rank0_only=True)
        return EXIT_PREEMPTED
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


def _say(msg: str, rank0_only: bool = False) -> None:
    """Print to stderr; with ``rank0_only``, only on the launcher's rank 0 (costs loading torch)."""
    if rank0_only:
        from hpcnoise.comm import launcher_rank  # lazy: torch

        if launcher_rank() != 0:
            return
    print(msg, file=sys.stderr, flush=True)


COMMANDS: dict[str, Callable[[list[str]], int]] = {"write": cmd_write, "run": cmd_run, "submit": cmd_submit}


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
