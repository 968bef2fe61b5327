"""Markdown for the report's tables: cell estimates and gap closures as text, a DataFrame of strings as a table."""

from __future__ import annotations

import math
from collections.abc import Callable

import pandas as pd


def fmt_estimate(
    mean: float, ci: float, n_seeds: int, n_runs: int | None = None, digits: int = 2, n_diverged: int = 0
) -> str:
    """A cell: mean ± CI half-width (n=seeds[, runs][, k diverged]); one seed: mean (n=1, no CI);
    no runs: empty; only diverged runs: "none finished (k diverged)"."""
    div = f", {n_diverged} diverged" if n_diverged else ""
    if n_seeds == 0 or not math.isfinite(mean):
        return f"none finished ({n_diverged} diverged)" if n_diverged else ""
    runs = f", {n_runs} runs" if n_runs is not None and n_runs != n_seeds else ""
    if n_seeds == 1 or not math.isfinite(ci):
        return f"{mean:.{digits}f} (n=1, no CI{runs}{div})"
    return f"{mean:.{digits}f} ± {ci:.{digits}f} (n={n_seeds}{runs}{div})"


def n_diverged(row: pd.Series) -> int:
    """A long table row's diverged count (0 for tables written before the column existed)."""
    value = row.get("n_diverged", 0)
    return int(value) if pd.notna(value) else 0


def fmt_cell(row: pd.Series, mean: str = "accuracy", ci: str = "ci", digits: int = 2) -> str:
    """``fmt_estimate`` of a long table row's ``mean`` and ``ci`` columns, with its seed, run and diverged counts."""
    return fmt_estimate(row[mean], row[ci], int(row["n_seeds"]), int(row["n_runs"]), digits, n_diverged(row))


def markdown(df: pd.DataFrame) -> str:
    """A DataFrame of strings as a GitHub Markdown table ("No rows." when it has none)."""
    if df.empty:
        return "No rows."
    cols = [str(c) for c in df.columns]
    lines = ["| " + " | ".join(cols) + " |", "| " + " | ".join("---" for _ in cols) + " |"]
    for _, row in df.iterrows():
        lines.append("| " + " | ".join(str(v).replace("|", "\\|") for v in row) + " |")
    return "\n".join(lines)


def markdown_rows(df: pd.DataFrame, row: Callable[[pd.Series], dict[str, object]]) -> str:
    """``markdown`` of one rendered row (``row``) per row of ``df``."""
    return markdown(pd.DataFrame([row(r) for _, r in df.iterrows()]))


def _pct(x: float) -> str:
    return f"{100.0 * x:.0f}%"


def fmt_closure(r: pd.Series) -> str:
    """A closure cell: "62% (31% to 93%)"; the baselines' by definition; no interval or no gap said so."""
    if r["role"] == "SB baseline":
        return "100% (by definition)"
    if r["role"] == "LB baseline":
        return "0% (by definition)"
    if not math.isfinite(r["closure"]):
        if int(r["n_seeds"]) == 0:
            return ""
        return "undefined (SB and LB equal)"
    if not math.isfinite(r["closure_ci"]):
        return f"{_pct(r['closure'])} (no interval: fewer than 2 seeds)"
    return f"{_pct(r['closure'])} ({_pct(r['closure_low'])} to {_pct(r['closure_high'])})"
