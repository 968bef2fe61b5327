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
- ``experiment``: the config as JSON without seed, paths and threads, to detect runs of different
  settings pooled into one cell.
- ``tau`` (and ``tau_epoch``, ``tau_trace_c``, ``tau_injected_variance``, ``tau_lr_ratio``, ``tau_batch``):
  the noise temperature of the run's step relative to small-batch SGD, as measured in the last row of
  diagnostics.jsonl that has a "temperature" entry (``hpcnoise.measure.measured_temperature``); NaN when no
  row has one (or its tau is not a finite number).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeGuard

import pandas as pd

REGIME_NAMES = {
    "sb": "SB",
    "lb": "LB",
    "diagf": "DiagF",
    "trace": "Trace",
    "multiplicative": "Multiplicative",
    "fullf": "FullF",
    "kfac": "K-FAC",
    "batchchange": "BatchChange",
}

# Config fields that do not change what is trained; runs differing only in these may be pooled.
NON_EXPERIMENT_FIELDS = frozenset(
    {"seed", "run_name", "out_dir", "progress", "threads", "device", "data_root", "preset"}
)

_CONFIG_REQUIRED = ("dataset", "model", "regime", "seed")
_METRICS_REQUIRED = ("epoch", "step", "train_error", "test_error")
# Keys that summary.json and config.json both hold; they must agree.
_SHARED_KEYS = ("dataset", "model", "regime", "seed", "epochs")

_ID_COLUMNS = ("run_id", "dataset", "model", "regime", "variant", "label", "lr_scaling", "seed", "world_size")
# The columns a diverged frame always has (so that tables can select from it when no run diverged).
DIVERGED_COLUMNS = (
    *_ID_COLUMNS,
    "path",
    "gbn",
    "batch",
    "device_used",
    "experiment",
    "diverged_epoch",
    "diverged_step",
    "diverged_message",
    "last_good_epoch",
    "last_good_test_error",
    "last_good_train_error",
)


class RunError(ValueError):
    """A run directory that cannot be used; the message is the reason listed in the report."""


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


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise RunError(f"{path.name}: invalid JSON ({e.msg} at line {e.lineno})") from e
    except (OSError, UnicodeDecodeError) as e:
        raise RunError(f"{path.name}: unreadable ({e})") from e


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise RunError(f"{path.name}: unreadable ({e})") from e
    rows = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise RunError(f"{path.name} line {i}: truncated or invalid JSON ({e.msg})") from e
        if not isinstance(row, dict):
            raise RunError(f"{path.name} line {i}: not a JSON object")
        rows.append(row)
    return rows


def _number(value: Any) -> TypeGuard[int | float]:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _require(obj: dict[str, Any], keys: tuple[str, ...], where: str) -> None:
    missing = [k for k in keys if k not in obj]
    if missing:
        raise RunError(f"{where}: missing key{'s' if len(missing) > 1 else ''} {', '.join(missing)}")


NOISE_FREE = frozenset({"sb", "lb", "batchchange"})  # regimes without injected noise


def label(regime: str, gbn: bool, lr_scaling: str, multiplier: float = 1.0, calibration: str = "paper") -> str:
    """Printed name of a regime variant, e.g. "LB+GBN", "DiagF+GBN (sqrt)", "LB (unscaled LR)", and for a
    noise multiplier other than the paper's: "DiagF+GBN x0.25", "DiagF+GBN (sqrt) x0.39 (temperature)"."""
    text = REGIME_NAMES.get(regime, regime) + ("+GBN" if gbn else "")
    if regime != "sb" and lr_scaling != "linear":
        text += " (unscaled LR)" if lr_scaling == "none" else f" ({lr_scaling})"
    if regime not in NOISE_FREE and (calibration != "paper" or multiplier != 1.0):
        text += f" x{multiplier:.3g}" + (f" ({calibration})" if calibration != "paper" else "")
    return text


def _load_config(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(config.json record, its config) of a run directory, checked."""
    record = _read_json(path / "config.json")
    if not isinstance(record, dict) or not isinstance(record.get("config"), dict):
        raise RunError("config.json: missing key config")
    cfg = record["config"]
    _require(cfg, _CONFIG_REQUIRED, "config.json")
    if not isinstance(cfg["seed"], int) or isinstance(cfg["seed"], bool):
        raise RunError(f"config.json: seed is {cfg['seed']!r}, not an integer")
    return record, cfg


def _describe(
    path: Path, run_id: str, record: dict[str, Any], cfg: dict[str, Any], summary: dict[str, Any], batch: int
) -> dict[str, Any]:
    """A run's row: config and record columns, summary scalars, and the derived columns (see the module)."""
    row: dict[str, Any] = {"run_id": run_id, "path": str(path)}
    for key, value in cfg.items():
        row[key] = tuple(value) if isinstance(value, list) else value
    row["lr_scaling"] = cfg.get("lr_scaling") or "linear"
    row["world_size"] = int(record.get("world_size") or summary.get("world_size") or 1)
    for key in ("launcher", "git", "started", "num_params", "noise_scale"):
        row[key] = record.get(key)
    row["device_used"] = str(record.get("device") or cfg.get("device") or "unknown")
    for key, value in summary.items():
        if key not in row and not isinstance(value, (dict, list)):
            row[key] = value
    ghost_bn = bool(cfg.get("ghost_bn", False))
    row["batch"] = batch
    row["gbn"] = ghost_bn and int(cfg.get("ghost_size", 0)) < batch
    row["variant"] = cfg["regime"] + ("+gbn" if row["gbn"] else "")
    # lambda actually used (config.json records it; older runs: the configured multiplier)
    row["noise_multiplier"] = float(record.get("noise_multiplier", cfg.get("noise_multiplier", 1.0)))
    row["noise_calibration"] = cfg.get("noise_calibration", "paper")
    row["label"] = label(
        cfg["regime"], row["gbn"], row["lr_scaling"], row["noise_multiplier"], row["noise_calibration"]
    )
    experiment = {k: v for k, v in cfg.items() if k not in NON_EXPERIMENT_FIELDS and k != "lr_scaling"}
    if cfg["regime"] != "sb":  # SB is the reference batch: no learning-rate scaling applies to it
        experiment["lr_scaling"] = row["lr_scaling"]
    row["experiment"] = json.dumps(experiment, sort_keys=True)
    return row


def _load_run(path: Path, run_id: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(one runs row, metrics rows) of a finished run, or RunError naming what is wrong."""
    record, cfg = _load_config(path)
    if not (path / "summary.json").exists():
        n = 0
        if (path / "metrics.jsonl").exists():
            try:
                n = len(_read_jsonl(path / "metrics.jsonl"))
            except RunError:
                n = 0
        raise RunError(f"incomplete: no summary.json ({n} epoch{'s' if n != 1 else ''} logged)")
    summary = _read_json(path / "summary.json")
    if not isinstance(summary, dict):
        raise RunError("summary.json: not a JSON object")
    _require(summary, ("final_test_error",), "summary.json")
    if not _number(summary["final_test_error"]):
        raise RunError(f"summary.json: final_test_error is {summary['final_test_error']!r}, not a number")
    for key in _SHARED_KEYS:
        if key in summary and key in cfg and summary[key] != cfg[key]:
            raise RunError(f"summary.json says {key}={summary[key]!r} but config.json says {cfg[key]!r}")
    if not (path / "metrics.jsonl").exists():
        raise RunError("metrics.jsonl: missing")
    metrics = _read_jsonl(path / "metrics.jsonl")
    if not metrics:
        raise RunError("metrics.jsonl: no epochs")
    for i, m in enumerate(metrics, 1):
        _require(m, _METRICS_REQUIRED, f"metrics.jsonl line {i}")
        bad = [k for k in _METRICS_REQUIRED if not _number(m[k])]
        if bad:
            raise RunError(f"metrics.jsonl line {i}: {bad[0]} is {m[bad[0]]!r}, not a number")

    batch = int(metrics[-1].get("batch_size", cfg.get("batch_size", 0)))
    row = _describe(path, run_id, record, cfg, summary, batch)
    row["test_accuracy"] = 100.0 * (1.0 - float(summary["final_test_error"]))
    return row, metrics


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _load_diverged(path: Path, run_id: str) -> dict[str, Any]:
    """The diverged row of a run with diverged.json and no summary.json, or RunError naming what is wrong."""
    record, cfg = _load_config(path)
    data = _read_json(path / "diverged.json")
    if not isinstance(data, dict):
        raise RunError("diverged.json: not a JSON object")
    _require(data, ("epoch",), "diverged.json")
    if not _integer(data["epoch"]):
        raise RunError(f"diverged.json: epoch is {data['epoch']!r}, not an integer")
    step = data.get("step")
    last_good = data.get("last_good")
    if last_good is not None and not isinstance(last_good, dict):
        raise RunError("diverged.json: last_good is neither a metrics row nor null")
    last_good = last_good or {}
    # The batch of the last epoch trained (SB trains with the small batch), as for finished runs.
    default_batch = cfg.get("small_batch" if cfg["regime"] == "sb" else "batch_size", 0)
    batch = last_good.get("batch_size", default_batch)
    row = _describe(path, run_id, record, cfg, {}, int(batch) if _number(batch) else 0)
    row["diverged_epoch"] = data["epoch"]
    row["diverged_step"] = step if _integer(step) else None
    row["diverged_message"] = " ".join(str(data.get("message") or "").split())  # one line
    for key in ("epoch", "test_error", "train_error"):
        value = last_good.get(key)
        row[f"last_good_{key}"] = float(value) if _number(value) else math.nan
    return row


def _load_sharpness(path: Path) -> dict[str, Any]:
    data = _read_json(path)
    if not isinstance(data, dict):
        raise RunError("sharpness.json: not a JSON object")
    _require(data, ("max_eigenvalue",), "sharpness.json")
    if not _number(data["max_eigenvalue"]):
        raise RunError(f"sharpness.json: max_eigenvalue is {data['max_eigenvalue']!r}, not a number")
    out = {"max_eigenvalue": float(data["max_eigenvalue"])}
    if _number(data.get("temperature")):
        out["temperature"] = float(data["temperature"])
    return out


TAU_COLUMNS = ("tau", "tau_epoch", "tau_trace_c", "tau_injected_variance", "tau_lr_ratio", "tau_batch")
_TAU_KEYS = {"tau": "tau", "trace_c": "tau_trace_c", "injected_variance": "tau_injected_variance"}
_TAU_KEYS |= {"lr_ratio": "tau_lr_ratio", "batch": "tau_batch"}


def _temperature(row: dict[str, Any], where: str) -> dict[str, float]:
    """The run columns of a diagnostics row's "temperature" entry (non-finite numbers: NaN)."""
    entry = row["temperature"]
    if not isinstance(entry, dict):
        raise RunError(f"{where}: temperature is not an object")
    out = {"tau_epoch": float(row["epoch"]) if _number(row["epoch"]) else math.nan}
    for key, column in _TAU_KEYS.items():
        value = entry.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise RunError(f"{where}: temperature[{key!r}] is {value!r}, not a number")
        out[column] = float(value) if _number(value) else math.nan
    return out


def _load_diagnostics(path: Path, run_id: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, float]]:
    """(Fisher-norm rows, gradient-variance rows, tau columns) of diagnostics.jsonl.

    The tau columns (``TAU_COLUMNS``) are those of the latest epoch's row with a "temperature" entry (the
    last such line on ties); empty when no row has one.
    """
    fisher, variance = [], []
    tau: dict[str, float] = {}
    for i, row in enumerate(_read_jsonl(path), 1):
        where = f"diagnostics.jsonl line {i}"
        _require(row, ("epoch",), where)
        if row.get("temperature") is not None:
            measured = _temperature(row, where)
            if not tau or not measured["tau_epoch"] < tau["tau_epoch"]:
                tau = measured
        for key, kind in (("fisher_frobenius", "full"), ("diag_fisher_frobenius", "diagonal")):
            if row.get(key) is not None:
                if not _number(row[key]):
                    raise RunError(f"{where}: {key} is {row[key]!r}, not a number")
                fisher.append({"run_id": run_id, "epoch": row["epoch"], "kind": kind, "frobenius": float(row[key])})
        per_regime = row.get("grad_variance") or {}
        if not isinstance(per_regime, dict):
            raise RunError(f"{where}: grad_variance is not an object")
        for measured, layers in per_regime.items():
            if not isinstance(layers, dict):
                raise RunError(f"{where}: grad_variance[{measured!r}] is not an object")
            for layer, value in layers.items():
                if not _number(value):
                    raise RunError(f"{where}: grad_variance[{measured!r}][{layer!r}] is {value!r}, not a number")
                variance.append(
                    {
                        "run_id": run_id,
                        "epoch": row["epoch"],
                        "measured": measured,
                        "layer": layer,
                        "variance": float(value),
                    }
                )
    return fisher, variance, tau


def load(root: Path) -> Loaded:
    """Load every run directory under ``root``; diverged runs go to ``diverged``, bad ones to ``skipped``.

    Nothing is raised for a bad run. summary.json marks a run finished even beside a diverged.json.
    """
    root = Path(root)
    runs, epochs, fisher, variance, diverged = [], [], [], [], []
    skipped: list[Skipped] = []
    dirs = find_run_dirs(root)
    for path in dirs:
        run_id = path.relative_to(root).as_posix() if path != root else "."
        try:
            if (path / "diverged.json").exists() and not (path / "summary.json").exists():
                diverged.append(_load_diverged(path, run_id))
                continue
            row, metrics = _load_run(path, run_id)
        except RunError as e:
            skipped.append(Skipped(run_id, str(e)))
            continue
        except (ValueError, TypeError, AttributeError) as e:  # a value of the wrong type somewhere
            skipped.append(Skipped(run_id, f"unexpected content: {type(e).__name__}: {e}"))
            continue
        if (path / "sharpness.json").exists():
            try:
                row.update(_load_sharpness(path / "sharpness.json"))
            except RunError as e:
                skipped.append(Skipped(run_id, str(e), "sharpness.json"))
        if (path / "diagnostics.jsonl").exists():
            try:
                f_rows, v_rows, tau = _load_diagnostics(path / "diagnostics.jsonl", run_id)
                fisher += f_rows
                variance += v_rows
                row.update(tau)
            except RunError as e:
                skipped.append(Skipped(run_id, str(e), "diagnostics.jsonl"))
        runs.append(row)
        ids = {k: row[k] for k in _ID_COLUMNS}
        epochs += [{**ids, **m} for m in metrics]
    runs_df = pd.DataFrame(runs)
    for col in ("max_eigenvalue", "temperature", *TAU_COLUMNS):
        if col not in runs_df:
            runs_df[col] = float("nan")
    return Loaded(
        root=root,
        runs=runs_df,
        epochs=pd.DataFrame(epochs),
        fisher=_with_ids(pd.DataFrame(fisher, columns=["run_id", "epoch", "kind", "frobenius"]), runs_df),
        grad_variance=_with_ids(
            pd.DataFrame(variance, columns=["run_id", "epoch", "measured", "layer", "variance"]), runs_df
        ),
        skipped=skipped,
        found=len(dirs),
        diverged=_diverged_frame(diverged),
    )


def _diverged_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """The diverged runs: every column of their rows, DIVERGED_COLUMNS at least (also with no rows)."""
    df = pd.DataFrame(rows)
    for col in DIVERGED_COLUMNS:
        if col not in df:
            df[col] = pd.Series(dtype=object)
    return df


def _with_ids(df: pd.DataFrame, runs: pd.DataFrame) -> pd.DataFrame:
    """Attach the run's identifying columns to a per-run table."""
    if runs.empty:
        return df.assign(**{c: pd.Series(dtype=object) for c in _ID_COLUMNS if c != "run_id"})
    return df.merge(runs[list(_ID_COLUMNS)], on="run_id", how="left")


def pooled_differences(experiments: list[str]) -> dict[str, list[Any]]:
    """Config fields (and their values) that differ among the ``experiment`` strings of runs pooled together."""
    configs = [json.loads(e) for e in set(experiments)]
    keys = sorted(set().union(*configs)) if configs else []
    out = {}
    for key in keys:
        values = sorted({json.dumps(c.get(key)) for c in configs})
        if len(values) > 1:
            out[key] = [json.loads(v) for v in values]
    return out
