"""The optional files of a finished run: sharpness.json and diagnostics.jsonl.

Either is dropped on its own when corrupt (a ``RunError``; ``analysis.load`` lists it and keeps the run).
diagnostics.jsonl gives Fisher norms, per-layer gradient variances and the noise temperature tau of the run's
step relative to small-batch SGD (``TAU_COLUMNS``; ``hpcnoise.measure.measured_temperature``).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from analysis.runfiles import RunError, is_number, read_jsonl, read_object, require

TAU_COLUMNS = ("tau", "tau_epoch", "tau_trace_c", "tau_injected_variance", "tau_lr_ratio", "tau_batch")
_TAU_KEYS = {"tau": "tau", "trace_c": "tau_trace_c", "injected_variance": "tau_injected_variance"}
_TAU_KEYS |= {"lr_ratio": "tau_lr_ratio", "batch": "tau_batch"}
_FISHER_KEYS = (("fisher_frobenius", "full"), ("diag_fisher_frobenius", "diagonal"))

# One row of each per-run table that diagnostics.jsonl fills.
FISHER_COLUMNS = ["run_id", "epoch", "kind", "frobenius"]
VARIANCE_COLUMNS = ["run_id", "epoch", "measured", "layer", "variance"]


def load_sharpness(path: Path) -> dict[str, Any]:
    """The run columns of sharpness.json: max_eigenvalue, and temperature when it is a number."""
    data = read_object(path, ("max_eigenvalue",))
    if not is_number(data["max_eigenvalue"]):
        raise RunError(f"sharpness.json: max_eigenvalue is {data['max_eigenvalue']!r}, not a number")
    out = {"max_eigenvalue": float(data["max_eigenvalue"])}
    if is_number(data.get("temperature")):
        out["temperature"] = float(data["temperature"])
    return out


def _temperature(row: dict[str, Any], where: str) -> dict[str, float]:
    """The run columns of a diagnostics row's "temperature" entry (non-finite numbers: NaN)."""
    entry = row["temperature"]
    if not isinstance(entry, dict):
        raise RunError(f"{where}: temperature is not an object")
    out = {"tau_epoch": float(row["epoch"]) if is_number(row["epoch"]) else math.nan}
    for key, column in _TAU_KEYS.items():
        value = entry.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise RunError(f"{where}: temperature[{key!r}] is {value!r}, not a number")
        out[column] = float(value) if is_number(value) else math.nan
    return out


def _fisher_rows(row: dict[str, Any], run_id: str, where: str) -> list[dict[str, Any]]:
    """The Fisher-norm rows of one diagnostics row (full and diagonal, those it has)."""
    out = []
    for key, kind in _FISHER_KEYS:
        if row.get(key) is not None:
            if not is_number(row[key]):
                raise RunError(f"{where}: {key} is {row[key]!r}, not a number")
            out.append({"run_id": run_id, "epoch": row["epoch"], "kind": kind, "frobenius": float(row[key])})
    return out


def _variance_rows(row: dict[str, Any], run_id: str, where: str) -> list[dict[str, Any]]:
    """The gradient-variance rows of one diagnostics row: one per measured regime x layer."""
    per_regime = row.get("grad_variance") or {}
    if not isinstance(per_regime, dict):
        raise RunError(f"{where}: grad_variance is not an object")
    out = []
    for measured, layers in per_regime.items():
        if not isinstance(layers, dict):
            raise RunError(f"{where}: grad_variance[{measured!r}] is not an object")
        for layer, value in layers.items():
            if not is_number(value):
                raise RunError(f"{where}: grad_variance[{measured!r}][{layer!r}] is {value!r}, not a number")
            out.append(
                {
                    "run_id": run_id,
                    "epoch": row["epoch"],
                    "measured": measured,
                    "layer": layer,
                    "variance": float(value),
                }
            )
    return out


def load_diagnostics(path: Path, run_id: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, float]]:
    """(Fisher-norm rows, gradient-variance rows, tau columns) of diagnostics.jsonl.

    The tau columns (``TAU_COLUMNS``) are those of the latest epoch's row with a "temperature" entry taken
    while the run's noise was on (its noise multiplier > 0), else of the latest row with one (the last such
    line on ties): the temperature a noise regime trains at is that of its noise phase, not the one left
    after the noise is switched off. Empty when no row has one.
    """
    fisher, variance = [], []
    tau: dict[str, float] = {}
    tau_noise_on = False
    for i, row in enumerate(read_jsonl(path), 1):
        where = f"diagnostics.jsonl line {i}"
        require(row, ("epoch",), where)
        if row.get("temperature") is not None:
            measured = _temperature(row, where)
            noise_on = (
                is_number(row["temperature"].get("noise_multiplier")) and row["temperature"]["noise_multiplier"] > 0
            )
            later = not tau or not measured["tau_epoch"] < tau["tau_epoch"]
            if (noise_on and (later or not tau_noise_on)) or (not tau_noise_on and later):
                tau, tau_noise_on = measured, noise_on
        fisher += _fisher_rows(row, run_id, where)
        variance += _variance_rows(row, run_id, where)
    return fisher, variance, tau
