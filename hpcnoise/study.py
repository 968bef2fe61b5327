"""The main job: the MNIST-1D study, end to end on one machine, then the report.

    hpcnoise study [--full | --grid] [--np 2] [--launcher horovodrun|mpirun|none] [--out runs/study]

SB; LB+GBN and the paper's diagF+GBN (noise multiplier lambda = 1) under linear scaling; LB+GBN and
the temperature-calibrated diagF+GBN (lambda = 0.39) under sqrt scaling; on MNIST-1D (generated
offline), 3 seeds each, trained under ``horovodrun --gloo -np 2`` on localhost (all cells in one launcher world,
so Horovod starts once), with the sharpness of every final model and Fisher and temperature
diagnostics during training; then the report (tables, figures, report.md) from the run directories.
The quick default (15 runs) takes 12 to 14 minutes on 2 CPU cores (measured 12 min 7 s and 14 min 1 s,
the three small-batch runs, with sync batch norm under Gloo, about half of it); ``--full`` trains 64
epochs; ``--grid`` runs the calibration grid (table ``mnist1d-grid``: 13 settings x 3 seeds at
GRID_EPOCHS; 59 minutes measured with a step that sent one more collective per step).
Runs that already finished are kept and not rerun, so an interrupted study continues where it stopped.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

from hpcnoise.config import config_from_dict
from hpcnoise.errors import EXIT_USAGE, ConfigError, Diverged, Parser
from hpcnoise.files import unwritable
from hpcnoise.presets import GRID_EPOCHS, with_epochs
from hpcnoise.sweepfile import cell_lines, read_cell, run_name, table_cells, write_file

QUICK_EPOCHS = 13  # the quick study: 15 runs in 12 to 14 minutes on 2 cores (warmup 2, noise 6, decays at 6 and 9)
FULL_EPOCHS = 64  # --full: twice the presets' epochs
PRECISE_BN_BATCHES = 8  # global training batches that re-estimate BN statistics before each evaluation


def study_cells(epochs: int, out_dir: Path, threads: int, table: str = "mnist1d") -> list:
    """A MNIST-1D table's cells at ``epochs`` (the presets' proportions, hpcnoise.presets.with_epochs),
    with sharpness and diagnostics switched on."""
    cells = []
    for cfg in table_cells(table, smoke=False, out_dir=str(out_dir)):
        cfg = replace(
            with_epochs(cfg, epochs),
            sharpness=True,
            diagnostics_every=max(epochs // 3, 1),
            # precise BN over 8 global batches before every evaluation: measured on mnist1d-lb-gbn and
            # -diagf-gbn at 13 epochs (seed 0), it cut mid-training test error by up to 22 points (the
            # running averages lag behind 14 steps an epoch) and left the final error unchanged
            precise_bn_batches=PRECISE_BN_BATCHES,
            threads=threads,
            progress=False,
            run_name="",
        )
        cells.append(replace(cfg, run_name=run_name(cfg)))
    return cells


def run_cells(path: Path) -> int:
    """Train every cell of a sweep file in this launcher world (the worker side of ``study``)."""
    from hpcnoise.comm import init  # lazy: torch and Horovod load only in the launched workers
    from hpcnoise.train import train

    comm = init("cpu")
    count = len(path.read_text().splitlines())
    for i in range(count):
        cfg = config_from_dict(read_cell(path, i)["config"])
        if comm.is_main:
            print(f"hpcnoise study: cell {i + 1}/{count}: {cfg.run_name}", flush=True)
        try:
            train(cfg, comm)
        except Diverged as e:  # a diverged cell is an outcome (the report counts it), not a failed study
            if comm.is_main:
                print(f"hpcnoise study: cell {i + 1}/{count} diverged: {e}", flush=True)
    return 0


def launch_command(launcher: str, np: int) -> list[str]:
    if launcher == "none":
        return []
    if launcher == "horovodrun":
        # Gloo needs no mpirun, so the study also runs as root without Open MPI's root override.
        bin_dir = Path(sys.executable).parent
        return [str(bin_dir / "horovodrun"), "--gloo", "-np", str(np), "-H", f"localhost:{np}"]
    return ["mpirun", "-np", str(np), "--bind-to", "none"]


def main(argv: list[str] | None = None) -> int:
    p = Parser(prog="hpcnoise study", description=__doc__.split("\n\n")[0])
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--full", action="store_true", help=f"{FULL_EPOCHS} epochs instead of {QUICK_EPOCHS}")
    mode.add_argument("--grid", action="store_true", help=f"the calibration grid (mnist1d-grid, {GRID_EPOCHS} epochs)")
    p.add_argument("--np", type=int, default=2, help="processes (default 2)")
    p.add_argument("--launcher", choices=("horovodrun", "mpirun", "none"), default="horovodrun")
    p.add_argument("--out", type=Path, default=None, help="root of the run directories (runs/study[-full])")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (default 1; 0: torch's default)")
    p.add_argument("--run-cells", type=Path, help=argparse.SUPPRESS)  # worker side, under the launcher
    try:
        args = p.parse_args(argv)
    except ConfigError as e:
        print(f"hpcnoise study: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    if args.run_cells:
        return run_cells(args.run_cells)
    try:
        if args.np < 1 or (args.launcher == "none" and args.np != 1):
            raise ConfigError(f"--np must be >= 1, and 1 with --launcher=none (got --np {args.np})")
        if args.threads < 0:
            raise ConfigError(f"--threads must be >= 0 (0: torch's default), got {args.threads}")
        name = "study-grid" if args.grid else "study-full" if args.full else "study"
        out = (args.out or Path("runs") / name).absolute()
        problem = unwritable(out)
        if problem is not None:
            raise ConfigError(f"cannot write to --out {out}: {problem[1]}")
        launcher = launch_command(args.launcher, args.np)[:1]
        if launcher and shutil.which(launcher[0]) is None:
            raise ConfigError(f"--launcher {args.launcher}: {launcher[0]} not found; install it or choose another")
        epochs = GRID_EPOCHS if args.grid else FULL_EPOCHS if args.full else QUICK_EPOCHS
        table = "mnist1d-grid" if args.grid else "mnist1d"
        cells = study_cells(epochs, out, args.threads, table)
        from hpcnoise.workload import validate  # lazy: torch

        for cfg in cells:  # e.g. a --np that does not divide the batch: fail here, not in every worker
            try:
                validate(cfg, args.np)
            except ConfigError as e:
                raise ConfigError(f"--np {args.np}: {e}") from e
    except ConfigError as e:
        print(f"hpcnoise study: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    sweep = out / "study.sweep.jsonl"
    write_file(sweep, cell_lines(table, cells))
    print(
        f"hpcnoise study: {len(cells)} runs of {epochs} epochs on {args.np} processes ({args.launcher}); runs in {out}",
        flush=True,
    )
    cmd = launch_command(args.launcher, args.np)
    cmd += [sys.executable, "-m", "hpcnoise.study", "--run-cells", str(sweep)]
    proc = subprocess.run(cmd, env=os.environ.copy())
    if proc.returncode != 0:
        print(
            f"hpcnoise study: error: training exited with status {proc.returncode}; rerun to continue", file=sys.stderr
        )
        return proc.returncode
    from analysis.report import main as report  # lazy: pandas and seaborn load only for the report

    return report([str(out), "--out", str(out / "report")])


if __name__ == "__main__":
    sys.exit(main())
