"""The paper's Tables 1-3 from our runs, beside its published numbers (see ``analysis.tables``).

Each table is a tidy long DataFrame (``paper_table``: one row per cell, every number; written as CSV) and a
Markdown rendering of the paper's layout (``paper_table_markdown``: rows (dataset, network), columns regimes,
each beside the paper's). The rendering lists the rows with at least one measured cell (``row_measured``);
the paper's rows nobody ran are rendered on their own as a reference (``split_measured``).

A noise regime's column holds only runs at the paper's noise (multiplier lambda = 1, ``noise_calibration``
"paper"), so that a calibration grid's other multipliers are not pooled into the paper's cell.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd

from analysis.cells import or_empty, pooled_note, seeds_text
from analysis.formatting import fmt_cell, markdown
from analysis.published import COLUMNS as PUBLISHED_COLUMNS
from analysis.published import TITLES, published
from analysis.published import rows as published_rows
from analysis.stats import Estimate, mean_ci, per_seed
from analysis.variants import NOISE_FREE


@dataclass(frozen=True)
class Column:
    """One regime column of a paper table and which runs fill it."""

    id: str  # the published column id (analysis.published)
    title: str  # as printed in the paper
    regime: str
    gbn: bool | None  # ghost batch norm in effect; None: any (mixed settings are flagged as pooled)
    lr_scaling: str | None  # "linear" | "sqrt"; None: any (SB, the reference batch, is not scaled)


@dataclass(frozen=True)
class TableSpec:
    name: str
    title: str
    columns: tuple[Column, ...]


def _spec(name: str, lr_scaling: str, title: str) -> TableSpec:
    """A published table's columns: SB (the reference batch, unscaled), then LB regimes at ``lr_scaling``.

    A column id ending '+gbn' is that regime with ghost batch norm; without it, either setting is used.
    """
    columns = []
    for cid in PUBLISHED_COLUMNS[name]:
        regime, gbn = cid.removesuffix("+gbn"), True if cid.endswith("+gbn") else None
        columns.append(Column(cid, TITLES[cid], regime, gbn, None if regime == "sb" else lr_scaling))
    return TableSpec(name, title, tuple(columns))


TABLES: dict[str, TableSpec] = {
    "table1": _spec("table1", "linear", "Table 1: validation accuracy (%), linear LR scaling"),
    "table2": _spec("table2", "linear", "Table 2: validation accuracy (%) of BatchChange, Multiplicative, K-FAC"),
    "table3": _spec("table3", "sqrt", "Table 3: validation accuracy (%), square-root LR scaling"),
}


def select(runs: pd.DataFrame, dataset: str, network: str, column: Column) -> pd.DataFrame:
    """The runs that fill one cell."""
    if runs.empty:
        return runs
    mask = (runs["dataset"] == dataset) & (runs["model"] == network) & (runs["regime"] == column.regime)
    if column.gbn is not None:
        mask &= runs["gbn"] == column.gbn
    if column.lr_scaling is not None:
        mask &= runs["lr_scaling"] == column.lr_scaling
    if column.regime not in NOISE_FREE:  # the paper's noise: lambda = 1, not calibrated
        if "noise_multiplier" in runs:
            mask &= runs["noise_multiplier"].fillna(1.0) == 1.0
        if "noise_calibration" in runs:
            mask &= runs["noise_calibration"].fillna("paper") == "paper"
    return runs[mask]


def _row_keys(runs: pd.DataFrame, diverged: pd.DataFrame, spec: TableSpec) -> list[tuple[str, str]]:
    """The paper's rows, then any other (dataset, network) with runs of the table's LB regimes at its LR scaling."""
    row_keys = published_rows(spec.name)
    extra = set()
    for df in (runs, diverged):
        if df.empty:
            continue
        for col in spec.columns:
            if col.regime != "sb":  # SB alone, shared by every table, does not make a row
                sel = df[(df["regime"] == col.regime) & (df["lr_scaling"] == col.lr_scaling)]
                extra |= set(zip(sel["dataset"], sel["model"]))
    return row_keys + sorted(k for k in extra if k not in row_keys)


def _paper_cell(
    runs: pd.DataFrame, diverged: pd.DataFrame, spec: TableSpec, dataset: str, network: str, col: Column
) -> dict[str, object]:
    """One cell of a long paper table: our mean and interval, the diverged count, the published number."""
    cell = select(runs, dataset, network, col)
    est = mean_ci(per_seed(cell, "test_accuracy")) if len(cell) else Estimate(math.nan, None, 0)
    pub = published(spec.name, dataset, network, col.id)
    return {
        "table": spec.name,
        "dataset": dataset,
        "network": network,
        "column": col.id,
        "title": col.title,
        "n_runs": len(cell),
        "n_seeds": est.n,
        "n_diverged": len(select(diverged, dataset, network, col)),
        "seeds": seeds_text(cell),
        "accuracy": est.mean,
        "ci": est.ci,
        "ci_low": est.low,
        "ci_high": est.high,
        "published": pub.mean if pub and pub.mean is not None else math.nan,
        "published_ci": pub.ci if pub and pub.ci is not None else math.nan,
        "published_in_paper": pub is not None,
        "published_note": pub.note if pub else "",
        "minus_published": est.mean - pub.mean if pub and pub.mean is not None else math.nan,
        "pooled": pooled_note(cell),
    }


def _measured_rows(long: pd.DataFrame) -> pd.Series:
    """Per cell of a long table: whether some cell of its (dataset, network) row has a run, finished or diverged."""
    ran = (long["n_runs"] > 0) | (long.get("n_diverged", 0) > 0)
    return ran.groupby([long["dataset"], long["network"]]).transform("any").astype(bool)


def paper_table(runs: pd.DataFrame, spec: TableSpec, diverged: pd.DataFrame | None = None) -> pd.DataFrame:
    """Tidy long form of one paper table: one row per (dataset, network, column), published numbers beside ours.

    Rows are the paper's rows (always, so the table renders with no runs) followed by any other
    (dataset, network) that has runs (finished or diverged) of one of the table's LB regimes at the table's
    LR scaling. ``n_diverged``: the cell's diverged runs, which are not in its mean. ``row_measured``: some
    cell of the row has a run, finished or diverged.
    """
    diverged = or_empty(diverged)
    out = [
        _paper_cell(runs, diverged, spec, dataset, network, col)
        for dataset, network in _row_keys(runs, diverged, spec)
        for col in spec.columns
    ]
    df = pd.DataFrame(out)
    if df.empty:
        return df.assign(row_measured=pd.Series(dtype=bool))
    df["row_measured"] = _measured_rows(df)
    return df


def split_measured(long: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(the rows with at least one measured cell, the rows nobody ran) of a long paper table."""
    if long.empty:
        return long, long
    if "row_measured" in long:
        measured = long["row_measured"].astype(bool)
    else:  # a table written before the column existed
        measured = _measured_rows(long)
    return long[measured], long[~measured]


def fmt_published(row: pd.Series) -> str:
    if not row["published_in_paper"]:
        return ""
    if not math.isfinite(row["published"]):
        return "N/A"
    text = f"{row['published']:.2f}"
    if math.isfinite(row["published_ci"]):
        text += f" ± {row['published_ci']:.2f}"
    return text + ("*" if row["published_note"] else "")


def paper_table_markdown(long: pd.DataFrame, spec: TableSpec) -> str:
    """The paper's layout: one row per (dataset, network); each regime column beside the paper's number."""
    wide = []
    for (dataset, network), group in long.groupby(["dataset", "network"], sort=False):
        row = {"Dataset": dataset, "Network": network}
        for col in spec.columns:
            cell = group[group["column"] == col.id].iloc[0]
            row[col.title] = fmt_cell(cell)
            row[f"{col.title} (paper)"] = fmt_published(cell)
        wide.append(row)
    return markdown(pd.DataFrame(wide))
