"""Load a root of run directories into tidy pandas DataFrames, listing (never raising on) bad runs.

A run directory is any directory holding config.json (see ``hpcnoise.rundir``); directories whose name starts
with '.' (RunDir's half-created temporaries) are not searched. Every run directory found ends up in exactly one
of three places:
- ``runs``: finished (summary.json present) and every file it needs parses: config.json, metrics.jsonl,
  summary.json. The optional sharpness.json and diagnostics.jsonl are dropped on their own when corrupt; the
  run itself is kept. Only these runs enter means, tables' numbers and figures.
- ``diverged``: no summary.json but diverged.json, written when the loss became non-finite
  (``{"epoch", "step", "message", "last_good"}``; exit status ``hpcnoise.errors.EXIT_DIVERGED``). These are
  results too (the configuration does not train at that seed), so they are kept, with the same identifying
  and derived columns as ``runs``, and every table counts them per cell beside the mean of the finished runs.
- ``skipped``: anything else (unfinished, corrupt), with its reason, so the report can list it.

Derived columns, shared by tables and figures:
- ``gbn``: ghost batch norm in effect, i.e. ghost_bn with ghost batches smaller than the step's batch
  (``sb`` with ghost_size == small_batch is plain batch norm);
- ``lr_scaling``: "linear" | "sqrt" | "none" (missing in config.json = "linear"); meaningless for ``sb``;
- ``variant``: the column id of the paper's tables, regime plus "+gbn" (e.g. "lb+gbn");
- ``noise_multiplier``, ``noise_calibration``: the noise multiplier lambda the run used, and how it was set;
- ``label``: what plots and tables print, e.g. "LB+GBN", "DiagF+GBN (sqrt)", "DiagF+GBN x0.25";
- ``test_accuracy``: 100 * (1 - final_test_error), the paper's "validation accuracy";
- ``final_val_error``, ``final_val_loss``, ``best_val_error`` (runs) and ``val_loss``, ``val_error`` (epochs):
  the held-out validation split's (docs/tuning.md); NaN for runs without one (older runs, val_samples = 0);
- ``experiment``: the config as JSON without seed, paths and threads, to detect runs of different
  settings pooled into one cell.
- ``tau`` (and ``tau_epoch``, ``tau_trace_c``, ``tau_injected_variance``, ``tau_lr_ratio``, ``tau_batch``):
  the noise temperature of the run's step relative to small-batch SGD, as measured in the last row of
  diagnostics.jsonl that has a "temperature" entry (``hpcnoise.measure.measured_temperature``); NaN when no
  row has one (or its tau is not a finite number).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from analysis.diverged import DIVERGED_COLUMNS, diverged_frame, load_diverged
from analysis.optional import FISHER_COLUMNS, TAU_COLUMNS, VARIANCE_COLUMNS, load_diagnostics, load_sharpness
from analysis.runfiles import RunError, is_number, read_config_record, read_jsonl, read_object, require
from analysis.variants import (
    ID_COLUMNS,
    NOISE_FREE,
    NON_EXPERIMENT_FIELDS,
    REGIME_NAMES,
    describe,
    label,
    pooled_differences,
)

__all__ = [  # what other modules import from here; defined in the modules named above
    "DIVERGED_COLUMNS",
    "NOISE_FREE",
    "NON_EXPERIMENT_FIELDS",
    "REGIME_NAMES",
    "TAU_COLUMNS",
    "Loaded",
    "RunError",
    "Skipped",
    "find_run_dirs",
    "label",
    "load",
    "pooled_differences",
]

_METRICS_REQUIRED = ("epoch", "step", "train_error", "test_error")
# The validation split's keys (docs/tuning.md): runs without one (older runs, val_samples = 0) get NaN.
VAL_METRICS_KEYS = ("val_loss", "val_error")
VAL_SUMMARY_KEYS = ("final_val_error", "final_val_loss", "best_val_error")
# Keys that summary.json and config.json both hold; they must agree.
_SHARED_KEYS = ("dataset", "model", "regime", "seed", "epochs")


@dataclass(frozen=True)
class Skipped:
    """A run (what='run') or one optional file of a run that was left out, and why."""

    run: str  # path relative to the root
    reason: str
    what: str = "run"


@dataclass
class Loaded:
    """Everything under one root: tidy tables plus the list of what was skipped.

    runs: one row per finished run (config columns, record columns, summary columns, sharpness, derived).
    diverged: one row per diverged run (config, record and derived columns as in ``runs``, plus
        diverged_epoch, diverged_step, diverged_message and last_good_epoch / last_good_test_error /
        last_good_train_error from the last finished epoch, NaN when it diverged in its first).
    epochs: one row per run x epoch (metrics.jsonl plus the run's identifying columns).
    fisher: one row per run x diagnostics epoch x kind ("full" | "diagonal"): Frobenius norms.
    grad_variance: one row per run x epoch x measured regime x layer: marginal gradient variance.
    """

    root: Path
    runs: pd.DataFrame
    epochs: pd.DataFrame
    fisher: pd.DataFrame
    grad_variance: pd.DataFrame
    skipped: list[Skipped] = field(default_factory=list)
    found: int = 0  # run directories found (finished + diverged + skipped runs)
    diverged: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=list(DIVERGED_COLUMNS)))


def find_run_dirs(root: Path) -> list[Path]:
    """Every directory under ``root`` (itself included) holding config.json, sorted; run dirs are not descended."""
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        if "config.json" in filenames:
            found.append(Path(dirpath))
            dirnames.clear()
            continue
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
    return sorted(found)


def _incomplete(path: Path) -> RunError:
    """The error of a run without summary.json, counting the epochs it logged."""
    n = 0
    if (path / "metrics.jsonl").exists():
        try:
            n = len(read_jsonl(path / "metrics.jsonl"))
        except RunError:
            n = 0
    return RunError(f"incomplete: no summary.json ({n} epoch{'s' if n != 1 else ''} logged)")


def _load_metrics(path: Path) -> list[dict[str, Any]]:
    """The rows of metrics.jsonl, each with the required keys holding numbers."""
    if not (path / "metrics.jsonl").exists():
        raise RunError("metrics.jsonl: missing")
    metrics = read_jsonl(path / "metrics.jsonl")
    if not metrics:
        raise RunError("metrics.jsonl: no epochs")
    for i, m in enumerate(metrics, 1):
        require(m, _METRICS_REQUIRED, f"metrics.jsonl line {i}")
        bad = [k for k in _METRICS_REQUIRED if not is_number(m[k])]
        if bad:
            raise RunError(f"metrics.jsonl line {i}: {bad[0]} is {m[bad[0]]!r}, not a number")
    return metrics


def _load_run(path: Path, run_id: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(one runs row, metrics rows) of a finished run, or RunError naming what is wrong."""
    record, cfg = read_config_record(path)
    if not (path / "summary.json").exists():
        raise _incomplete(path)
    summary = read_object(path / "summary.json", ("final_test_error",))
    if not is_number(summary["final_test_error"]):
        raise RunError(f"summary.json: final_test_error is {summary['final_test_error']!r}, not a number")
    for key in _SHARED_KEYS:
        if key in summary and key in cfg and summary[key] != cfg[key]:
            raise RunError(f"summary.json says {key}={summary[key]!r} but config.json says {cfg[key]!r}")
    metrics = _load_metrics(path)
    batch = int(metrics[-1].get("batch_size", cfg.get("batch_size", 0)))
    row = describe(path, run_id, record, cfg, summary, batch)
    row["test_accuracy"] = 100.0 * (1.0 - float(summary["final_test_error"]))
    return row, metrics


@dataclass
class _Rows:
    """What the run directories under a root add up to, before it becomes ``Loaded``'s frames."""

    runs: list[dict[str, Any]] = field(default_factory=list)
    epochs: list[dict[str, Any]] = field(default_factory=list)
    fisher: list[dict[str, Any]] = field(default_factory=list)
    variance: list[dict[str, Any]] = field(default_factory=list)
    diverged: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)


def _add_optional(path: Path, run_id: str, row: dict[str, Any], rows: _Rows) -> None:
    """sharpness.json and diagnostics.jsonl of a finished run, each skipped on its own when corrupt."""
    if (path / "sharpness.json").exists():
        try:
            row.update(load_sharpness(path / "sharpness.json"))
        except RunError as e:
            rows.skipped.append(Skipped(run_id, str(e), "sharpness.json"))
    if (path / "diagnostics.jsonl").exists():
        try:
            f_rows, v_rows, tau = load_diagnostics(path / "diagnostics.jsonl", run_id)
            rows.fisher += f_rows
            rows.variance += v_rows
            row.update(tau)
        except RunError as e:
            rows.skipped.append(Skipped(run_id, str(e), "diagnostics.jsonl"))


def _add_run(path: Path, run_id: str, rows: _Rows) -> None:
    """One run directory: a diverged run, a finished run (with its epochs and optional files), or skipped."""
    try:
        if (path / "diverged.json").exists() and not (path / "summary.json").exists():
            rows.diverged.append(load_diverged(path, run_id))
            return
        row, metrics = _load_run(path, run_id)
    except RunError as e:
        rows.skipped.append(Skipped(run_id, str(e)))
        return
    except (ValueError, TypeError, AttributeError) as e:  # a value of the wrong type somewhere
        rows.skipped.append(Skipped(run_id, f"unexpected content: {type(e).__name__}: {e}"))
        return
    _add_optional(path, run_id, row, rows)
    rows.runs.append(row)
    ids = {k: row[k] for k in ID_COLUMNS}
    rows.epochs += [{**ids, **m} for m in metrics]


def load(root: Path) -> Loaded:
    """Load every run directory under ``root``; diverged runs go to ``diverged``, bad ones to ``skipped``.

    Nothing is raised for a bad run. summary.json marks a run finished even beside a diverged.json.
    """
    root = Path(root)
    rows = _Rows()
    dirs = find_run_dirs(root)
    for path in dirs:
        _add_run(path, path.relative_to(root).as_posix() if path != root else ".", rows)
    runs_df = pd.DataFrame(rows.runs)
    for col in ("max_eigenvalue", "temperature", *TAU_COLUMNS, *VAL_SUMMARY_KEYS):
        if col not in runs_df:
            runs_df[col] = float("nan")
    epochs_df = pd.DataFrame(rows.epochs)
    for col in VAL_METRICS_KEYS:
        if col not in epochs_df:
            epochs_df[col] = float("nan")
    return Loaded(
        root=root,
        runs=runs_df,
        epochs=epochs_df,
        fisher=_with_ids(pd.DataFrame(rows.fisher, columns=FISHER_COLUMNS), runs_df),
        grad_variance=_with_ids(pd.DataFrame(rows.variance, columns=VARIANCE_COLUMNS), runs_df),
        skipped=rows.skipped,
        found=len(dirs),
        diverged=diverged_frame(rows.diverged),
    )


def _with_ids(df: pd.DataFrame, runs: pd.DataFrame) -> pd.DataFrame:
    """Attach the run's identifying columns to a per-run table."""
    if runs.empty:
        return df.assign(**{c: pd.Series(dtype=object) for c in ID_COLUMNS if c != "run_id"})
    return df.merge(runs[list(ID_COLUMNS)], on="run_id", how="left")
