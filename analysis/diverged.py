"""Diverged runs: run directories with diverged.json and no summary.json (``Loaded.diverged``).

diverged.json is written when the loss became non-finite (``{"epoch", "step", "message", "last_good"}``;
exit status ``hpcnoise.errors.EXIT_DIVERGED``). A diverged run's row has the identifying and derived columns
of a finished run's (``analysis.variants.describe``) plus ``DIVERGED_FIELDS``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd

from analysis.runfiles import RunError, is_integer, is_number, read_config_record, read_object
from analysis.variants import ID_COLUMNS, describe

# Where the run diverged, and its last finished epoch (NaN when it diverged in its first).
DIVERGED_FIELDS = (
    "diverged_epoch",
    "diverged_step",
    "diverged_message",
    "last_good_epoch",
    "last_good_test_error",
    "last_good_train_error",
)
# The columns a diverged frame always has (so that tables can select from it when no run diverged).
DIVERGED_COLUMNS = (*ID_COLUMNS, "path", "gbn", "batch", "device_used", "experiment", *DIVERGED_FIELDS)


def load_diverged(path: Path, run_id: str) -> dict[str, Any]:
    """The diverged row of a run with diverged.json and no summary.json, or RunError naming what is wrong."""
    record, cfg = read_config_record(path)
    data = read_object(path / "diverged.json", ("epoch",))
    if not is_integer(data["epoch"]):
        raise RunError(f"diverged.json: epoch is {data['epoch']!r}, not an integer")
    step = data.get("step")
    last_good = data.get("last_good")
    if last_good is not None and not isinstance(last_good, dict):
        raise RunError("diverged.json: last_good is neither a metrics row nor null")
    last_good = last_good or {}
    # The batch of the last epoch trained (SB trains with the small batch), as for finished runs.
    default_batch = cfg.get("small_batch" if cfg["regime"] == "sb" else "batch_size", 0)
    batch = last_good.get("batch_size", default_batch)
    row = describe(path, run_id, record, cfg, {}, int(batch) if is_number(batch) else 0)
    row["diverged_epoch"] = data["epoch"]
    row["diverged_step"] = step if is_integer(step) else None
    row["diverged_message"] = " ".join(str(data.get("message") or "").split())  # one line
    for key in ("epoch", "test_error", "train_error"):
        value = last_good.get(key)
        row[f"last_good_{key}"] = float(value) if is_number(value) else math.nan
    return row


def diverged_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """The diverged runs: every column of their rows, DIVERGED_COLUMNS at least (also with no rows)."""
    df = pd.DataFrame(rows)
    for col in DIVERGED_COLUMNS:
        if col not in df:
            df[col] = pd.Series(dtype=object)
    return df
