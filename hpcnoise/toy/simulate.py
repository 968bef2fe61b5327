"""The toy's random experiments: trajectories, Monte-Carlo chains, Theorem 3.1 and stationary checks, Fig. 1.

Every experiment draws from its own named random stream of the seed, so changing one never shifts
another's draws. ``compute`` runs them all for a ToyConfig.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from hpcnoise.toy.model import (
    Array,
    Noise,
    ToyConfig,
    ToyError,
    constant_lrs,
    exact_loss_curve,
    loss,
    noise_factor,
    noise_trace,
    sqrt_psd,
    stationary_loss,
    theorem_bound,
    theorem_gamma,
    theorem_lrs,
    theorem_nu,
)

__all__ = [
    "BoundCheck",
    "MonteCarlo",
    "OneStep",
    "Stationary",
    "ToyResults",
    "check_theorem",
    "compare_stationary",
    "compute",
    "monte_carlo",
    "one_step",
    "regression_data",
    "trajectory",
]

# Independent random streams, one per use, so that changing one experiment never shifts another's draws.
_STREAMS = {"data": 0, "one_step": 1, "trajectory": 2, "theorem": 3, "stationary": 4}


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
        """The exact E[L(theta_k)] is at most the bound at every k."""
        return bool(np.all(self.exact <= self.bound))

    @property
    def worst_k(self) -> int:
        """The k where the Monte-Carlo mean comes closest to the bound (largest mean / bound)."""
        return int(np.argmax(self.mean / self.bound))

    @property
    def worst_ratio(self) -> float:
        """The largest mean / bound over k (at worst_k)."""
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
# Everything at once


@dataclass(frozen=True)
class ToyResults:
    """Everything the toy computes for one ToyConfig, before it is drawn and written."""

    cfg: ToyConfig
    cs: dict[Noise, Array]  # the noise matrix C of each kind
    traces: dict[Noise, float]  # Tr(C^T A C) of each kind
    paths: dict[Noise, Array]  # Fig. 2: constant-lr trajectories, one per kind, all from the same xi
    checks: dict[Noise, BoundCheck]  # Theorem 3.1 for full and diagonal noise
    stationary: Stationary  # constant-lr final loss, full versus diagonal noise
    step: OneStep  # Fig. 1


def compute(cfg: ToyConfig) -> ToyResults:
    """Run every experiment of the toy with cfg's numbers, each from its own random stream of cfg.seed."""
    a, theta0 = cfg.matrix, np.array(cfg.theta0)
    cs = {kind: noise_factor(a, kind, cfg.sigma) for kind in Noise}
    lrs = constant_lrs(cfg.lr, cfg.steps)
    # A fresh generator of the same stream per kind: all four runs see the same xi, only C differs.
    paths = {kind: trajectory(a, c, theta0, lrs, _rng(cfg.seed, "trajectory")) for kind, c in cs.items()}
    return ToyResults(
        cfg=cfg,
        cs=cs,
        traces={kind: noise_trace(a, c) for kind, c in cs.items()},
        paths=paths,
        checks=check_theorem(a, theta0, cfg.steps, cfg.chains, _rng(cfg.seed, "theorem"), z=cfg.z),
        stationary=compare_stationary(a, theta0, cfg.lr, cfg.steps, cfg.chains, _rng(cfg.seed, "stationary"), z=cfg.z),
        step=one_step(
            a,
            np.array(cfg.theta_one_step),
            cfg.lr,
            cfg.n_data,
            cfg.batch,
            cfg.draws,
            cfg.sigma,
            _rng(cfg.seed, "data"),
        ),
    )
