"""The paper's Tables 1-3 from our runs, beside its published numbers; throughput and sharpness tables.

Every number is a mean over seeds with a 95% Student-t confidence interval: mean +- t_{0.975, n-1} sd / sqrt(n)
(sd with n - 1 degrees of freedom). Runs that repeat a seed are averaged first, so n counts seeds, not runs.
With one seed there is no interval, and the table says so rather than printing a zero-width one.

Means are over finished runs only. Diverged runs (``analysis.load``: the loss became non-finite) are counted
per cell beside the mean, never dropped silently: ``n_diverged`` in every long table, and "k diverged" in the
cell's text (``fmt_estimate``); a cell whose runs all diverged reads "none finished (k diverged)". The
``diverged`` argument of the table functions is ``Loaded.diverged`` (None: no diverged runs).

Each table exists twice: a tidy long DataFrame (one row per cell, every number; written as CSV) and a
Markdown rendering of the paper's layout (rows (dataset, network), columns regimes, each beside the paper's).
The rendering lists the rows with at least one measured cell (``row_measured``); the paper's rows nobody ran
are rendered on their own as a reference (``split_measured``).

A noise regime's column holds only runs at the paper's noise (multiplier lambda = 1, ``noise_calibration``
"paper"), so that a calibration grid's other multipliers are not pooled into the paper's cell; they are in
``results_table`` and ``analysis.closure``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats

from analysis.load import NOISE_FREE, pooled_differences
from analysis.published import COLUMNS as PUBLISHED_COLUMNS
from analysis.published import TITLES, published, published_any
from analysis.published import rows as published_rows

LEVEL = 0.95


@dataclass(frozen=True)
class Estimate:
    """Mean of n values and the half-width of its confidence interval (None when n < 2)."""

    mean: float
    half: float | None
    n: int

    @property
    def low(self) -> float:
        return self.mean - self.half if self.half is not None else math.nan

    @property
    def high(self) -> float:
        return self.mean + self.half if self.half is not None else math.nan

    @property
    def ci(self) -> float:
        """The half-width, NaN when there is none (as the tables store it)."""
        return self.half if self.half is not None else math.nan


def mean_ci(values: Iterable[float], level: float = LEVEL) -> Estimate:
    """Mean and Student-t confidence half-width of the finite values (NaN mean when there are none)."""
    x = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    n = len(x)
    if n == 0:
        return Estimate(math.nan, None, 0)
    if n == 1:
        return Estimate(float(x[0]), None, 1)
    sd = float(np.std(x, ddof=1))
    return Estimate(float(x.mean()), float(stats.t.ppf(0.5 + level / 2, n - 1) * sd / math.sqrt(n)), n)


def ci_band(values: Sequence[float]) -> tuple[float, float]:
    """(low, high) of mean_ci for seaborn's ``errorbar=``; a single value gives a zero-width band."""
    est = mean_ci(values)
    return (est.mean, est.mean) if est.half is None else (est.low, est.high)


def welch_diff(a: Sequence[float], b: Sequence[float], level: float = LEVEL) -> Estimate:
    """mean(a) - mean(b) with a Welch-Satterthwaite t interval (None when either side has < 2 values)."""
    xa, xb = (np.asarray([v for v in x if math.isfinite(v)], dtype=float) for x in (a, b))
    ea, eb = mean_ci(xa), mean_ci(xb)
    diff = ea.mean - eb.mean
    if ea.n < 2 or eb.n < 2:
        return Estimate(diff, None, min(ea.n, eb.n))
    va, vb = float(np.var(xa, ddof=1)) / ea.n, float(np.var(xb, ddof=1)) / eb.n
    se = math.sqrt(va + vb)
    if se == 0.0:
        return Estimate(diff, 0.0, min(ea.n, eb.n))
    dof = (va + vb) ** 2 / (va**2 / (ea.n - 1) + vb**2 / (eb.n - 1))
    return Estimate(diff, float(stats.t.ppf(0.5 + level / 2, dof) * se), min(ea.n, eb.n))


def _or_empty(diverged: pd.DataFrame | None) -> pd.DataFrame:
    return diverged if diverged is not None else pd.DataFrame()


def _matching(df: pd.DataFrame, **values: object) -> pd.DataFrame:
    """The rows of ``df`` whose columns equal ``values`` (all of ``df`` when it is empty)."""
    if df.empty:
        return df
    mask = pd.Series(True, index=df.index)
    for column, value in values.items():
        mask &= df[column] == value
    return df[mask]


def per_seed(runs: pd.DataFrame, column: str) -> pd.Series:
    """``column`` averaged over runs that share a seed: one value per seed."""
    return runs.groupby("seed")[column].mean()


# --- the paper's tables ----------------------------------------------------------------------------------------
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


def _pooled_note(cell: pd.DataFrame) -> str:
    diffs = pooled_differences(list(cell["experiment"])) if len(cell) else {}
    return "; ".join(f"pools {k} = {', '.join(map(str, v))}" for k, v in diffs.items())


def _seeds_text(cell: pd.DataFrame) -> str:
    return ",".join(str(s) for s in sorted(cell["seed"].unique())) if len(cell) else ""


def paper_table(runs: pd.DataFrame, spec: TableSpec, diverged: pd.DataFrame | None = None) -> pd.DataFrame:
    """Tidy long form of one paper table: one row per (dataset, network, column), published numbers beside ours.

    Rows are the paper's rows (always, so the table renders with no runs) followed by any other
    (dataset, network) that has runs (finished or diverged) of one of the table's LB regimes at the table's
    LR scaling. ``n_diverged``: the cell's diverged runs, which are not in its mean. ``row_measured``: some
    cell of the row has a run, finished or diverged.
    """
    diverged = _or_empty(diverged)
    row_keys = published_rows(spec.name)
    extra = set()
    for df in (runs, diverged):
        if df.empty:
            continue
        for col in spec.columns:
            if col.regime != "sb":  # SB alone, shared by every table, does not make a row
                sel = df[(df["regime"] == col.regime) & (df["lr_scaling"] == col.lr_scaling)]
                extra |= set(zip(sel["dataset"], sel["model"]))
    row_keys += sorted(k for k in extra if k not in row_keys)
    out = []
    for dataset, network in row_keys:
        for col in spec.columns:
            cell = select(runs, dataset, network, col)
            n_diverged = len(select(diverged, dataset, network, col))
            est = mean_ci(per_seed(cell, "test_accuracy")) if len(cell) else Estimate(math.nan, None, 0)
            pub = published(spec.name, dataset, network, col.id)
            out.append(
                {
                    "table": spec.name,
                    "dataset": dataset,
                    "network": network,
                    "column": col.id,
                    "title": col.title,
                    "n_runs": len(cell),
                    "n_seeds": est.n,
                    "n_diverged": n_diverged,
                    "seeds": _seeds_text(cell),
                    "accuracy": est.mean,
                    "ci": est.ci,
                    "ci_low": est.low,
                    "ci_high": est.high,
                    "published": pub.mean if pub and pub.mean is not None else math.nan,
                    "published_ci": pub.ci if pub and pub.ci is not None else math.nan,
                    "published_in_paper": pub is not None,
                    "published_note": pub.note if pub else "",
                    "minus_published": est.mean - pub.mean if pub and pub.mean is not None else math.nan,
                    "pooled": _pooled_note(cell),
                }
            )
    df = pd.DataFrame(out)
    if df.empty:
        return df.assign(row_measured=pd.Series(dtype=bool))
    ran = (df["n_runs"] > 0) | (df["n_diverged"] > 0)
    df["row_measured"] = ran.groupby([df["dataset"], df["network"]]).transform("any").astype(bool)
    return df


def split_measured(long: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(the rows with at least one measured cell, the rows nobody ran) of a long paper table."""
    if long.empty:
        return long, long
    if "row_measured" in long:
        measured = long["row_measured"].astype(bool)
    else:  # a table written before the column existed
        ran = (long["n_runs"] > 0) | (long.get("n_diverged", 0) > 0)
        measured = ran.groupby([long["dataset"], long["network"]]).transform("any").astype(bool)
    return long[measured], long[~measured]


# --- formatting ----------------------------------------------------------------------------------------------
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


def _n_diverged(row: pd.Series) -> int:
    """A long table row's diverged count (0 for tables written before the column existed)."""
    value = row.get("n_diverged", 0)
    return int(value) if pd.notna(value) else 0


def fmt_published(row: pd.Series) -> str:
    if not row["published_in_paper"]:
        return ""
    if not math.isfinite(row["published"]):
        return "N/A"
    text = f"{row['published']:.2f}"
    if math.isfinite(row["published_ci"]):
        text += f" ± {row['published_ci']:.2f}"
    return text + ("*" if row["published_note"] else "")


def markdown(df: pd.DataFrame) -> str:
    """A DataFrame of strings as a GitHub Markdown table ("No rows." when it has none)."""
    if df.empty:
        return "No rows."
    cols = [str(c) for c in df.columns]
    lines = ["| " + " | ".join(cols) + " |", "| " + " | ".join("---" for _ in cols) + " |"]
    for _, row in df.iterrows():
        lines.append("| " + " | ".join(str(v).replace("|", "\\|") for v in row) + " |")
    return "\n".join(lines)


def paper_table_markdown(long: pd.DataFrame, spec: TableSpec) -> str:
    """The paper's layout: one row per (dataset, network); each regime column beside the paper's number."""
    wide = []
    for (dataset, network), group in long.groupby(["dataset", "network"], sort=False):
        row = {"Dataset": dataset, "Network": network}
        for col in spec.columns:
            cell = group[group["column"] == col.id].iloc[0]
            row[col.title] = fmt_estimate(
                cell["accuracy"], cell["ci"], int(cell["n_seeds"]), int(cell["n_runs"]), n_diverged=_n_diverged(cell)
            )
            row[f"{col.title} (paper)"] = fmt_published(cell)
        wide.append(row)
    return markdown(pd.DataFrame(wide))


# --- every variant ---------------------------------------------------------------------------------------------
def _variant_cell(
    dataset: str, network: str, regime: str, cell: pd.DataFrame, est: Estimate, n_diverged: int
) -> dict[str, object]:
    """The columns every per-variant table starts with: which variant, how many runs, seeds and diverged runs."""
    return {
        "dataset": dataset,
        "network": network,
        "regime": regime,
        "n_runs": len(cell),
        "n_seeds": est.n,
        "n_diverged": n_diverged,
    }


def _markdown_rows(df: pd.DataFrame, row: Callable[[pd.Series], dict[str, object]]) -> str:
    """``markdown`` of one rendered row (``row``) per row of ``df``."""
    return markdown(pd.DataFrame([row(r) for _, r in df.iterrows()]))


def _variant_names(r: pd.Series) -> dict[str, object]:
    return {"Dataset": r["dataset"], "Network": r["network"], "Regime": r["regime"]}


def results_table(runs: pd.DataFrame, diverged: pd.DataFrame | None = None) -> pd.DataFrame:
    """Every (dataset, network, regime variant) present, finished or diverged: final test accuracy and train
    error over the seeds of its finished runs, and how many of its runs diverged."""
    diverged = _or_empty(diverged)
    out: list[dict[str, object]] = []
    keys: set[tuple[str, str, str]] = set()
    for df in (runs, diverged):
        if not df.empty:
            keys |= set(zip(df["dataset"], df["model"], df["label"]))
    for dataset, network, lab in sorted(keys):
        cell = _matching(runs, dataset=dataset, model=network, label=lab)
        gone = _matching(diverged, dataset=dataset, model=network, label=lab)
        acc = mean_ci(per_seed(cell, "test_accuracy")) if len(cell) else Estimate(math.nan, None, 0)
        has_train = len(cell) and "final_train_error" in cell
        train = mean_ci(100.0 * per_seed(cell, "final_train_error")) if has_train else None
        either = cell if len(cell) else gone
        variant, scaling = either["variant"].iloc[0], either["lr_scaling"].iloc[0]
        table3 = scaling == "sqrt" and variant != "sb"  # Table 3: the square-root scaled LB regimes
        pub = published("table3", dataset, network, variant) if table3 else published_any(dataset, network, variant)
        out.append(
            {
                **_variant_cell(dataset, network, lab, cell, acc, len(gone)),
                "seeds": _seeds_text(cell),
                "accuracy": acc.mean,
                "ci": acc.ci,
                "train_error": train.mean if train else math.nan,
                "train_error_ci": train.ci if train else math.nan,
                "published": pub.mean if pub and pub.mean is not None else math.nan,
                "published_source": pub.source if pub else "",
                "pooled": _pooled_note(cell),
            }
        )
    return pd.DataFrame(out)


def results_markdown(df: pd.DataFrame) -> str:
    return _markdown_rows(
        df,
        lambda r: {
            **_variant_names(r),
            "Test accuracy (%)": fmt_estimate(
                r["accuracy"], r["ci"], int(r["n_seeds"]), int(r["n_runs"]), n_diverged=_n_diverged(r)
            ),
            "Final train error (%)": fmt_estimate(r["train_error"], r["train_error_ci"], int(r["n_seeds"])),
            "Paper": f"{r['published']:.2f}" if math.isfinite(r["published"]) else "",
            "Seeds": r["seeds"],
        },
    )


# --- throughput and sharpness -----------------------------------------------------------------------------------
_THROUGHPUT_KEYS = ["dataset", "model", "label", "device_used", "batch"]


def run_throughput(epochs: pd.DataFrame) -> pd.Series:
    """Samples/s of each run: the mean over its epochs, leaving out the first (start-up) when there are more."""

    def steady(group: pd.DataFrame) -> float:
        rows = group.sort_values("epoch")
        rows = rows.iloc[1:] if len(rows) > 1 else rows
        return float(rows["samples_per_s"].mean())

    if epochs.empty or "samples_per_s" not in epochs:
        return pd.Series(dtype=float)
    return epochs.groupby("run_id")[["epoch", "samples_per_s"]].apply(steady)


def throughput_table(runs: pd.DataFrame, epochs: pd.DataFrame, diverged: pd.DataFrame | None = None) -> pd.DataFrame:
    """Samples/s in total and per worker by (dataset, model, regime, device, batch, world size).

    Scaling efficiency = per-worker throughput at W workers / per-worker throughput at 1 worker of the same
    (dataset, model, regime, device, batch); NaN when no 1-worker runs exist. Means over finished runs;
    ``n_diverged``: the cell's diverged runs (a cell with no finished run has no row).
    """
    diverged = _or_empty(diverged)
    per_run = run_throughput(epochs)
    if per_run.empty or runs.empty:
        return pd.DataFrame()
    df = runs.set_index("run_id").join(per_run.rename("samples_per_s"), how="inner").reset_index()
    df["per_worker"] = df["samples_per_s"] / df["world_size"]
    out = []
    for key, cell in df.groupby(_THROUGHPUT_KEYS + ["world_size"], sort=True, dropna=False):
        total, worker = mean_ci(cell["samples_per_s"]), mean_ci(cell["per_worker"])
        where = dict(zip(_THROUGHPUT_KEYS + ["world_size"], key))
        out.append(
            {
                **where,
                "n_runs": len(cell),
                "n_diverged": len(_matching(diverged, **where)),
                "samples_per_s": total.mean,
                "samples_per_s_ci": total.ci,
                "per_worker": worker.mean,
                "per_worker_ci": worker.ci,
            }
        )
    table = pd.DataFrame(out)
    base = table[table["world_size"] == 1].set_index(_THROUGHPUT_KEYS)["per_worker"].rename("base")
    table = table.join(base, on=_THROUGHPUT_KEYS)
    table["efficiency"] = table["per_worker"] / table["base"]
    return table.drop(columns="base")


def throughput_markdown(df: pd.DataFrame) -> str:
    return _markdown_rows(
        df,
        lambda r: {
            "Dataset": r["dataset"],
            "Model": r["model"],
            "Regime": r["label"],
            "Device": r["device_used"],
            "Batch": int(r["batch"]),
            "Workers": int(r["world_size"]),
            "Samples/s": fmt_estimate(
                r["samples_per_s"], r["samples_per_s_ci"], int(r["n_runs"]), digits=0, n_diverged=_n_diverged(r)
            ),
            "Samples/s per worker": fmt_estimate(r["per_worker"], r["per_worker_ci"], int(r["n_runs"]), digits=0),
            "Scaling efficiency": f"{r['efficiency']:.2f}" if math.isfinite(r["efficiency"]) else "",
        },
    )


def sharpness_table(runs: pd.DataFrame, diverged: pd.DataFrame | None = None) -> pd.DataFrame:
    """Maximum Hessian eigenvalue of the final model (sharpness.json) by (dataset, model, regime).

    ``n_diverged``: the variant's diverged runs (no final model, so never measured); a variant without a
    measured run has no row.
    """
    diverged = _or_empty(diverged)
    if runs.empty or "max_eigenvalue" not in runs:
        return pd.DataFrame()
    have = runs[runs["max_eigenvalue"].notna()]
    out = []
    for (dataset, network, lab), cell in have.groupby(["dataset", "model", "label"], sort=True):
        est = mean_ci(per_seed(cell, "max_eigenvalue"))
        gone = _matching(diverged, dataset=dataset, model=network, label=lab)
        out.append(
            {
                **_variant_cell(dataset, network, lab, cell, est, len(gone)),
                "max_eigenvalue": est.mean,
                "ci": est.ci,
                "temperature": mean_ci(per_seed(cell, "temperature")).mean,
            }
        )
    return pd.DataFrame(out)


def sharpness_markdown(df: pd.DataFrame) -> str:
    return _markdown_rows(
        df,
        lambda r: {
            **_variant_names(r),
            "Max eigenvalue": fmt_estimate(
                r["max_eigenvalue"], r["ci"], int(r["n_seeds"]), int(r["n_runs"]), 3, _n_diverged(r)
            ),
            "Temperature": f"{r['temperature']:.3f}" if math.isfinite(r["temperature"]) else "",
        },
    )
