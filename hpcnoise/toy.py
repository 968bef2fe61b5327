"""The 2-D convex quadratic toy of Section 3: full versus diagonal Fisher noise (Figs. 1-2, Theorem 3.1).

L(theta) = theta^T A theta / 2 and the noisy iteration theta <- theta - a_k A theta + a_k C xi, xi ~ N(0, I).
Fisher and Hessian coincide here (both are A), so "full Fisher" noise is C = sqrt(A) and "diagonal Fisher"
noise is C = sqrt(diag A). The paper gives no numbers for its toy; ours is ToyConfig below.

What is computed, each as data that tests check:
- Tr(C^T A C), the term Theorem 3.1 says separates the two choices, against its closed forms.
- Trajectories at a constant learning rate (Fig. 2) and one-step noise clouds (Fig. 1).
- E[L(theta_k)] under the theorem's schedule a_k = 2 / ((k + gamma) lambda_min), three ways: Monte-Carlo over
  independent chains (vectorised over chains), the exact moment recursion, and the bound nu / (k + gamma).
- The constant-learning-rate stationary loss, by Monte-Carlo with paired noise and in closed form.
"""

from __future__ import annotations

import argparse
import enum
import io
import json
import math
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

Array = NDArray[np.float64]

FIG1_NAME = "toy_fig1_one_step.png"
FIG2_NAME = "toy_fig2_trajectories.png"
THEOREM_NAME = "toy_theorem.png"
JSON_NAME = "toy.json"

# Independent random streams, one per use, so that changing one experiment never shifts another's draws.
_STREAMS = {"data": 0, "one_step": 1, "trajectory": 2, "theorem": 3, "stationary": 4}


class ToyError(ValueError):
    """Bad input to the toy (reported as one line by main)."""


class Noise(str, enum.Enum):
    """The noise matrices C of the pictures and the theorem check."""

    NONE = "none"
    ISOTROPIC = "isotropic"
    FULL = "full"
    DIAG = "diag"


@dataclass(frozen=True)
class ToyConfig:
    """Every number the toy uses; written into toy.json."""

    # Ill-conditioned, strongly correlated SPD matrix: eigenvalues 4 -/+ sqrt(13) = 0.394, 7.606 (condition
    # 19.3), correlation 3 / sqrt(12) = 0.87, and diag A = (2, 6) is not isotropic, so the diagonal-Fisher
    # noise differs from both the full-Fisher and the isotropic noise.
    a: tuple[tuple[float, float], tuple[float, float]] = ((2.0, 3.0), (3.0, 6.0))
    theta0: tuple[float, float] = (-3.0, 2.5)  # start of Fig. 2 and of the theorem check; L = 5.25
    lr: float = 0.1  # Fig. 2: constant learning rate; lr * lambda_max = 0.76 < 2, so the iteration is stable
    steps: int = 500  # Fig. 2 and the theorem check: iterations
    plot_every: int = 10  # Fig. 2 draws every 10th iterate
    sigma: float = 0.1  # Fig. 1(b): isotropic noise C = sigma I, added to the gradient as in Eqn. 2
    # Fig. 1: a regression data set with exactly this loss; one-step clouds start at theta_one_step.
    n_data: int = 4096  # M_L: the large batch is the whole data set
    batch: int = 128  # M_S: the small batch whose SGD noise the Fisher noise models
    theta_one_step: tuple[float, float] = (-0.5, 0.5)
    draws: int = 1000  # points per one-step cloud
    z: float = 3.0  # Monte-Carlo margin in standard errors
    chains: int = 10000
    seed: int = 0

    @property
    def matrix(self) -> Array:
        return np.array(self.a, dtype=np.float64)


# ----------------------------------------------------------------------------------------------------------
# Matrices and traces


def _spd_eigh(a: Array) -> tuple[Array, Array]:
    """Eigen-decomposition of a symmetric positive-definite matrix; raises ToyError otherwise."""
    if a.ndim != 2 or a.shape[0] != a.shape[1] or not np.allclose(a, a.T, rtol=0.0, atol=1e-12):
        raise ToyError("A must be a symmetric square matrix")
    w, v = np.linalg.eigh(a)
    if w[0] <= 0.0:
        raise ToyError(f"A must be positive definite (smallest eigenvalue {w[0]:.3g})")
    return w, v


def sqrt_psd(a: Array) -> Array:
    """Symmetric square root V sqrt(W) V^T of a symmetric positive semi-definite matrix."""
    w, v = np.linalg.eigh(a)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


_NOISE_FACTORS: dict[Noise, Callable[[Array, float], Array]] = {
    Noise.NONE: lambda a, sigma: np.zeros_like(a),
    Noise.ISOTROPIC: lambda a, sigma: sigma * np.eye(a.shape[0]),
    Noise.FULL: lambda a, sigma: sqrt_psd(a),
    Noise.DIAG: lambda a, sigma: np.diag(np.sqrt(np.diag(a))),
}


def noise_factor(a: Array, kind: Noise, sigma: float = 0.1) -> Array:
    """The matrix C of the noise C xi: 0, sigma I, sqrt(A) or sqrt(diag A)."""
    return _NOISE_FACTORS[Noise(kind)](a, sigma)


def noise_trace(a: Array, c: Array) -> float:
    """Tr(C^T A C) = E ||C xi||_A^2, the noise term of Theorem 3.1."""
    return float(np.trace(c.T @ a @ c))


def trace_closed_forms(a: Array, sigma: float = 0.1) -> dict[Noise, float]:
    """Closed forms of Tr(C^T A C).

    full: Tr(sqrt(A) A sqrt(A)) = Tr(A^2) = ||A||_F^2 (A symmetric).
    diag: with D = diag A, Tr(sqrt(D) A sqrt(D)) = Tr(A D) = sum_i A_ii D_ii = sum_i A_ii^2 = ||diag A||_F^2;
          only the diagonal of A enters, so full - diag = sum_{i != j} A_ij^2.
    isotropic: sigma^2 Tr(A).
    """
    return {
        Noise.NONE: 0.0,
        Noise.ISOTROPIC: sigma**2 * float(np.trace(a)),
        Noise.FULL: float(np.sum(a * a)),
        Noise.DIAG: float(np.sum(np.diag(a) ** 2)),
    }


def loss(a: Array, theta: Array) -> Array:
    """L(theta) = theta^T A theta / 2 over the last axis."""
    return 0.5 * np.sum((theta @ a) * theta, axis=-1)


# ----------------------------------------------------------------------------------------------------------
# Schedules and the bound of Theorem 3.1


def constant_lrs(lr: float, steps: int) -> Array:
    """a_k = lr for k = 0 .. steps - 1."""
    return np.full(steps, float(lr))


def theorem_gamma(a: Array) -> float:
    """Smallest gamma with a_0 = 2 / (gamma lambda_min) <= 1 / lambda_max, i.e. gamma = 2 lambda_max / lambda_min."""
    w, _ = _spd_eigh(a)
    return 2.0 * float(w[-1] / w[0])


def theorem_lrs(a: Array, steps: int) -> Array:
    """a_k = 2 / ((k + gamma) lambda_min) for k = 0 .. steps - 1; a_k <= a_0 = 1 / lambda_max."""
    w, _ = _spd_eigh(a)
    return 2.0 / ((np.arange(steps) + theorem_gamma(a)) * w[0])


def theorem_nu(a: Array, c: Array, theta0: Array) -> float:
    """nu = max(2 Tr(C^T A C) / lambda_min^2, gamma L(theta_0)).

    From E[L_{k+1}] <= (1 - a_k lambda_min) E[L_k] + a_k^2 Tr(C^T A C) / 2: with a_k = 2 / ((k + gamma)
    lambda_min) the induction step needs nu >= 2 Tr(C^T A C) / lambda_min^2 and the base case L_0 <= nu / gamma.
    """
    w, _ = _spd_eigh(a)
    return max(2.0 * noise_trace(a, c) / w[0] ** 2, theorem_gamma(a) * float(loss(a, theta0)))


def theorem_bound(a: Array, c: Array, theta0: Array, steps: int) -> Array:
    """nu / (k + gamma) for k = 0 .. steps."""
    return theorem_nu(a, c, theta0) / (np.arange(steps + 1, dtype=np.float64) + theorem_gamma(a))


# ----------------------------------------------------------------------------------------------------------
# Exact moments and closed forms


def exact_loss_curve(a: Array, c: Array, theta0: Array, lrs: Array) -> Array:
    """E[L(theta_k)] for k = 0 .. len(lrs), exactly, from the mean and covariance recursion.

    m_{k+1} = M_k m_k, S_{k+1} = M_k S_k M_k^T + a_k^2 C C^T with M_k = I - a_k A;
    E[L_k] = (m_k^T A m_k + Tr(A S_k)) / 2.
    """
    d = a.shape[0]
    q = c @ c.T
    m = np.asarray(theta0, dtype=np.float64).copy()
    s = np.zeros((d, d))
    out = np.empty(len(lrs) + 1)
    for k, lr in enumerate(lrs):
        out[k] = 0.5 * (m @ a @ m + np.sum(a * s))
        step = np.eye(d) - lr * a
        m = step @ m
        s = step @ s @ step.T + lr**2 * q
    out[len(lrs)] = 0.5 * (m @ a @ m + np.sum(a * s))
    return out


def _noise_in_eigenbasis(a: Array, c: Array) -> tuple[Array, Array]:
    """Eigenvalues lambda_i of A and the noise variances q_i = u_i^T C C^T u_i along its eigenvectors u_i."""
    w, v = _spd_eigh(a)
    return w, np.einsum("ji,jk,ki->i", v, c @ c.T, v)


def stationary_loss(a: Array, c: Array, lr: float) -> float:
    """lim_k E[L(theta_k)] at a constant learning rate: (lr / 2) sum_i q_i / (2 - lr lambda_i).

    In A's eigenbasis the stationary variance is lr^2 q_i / (1 - (1 - lr lambda_i)^2). Only the noise
    variances q_i along A's eigenvectors enter; sum_i q_i = Tr(C C^T) = Tr(A) for both Fisher choices, and the
    weight grows with lambda_i, so noise aligned with the steep direction (full Fisher) costs the most.
    """
    w, q = _noise_in_eigenbasis(a, c)
    if lr * w[-1] >= 2.0:
        raise ToyError(f"lr * lambda_max = {lr * w[-1]:.3g} >= 2: the iteration diverges")
    return float(0.5 * lr * np.sum(q / (2.0 - lr * w)))


def schedule_limit(a: Array, c: Array) -> float:
    """lim_k (k + gamma) E[L(theta_k)] under the theorem's schedule: sum_i 2 r_i q_i / (lambda_min (4 r_i - 1)).

    r_i = lambda_i / lambda_min. Substituting E[(u_i^T theta_k)^2] = c_i / (k + gamma) into the recursion
    v_{k+1} = (1 - a_k lambda_i)^2 v_k + a_k^2 q_i gives c_i = 4 q_i / (lambda_min^2 (4 r_i - 1)); the mean
    decays like k^(-2 r_i) and drops out. The weight 2 r / (4 r - 1) falls from 2/3 (flat direction) to 1/2
    (steep), so unlike at a constant rate, noise in the flat direction costs more here.
    """
    w, q = _noise_in_eigenbasis(a, c)
    r = w / w[0]
    return float(np.sum(2.0 * r * q / (w[0] * (4.0 * r - 1.0))))


# ----------------------------------------------------------------------------------------------------------
# Simulation


def _rng(seed: int, stream: str) -> np.random.Generator:
    """The generator of one named random stream."""
    return np.random.default_rng([seed, _STREAMS[stream]])


def trajectory(a: Array, c: Array, theta0: Array, lrs: Array, rng: np.random.Generator) -> Array:
    """One run theta_0 .. theta_K of theta <- theta - a_k A theta + a_k C xi; shape (K + 1, d)."""
    d = a.shape[0]
    xi = rng.standard_normal((len(lrs), d))  # drawn up front: the same rng gives the same xi for any C
    out = np.empty((len(lrs) + 1, d))
    out[0] = theta0
    for k, lr in enumerate(lrs):
        out[k + 1] = out[k] - lr * (a @ out[k]) + lr * (c @ xi[k])
    return out


@dataclass(frozen=True)
class MonteCarlo:
    """Loss statistics over independent chains, one row per noise matrix."""

    mean: Array  # (n_c, K + 1): mean of L(theta_k) over chains
    se: Array  # (n_c, K + 1): its standard error
    final: Array  # (n_c, chains): L(theta_K) of every chain


def monte_carlo(
    a: Array, cs: Sequence[Array], theta0: Array, lrs: Array, chains: int, rng: np.random.Generator
) -> MonteCarlo:
    """Run `chains` independent chains per noise matrix, vectorised over chains.

    Chain j sees the same xi sequence for every C (common random numbers): each row is an ordinary
    Monte-Carlo estimate, and differences between rows have a much smaller standard error.
    """
    if chains < 2:
        raise ToyError(f"chains must be at least 2 (got {chains})")
    cmat = np.stack([np.asarray(c, dtype=np.float64) for c in cs])  # (n_c, d, d)
    theta = np.broadcast_to(np.asarray(theta0, dtype=np.float64), (len(cs), chains, a.shape[0])).copy()
    mean = np.empty((len(cs), len(lrs) + 1))
    se = np.empty_like(mean)

    def record(k: int) -> Array:
        losses = loss(a, theta)
        mean[:, k] = losses.mean(axis=1)
        se[:, k] = losses.std(axis=1, ddof=1) / math.sqrt(chains)
        return losses

    final = record(0)
    for k, lr in enumerate(lrs):
        xi = rng.standard_normal((chains, a.shape[0]))
        theta += -lr * (theta @ a) + lr * np.einsum("cij,nj->cni", cmat, xi)  # row vectors; A symmetric
        final = record(k + 1)
    return MonteCarlo(mean=mean, se=se, final=final)


@dataclass(frozen=True)
class BoundCheck:
    """Theorem 3.1 for one noise matrix: Monte-Carlo and exact E[L(theta_k)] against nu / (k + gamma)."""

    kind: Noise
    gamma: float
    nu: float
    z: float
    mean: Array  # Monte-Carlo E[L(theta_k)], k = 0 .. K
    se: Array
    exact: Array  # moment recursion
    bound: Array  # nu / (k + gamma)

    @property
    def holds(self) -> bool:
        """The bound holds with margin: mean + z SE <= bound at every k."""
        return bool(np.all(self.mean + self.z * self.se <= self.bound))

    @property
    def exact_holds(self) -> bool:
        return bool(np.all(self.exact <= self.bound))

    @property
    def worst_k(self) -> int:
        """The k where the Monte-Carlo mean comes closest to the bound (largest mean / bound)."""
        return int(np.argmax(self.mean / self.bound))

    @property
    def worst_ratio(self) -> float:
        return float(self.mean[self.worst_k] / self.bound[self.worst_k])


def check_theorem(
    a: Array,
    theta0: Array,
    steps: int,
    chains: int,
    rng: np.random.Generator,
    kinds: Sequence[Noise] = (Noise.FULL, Noise.DIAG),
    z: float = 3.0,
) -> dict[Noise, BoundCheck]:
    """Theorem 3.1 by Monte-Carlo (and exactly) for each noise kind, chains sharing their xi across kinds."""
    lrs = theorem_lrs(a, steps)
    cs = [noise_factor(a, k) for k in kinds]
    mc = monte_carlo(a, cs, theta0, lrs, chains, rng)
    return {
        kind: BoundCheck(
            kind=kind,
            gamma=theorem_gamma(a),
            nu=theorem_nu(a, c, theta0),
            z=z,
            mean=mc.mean[i],
            se=mc.se[i],
            exact=exact_loss_curve(a, c, theta0, lrs),
            bound=theorem_bound(a, c, theta0, steps),
        )
        for i, (kind, c) in enumerate(zip(kinds, cs))
    }


@dataclass(frozen=True)
class Stationary:
    """E[L(theta_K)] at a constant learning rate, full versus diagonal Fisher noise, from the same xi."""

    lr: float
    steps: int
    chains: int
    z: float
    full_mean: float
    full_se: float
    full_closed: float  # stationary_loss
    diag_mean: float
    diag_se: float
    diag_closed: float
    diff_mean: float  # full - diag, per chain (paired)
    diff_se: float

    @property
    def diag_smaller(self) -> bool:
        """Diagonal-noise loss is smaller with margin: (full - diag) - z SE > 0."""
        return self.diff_mean - self.z * self.diff_se > 0.0


def compare_stationary(
    a: Array, theta0: Array, lr: float, steps: int, chains: int, rng: np.random.Generator, z: float = 3.0
) -> Stationary:
    """Final-iterate loss after `steps` constant-lr steps (by then stationary) for full and diagonal noise."""
    cs = [noise_factor(a, Noise.FULL), noise_factor(a, Noise.DIAG)]
    mc = monte_carlo(a, cs, theta0, constant_lrs(lr, steps), chains, rng)
    diff = mc.final[0] - mc.final[1]
    root = math.sqrt(chains)
    return Stationary(
        lr=lr,
        steps=steps,
        chains=chains,
        z=z,
        full_mean=float(mc.final[0].mean()),
        full_se=float(mc.final[0].std(ddof=1) / root),
        full_closed=stationary_loss(a, cs[0], lr),
        diag_mean=float(mc.final[1].mean()),
        diag_se=float(mc.final[1].std(ddof=1) / root),
        diag_closed=stationary_loss(a, cs[1], lr),
        diff_mean=float(diff.mean()),
        diff_se=float(diff.std(ddof=1) / root),
    )


# ----------------------------------------------------------------------------------------------------------
# Fig. 1: one noisy step of a regression problem with exactly this loss


def regression_data(a: Array, n: int, rng: np.random.Generator) -> tuple[Array, Array]:
    """Inputs X (n, d) and residual targets e (n,) with X^T X / n = A, X^T e = 0 and e^T e / n = 1, exactly.

    The per-sample losses (x_i^T theta - e_i)^2 / 2 then average to L(theta) + 1/2, the full-batch gradient is
    A theta, and the empirical Fisher at the optimum is close to A: Fisher and Hessian coincide, as in 3.2.
    """
    d = a.shape[0]
    q, _ = np.linalg.qr(rng.standard_normal((n, d + 1)))
    return math.sqrt(n) * q[:, :d] @ sqrt_psd(a), math.sqrt(n) * q[:, d]


@dataclass(frozen=True)
class OneStep:
    """Clouds of theta - lr (A theta + noise) from one start point, one per noise kind."""

    start: Array
    mean_step: Array  # theta - lr A theta
    clouds: dict[str, Array]  # "sgd", "isotropic", "full", "diag": (draws, d)
    fisher: Array  # empirical Fisher F = (1/n) sum_i g_i g_i^T at start
    scale: float  # s = sqrt((n - batch) / (n batch))
    rel_err_full: float  # ||Cov_SGD - s^2 F||_F / ||Cov_SGD||_F (exact covariances)
    rel_err_diag: float  # ||Cov_SGD - s^2 diag F||_F / ||Cov_SGD||_F


def one_step(
    a: Array, theta: Array, lr: float, n: int, batch: int, draws: int, sigma: float, rng: np.random.Generator
) -> OneStep:
    """Fig. 1: one SGD step (batch of `batch` out of n), and one large-batch step with isotropic, full-Fisher
    and diagonal-Fisher noise scaled as in Eqn. 5, so the Fisher clouds model the SGD one."""
    if not 0 < batch < n:
        raise ToyError(f"need 0 < batch < n (got batch={batch}, n={n})")
    x, e = regression_data(a, n, rng)
    g = x * (x @ theta - e)[:, None]  # per-sample gradients, (n, d)
    fisher = g.T @ g / n
    scale = math.sqrt((n - batch) / (n * batch))
    mean_step = theta - lr * (a @ theta)
    idx = np.argpartition(rng.random((draws, n)), batch, axis=1)[:, :batch]  # batches without replacement
    xi = rng.standard_normal((draws, a.shape[0]))
    clouds = {
        "sgd": theta - lr * g[idx].mean(axis=1),
        "isotropic": mean_step + lr * sigma * xi,
        "full": mean_step + lr * scale * xi @ sqrt_psd(fisher).T,
        "diag": mean_step + lr * scale * xi * np.sqrt(np.diag(fisher)),
    }
    # Sampling `batch` of n without replacement: Cov(g_B) = (n - batch) / (batch (n - 1)) Cov_i(g_i).
    cov_sgd = (n - batch) / (batch * (n - 1)) * np.cov(g.T, bias=True)
    norm = float(np.linalg.norm(cov_sgd))
    return OneStep(
        start=np.asarray(theta, dtype=np.float64),
        mean_step=mean_step,
        clouds=clouds,
        fisher=fisher,
        scale=scale,
        rel_err_full=float(np.linalg.norm(cov_sgd - scale**2 * fisher)) / norm,
        rel_err_diag=float(np.linalg.norm(cov_sgd - scale**2 * np.diag(np.diag(fisher)))) / norm,
    )


# ----------------------------------------------------------------------------------------------------------
# Pictures (rendered to PNG bytes with the Agg canvas; no pyplot, no global state)


_TITLES = {
    Noise.NONE: "No noise",
    Noise.ISOTROPIC: "Isotropic Gaussian",
    Noise.FULL: "Full Fisher, $C=\\sqrt{A}$",
    Noise.DIAG: "Diagonal Fisher, $C=\\sqrt{\\mathrm{diag}\\,A}$",
}


def _png(fig: Any) -> bytes:
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


# ----------------------------------------------------------------------------------------------------------
# Running, writing, reporting


def _git_hash() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return (out.stdout.strip() or None) if out.returncode == 0 else None


def _check_out_dir(out_dir: Path) -> None:
    """Fail early, before any work, when out_dir cannot be a writable directory."""
    probe = out_dir
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise ToyError(f"cannot write to {out_dir}: {probe} is not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ToyError(f"cannot write to {out_dir}: {probe} is not writable")


def _write_atomically(files: Mapping[Path, bytes]) -> None:
    """Write every file to a temporary name in its directory, then os.replace them all; on error remove temps.

    Renames happen in the mapping's order; run() puts toy.json last, so its presence marks a complete run."""
    staged: list[tuple[Path, Path]] = []
    try:
        for path, data in files.items():
            fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            staged.append((Path(tmp_name), path))
            os.fchmod(fd, 0o644)  # mkstemp creates 0600; results are meant to be read by others
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
        for staged_tmp, target in staged:
            os.replace(staged_tmp, target)
    except BaseException:
        for staged_tmp, _ in staged:
            staged_tmp.unlink(missing_ok=True)
        raise


def _validate(cfg: ToyConfig) -> None:
    if cfg.chains < 2:
        raise ToyError(f"--chains must be an integer >= 2 (got {cfg.chains})")
    if cfg.seed < 0:
        raise ToyError(f"--seed must be a non-negative integer (got {cfg.seed})")
    _spd_eigh(cfg.matrix)


def _curve(x: Array) -> list[float]:
    return [float(v) for v in x]


def run(out_dir: Path, chains: int = ToyConfig.chains, seed: int = ToyConfig.seed) -> dict[str, Any]:
    """Compute everything, write the three PNGs and toy.json into out_dir, and return toy.json's content."""
    cfg = ToyConfig(chains=chains, seed=seed)
    _validate(cfg)
    out_dir = Path(out_dir)
    _check_out_dir(out_dir)
    a, theta0 = cfg.matrix, np.array(cfg.theta0)
    w, _ = _spd_eigh(a)

    closed = trace_closed_forms(a, cfg.sigma)
    cs = {kind: noise_factor(a, kind, cfg.sigma) for kind in Noise}
    traces = {kind: noise_trace(a, c) for kind, c in cs.items()}

    lrs = constant_lrs(cfg.lr, cfg.steps)
    # A fresh generator of the same stream per kind: all four runs see the same xi, only C differs.
    paths = {kind: trajectory(a, c, theta0, lrs, _rng(cfg.seed, "trajectory")) for kind, c in cs.items()}
    checks = check_theorem(a, theta0, cfg.steps, cfg.chains, _rng(cfg.seed, "theorem"), z=cfg.z)
    stat = compare_stationary(a, theta0, cfg.lr, cfg.steps, cfg.chains, _rng(cfg.seed, "stationary"), z=cfg.z)
    step = one_step(
        a,
        np.array(cfg.theta_one_step),
        cfg.lr,
        cfg.n_data,
        cfg.batch,
        cfg.draws,
        cfg.sigma,
        _rng(cfg.seed, "data"),
    )

    files = {
        out_dir / FIG1_NAME: draw_one_step(a, step, cfg.sigma),
        out_dir / FIG2_NAME: draw_trajectories(a, paths, cfg.plot_every, traces, cfg.lr),
        out_dir / THEOREM_NAME: draw_theorem(checks),
    }
    summary: dict[str, Any] = {
        "config": asdict(cfg),
        "matrix": {
            "A": a.tolist(),
            "eigenvalues": w.tolist(),
            "condition": float(w[-1] / w[0]),
            "loss_theta0": float(loss(a, theta0)),
        },
        "traces": {kind.value: {"value": traces[kind], "closed_form": closed[kind]} for kind in Noise},
        "theorem": {
            "gamma": theorem_gamma(a),
            "a0": float(theorem_lrs(a, 1)[0]),
            "steps": cfg.steps,
            **{
                kind.value: {
                    "nu": chk.nu,
                    "holds": chk.holds,
                    "exact_holds": chk.exact_holds,
                    "worst_k": chk.worst_k,
                    "worst_ratio": chk.worst_ratio,
                    "final": {
                        "mean": float(chk.mean[-1]),
                        "se": float(chk.se[-1]),
                        "exact": float(chk.exact[-1]),
                        "bound": float(chk.bound[-1]),
                    },
                    "limit_k_times_loss": schedule_limit(a, cs[kind]),
                    "curve": {
                        "mean": _curve(chk.mean),
                        "se": _curve(chk.se),
                        "exact": _curve(chk.exact),
                        "bound": _curve(chk.bound),
                    },
                }
                for kind, chk in checks.items()
            },
        },
        "stationary": {**asdict(stat), "diag_smaller": stat.diag_smaller},
        "one_step": {
            "start": step.start.tolist(),
            "fisher": step.fisher.tolist(),
            "scale": step.scale,
            "rel_err_full": step.rel_err_full,
            "rel_err_diag": step.rel_err_diag,
        },
        "trajectories": {kind.value: path[:: cfg.plot_every].tolist() for kind, path in paths.items()},
        "provenance": {"git": _git_hash(), "numpy": np.__version__, "python": sys.version.split()[0]},
    }
    json_path = out_dir / JSON_NAME
    summary["files"] = [str(p) for p in [*files, json_path]]
    files[json_path] = (json.dumps(summary, indent=1, allow_nan=False) + "\n").encode()
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_atomically(files)
    return summary


def format_summary(summary: Mapping[str, Any]) -> str:
    """A short readable account of toy.json."""
    cfg, mat, tr, th, st = (summary[k] for k in ("config", "matrix", "traces", "theorem", "stationary"))
    one = summary["one_step"]
    lines = [
        (
            f"A = {mat['A']}, eigenvalues {mat['eigenvalues'][0]:.4f}, {mat['eigenvalues'][1]:.4f} "
            f"(condition {mat['condition']:.2f}); theta0 = {list(cfg['theta0'])}, "
            f"L(theta0) = {mat['loss_theta0']:.4g}"
        ),
        "Tr(C^T A C):",
        (
            f"  full  C = sqrt(A)      : {tr['full']['value']:.12g}  "
            f"(Tr(A^2) = ||A||_F^2 = {tr['full']['closed_form']:.12g})"
        ),
        (
            f"  diag  C = sqrt(diag A) : {tr['diag']['value']:.12g}  "
            f"(Tr(A diag A) = sum_i A_ii^2 = ||diag A||_F^2 = {tr['diag']['closed_form']:.12g})"
        ),
        (
            f"  isotropic C = {cfg['sigma']:g} I  : {tr['isotropic']['value']:.12g}  "
            f"(sigma^2 Tr A = {tr['isotropic']['closed_form']:.12g})"
        ),
        (
            f"Theorem 3.1: a_k = 2/((k+gamma) lambda_min), gamma = {th['gamma']:.4f} "
            f"(a_0 = {th['a0']:.4f} = 1/lambda_max), K = {th['steps']}, {cfg['chains']} chains, "
            f"margin {cfg['z']:g} SE"
        ),
    ]
    for kind in ("full", "diag"):
        c = th[kind]
        f = c["final"]
        verdict = "HOLDS" if c["holds"] and c["exact_holds"] else "VIOLATED"
        lines.append(
            f"  {kind:4s}: nu = {c['nu']:.2f}; bound {verdict} (MC mean + {cfg['z']:g} SE <= bound at every k, "
            f"exact too); closest at k = {c['worst_k']}: mean/bound = {c['worst_ratio']:.3f}; "
            f"E[L_K] = {f['mean']:.5f} +- {f['se']:.5f} (exact {f['exact']:.5f}) vs bound {f['bound']:.4f}; "
            f"lim (k+gamma) E[L_k] = {c['limit_k_times_loss']:.3f}"
        )
    lower = min(("full", "diag"), key=lambda kind: th[kind]["final"]["exact"])
    lines.append(
        f"  at K the schedule favours {lower} noise (exact E[L_K]); the bound's Tr(C^T A C) ranks diag first, "
        "but it is an upper bound, not the rate"
    )
    smaller = "smaller" if st["diag_smaller"] else "NOT smaller"
    lines += [
        f"Constant lr {st['lr']:g}, L(theta_{st['steps']}) over {st['chains']} paired chains:",
        (
            f"  full {st['full_mean']:.5f} +- {st['full_se']:.5f} (closed form {st['full_closed']:.5f}); "
            f"diag {st['diag_mean']:.5f} +- {st['diag_se']:.5f} (closed form {st['diag_closed']:.5f})"
        ),
        (
            f"  full - diag = {st['diff_mean']:.5f} +- {st['diff_se']:.5f}: diagonal {smaller} "
            f"by {st['diff_mean'] / st['diff_se']:.1f} SE"
        ),
        (
            f"One SGD step (batch {cfg['batch']} of {cfg['n_data']}, s = {one['scale']:.4f}): relative "
            f"Frobenius error of its noise covariance vs s^2 F = {one['rel_err_full']:.3f}, "
            f"vs s^2 diag F = {one['rel_err_diag']:.3f}"
        ),
        "wrote " + ", ".join(summary["files"]),
    ]
    return "\n".join(lines)


class _Parser(argparse.ArgumentParser):
    """argparse that raises ToyError instead of printing usage and exiting, so errors are one line."""

    def error(self, message: str) -> Any:
        raise ToyError(message)


def main(argv: list[str] | None = None) -> int:
    """`hpcnoise toy`: run the toy and print a summary; bad input gives one line on stderr and exit 2."""
    parser = _Parser(prog="hpcnoise toy", description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, default=Path("toy"), help="output directory (default: toy)")
    parser.add_argument("--chains", type=int, default=ToyConfig.chains, help="Monte-Carlo chains (>= 2)")
    parser.add_argument("--seed", type=int, default=ToyConfig.seed, help="random seed (>= 0)")
    try:
        args = parser.parse_args(argv)
        summary = run(args.out, chains=args.chains, seed=args.seed)
    except (ToyError, OSError) as exc:
        print(f"hpcnoise toy: error: {exc}", file=sys.stderr)
        return 2
    print(format_summary(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
