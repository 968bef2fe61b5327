"""The toy's pictures, rendered to PNG bytes with the Agg canvas (no pyplot, no global state).

matplotlib and seaborn are imported inside the drawing functions, so the rest of the toy loads without them.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from typing import Any

import numpy as np

from hpcnoise.toy.model import Array, Noise, loss, noise_factor, stationary_loss
from hpcnoise.toy.simulate import BoundCheck, OneStep

__all__ = ["draw_one_step", "draw_theorem", "draw_trajectories"]


_TITLES = {
    Noise.NONE: "No noise",
    Noise.ISOTROPIC: "Isotropic Gaussian",
    Noise.FULL: "Full Fisher, $C=\\sqrt{A}$",
    Noise.DIAG: "Diagonal Fisher, $C=\\sqrt{\\mathrm{diag}\\,A}$",
}


def _png(fig: Any) -> bytes:
    """A matplotlib Figure as PNG bytes (120 dpi, tight box), drawn on its own Agg canvas."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    return buf.getvalue()


def _contours(ax: Any, a: Array, lo: Array, hi: Array, levels: int = 12) -> None:
    """Loss contours over the box lo..hi, levels spaced geometrically so the valley floor shows."""
    gx, gy = np.meshgrid(np.linspace(lo[0], hi[0], 200), np.linspace(lo[1], hi[1], 200))
    vals = loss(a, np.stack([gx, gy], axis=-1))
    top = float(vals.max())
    ax.contour(gx, gy, vals, levels=top * np.geomspace(1e-3, 1.0, levels), colors="0.7", linewidths=0.7)


def _box(points: Array, pad: float) -> tuple[Array, Array]:
    """Corners (lo, hi) of a square box around the points, its side the larger span times pad."""
    lo, hi = points.min(axis=0), points.max(axis=0)
    span = float(np.max(hi - lo)) * pad + 1e-9
    mid = (lo + hi) / 2
    return mid - span / 2, mid + span / 2


def draw_one_step(a: Array, step: OneStep, sigma: float) -> bytes:
    """Fig. 1: four panels, each the start point, the noiseless step and the cloud of noisy end points."""
    import seaborn as sns
    from matplotlib.figure import Figure

    panels = [
        ("sgd", "(a) SGD step"),
        ("isotropic", f"(b) Isotropic Gaussian ($\\sigma$ = {sigma:g})"),
        ("full", "(c) Full Fisher"),
        ("diag", "(d) Diagonal Fisher"),
    ]
    every = np.concatenate([step.start[None], *step.clouds.values()])
    lo, hi = _box(every, pad=1.15)
    color = sns.color_palette("deep")[0]
    with sns.axes_style("white"):
        fig = Figure(figsize=(14, 3.8))
        axes = fig.subplots(1, 4, sharex=True, sharey=True)
        for ax, (key, title) in zip(axes, panels):
            _contours(ax, a, lo, hi, levels=16)
            pts = step.clouds[key]
            ax.scatter(pts[:, 0], pts[:, 1], s=3, alpha=0.35, color=color, linewidths=0)
            ax.annotate("", xy=step.mean_step, xytext=step.start, arrowprops={"arrowstyle": "->", "color": "k"})
            ax.plot(*step.start, "o", color="tab:blue", ms=6)
            ax.plot(*step.mean_step, "x", color="k", ms=7)
            ax.set_title(title)
            ax.set_xlim(lo[0], hi[0])
            ax.set_ylim(lo[1], hi[1])
            ax.set_aspect("equal")
            ax.set_xlabel(r"$\theta_1$")
        axes[0].set_ylabel(r"$\theta_2$")
        fig.suptitle("One step from the blue point (x: noiseless step, dots: noisy end points)", y=1.02)
        return _png(fig)


def draw_trajectories(
    a: Array, paths: Mapping[Noise, Array], every: int, traces: Mapping[Noise, float], lr: float
) -> bytes:
    """Fig. 2: full versus diagonal Fisher trajectories over the loss contours, every `every` iterates.

    Titles give the run's final loss and the stationary E[L] at this constant lr (stationary_loss)."""
    import seaborn as sns
    from matplotlib.figure import Figure

    lo, hi = _box(np.concatenate(list(paths.values())), pad=1.1)
    palette = sns.color_palette("deep")
    with sns.axes_style("white"):
        fig = Figure(figsize=(11, 5))
        axes = fig.subplots(1, 2, sharex=True, sharey=True)
        for ax, kind in zip(axes, (Noise.FULL, Noise.DIAG)):
            _contours(ax, a, lo, hi, levels=14)
            ref = paths[Noise.NONE][::every]
            ax.plot(ref[:, 0], ref[:, 1], "--", color="0.5", lw=1, label="no noise")
            pts = paths[kind][::every]
            ax.plot(pts[:, 0], pts[:, 1], "-o", color=palette[3], lw=0.8, ms=2.5, label=f"every {every} iterates")
            ax.plot(*pts[0], "o", color="tab:blue", ms=9, label="start")
            ax.plot(*paths[kind][-1], "o", color="tab:green", ms=9, label="end")
            final = float(loss(a, paths[kind][-1]))
            expected = stationary_loss(a, noise_factor(a, kind), lr)
            ax.set_title(
                f"{_TITLES[kind]}, Tr$(C^TAC)$ = {traces[kind]:.4g}\n$L(\\theta_{{end}})$ = {final:.3f}, "
                f"stationary $E[L]$ = {expected:.3f}",
                fontsize=11,
            )
            ax.set_xlim(lo[0], hi[0])
            ax.set_ylim(lo[1], hi[1])
            ax.set_aspect("equal")
            ax.set_xlabel(r"$\theta_1$")
        axes[0].set_ylabel(r"$\theta_2$")
        axes[1].legend(loc="upper right", fontsize=8)
        return _png(fig)


def draw_theorem(checks: Mapping[Noise, BoundCheck]) -> bytes:
    """E[L(theta_k)] (Monte-Carlo with z-SE band, exact) against the bound nu / (k + gamma), log-log."""
    import seaborn as sns
    from matplotlib.figure import Figure

    palette = sns.color_palette("deep")
    with sns.axes_style("whitegrid"):
        fig = Figure(figsize=(7, 4.5))
        ax = fig.subplots()
        for color, (kind, chk) in zip((palette[3], palette[0]), checks.items()):
            k = np.arange(1, len(chk.mean))
            m, s = chk.mean[1:], chk.se[1:]
            ax.fill_between(k, np.clip(m - chk.z * s, 1e-12, None), m + chk.z * s, color=color, alpha=0.25, lw=0)
            ax.plot(k, m, color=color, lw=1.2, label=f"{kind.value}: Monte-Carlo E[L] $\\pm$ {chk.z:g} SE")
            ax.plot(k, chk.exact[1:], ":", color="k", lw=0.8)
            ax.plot(k, chk.bound[1:], "--", color=color, lw=1.2, label=f"{kind.value}: bound $\\nu/(k+\\gamma)$")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("iteration k")
        ax.set_ylabel(r"$E[L(\theta_k)]$")
        ax.set_title(r"Theorem 3.1, $a_k = 2/((k+\gamma)\lambda_{min})$ (dotted: exact)")
        ax.legend(fontsize=8)
        return _png(fig)
