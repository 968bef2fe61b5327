"""Regime variants: their printed names and the columns of a run's row (config, record, summary, derived).

The derived columns are described in ``analysis.load``; ``describe`` makes the row of a finished or a
diverged run alike, so that tables and figures can select from both the same way.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hpcnoise.regimes import REGIMES

# Printed names and noise-free flags come from the regime registry (hpcnoise.regimes), the one home of
# what a regime is. A regime no longer registered keeps its key as its name and counts as noisy.
REGIME_NAMES = {key: regime.name for key, regime in REGIMES.items()}
NOISE_FREE = frozenset(key for key, regime in REGIMES.items() if regime.noise_free)
REFERENCE = frozenset(key for key, regime in REGIMES.items() if regime.reference)  # the small-batch reference

# Config fields that do not change what is trained; runs differing only in these may be pooled.
NON_EXPERIMENT_FIELDS = frozenset(
    {"seed", "run_name", "out_dir", "progress", "threads", "device", "data_root", "preset"}
)

# The columns that identify a run (and its variant) in every per-run table.
ID_COLUMNS = ("run_id", "dataset", "model", "regime", "variant", "label", "lr_scaling", "seed", "world_size")


def label(regime: str, gbn: bool, lr_scaling: str, multiplier: float = 1.0, calibration: str = "paper") -> str:
    """Printed name of a regime variant, e.g. "LB+GBN", "DiagF+GBN (sqrt)", "LB (unscaled LR)", and for a
    noise multiplier other than the paper's: "DiagF+GBN x0.25", "DiagF+GBN (sqrt) x0.39 (temperature)"."""
    text = REGIME_NAMES.get(regime, regime) + ("+GBN" if gbn else "")
    if regime not in REFERENCE and lr_scaling != "linear":
        text += " (unscaled LR)" if lr_scaling == "none" else f" ({lr_scaling})"
    if regime not in NOISE_FREE and (calibration != "paper" or multiplier != 1.0):
        text += f" x{multiplier:.3g}" + (f" ({calibration})" if calibration != "paper" else "")
    return text


def describe(
    path: Path, run_id: str, record: dict[str, Any], cfg: dict[str, Any], summary: dict[str, Any], batch: int
) -> dict[str, Any]:
    """A run's row: config and record columns, summary scalars, and the derived columns (see ``analysis.load``)."""
    row: dict[str, Any] = {"run_id": run_id, "path": str(path)}
    for key, value in cfg.items():
        row[key] = tuple(value) if isinstance(value, list) else value
    row["lr_scaling"] = cfg.get("lr_scaling") or "linear"
    row["world_size"] = int(record.get("world_size") or summary.get("world_size") or 1)
    for key in ("launcher", "git", "started", "num_params", "noise_scale"):
        row[key] = record.get(key)
    row["device_used"] = str(record.get("device") or cfg.get("device") or "unknown")
    # number format and memory layout (runs from before bf16 and channels_last: float32 or their dtype)
    row["precision"] = str(cfg.get("dtype", "float32")) + (" channels-last" if cfg.get("channels_last") else "")
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
    row["experiment"] = experiment(cfg, row["lr_scaling"])
    return row


def experiment(cfg: dict[str, Any], lr_scaling: str) -> str:
    """The config as JSON without the fields that do not change what is trained (``NON_EXPERIMENT_FIELDS``)."""
    fields = {k: v for k, v in cfg.items() if k not in NON_EXPERIMENT_FIELDS and k != "lr_scaling"}
    if cfg["regime"] not in REFERENCE:  # SB is the reference batch: no learning-rate scaling applies to it
        fields["lr_scaling"] = lr_scaling
    return json.dumps(fields, sort_keys=True)


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
