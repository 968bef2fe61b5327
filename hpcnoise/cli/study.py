"""``hpcnoise study``: the main job's command line (the study itself: hpcnoise.study)."""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from hpcnoise import study
from hpcnoise.cli.common import check_threads, error
from hpcnoise.errors import EXIT_PREEMPTED, ConfigError, Parser
from hpcnoise.files import unwritable
from hpcnoise.presets import GRID_EPOCHS
from hpcnoise.study import FULL_EPOCHS, QUICK_EPOCHS
from hpcnoise.sweepfile import cell_lines, write_file

PROG = "hpcnoise study"
STOPPED = f"{PROG}: stopped after a checkpoint; rerun the same command to continue"


def _parser() -> Parser:
    p = Parser(prog=PROG, description=(study.__doc__ or "").split("\n\n")[0])
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--full", action="store_true", help=f"{FULL_EPOCHS} epochs instead of {QUICK_EPOCHS}")
    mode.add_argument("--grid", action="store_true", help=f"the calibration grid (mnist1d-grid, {GRID_EPOCHS} epochs)")
    p.add_argument("--np", type=int, default=2, help="processes (default 2)")
    p.add_argument("--launcher", choices=("horovodrun", "mpirun", "none"), default="horovodrun")
    p.add_argument("--out", type=Path, default=None, help="root of the run directories (runs/study[-full])")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (default 1; 0: torch's default)")
    p.add_argument("--run-cells", type=Path, help=argparse.SUPPRESS)  # worker side, under the launcher
    return p


def _plan(args: argparse.Namespace) -> tuple[Path, str, int, list]:
    """The run root, the table, the epochs and the cells; ConfigError on bad arguments."""
    if args.np < 1 or (args.launcher == "none" and args.np != 1):
        raise ConfigError(f"--np must be >= 1, and 1 with --launcher=none (got --np {args.np})")
    check_threads(args.threads)
    name = "study-grid" if args.grid else "study-full" if args.full else "study"
    out = (args.out or Path("runs") / name).absolute()
    problem = unwritable(out)
    if problem is not None:
        raise ConfigError(f"cannot write to --out {out}: {problem[1]}")
    launcher = study.launch_command(args.launcher, args.np)[:1]
    if launcher and shutil.which(launcher[0]) is None:
        raise ConfigError(f"--launcher {args.launcher}: {launcher[0]} not found; install it or choose another")
    epochs = GRID_EPOCHS if args.grid else FULL_EPOCHS if args.full else QUICK_EPOCHS
    table = "mnist1d-grid" if args.grid else "mnist1d"
    cells = study.study_cells(epochs, out, args.threads, table)
    from hpcnoise.workload import validate  # lazy: torch

    for cfg in cells:  # e.g. a --np that does not divide the batch: fail here, not in every worker
        try:
            validate(cfg, args.np)
        except ConfigError as e:
            raise ConfigError(f"--np {args.np}: {e}") from e
    return out, table, epochs, cells


def main(argv: list[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
    except ConfigError as e:
        return error(str(e), prog=PROG)
    if args.run_cells:
        return study.run_cells(args.run_cells)
    try:
        out, table, epochs, cells = _plan(args)
    except ConfigError as e:
        return error(str(e), prog=PROG)
    sweep = out / "study.sweep.jsonl"
    write_file(sweep, cell_lines(table, cells))
    print(
        f"{PROG}: {len(cells)} runs of {epochs} epochs on {args.np} processes ({args.launcher}); runs in {out}",
        flush=True,
    )
    return train_and_report(args.launcher, args.np, sweep, out)


def train_and_report(launcher: str, np: int, sweep: Path, out: Path) -> int:
    """Train the sweep's cells under the launcher, then write the report of ``out``; a stop (SIGTERM,
    Ctrl-C) is one line on stderr and ``EXIT_PREEMPTED``, rerunning continues."""
    code, stopped = study.train_cells(launcher, np, sweep)
    if stopped:
        print(STOPPED, file=sys.stderr, flush=True)
        return EXIT_PREEMPTED
    if code != 0:
        print(f"{PROG}: error: training exited with status {code}; rerun to continue", file=sys.stderr)
        return code
    from hpcnoise.cli.report import main as report  # lazy: pandas and seaborn load only for the report

    return report([str(out), "--out", str(out / "report")])
