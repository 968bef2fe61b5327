"""What every figure shares: its spec, the PNG it becomes, the regime order and colours, and panel grids.

Figures (``analysis.figures``, ``analysis.noise_figures``) draw one panel per (dataset, network) on an Agg
canvas; a figure whose data no run provides raises ``NoData`` with the reason, never an error.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pandas as pd
import seaborn as sns
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from analysis.load import Loaded
from analysis.stats import ci_band
from analysis.variants import REGIME_NAMES


class NoData(Exception):
    """The runs hold nothing this figure plots; the message says what is missing."""


@dataclass(frozen=True)
class FigureSpec:
    name: str  # PNG file name
    title: str
    caption: str
    draw: Callable[[Loaded], Figure]
    intervals: bool = True  # bands and bars are the 95% t interval over seeds (the report says so)


def png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def label_order(runs: pd.DataFrame) -> list[str]:
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


def palette(labels: list[str]) -> dict[str, Any]:
    """A distinct colour per label (tab10, tab20 beyond 10 labels, husl beyond 20)."""
    name = "tab10" if len(labels) <= 10 else "tab20" if len(labels) <= 20 else "husl"
    return dict(zip(labels, sns.color_palette(name, n_colors=max(len(labels), 1))))


def panels(df: pd.DataFrame, keys: list[str]) -> list[tuple[str, pd.DataFrame]]:
    return [
        (" / ".join(map(str, k if isinstance(k, tuple) else (k,))), g)
        for k, g in df.groupby(keys if len(keys) > 1 else keys[0], sort=True)
    ]


def hued(ax: Any, hue: str, order: list[str], palette: Any = "tab10") -> dict[str, Any]:
    """The seaborn arguments every plot shares: colours by ``hue`` in ``order``; bands and bars: ``ci_band``."""
    return {"hue": hue, "hue_order": order, "palette": palette, "errorbar": ci_band, "ax": ax}


def grid(n: int, width: float = 5.0, height: float = 3.6) -> tuple[Figure, list[Any]]:
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(width * cols, height * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel().tolist()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]
