"""``hpcnoise study``: the main job's command line.

The quick default reruns the committed tuned settings (``quick_main``), ``--tune`` is the tuned
comparison itself (``tune_main``, hpcnoise.tuning), and ``--paper``, ``--full`` and ``--grid`` run the
paper's untuned settings (hpcnoise.study)."""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path
from typing import Any

from hpcnoise import study, tuning
from hpcnoise.cli.common import check_threads, error
from hpcnoise.config import config_from_dict
from hpcnoise.errors import EXIT_PREEMPTED, ConfigError, Parser
from hpcnoise.files import unwritable, write_json_atomic
from hpcnoise.presets import GRID_EPOCHS, TUNE_REGIMES, TUNE_WORKLOADS, TUNED_SETTINGS, tuned_settings
from hpcnoise.study import FULL_EPOCHS, PAPER_EPOCHS
from hpcnoise.sweepfile import cell_lines, write_file

PROG = "hpcnoise study"
STOPPED = f"{PROG}: stopped after a checkpoint; rerun the same command to continue"
TUNE_TRIALS = 8  # trials per (workload, regime): 2 x 3 x 8 = 48 (README, "Tuned comparison")
TUNE_LONG_FACTOR = 2.0  # the long budget: LB regimes trained twice the epochs
# The quick default: the committed tuned settings (hpcnoise/tuned_settings.json) rerun on the MLP with the
# tuned study's own rerun seeds (5), at equal epochs and, for LB+GBN, the long budget (README: the measured
# time)
QUICK_WORKLOADS = ["mlp"]
QUICK_LONG_REGIMES = ("lb",)


def _parser() -> Parser:
    p = Parser(
        prog=PROG,
        description="The main job on MNIST-1D, then its report: by default the tuned settings "
        "(hpcnoise/tuned_settings.json) rerun with fresh seeds; --tune tunes them; --paper, --full and --grid "
        "run the paper's settings.",
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--paper", action="store_true", help=f"the paper's settings untuned ({PAPER_EPOCHS} epochs, with sharpness)"
    )
    mode.add_argument("--full", action="store_true", help=f"the paper's settings, {FULL_EPOCHS} epochs")
    mode.add_argument("--grid", action="store_true", help=f"the calibration grid (mnist1d-grid, {GRID_EPOCHS} epochs)")
    mode.add_argument("--tune", action="store_true", help="the tuned comparison (docs/tuning.md)")
    p.add_argument("--np", type=int, default=2, help="processes (default 2)")
    p.add_argument(
        "--launcher",
        choices=("horovodrun", "mpirun", "local", "none"),
        default=None,
        help="local (the default and --tune's: NP plain processes, each its share of the runs), or horovodrun "
        "(--paper, --full and --grid's default)",
    )
    p.add_argument(
        "--out", type=Path, default=None, help="root of the run directories (runs/study[-paper|-full|-grid|-tune])"
    )
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (default 1; 0: torch's default)")
    tune = p.add_argument_group("the tuned comparison (--tune)")
    tune.add_argument("--trials", type=int, default=TUNE_TRIALS, help=f"trials per regime (default {TUNE_TRIALS})")
    tune.add_argument("--seed", type=int, default=0, help="the trials' seed; reruns take the 5 after it (default 0)")
    tune.add_argument("--long-factor", type=float, default=TUNE_LONG_FACTOR, help="k: the long budget's epochs x k")
    tune.add_argument("--workloads", default=",".join(TUNE_WORKLOADS), help="comma-separated (default: all)")
    tune.add_argument("--smoke", action="store_true", help="the presets' seconds-long smoke sizes")
    p.add_argument(
        "--settings",
        type=Path,
        default=None,
        help="the quick study: the tuned settings to rerun (default hpcnoise/tuned_settings.json; a finished "
        "--tune study writes OUT/tuned_settings.json)",
    )
    p.add_argument("--run-cells", type=Path, help=argparse.SUPPRESS)  # worker side, under the launcher
    p.add_argument("--shard", default="0/1", help=argparse.SUPPRESS)  # the local launcher's process r of n
    return p


def _plan(args: argparse.Namespace) -> tuple[Path, str, int, list]:
    """The run root, the table, the epochs and the cells; ConfigError on bad arguments."""
    if args.np < 1 or (args.launcher == "none" and args.np != 1):
        raise ConfigError(f"--np must be >= 1, and 1 with --launcher=none (got --np {args.np})")
    check_threads(args.threads)
    name = "study-grid" if args.grid else "study-full" if args.full else "study-paper"
    out = (args.out or Path("runs") / name).absolute()
    problem = unwritable(out)
    if problem is not None:
        raise ConfigError(f"cannot write to --out {out}: {problem[1]}")
    launcher = study.launch_command(args.launcher, args.np)[:1]
    if launcher and shutil.which(launcher[0]) is None:
        raise ConfigError(f"--launcher {args.launcher}: {launcher[0]} not found; install it or choose another")
    epochs = GRID_EPOCHS if args.grid else FULL_EPOCHS if args.full else PAPER_EPOCHS
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
        r, _, n = args.shard.partition("/")
        return study.run_cells(args.run_cells, (int(r), int(n)))
    if args.tune:
        return tune_main(args)
    if not (args.paper or args.full or args.grid):
        return quick_main(args)
    args.launcher = args.launcher or "horovodrun"
    try:
        if args.launcher == "local" or args.trials != TUNE_TRIALS or args.smoke or args.settings:
            raise ConfigError(
                "--launcher local is an option of --tune and the quick default; --trials and --smoke of --tune; "
                "--settings of the quick default"
            )
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


# --- the tuned comparison (--tune) ------------------------------------------------------------------------
def _tune_plan(args: argparse.Namespace) -> Path:
    """Check the --tune arguments and write (or find) the manifest; ConfigError before anything is written."""
    args.launcher = args.launcher or "local"
    if args.np < 1 or (args.launcher == "none" and args.np != 1):
        raise ConfigError(f"--np must be >= 1, and 1 with --launcher=none (got --np {args.np})")
    if args.settings:
        raise ConfigError("--settings is an option of the quick default (it reruns tuned settings), not of --tune")
    if args.threads != 1:  # the runs' configs, and so the manifest, hold threads=1 (hpcnoise.presets)
        raise ConfigError(f"--threads: the tuned study's runs use 1 thread each (got --threads {args.threads})")
    out = (args.out or Path("runs") / ("study-tune" + ("-smoke" if args.smoke else ""))).absolute()
    problem = unwritable(out)
    if problem is not None:
        raise ConfigError(f"cannot write to --out {out}: {problem[1]}")
    launcher = study.launch_command(args.launcher, args.np)[:1]
    if launcher and shutil.which(launcher[0]) is None:
        raise ConfigError(f"--launcher {args.launcher}: {launcher[0]} not found; install it or choose another")
    workloads = [w for w in args.workloads.split(",") if w]
    budgets = {"equal": 1.0, "long": args.long_factor}
    seeds = tuning.default_rerun_seeds(args.seed)
    tuning.write_manifest(out, workloads, list(TUNE_REGIMES), args.trials, args.seed, budgets, seeds, args.smoke)
    return out


def _train(args: argparse.Namespace, sweep: Path, what: str) -> int | None:
    """Train a sweep file's cells; None when all are done, else the command's exit status."""
    n = len(sweep.read_text().splitlines())
    print(f"{PROG}: {what}: {n} runs on {args.np} processes ({args.launcher})", flush=True)
    code, stopped = study.train_cells(args.launcher, args.np, sweep)
    if stopped:
        print(STOPPED, file=sys.stderr, flush=True)
        return EXIT_PREEMPTED
    if code != 0:
        print(f"{PROG}: error: training exited with status {code}; rerun to continue", file=sys.stderr)
        return code
    return None


def tune_main(args: argparse.Namespace) -> int:
    """``hpcnoise study --tune``: the manifest (written once), the trials, the selection on validation
    (written once), the reruns of each budget, then the report. Rerunning continues where it stopped."""
    try:
        out = _tune_plan(args)
    except ConfigError as e:
        return error(str(e), prog=PROG)
    manifest = tuning.read_manifest(out)
    print(f"{PROG}: tuned comparison in {out} (manifest: {out / tuning.MANIFEST})", flush=True)
    code = _train(args, out / tuning.TRIALS_FILE, "trials")
    if code is not None:
        return code
    selected = tuning.select_once(out, manifest)
    write_json_atomic(out / tuning.SETTINGS, tuning.settings_record(out, manifest, selected))
    return reruns_and_report(args, out, manifest, selected)


def reruns_and_report(
    args: argparse.Namespace, out: Path, manifest: dict[str, Any], selected: dict[tuple[str, str], Any]
) -> int:
    """Train the reruns of every budget of the selection (their sweep files written once), then the report."""
    for budget in manifest["budgets"]:
        sweep = out / f"reruns-{budget}.sweep.jsonl"
        if not sweep.exists():  # written once, after the selection
            write_file(sweep, cell_lines(f"tune-{budget}", tuning.rerun_cells(manifest, selected, budget, out)))
        code = _train(args, sweep, f"reruns ({budget} budget)")
        if code is not None:
            return code
    from hpcnoise.cli.report import main as report  # lazy: pandas and seaborn load only for the report

    return report([str(out), "--out", str(out / "report")])


# --- the quick default: the tuned settings, rerun --------------------------------------------------------
def _quick_plan(args: argparse.Namespace) -> Path:
    """Check the quick study's arguments and write (or find) its manifest and selection: the tuned
    settings (``--settings``, default the committed ones) on QUICK_WORKLOADS with their study's rerun seeds."""
    args.launcher = args.launcher or "local"
    if args.np < 1 or (args.launcher == "none" and args.np != 1):
        raise ConfigError(f"--np must be >= 1, and 1 with --launcher=none (got --np {args.np})")
    if args.trials != TUNE_TRIALS or args.smoke:
        raise ConfigError("--trials and --smoke are options of --tune")
    if args.threads != 1:  # the tuned settings' configs hold threads=1 (hpcnoise.presets.tuning_preset)
        raise ConfigError(f"--threads: the tuned settings' runs use 1 thread each (got --threads {args.threads})")
    out = (args.out or Path("runs") / "study").absolute()
    problem = unwritable(out)
    if problem is not None:
        raise ConfigError(f"cannot write to --out {out}: {problem[1]}")
    if (out / "study.sweep.jsonl").exists() and not (out / tuning.MANIFEST).exists():
        raise ConfigError(f"--out {out} holds the paper's study (hpcnoise study --paper); give another --out")
    launcher = study.launch_command(args.launcher, args.np)[:1]
    if launcher and shutil.which(launcher[0]) is None:
        raise ConfigError(f"--launcher {args.launcher}: {launcher[0]} not found; install it or choose another")
    path = args.settings or TUNED_SETTINGS
    if not path.exists():
        raise ConfigError(
            f"no tuned settings at {path}: run `hpcnoise study --tune` and pass its OUT/tuned_settings.json with "
            "--settings, or run the paper's settings with --paper"
        )
    settings = tuned_settings(path)
    try:
        seeds = settings["manifest"]["rerun_seeds"]
        manifest, record = tuning.imported_study(settings, QUICK_WORKLOADS, seeds, QUICK_LONG_REGIMES)
    except (KeyError, TypeError) as e:
        raise ConfigError(f"{path} is not a tuned-settings file as `hpcnoise study --tune` writes it ({e!r})") from e
    from hpcnoise.workload import validate  # lazy: torch

    for t in manifest["trials"]:  # e.g. a --np that does not divide the batch: fail here, not in every worker
        try:
            validate(config_from_dict(t["config"]), args.np)
        except ConfigError as e:
            raise ConfigError(f"--np {args.np}: {e}") from e
    tuning.write_imported(out, manifest, record)
    return out


def quick_main(args: argparse.Namespace) -> int:
    """``hpcnoise study``: the tuned settings rerun with fresh seeds at equal epochs and LB+GBN's long
    budget, then the tuned report, which says where the settings came from. Rerunning continues."""
    try:
        out = _quick_plan(args)
    except ConfigError as e:
        return error(str(e), prog=PROG)
    manifest = tuning.read_manifest(out)
    source = manifest["imported"]
    print(
        f"{PROG}: the tuned settings ({source['command']}, selected {source['selected_on']} at "
        f"{source['commit'][:12]}) rerun in {out}",
        flush=True,
    )
    return reruns_and_report(args, out, manifest, tuning.select_once(out, manifest))
