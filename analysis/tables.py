"""The paper's Tables 1-3 from our runs, beside its published numbers; results, throughput and sharpness tables.

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

Where things are: the statistics in ``analysis.stats``, the paper's tables in ``analysis.paper_tables``, cell
formatting and Markdown in ``analysis.formatting``; this module holds the per-variant tables (every variant,
throughput, sharpness) and names the others too, so ``tables.X`` reaches every table function.
"""

from __future__ import annotations

import math

import pandas as pd

from analysis.cells import matching, or_empty, pooled_note, seeds_text, variants_present
from analysis.formatting import fmt_cell, fmt_estimate, markdown, markdown_rows, n_diverged
from analysis.paper_tables import (
    TABLES,
    Column,
    TableSpec,
    fmt_published,
    paper_table,
    paper_table_markdown,
    select,
    split_measured,
)
from analysis.published import published, published_any
from analysis.stats import LEVEL, Estimate, ci_band, mean_ci, per_seed, welch_diff

__all__ = [  # the per-variant tables defined here, and what other modules define that callers reach from here
    "LEVEL",
    "TABLES",
    "Column",
    "Estimate",
    "TableSpec",
    "ci_band",
    "fmt_estimate",
    "fmt_published",
    "markdown",
    "mean_ci",
    "paper_table",
    "paper_table_markdown",
    "per_seed",
    "results_markdown",
    "results_table",
    "select",
    "sharpness_markdown",
    "sharpness_table",
    "split_measured",
    "throughput_markdown",
    "throughput_table",
    "run_throughput",
    "PREDICTION_COLUMNS",
    "welch_diff",
]


# --- every variant ---------------------------------------------------------------------------------------------
def _variant_cell(
    dataset: str, network: str, regime: str, cell: pd.DataFrame, est: Estimate, diverged: int
) -> dict[str, object]:
    """The columns every per-variant table starts with: which variant, how many runs, seeds and diverged runs."""
    return {
        "dataset": dataset,
        "network": network,
        "regime": regime,
        "n_runs": len(cell),
        "n_seeds": est.n,
        "n_diverged": diverged,
    }


def _variant_names(r: pd.Series) -> dict[str, object]:
    return {"Dataset": r["dataset"], "Network": r["network"], "Regime": r["regime"]}


def _results_row(runs: pd.DataFrame, diverged: pd.DataFrame, dataset: str, network: str, lab: str) -> dict[str, object]:
    """One variant's row of ``results_table``."""
    cell = matching(runs, dataset=dataset, model=network, label=lab)
    gone = matching(diverged, dataset=dataset, model=network, label=lab)
    acc = mean_ci(per_seed(cell, "test_accuracy")) if len(cell) else Estimate(math.nan, None, 0)
    has_train = len(cell) and "final_train_error" in cell
    train = mean_ci(100.0 * per_seed(cell, "final_train_error")) if has_train else None
    either = cell if len(cell) else gone
    variant, scaling = either["variant"].iloc[0], either["lr_scaling"].iloc[0]
    table3 = scaling == "sqrt" and variant != "sb"  # Table 3: the square-root scaled LB regimes
    pub = published("table3", dataset, network, variant) if table3 else published_any(dataset, network, variant)
    return {
        **_variant_cell(dataset, network, lab, cell, acc, len(gone)),
        "seeds": seeds_text(cell),
        "accuracy": acc.mean,
        "ci": acc.ci,
        "train_error": train.mean if train else math.nan,
        "train_error_ci": train.ci if train else math.nan,
        "published": pub.mean if pub and pub.mean is not None else math.nan,
        "published_source": pub.source if pub else "",
        "pooled": pooled_note(cell),
    }


def results_table(runs: pd.DataFrame, diverged: pd.DataFrame | None = None) -> pd.DataFrame:
    """Every (dataset, network, regime variant) present, finished or diverged: final test accuracy and train
    error over the seeds of its finished runs, and how many of its runs diverged."""
    diverged = or_empty(diverged)
    out = [_results_row(runs, diverged, *key) for key in variants_present(runs, diverged)]
    return pd.DataFrame(out)


def results_markdown(df: pd.DataFrame) -> str:
    return markdown_rows(
        df,
        lambda r: {
            **_variant_names(r),
            "Test accuracy (%)": fmt_cell(r),
            "Final train error (%)": fmt_estimate(r["train_error"], r["train_error_ci"], int(r["n_seeds"])),
            "Paper": f"{r['published']:.2f}" if math.isfinite(r["published"]) else "",
            "Seeds": r["seeds"],
        },
    )


# --- throughput and sharpness -----------------------------------------------------------------------------------
_THROUGHPUT_KEYS = ["dataset", "model", "label", "device_used", "precision", "batch"]


def run_throughput(epochs: pd.DataFrame) -> pd.Series:
    """Samples/s of each run: the mean over its epochs, leaving out the first (start-up) when there are more."""

    def steady(group: pd.DataFrame) -> float:
        rows = group.sort_values("epoch")
        rows = rows.iloc[1:] if len(rows) > 1 else rows
        return float(rows["samples_per_s"].mean())

    if epochs.empty or "samples_per_s" not in epochs:
        return pd.Series(dtype=float)
    return epochs.groupby("run_id")[["epoch", "samples_per_s"]].apply(steady)


PREDICTION_COLUMNS = ("run_id", "predicted_efficiency", "network")


def throughput_table(
    runs: pd.DataFrame,
    epochs: pd.DataFrame,
    diverged: pd.DataFrame | None = None,
    predictions: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """Samples/s in total and per worker by (dataset, model, regime, device, precision, batch, world size).

    Scaling efficiency = per-worker throughput at W workers / per-worker throughput at 1 worker of the same
    (dataset, model, regime, device, batch); NaN when no 1-worker runs exist. The batch is the global one, so
    this is strong scaling. Means over finished runs; ``n_diverged``: the cell's diverged runs (a cell with no
    finished run has no row).

    ``predictions`` (columns ``PREDICTION_COLUMNS``, one row per run that has one; the report reads them from
    RUN_DIR/scaling.json, ``hpcnoise.benchmarks.throughput``): the scaling MODEL's efficiency of each run.
    ``predicted_efficiency`` is their mean over the cell's runs (``n_predicted`` of them), ``network`` the
    distinct network descriptions they were computed with; NaN and "" where no run of the cell has one.
    """
    diverged = or_empty(diverged)
    per_run = run_throughput(epochs)
    if per_run.empty or runs.empty:
        return pd.DataFrame()
    df = runs.set_index("run_id").join(per_run.rename("samples_per_s"), how="inner").reset_index()
    df["per_worker"] = df["samples_per_s"] / df["world_size"]
    if predictions is None or predictions.empty:
        predictions = pd.DataFrame({c: pd.Series(dtype=float if c == "predicted_efficiency" else object)
                                    for c in PREDICTION_COLUMNS})  # fmt: skip
    df = df.merge(predictions[list(PREDICTION_COLUMNS)], on="run_id", how="left")
    out = []
    for key, cell in df.groupby(_THROUGHPUT_KEYS + ["world_size"], sort=True, dropna=False):
        total, worker = mean_ci(cell["samples_per_s"]), mean_ci(cell["per_worker"])
        where = dict(zip(_THROUGHPUT_KEYS + ["world_size"], key))
        predicted = cell["predicted_efficiency"].dropna()
        out.append(
            {
                **where,
                "n_runs": len(cell),
                "n_diverged": len(matching(diverged, **where)),
                "samples_per_s": total.mean,
                "samples_per_s_ci": total.ci,
                "per_worker": worker.mean,
                "per_worker_ci": worker.ci,
                "predicted_efficiency": float(predicted.mean()) if len(predicted) else math.nan,
                "n_predicted": len(predicted),
                "network": "; ".join(sorted(set(cell["network"].dropna().astype(str)))),
            }
        )
    table = pd.DataFrame(out)
    base = table[table["world_size"] == 1].set_index(_THROUGHPUT_KEYS)["per_worker"].rename("base")
    table = table.join(base, on=_THROUGHPUT_KEYS)
    table["efficiency"] = table["per_worker"] / table["base"]
    columns = [c for c in table.columns if c not in ("base", "efficiency", "predicted_efficiency")]
    at = columns.index("per_worker_ci") + 1
    return table[[*columns[:at], "efficiency", "predicted_efficiency", *columns[at:]]]


def _ratio(value: float) -> str:
    return f"{value:.2f}" if math.isfinite(value) else ""


def throughput_markdown(df: pd.DataFrame) -> str:
    return markdown_rows(
        df,
        lambda r: {
            "Dataset": r["dataset"],
            "Model": r["model"],
            "Regime": r["label"],
            "Device": r["device_used"],
            "Precision": r["precision"],
            "Batch": int(r["batch"]),
            "Workers": int(r["world_size"]),
            "Samples/s": fmt_estimate(
                r["samples_per_s"], r["samples_per_s_ci"], int(r["n_runs"]), digits=0, n_diverged=n_diverged(r)
            ),
            "Samples/s per worker": fmt_estimate(r["per_worker"], r["per_worker_ci"], int(r["n_runs"]), digits=0),
            "Scaling efficiency (measured)": _ratio(r["efficiency"]),
            "Predicted efficiency (model)": _ratio(r["predicted_efficiency"]),
        },
    )


def sharpness_table(runs: pd.DataFrame, diverged: pd.DataFrame | None = None) -> pd.DataFrame:
    """Maximum Hessian eigenvalue of the final model (sharpness.json) by (dataset, model, regime).

    ``n_diverged``: the variant's diverged runs (no final model, so never measured); a variant without a
    measured run has no row.
    """
    diverged = or_empty(diverged)
    if runs.empty or "max_eigenvalue" not in runs:
        return pd.DataFrame()
    have = runs[runs["max_eigenvalue"].notna()]
    out = []
    for (dataset, network, lab), cell in have.groupby(["dataset", "model", "label"], sort=True):
        est = mean_ci(per_seed(cell, "max_eigenvalue"))
        gone = matching(diverged, dataset=dataset, model=network, label=lab)
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
    return markdown_rows(
        df,
        lambda r: {
            **_variant_names(r),
            "Max eigenvalue": fmt_cell(r, "max_eigenvalue", digits=3),
            "Temperature": f"{r['temperature']:.3f}" if math.isfinite(r["temperature"]) else "",
        },
    )
