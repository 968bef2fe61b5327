"""The paper's Figures 3a-d and 4 from loaded runs, drawn with seaborn on Agg canvases into PNG bytes.

Curves are the mean over seeds with a 95% Student-t band (``analysis.tables.ci_band``, the tables' interval);
bars carry the same interval. One panel per (dataset, network). A figure whose data no run provides is skipped
with the reason (``NoData``), never an error. Figures are rendered in memory; ``analysis.report`` writes them.

``FIGURES`` are the paper's; ``NOISE_FIGURES`` answer the calibration question (test accuracy against the noise
multiplier lambda, and against the measured noise temperature tau); ``ALL_FIGURES`` is what the report draws.
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pandas as pd
import seaborn as sns
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

from analysis.load import NOISE_FREE, REGIME_NAMES, Loaded, label
from analysis.tables import ci_band, mean_ci, per_seed


class NoData(Exception):
    """The runs hold nothing this figure plots; the message says what is missing."""


@dataclass(frozen=True)
class FigureSpec:
    name: str  # PNG file name
    title: str
    caption: str
    draw: Callable[[Loaded], Figure]
    intervals: bool = True  # bands and bars are the 95% t interval over seeds (the report says so)


def _png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def _natural(text: str) -> list[Any]:
    """Sort key that puts layer2 before layer10."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(text))]


def _label_order(runs: pd.DataFrame) -> list[str]:
    """Regime labels in the paper's order: SB, LB, DiagF, ..., plain before GBN, linear before sqrt."""
    regimes = list(REGIME_NAMES)
    first = runs.drop_duplicates("label")

    def key(row: pd.Series) -> tuple[int, str, bool, str, str, float]:
        idx = regimes.index(row["regime"]) if row["regime"] in regimes else len(regimes)
        lam = row.get("noise_multiplier", 1.0)
        lam = float(lam) if isinstance(lam, (int, float)) and math.isfinite(lam) else 1.0
        calibration = str(row.get("noise_calibration", "paper"))
        return (idx, row["regime"], bool(row["gbn"]), row["lr_scaling"], calibration, lam)

    return [r["label"] for _, r in sorted(first.iterrows(), key=lambda item: key(item[1]))]


def _palette(labels: list[str]) -> dict[str, Any]:
    """A distinct colour per label (tab10, tab20 beyond 10 labels, husl beyond 20)."""
    name = "tab10" if len(labels) <= 10 else "tab20" if len(labels) <= 20 else "husl"
    return dict(zip(labels, sns.color_palette(name, n_colors=max(len(labels), 1))))


def _panels(df: pd.DataFrame, keys: list[str]) -> list[tuple[str, pd.DataFrame]]:
    return [
        (" / ".join(map(str, k if isinstance(k, tuple) else (k,))), g)
        for k, g in df.groupby(keys if len(keys) > 1 else keys[0], sort=True)
    ]


def _hued(ax: Any, hue: str, order: list[str], palette: Any = "tab10") -> dict[str, Any]:
    """The seaborn arguments every plot shares: colours by ``hue`` in ``order``; bands and bars: ``ci_band``."""
    return {"hue": hue, "hue_order": order, "palette": palette, "errorbar": ci_band, "ax": ax}


def _grid(n: int, width: float = 5.0, height: float = 3.6) -> tuple[Figure, list[Any]]:
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(width * cols, height * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel().tolist()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


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
    order = _label_order(loaded.runs)
    palette = _palette(order)
    panels = _panels(df.assign(Regime=df["label"]), ["dataset", "model"])
    fig, axes = _grid(len(panels))
    for ax, (name, data) in zip(axes, panels):
        present = [lab for lab in order if lab in set(data["Regime"])]
        # markers, so that one-point curves show
        sns.lineplot(
            data=data, x=x, y=y, style=style, marker="o", markersize=4, **_hued(ax, "Regime", present, palette)
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
    panels = _panels(df, ["dataset", "model", "label"])
    measured = sorted(
        df["measured"].unique(),
        key=lambda m: (list(REGIME_NAMES).index(m) if m in REGIME_NAMES else len(REGIME_NAMES), m),
    )
    fig, axes = _grid(len(panels), width=6.0)
    for ax, (name, data) in zip(axes, panels):
        layers, total = _some_layers(data["layer"].unique())
        shown_layers = data[data["layer"].isin(layers)]
        sns.barplot(data=shown_layers, x="layer", y="variance", order=layers, **_hued(ax, "measured", measured))
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
    order = [lab for lab in _label_order(runs) if lab in set(df["label"])]
    fig = Figure(figsize=(max(5.0, 2.2 * df["panel"].nunique() + 2), 3.8), layout="constrained")
    ax = fig.subplots()
    sns.barplot(data=df, x="panel", y="max_eigenvalue", **_hued(ax, "label", order, _palette(_label_order(runs))))
    ax.set(xlabel="", ylabel="max Hessian eigenvalue", title="Fig. 3d: maximum eigenvalue of the final model")
    ax.legend(fontsize="small", title=None)
    return fig


def fig4_val_error(loaded: Loaded) -> Figure:
    return _error_curves(
        loaded, "test_error", "epoch", "epoch", "validation error (%)", "Fig. 4: validation error vs epochs"
    )


# --- the calibration question: accuracy against lambda and against the measured temperature -------------------
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


def fig_accuracy_vs_lambda(loaded: Loaded) -> Figure:
    """Test accuracy against lambda, one panel per (dataset, network, LR rule); SB and LB as bands."""
    runs = loaded.runs
    noisy = runs[~runs["regime"].isin(NOISE_FREE)] if not runs.empty else runs
    if noisy.empty:
        raise NoData("no finished run of a noise regime")
    varied = (noisy["noise_multiplier"] != 1.0) | (noisy["noise_calibration"] != "paper")
    if not varied.any():
        raise NoData("no run with a noise multiplier other than the paper's lambda = 1 (noise_multiplier)")
    noisy = noisy.assign(series=[label(r, g, k) for r, g, k in zip(noisy["regime"], noisy["gbn"], noisy["lr_scaling"])])
    panels = list(noisy.groupby(["dataset", "model", "lr_scaling"], sort=True))
    fig, axes = _grid(len(panels), width=5.8, height=4.0)
    for ax, ((dataset, model, rule), data) in zip(axes, panels):
        lams = sorted(data["noise_multiplier"].unique())
        where = {lam: i for i, lam in enumerate(lams)}
        series = [s for s in _label_order(data.assign(label=data["series"])) if s in set(data["series"])]
        palette = _palette(series)
        handles: list[Any] = []
        for j, name in enumerate(series):
            shift = 0.1 * (j - (len(series) - 1) / 2)  # dodge the series apart
            line_x, line_y = [], []
            for (lam, calibration), cell in data[data["series"] == name].groupby(
                ["noise_multiplier", "noise_calibration"]
            ):
                values = list(per_seed(cell, "test_accuracy"))
                est = mean_ci(values)
                x = where[lam] + shift
                ax.scatter([x] * len(values), values, color=palette[name], s=9, alpha=0.35, lw=0)
                temperature = calibration == "temperature"
                ax.errorbar(
                    x,
                    est.mean,
                    yerr=est.half or 0.0,
                    color=palette[name],
                    marker="*" if temperature else "o",
                    markersize=11 if temperature else 6,
                    markeredgecolor="black" if temperature else palette[name],
                    capsize=3,
                    ls="none",
                )
                if calibration == "paper":
                    line_x.append(x)
                    line_y.append(est.mean)
            ax.plot(line_x, line_y, color=palette[name], lw=1.0, alpha=0.8)
            handles.append(Line2D([], [], color=palette[name], marker="o", label=name))
        if (data["noise_calibration"] == "temperature").any():
            handles.append(
                Line2D(
                    [],
                    [],
                    color="white",
                    marker="*",
                    markersize=11,
                    markeredgecolor="black",
                    markerfacecolor="0.6",
                    label="temperature-calibrated λ",
                )  # fmt: skip
            )
        sb, lb, lb_name = _baselines(runs, dataset, model, rule)
        for values, colour, name in ((sb, _SB_COLOUR, "SB"), (lb, _LB_COLOUR, lb_name)):
            handle = _band(ax, values, colour, name)
            if handle is not None:
                handles.append(handle)
        temp_at = set(data.loc[data["noise_calibration"] == "temperature", "noise_multiplier"])
        ax.set_xticks(range(len(lams)), [f"{lam:.3g}" + ("\n(temp.)" if lam in temp_at else "") for lam in lams])
        ax.set_xlim(-0.6, len(lams) - 0.4)
        ax.set(
            title=f"{dataset} / {model}, {rule} LR scaling",
            xlabel="noise multiplier λ (ordered, not to scale)",
            ylabel="test accuracy (%)",
        )
        ax.legend(handles=handles, fontsize="x-small", loc="best")
    fig.suptitle("Test accuracy against the noise multiplier λ")
    return fig


def fig_accuracy_vs_tau(loaded: Loaded) -> Figure:
    """Test accuracy against the measured temperature ratio tau, one point per run, one panel per pair."""
    runs = loaded.runs
    if runs.empty or "tau" not in runs or not (runs["tau"].astype(float) > 0).any():
        raise NoData('no run has a measured temperature (a "temperature" entry with tau > 0 in diagnostics.jsonl)')
    df = runs[runs["tau"].astype(float) > 0]
    order = [lab for lab in _label_order(runs) if lab in set(df["label"])]
    palette = _palette(order)
    panels = _panels(df, ["dataset", "model"])
    fig, axes = _grid(len(panels), width=7.0, height=4.2)
    for ax, (name, data) in zip(axes, panels):
        present = [lab for lab in order if lab in set(data["label"])]
        sns.scatterplot(
            data=data, x="tau", y="test_accuracy", hue="label", hue_order=present, palette=palette, s=40, ax=ax
        )
        ax.set_xscale("log")
        ax.axvline(1.0, color="0.4", ls=":", lw=1.0, label="τ = 1 (SB's temperature)")
        ax.set(
            title=name, xlabel="measured noise temperature τ (relative to SB, log scale)", ylabel="test accuracy (%)"
        )
        ax.legend(fontsize="x-small", title=None, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.suptitle("Test accuracy against the measured noise temperature τ")
    return fig


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
ALL_FIGURES: list[FigureSpec] = [*FIGURES, *NOISE_FIGURES]


def render(loaded: Loaded, specs: list[FigureSpec] | None = None) -> tuple[dict[str, bytes], dict[str, str]]:
    """({file name: PNG bytes} of the figures drawn, {file name: why skipped} of the others) of ``specs``
    (default: the paper's ``FIGURES``; the report draws ``ALL_FIGURES``)."""
    drawn: dict[str, bytes] = {}
    skipped: dict[str, str] = {}
    for spec in FIGURES if specs is None else specs:
        try:
            drawn[spec.name] = _png(spec.draw(loaded))
        except NoData as e:
            skipped[spec.name] = str(e)
    return drawn, skipped
