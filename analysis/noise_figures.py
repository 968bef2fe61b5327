"""The calibration question's figures: test accuracy against the noise multiplier lambda and against the
measured noise temperature tau (``NOISE_FIGURES``; ``analysis.figures`` has the paper's).

SB and the LB+GBN baseline of the same LR rule are drawn as bands of their mean and 95% t interval.
"""

from __future__ import annotations

from typing import Any

import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from analysis import plotting
from analysis.load import Loaded
from analysis.plotting import FigureSpec, NoData
from analysis.stats import mean_ci, per_seed
from analysis.variants import NOISE_FREE, label

_SB_COLOUR, _LB_COLOUR = "0.35", "tab:red"


def _band(ax: Any, values: list[float], colour: Any, name: str) -> Any:
    """SB or LB drawn as a horizontal line at the mean and a band of its 95% t interval; the legend handle."""
    est = mean_ci(values)
    if est.n == 0:
        return None
    ax.axhline(est.mean, color=colour, lw=1.2, ls="--")
    text = f"{name}: {est.mean:.2f}%"
    if est.half is not None and est.half > 0:
        ax.axhspan(est.low, est.high, color=colour, alpha=0.18, lw=0)
        text += f" ± {est.half:.2f}"
    text += f" (n={est.n})"
    return Patch(facecolor=colour, edgecolor=colour, alpha=0.4, label=text)


def _baselines(runs: pd.DataFrame, dataset: str, model: str, rule: str) -> tuple[list[float], list[float], str]:
    """(SB accuracies per seed, LB+GBN accuracies per seed under ``rule``, the LB label)."""
    pair = runs[(runs["dataset"] == dataset) & (runs["model"] == model)]
    sb = pair[(pair["regime"] == "sb") & ~pair["gbn"].astype(bool)]
    lb = pair[(pair["regime"] == "lb") & pair["gbn"].astype(bool) & (pair["lr_scaling"] == rule)]
    lb_name = str(lb["label"].iloc[0]) if len(lb) else label("lb", True, rule)
    return list(per_seed(sb, "test_accuracy")), list(per_seed(lb, "test_accuracy")), lb_name


def _noise_runs(runs: pd.DataFrame) -> pd.DataFrame:
    """The finished runs of noise regimes, with ``series``: the label without lambda (NoData unless lambda varies)."""
    noisy = runs[~runs["regime"].isin(NOISE_FREE)] if not runs.empty else runs
    if noisy.empty:
        raise NoData("no finished run of a noise regime")
    varied = (noisy["noise_multiplier"] != 1.0) | (noisy["noise_calibration"] != "paper")
    if not varied.any():
        raise NoData("no run with a noise multiplier other than the paper's lambda = 1 (noise_multiplier)")
    return noisy.assign(series=[label(r, g, k) for r, g, k in zip(noisy["regime"], noisy["gbn"], noisy["lr_scaling"])])


def _lambda_point(ax: Any, x: float, values: list[float], colour: Any, calibration: str) -> float:
    """One (series, lambda) cell: its seeds as dots and their mean with its t interval; returns the mean."""
    est = mean_ci(values)
    ax.scatter([x] * len(values), values, color=colour, s=9, alpha=0.35, lw=0)
    temperature = calibration == "temperature"
    ax.errorbar(
        x,
        est.mean,
        yerr=est.half or 0.0,
        color=colour,
        marker="*" if temperature else "o",
        markersize=11 if temperature else 6,
        markeredgecolor="black" if temperature else colour,
        capsize=3,
        ls="none",
    )
    return est.mean


def _lambda_series(ax: Any, data: pd.DataFrame, name: str, colour: Any, where: dict[float, int], shift: float) -> Any:
    """One series of a panel: a point per lambda, the paper-calibrated ones joined by a line; its legend handle."""
    line_x, line_y = [], []
    for (lam, calibration), cell in data[data["series"] == name].groupby(["noise_multiplier", "noise_calibration"]):
        x = where[lam] + shift
        mean = _lambda_point(ax, x, list(per_seed(cell, "test_accuracy")), colour, calibration)
        if calibration == "paper":
            line_x.append(x)
            line_y.append(mean)
    ax.plot(line_x, line_y, color=colour, lw=1.0, alpha=0.8)
    return Line2D([], [], color=colour, marker="o", label=name)


def _temperature_handle() -> Any:
    """The legend entry of the temperature-calibrated lambda's star."""
    return Line2D(
        [],
        [],
        color="white",
        marker="*",
        markersize=11,
        markeredgecolor="black",
        markerfacecolor="0.6",
        label="temperature-calibrated λ",
    )


def _baseline_bands(ax: Any, runs: pd.DataFrame, dataset: str, model: str, rule: str) -> list[Any]:
    """SB and the LB+GBN baseline of ``rule`` as bands; their legend handles (those with runs)."""
    sb, lb, lb_name = _baselines(runs, dataset, model, rule)
    handles = []
    for values, colour, name in ((sb, _SB_COLOUR, "SB"), (lb, _LB_COLOUR, lb_name)):
        handle = _band(ax, values, colour, name)
        if handle is not None:
            handles.append(handle)
    return handles


def _lambda_panel(ax: Any, runs: pd.DataFrame, dataset: str, model: str, rule: str, data: pd.DataFrame) -> None:
    """One (dataset, network, LR rule): every noise series against lambda, over the SB and LB bands."""
    lams = sorted(data["noise_multiplier"].unique())
    where = {lam: i for i, lam in enumerate(lams)}
    series = [s for s in plotting.label_order(data.assign(label=data["series"])) if s in set(data["series"])]
    colours = plotting.palette(series)
    handles: list[Any] = []
    for j, name in enumerate(series):
        shift = 0.1 * (j - (len(series) - 1) / 2)  # dodge the series apart
        handles.append(_lambda_series(ax, data, name, colours[name], where, shift))
    if (data["noise_calibration"] == "temperature").any():
        handles.append(_temperature_handle())
    handles += _baseline_bands(ax, runs, dataset, model, rule)
    temp_at = set(data.loc[data["noise_calibration"] == "temperature", "noise_multiplier"])
    ax.set_xticks(range(len(lams)), [f"{lam:.3g}" + ("\n(temp.)" if lam in temp_at else "") for lam in lams])
    ax.set_xlim(-0.6, len(lams) - 0.4)
    ax.set(
        title=f"{dataset} / {model}, {rule} LR scaling",
        xlabel="noise multiplier λ (ordered, not to scale)",
        ylabel="test accuracy (%)",
    )
    ax.legend(handles=handles, fontsize="x-small", loc="best")


def fig_accuracy_vs_lambda(loaded: Loaded) -> Figure:
    """Test accuracy against lambda, one panel per (dataset, network, LR rule); SB and LB as bands."""
    noisy = _noise_runs(loaded.runs)
    panels = list(noisy.groupby(["dataset", "model", "lr_scaling"], sort=True))
    fig, axes = plotting.grid(len(panels), width=5.8, height=4.0)
    for ax, ((dataset, model, rule), data) in zip(axes, panels):
        _lambda_panel(ax, loaded.runs, dataset, model, rule, data)
    fig.suptitle("Test accuracy against the noise multiplier λ")
    return fig


def fig_accuracy_vs_tau(loaded: Loaded) -> Figure:
    """Test accuracy against the measured temperature ratio tau, one point per run, one panel per pair."""
    runs = loaded.runs
    if runs.empty or "tau" not in runs or not (runs["tau"].astype(float) > 0).any():
        raise NoData('no run has a measured temperature (a "temperature" entry with tau > 0 in diagnostics.jsonl)')
    df = runs[runs["tau"].astype(float) > 0]
    order = [lab for lab in plotting.label_order(runs) if lab in set(df["label"])]
    colours = plotting.palette(order)
    panels = plotting.panels(df, ["dataset", "model"])
    fig, axes = plotting.grid(len(panels), width=7.0, height=4.2)
    for ax, (name, data) in zip(axes, panels):
        present = [lab for lab in order if lab in set(data["label"])]
        sns.scatterplot(
            data=data, x="tau", y="test_accuracy", hue="label", hue_order=present, palette=colours, s=40, ax=ax
        )
        ax.set_xscale("log")
        ax.axvline(1.0, color="0.4", ls=":", lw=1.0, label="τ = 1 (SB's temperature)")
        ax.set(
            title=name, xlabel="measured noise temperature τ (relative to SB, log scale)", ylabel="test accuracy (%)"
        )
        ax.legend(fontsize="x-small", title=None, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.suptitle("Test accuracy against the measured noise temperature τ")
    return fig


NOISE_FIGURES: list[FigureSpec] = [
    FigureSpec(
        "accuracy_vs_lambda.png",
        "Test accuracy against the noise multiplier λ",
        "Final test accuracy of each noise regime against its noise multiplier λ, one panel per learning-rate "
        "rule: dots are seeds, markers the mean with its 95% t interval, stars the temperature-calibrated λ "
        "(0 under linear scaling, so the λ axis is ordered, not logarithmic). Dashed lines and bands: SB and "
        "the LB+GBN baseline of the same rule, mean and 95% t interval over seeds.",
        fig_accuracy_vs_lambda,
        intervals=False,  # the caption says what its bands are
    ),
    FigureSpec(
        "accuracy_vs_tau.png",
        "Test accuracy against the measured noise temperature τ",
        "Final test accuracy of each run against its noise temperature τ relative to small-batch SGD, as "
        "measured in its last diagnostics row (log scale; τ = 1 is SB's temperature). One point per run.",
        fig_accuracy_vs_tau,
        intervals=False,
    ),
]
