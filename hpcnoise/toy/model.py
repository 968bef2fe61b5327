"""The model of the toy: the quadratic, its noise matrices, the bound of Theorem 3.1 and exact closed forms.

L(theta) = theta^T A theta / 2 and the noisy iteration theta <- theta - a_k A theta + a_k C xi, xi ~ N(0, I).
Fisher and Hessian coincide here (both are A), so "full Fisher" noise is C = sqrt(A) and "diagonal Fisher"
noise is C = sqrt(diag A). Everything here is deterministic; the random experiments are in simulate.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from hpcnoise.errors import ConfigError

Array = NDArray[np.float64]

__all__ = [
    "Array",
    "Noise",
    "ToyConfig",
    "ToyError",
    "constant_lrs",
    "exact_loss_curve",
    "loss",
    "noise_factor",
    "noise_trace",
    "schedule_limit",
    "spd_eigh",
    "sqrt_psd",
    "stationary_loss",
    "theorem_bound",
    "theorem_gamma",
    "theorem_lrs",
    "theorem_nu",
    "trace_closed_forms",
]


class ToyError(ConfigError):
    """Bad input to the toy (reported as one line by ``hpcnoise toy``)."""


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
        """A as a float64 array."""
        return np.array(self.a, dtype=np.float64)


# ----------------------------------------------------------------------------------------------------------
# Matrices and traces


def spd_eigh(a: Array) -> tuple[Array, Array]:
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
    root: Array = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T
    return root


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
    value: Array = 0.5 * np.sum((theta @ a) * theta, axis=-1)
    return value


# ----------------------------------------------------------------------------------------------------------
# Schedules and the bound of Theorem 3.1


def constant_lrs(lr: float, steps: int) -> Array:
    """a_k = lr for k = 0 .. steps - 1."""
    return np.full(steps, float(lr))


def theorem_gamma(a: Array) -> float:
    """Smallest gamma with a_0 = 2 / (gamma lambda_min) <= 1 / lambda_max, i.e. gamma = 2 lambda_max / lambda_min."""
    w, _ = spd_eigh(a)
    return 2.0 * float(w[-1] / w[0])


def theorem_lrs(a: Array, steps: int) -> Array:
    """a_k = 2 / ((k + gamma) lambda_min) for k = 0 .. steps - 1; a_k <= a_0 = 1 / lambda_max."""
    w, _ = spd_eigh(a)
    lrs: Array = 2.0 / ((np.arange(steps) + theorem_gamma(a)) * w[0])
    return lrs


def theorem_nu(a: Array, c: Array, theta0: Array) -> float:
    """nu = max(2 Tr(C^T A C) / lambda_min^2, gamma L(theta_0)).

    From E[L_{k+1}] <= (1 - a_k lambda_min) E[L_k] + a_k^2 Tr(C^T A C) / 2: with a_k = 2 / ((k + gamma)
    lambda_min) the induction step needs nu >= 2 Tr(C^T A C) / lambda_min^2 and the base case L_0 <= nu / gamma.
    """
    w, _ = spd_eigh(a)
    nu: float = max(2.0 * noise_trace(a, c) / w[0] ** 2, theorem_gamma(a) * float(loss(a, theta0)))
    return nu


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
    w, v = spd_eigh(a)
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
