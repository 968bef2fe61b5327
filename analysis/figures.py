"""The paper's Figures 3a-d and 4 from loaded runs, drawn with seaborn on Agg canvases into PNG bytes.

Curves are the mean over seeds with a 95% Student-t band (``analysis.stats.ci_band``, the tables' interval);
bars carry the same interval. One panel per (dataset, network). A figure whose data no run provides is skipped
with the reason (``NoData``), never an error. Figures are rendered in memory; ``analysis.report`` writes them.

``FIGURES`` are the paper's; ``NOISE_FIGURES`` answer the calibration question (test accuracy against the noise
multiplier lambda, and against the measured noise temperature tau; ``analysis.noise_figures``); ``ALL_FIGURES``
is what the report draws. What every figure shares (specs, PNG, regime order and colours) is in
``analysis.plotting``.
"""

from __future__ import annotations

import re
from typing import Any

import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from analysis import plotting
from analysis.load import Loaded
from analysis.noise_figures import NOISE_FIGURES, fig_accuracy_vs_lambda, fig_accuracy_vs_tau
from analysis.plotting import FigureSpec, NoData
from analysis.variants import REGIME_NAMES

__all__ = [  # the paper's figures are defined here; the noise figures in analysis.noise_figures
    "ALL_FIGURES",
    "FIGURES",
    "NOISE_FIGURES",
    "FigureSpec",
    "NoData",
    "fig3a_fisher_norms",
    "fig3b_grad_variance",
    "fig3c_train_error",
    "fig3d_sharpness",
    "fig4_val_error",
    "fig_accuracy_vs_lambda",
    "fig_accuracy_vs_tau",
    "render",
]


def _natural(text: str) -> list[Any]:
    """Sort key that puts layer2 before layer10."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(text))]


def _curves(
    loaded: Loaded,
    df: pd.DataFrame,
    x: str,
    y: str,
    xlabel: str,
    ylabel: str,
    title: str,
    style: str | None = None,
    log: bool = False,
) -> Figure:
    """One panel per (dataset, network): y over x, a line per regime (mean over seeds, t band)."""
    order = plotting.label_order(loaded.runs)
    colours = plotting.palette(order)
    panels = plotting.panels(df.assign(Regime=df["label"]), ["dataset", "model"])
    fig, axes = plotting.grid(len(panels))
    for ax, (name, data) in zip(axes, panels):
        present = [lab for lab in order if lab in set(data["Regime"])]
        # markers, so that one-point curves show
        sns.lineplot(
            data=data, x=x, y=y, style=style, marker="o", markersize=4, **plotting.hued(ax, "Regime", present, colours)
        )
        ax.set(title=name, xlabel=xlabel, ylabel=ylabel)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs and steps are counts
        if data[x].nunique() == 1:  # a single measurement: centre it
            ax.set_xlim(data[x].iloc[0] - 1, data[x].iloc[0] + 1)
        if log:
            ax.set_yscale("log")
        ax.legend(fontsize="small", title=None if style is None else "")
    fig.suptitle(title)
    return fig


def fig3a_fisher_norms(loaded: Loaded) -> Figure:
    if loaded.fisher.empty:
        raise NoData("no run has Fisher norms (fisher_frobenius / diag_fisher_frobenius in diagnostics.jsonl)")
    df = loaded.fisher.assign(Fisher=loaded.fisher["kind"].map({"full": "full F", "diagonal": "diag F"}))
    return _curves(
        loaded,
        df,
        "epoch",
        "frobenius",
        "epoch",
        "Frobenius norm",
        "Fig. 3a: Frobenius norm of the full and diagonal Fisher",
        style="Fisher",
        log=True,
    )


def _some_layers(names: Any, most: int = 12, pick: int = 8) -> tuple[list[str], int]:
    """(tensors to plot, how many there are): all of a small network's; else ``pick`` weight tensors spread
    evenly through a deep one, as the paper shows a few layers of ResNet44."""
    layers = sorted(map(str, names), key=_natural)
    if len(layers) <= most:
        return layers, len(layers)
    weights = [n for n in layers if n.endswith("weight")] or layers
    chosen = sorted({round(i * (len(weights) - 1) / (pick - 1)) for i in range(pick)})
    return [weights[i] for i in chosen], len(layers)


def fig3b_grad_variance(loaded: Loaded) -> Figure:
    gv = loaded.grad_variance
    if gv.empty:
        raise NoData("no run has gradient variances (grad_variance in diagnostics.jsonl)")
    last = gv.groupby("run_id")["epoch"].transform("max")
    df = gv[gv["epoch"] == last]  # each run's latest measurement at its frozen network
    panels = plotting.panels(df, ["dataset", "model", "label"])
    measured = sorted(
        df["measured"].unique(),
        key=lambda m: (list(REGIME_NAMES).index(m) if m in REGIME_NAMES else len(REGIME_NAMES), m),
    )
    fig, axes = plotting.grid(len(panels), width=6.0)
    for ax, (name, data) in zip(axes, panels):
        layers, total = _some_layers(data["layer"].unique())
        shown_layers = data[data["layer"].isin(layers)]
        sns.barplot(data=shown_layers, x="layer", y="variance", order=layers, **plotting.hued(ax, "measured", measured))
        ax.set_yscale("log")
        shown = f"; {len(layers)} of {total} tensors" if len(layers) < total else ""
        ax.set(
            title=f"{name.rsplit(' / ', 1)[0]} (network trained with {name.rsplit(' / ', 1)[1]}{shown})",
            xlabel="parameter tensor",
            ylabel="gradient variance (mean over tensor)",
        )
        ax.tick_params(axis="x", labelrotation=45)
        ax.legend(fontsize="small", title="noise")
    fig.suptitle("Fig. 3b: per-layer marginal gradient variance by regime")
    return fig


def _error_curves(loaded: Loaded, error: str, x: str, xlabel: str, ylabel: str, title: str) -> Figure:
    """``_curves`` of an error column of the epochs table, in percent."""
    if loaded.epochs.empty:
        raise NoData("no epochs logged")
    df = loaded.epochs.assign(**{f"{error}_pct": 100.0 * loaded.epochs[error]})
    return _curves(loaded, df, x, f"{error}_pct", xlabel, ylabel, title)


def fig3c_train_error(loaded: Loaded) -> Figure:
    return _error_curves(
        loaded,
        "train_error",
        "step",
        "iterations (parameter updates)",
        "training error (%)",
        "Fig. 3c: training error vs iterations",
    )


def fig3d_sharpness(loaded: Loaded) -> Figure:
    runs = loaded.runs
    if runs.empty or runs["max_eigenvalue"].isna().all():
        raise NoData("no run has sharpness.json (max_eigenvalue)")
    df = runs[runs["max_eigenvalue"].notna()].assign(panel=lambda d: d["dataset"] + " / " + d["model"])
    order = [lab for lab in plotting.label_order(runs) if lab in set(df["label"])]
    fig = Figure(figsize=(max(5.0, 2.2 * df["panel"].nunique() + 2), 3.8), layout="constrained")
    ax = fig.subplots()
    sns.barplot(
        data=df,
        x="panel",
        y="max_eigenvalue",
        **plotting.hued(ax, "label", order, plotting.palette(plotting.label_order(runs))),
    )
    ax.set(xlabel="", ylabel="max Hessian eigenvalue", title="Fig. 3d: maximum eigenvalue of the final model")
    ax.legend(fontsize="small", title=None)
    return fig


def fig4_val_error(loaded: Loaded) -> Figure:
    return _error_curves(
        loaded, "test_error", "epoch", "epoch", "validation error (%)", "Fig. 4: validation error vs epochs"
    )


FIGURES: list[FigureSpec] = [
    FigureSpec(
        "fig3a_fisher_norms.png",
        "Fig. 3a: Frobenius norms of the full and diagonal Fisher",
        "Frobenius norm of the full and the diagonal empirical Fisher during training.",
        fig3a_fisher_norms,
    ),
    FigureSpec(
        "fig3b_grad_variance.png",
        "Fig. 3b: gradient variance per layer",
        "Marginal gradient variance per layer at a frozen network, by noise regime (log scale).",
        fig3b_grad_variance,
    ),
    FigureSpec(
        "fig3c_train_error.png",
        "Fig. 3c: training error vs iterations",
        "Training error (epoch average) against parameter updates: the convergence comparison.",
        fig3c_train_error,
    ),
    FigureSpec(
        "fig3d_sharpness.png",
        "Fig. 3d: maximum Hessian eigenvalue",
        "Maximum Hessian eigenvalue of the final model (BN folded, temperature fitted).",
        fig3d_sharpness,
    ),
    FigureSpec(
        "fig4_val_error.png", "Fig. 4: validation error vs epochs", "Held-out error after each epoch.", fig4_val_error
    ),
]


ALL_FIGURES: list[FigureSpec] = [*FIGURES, *NOISE_FIGURES]


def render(loaded: Loaded, specs: list[FigureSpec] | None = None) -> tuple[dict[str, bytes], dict[str, str]]:
    """({file name: PNG bytes} of the figures drawn, {file name: why skipped} of the others) of ``specs``
    (default: the paper's ``FIGURES``; the report draws ``ALL_FIGURES``)."""
    drawn: dict[str, bytes] = {}
    skipped: dict[str, str] = {}
    for spec in FIGURES if specs is None else specs:
        try:
            drawn[spec.name] = plotting.png(spec.draw(loaded))
        except NoData as e:
            skipped[spec.name] = str(e)
    return drawn, skipped
