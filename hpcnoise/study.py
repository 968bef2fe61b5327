"""The paper's MNIST-1D study, end to end on one machine, then the report (``hpcnoise study --paper``,
``--full``, ``--grid``; the quick default reruns the tuned settings instead: hpcnoise.cli.study).

    hpcnoise study --paper [--np 2] [--launcher horovodrun|mpirun|none] [--out runs/study-paper]
    (the command line: hpcnoise.cli.study)

SB; LB+GBN and the paper's diagF+GBN (noise multiplier lambda = 1) under linear scaling; LB+GBN and
the temperature-calibrated diagF+GBN (lambda = 0.39) under sqrt scaling; on MNIST-1D (generated
offline), 3 seeds each, trained under ``horovodrun --gloo -np 2`` on localhost (all cells in one launcher world,
so Horovod starts once), with the sharpness of every final model and Fisher and temperature
diagnostics during training; then the report (tables, figures, report.md) from the run directories.
``--paper`` (15 runs) takes 12 to 14 minutes on 2 CPU cores (measured 12 min 7 s and 14 min 1 s,
the three small-batch runs, with sync batch norm under Gloo, about half of it); ``--full`` trains 64
epochs; ``--grid`` runs the calibration grid (table ``mnist1d-grid``: 13 settings x 3 seeds at
GRID_EPOCHS; 59 minutes measured with a step that sent one more collective per step).
Runs that already finished are kept and not rerun, so an interrupted study continues where it stopped:
SIGTERM or Ctrl-C (SIGINT) reaches this process, which sends SIGTERM to the training ranks; they stop
after the same step, write their checkpoint and exit 0 (so that the launcher has no failure to report),
and the command says in one line that it stopped (``EXIT_PREEMPTED``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import psutil

from hpcnoise.config import config_from_dict
from hpcnoise.errors import Diverged, Preempted
from hpcnoise.presets import with_epochs
from hpcnoise.runstate import run_state
from hpcnoise.sweepfile import read_cell, read_cells, run_name, table_cells

PAPER_EPOCHS = 13  # --paper: 15 runs in 12 to 14 minutes on 2 cores (warmup 2, noise 6, decays at 6 and 9)
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


def run_cells(path: Path, shard: tuple[int, int] = (0, 1)) -> int:
    """Train every cell of a sweep file in this launcher world (the worker side of ``study``); with
    ``shard`` (r, n), only the cells whose index is r modulo n (the ``local`` launcher's process r)."""
    from hpcnoise.comm import init  # lazy: torch and Horovod load only in the launched workers
    from hpcnoise.train import train

    comm = init("cpu")
    count = len(path.read_text().splitlines())
    for i in range(shard[0], count, shard[1]):
        cfg = config_from_dict(read_cell(path, i)["config"])
        if comm.is_main:
            print(f"hpcnoise study: cell {i + 1}/{count}: {cfg.run_name}", flush=True)
        try:
            train(cfg, comm)
        except Diverged as e:  # a diverged cell is an outcome (the report counts it), not a failed study
            if comm.is_main:
                print(f"hpcnoise study: cell {i + 1}/{count} diverged: {e}", flush=True)
        except Preempted:  # checkpoint written: exit 0, and the command that started us says it in one line
            return 0
    return 0


def launch_command(launcher: str, np: int) -> list[str]:
    """The launcher's command prefix; ``none`` and ``local`` (``np`` plain processes, each training every
    np-th cell: hpcnoise.study.train_cells) have none."""
    if launcher in ("none", "local"):
        return []
    if launcher == "horovodrun":
        # Gloo needs no mpirun, so the study also runs as root without Open MPI's root override.
        bin_dir = Path(sys.executable).parent
        return [str(bin_dir / "horovodrun"), "--gloo", "-np", str(np), "-H", f"localhost:{np}"]
    return ["mpirun", "-np", str(np), "--bind-to", "none"]


WORKER = ["-m", "hpcnoise.cli", "study", "--run-cells"]  # the ranks' command: run_cells(FILE)


def _ranks(procs: list[subprocess.Popen]) -> list[Any]:
    """The training ranks among ``procs`` and their descendants: the processes whose arguments hold
    ``--run-cells`` (not the shells that launchers start them through, whose one argument holds it)."""
    family = []
    for proc in procs:
        try:
            top = psutil.Process(proc.pid)
            family += [top, *top.children(recursive=True)]
        except psutil.NoSuchProcess:
            pass
    ranks = []
    for p in family:
        try:
            if WORKER[-1] in p.cmdline():
                ranks.append(p)
        except psutil.Error:  # ended meanwhile
            pass
    return ranks


def _stopper(procs: list[subprocess.Popen], stopped: list[int]) -> Callable[[int, Any], None]:
    """A handler of SIGTERM and SIGINT that sends SIGTERM to the training ranks (train's stop signal), or
    to the launcher while no rank has started."""

    def stop(signum: int, frame: Any) -> None:
        stopped.append(signum)
        ranks = _ranks(procs)
        for p in ranks:
            try:
                p.send_signal(signal.SIGTERM)
            except Exception:  # psutil.NoSuchProcess: ended meanwhile
                pass
        for proc in procs:
            if not ranks and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)

    return stop


def train_cells(launcher: str, np: int, sweep: Path) -> tuple[int, bool]:
    """Train the cells of ``sweep`` under ``launcher`` with ``np`` ranks: (the launcher's exit status,
    whether the study was stopped: by a signal, or with cells neither finished nor diverged).

    The launcher runs in a session of its own, so that Ctrl-C reaches only this process; a SIGTERM or
    SIGINT here is passed on to the ranks as SIGTERM, which make them checkpoint and exit 0. The ranks are
    signalled rather than the launcher, which would kill them a few seconds later (horovodrun) and report
    them as failed. The ``local`` launcher starts ``np`` plain processes instead, process r training the
    cells r, r + np, ... (for cells whose result does not depend on the world size: sync or ghost batch
    norm); the status is the first non-zero one of theirs."""
    cmd = launch_command(launcher, np) + [sys.executable, *WORKER, str(sweep)]
    shards = [["--shard", f"{r}/{np}"] for r in range(np)] if launcher == "local" else [[]]
    stopped: list[int] = []
    procs = [subprocess.Popen(cmd + shard, env=os.environ.copy(), start_new_session=True) for shard in shards]
    handler = _stopper(procs, stopped)
    old = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        codes = [proc.wait() for proc in procs]
        code = next((c for c in codes if c != 0), 0)
    finally:
        for sig, previous in old.items():
            signal.signal(sig, previous)
    if stopped or code != 0:
        return code, bool(stopped)
    return code, not all(run_state(cell["run_dir"]) in ("finished", "diverged") for cell in read_cells(sweep))
