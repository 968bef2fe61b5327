"""Sweeps: the cells of a table written to a file, one cell run per Slurm array task.

    hpcnoise sweep write TABLE --out FILE [--smoke] [--out_dir RUNS]
    hpcnoise sweep run FILE [--index I] [--key=value ...]
    hpcnoise sweep submit TABLE [--smoke] [--out_dir RUNS] [--file FILE] [--max-parallel N]
                          [--sbatch=OPTION ...] [--script PATH] [--dry-run] [--key=value ...]
    hpcnoise sweep status FILE_OR_RUNS_DIR [--list]

A sweep file holds one JSON line per cell of a table in ``hpcnoise.presets.TABLES``:
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

import os
import shlex
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from hpcnoise.config import Config, apply_overrides, check_values, config_from_dict
from hpcnoise.errors import EXIT_USAGE, ConfigError, Parser, RunStopped
from hpcnoise.presets import TABLES
from hpcnoise.runstate import diverged_text, run_state, state_detail
from hpcnoise.status import counts_text, status_groups
from hpcnoise.sweepfile import SweepError, cell_lines, read_cell, table_cells, write_file

SWEEP_SCRIPT = Path(__file__).resolve().parents[2] / "jobs" / "sweep.sbatch"


def sweep_parser(prog: str, description: str) -> Parser:
    """argparse that raises SweepError (prefixed with the program) instead of printing usage and exiting."""
    return Parser(prog=prog, description=description, error_type=SweepError, prefix_prog=True)


def cmd_write(argv: list[str]) -> int:
    p = sweep_parser(prog="hpcnoise sweep write", description="Write the cells of a table as a sweep file.")
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
    p = sweep_parser(prog="hpcnoise sweep run", description="Train one cell of a sweep file.")
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
    except RunStopped as e:  # preempted, diverged, locked by another job, a failed write
        _say(e.line(), rank0_only=True)
        return e.exit_code
    return 0


def cmd_submit(argv: list[str]) -> int:
    p = sweep_parser(
        prog="hpcnoise sweep submit", description="Write a table's sweep file and submit it as a job array."
    )
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


def cmd_status(argv: list[str]) -> int:
    p = sweep_parser(
        prog="hpcnoise sweep status",
        description="Count a sweep's cells by state: finished, running, preempted, diverged, failed, not started.",
    )
    p.add_argument("target", type=Path, help="a sweep file, or a directory of runs holding *.sweep.jsonl files")
    p.add_argument("--list", action="store_true", help="also one line per cell: index, state, run name, detail")
    args = p.parse_args(argv)
    groups = status_groups(args.target)  # all input checked before anything is printed
    everything: list[str] = []
    for group in groups:
        states = [run_state(run_dir) for _, run_dir, _ in group.entries]
        everything += states
        n = len(states)
        print(f"{group.title}: {n} {group.noun}{'s' if n != 1 else ''}: {counts_text(states)}")
        if args.list:
            id_width = max(len(i) for i, _, _ in group.entries)
            name_width = max(len(name) for _, _, name in group.entries)
            for (i, run_dir, name), state in zip(group.entries, states):
                line = f"  {i:>{id_width}}  {state:<11}" + (f"  {name:<{name_width}}" if name_width else "")
                print((line + "  " + state_detail(run_dir, state)).rstrip())
    if len(groups) > 1:
        print(f"total: {len(everything)}: {counts_text(everything)}")
    return 0


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
