"""A table cell's runs: selecting them from the finished and diverged frames, and describing what they pool."""

from __future__ import annotations

import pandas as pd

from analysis.variants import pooled_differences


def or_empty(diverged: pd.DataFrame | None) -> pd.DataFrame:
    """The diverged frame of a table function's argument (None: no diverged runs)."""
    return diverged if diverged is not None else pd.DataFrame()


def matching(df: pd.DataFrame, **values: object) -> pd.DataFrame:
    """The rows of ``df`` whose columns equal ``values`` (all of ``df`` when it is empty)."""
    if df.empty:
        return df
    mask = pd.Series(True, index=df.index)
    for column, value in values.items():
        mask &= df[column] == value
    return df[mask]


def variants_present(runs: pd.DataFrame, diverged: pd.DataFrame) -> list[tuple[str, str, str]]:
    """Every (dataset, network, label) with a finished or a diverged run, sorted."""
    keys: set[tuple[str, str, str]] = set()
    for df in (runs, diverged):
        if not df.empty:
            keys |= set(zip(df["dataset"], df["model"], df["label"]))
    return sorted(keys)


def pooled_note(cell: pd.DataFrame) -> str:
    """ "pools FIELD = A, B" for each config field whose values differ among the cell's runs ("" when none)."""
    diffs = pooled_differences(list(cell["experiment"])) if len(cell) else {}
    return "; ".join(f"pools {k} = {', '.join(map(str, v))}" for k, v in diffs.items())


def seeds_text(cell: pd.DataFrame) -> str:
    """The cell's seeds, sorted and comma-separated."""
    return ",".join(str(s) for s in sorted(cell["seed"].unique())) if len(cell) else ""
