"""The statistics of the tuned comparison (docs/tuning.md): the best-of-k curve over a regime's trials and
Holm's step-down correction over the declared comparisons, each a Welch t-test.

Best-of-k: the validation accuracy the selection rule (``hpcnoise.tuning.select``: highest final validation
accuracy; a diverged or missing trial ranks last) would reach with k trials instead of N, k = 1..N. For n
trials with finished accuracies a_(1) <= ... <= a_(m) and n - m without one, drawing k with replacement,
P(best <= a_(i)) = ((n - m + i) / n)^k, so

    E[best | at least one finished] = sum_i a_(i) [((n-m+i)/n)^k - ((n-m+i-1)/n)^k] / (1 - ((n-m)/n)^k)

(``expected_best``); ``best_of_k`` estimates the same by a bootstrap (B resamples of k trials, a fixed seed)
and gives its 90% band (the 5th and 95th percentiles of the best of k).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

BOOTSTRAP_B = 2000
BOOTSTRAP_SEED = 20240607
BAND = 0.90  # the best-of-k band: 5th to 95th percentile of the resampled best
ALPHA = 0.05  # the family-wise error rate of the declared comparisons (Holm)


@dataclass(frozen=True)
class BestOfK:
    """The best validation accuracy after k trials: its bootstrap mean and 90% band, the exact expectation,
    and the share of resamples in which no drawn trial finished (their best is undefined, not in the mean)."""

    k: int
    mean: float
    low: float
    high: float
    exact: float
    none_finished: float


def _finite_sorted(values: Sequence[float | None]) -> np.ndarray:
    return np.sort(np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=float))


def expected_best(values: Sequence[float | None], k: int) -> float:
    """The exact expected best of ``k`` draws with replacement from ``values`` (None or NaN: a trial without
    an accuracy, ranked last), given that at least one drawn trial has one; NaN when none has."""
    a = _finite_sorted(values)
    n, m = len(values), len(a)
    if m == 0:
        return math.nan
    below = n - m  # trials without an accuracy rank below every finished one
    cdf = ((below + np.arange(0, m + 1)) / n) ** k  # P(best <= a_(i)), i = 0..m (i = 0: none finished)
    return float(np.dot(a, np.diff(cdf)) / (1.0 - cdf[0]))


def best_of_k(
    values: Sequence[float | None], ks: Sequence[int], b: int = BOOTSTRAP_B, seed: int = BOOTSTRAP_SEED
) -> list[BestOfK]:
    """For each k of ``ks``: resample k of ``values`` with replacement ``b`` times and take the best (NaN
    values rank last); the mean of the bests and their ``BAND`` percentiles, beside ``expected_best``."""
    x = np.asarray([v if v is not None else math.nan for v in values], dtype=float)
    ranked = np.where(np.isfinite(x), x, -np.inf)
    rng = np.random.default_rng(seed)
    out = []
    for k in ks:
        draws = ranked[rng.integers(0, len(x), size=(b, k))].max(axis=1)
        finished = draws[np.isfinite(draws)]
        tail = (1.0 - BAND) / 2
        low, high = np.quantile(finished, [tail, 1.0 - tail]) if len(finished) else (math.nan, math.nan)
        mean = float(finished.mean()) if len(finished) else math.nan
        none = 1.0 - len(finished) / b
        out.append(BestOfK(int(k), mean, float(low), float(high), expected_best(values, int(k)), none))
    return out


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the order given: sorted ascending, p_(j) times (m - j + 1)
    (j = 1..m), made non-decreasing and capped at 1. A comparison survives at level alpha when its adjusted
    p-value is <= alpha. A NaN p-value (a comparison that could not be tested) counts as 1: it stays in the
    family, so m is the number of comparisons declared."""
    p = np.asarray([v if math.isfinite(v) else 1.0 for v in pvalues], dtype=float)
    m = len(p)
    order = np.argsort(p, kind="stable")
    scaled = np.minimum(1.0, p[order] * (m - np.arange(m)))
    adjusted = np.empty(m)
    adjusted[order] = np.maximum.accumulate(scaled) if m else scaled
    return [float(v) for v in adjusted]


@dataclass(frozen=True)
class Welch:
    """A two-sided Welch t-test of mean(a) - mean(b): the difference, t, its degrees of freedom and p
    (NaN when either side has fewer than 2 values)."""

    diff: float
    t: float
    dof: float
    p: float


def welch_test(a: Sequence[float], b: Sequence[float]) -> Welch:
    xa, xb = (np.asarray([v for v in x if math.isfinite(v)], dtype=float) for x in (a, b))
    diff = float(xa.mean() - xb.mean()) if len(xa) and len(xb) else math.nan
    if len(xa) < 2 or len(xb) < 2:
        return Welch(diff, math.nan, math.nan, math.nan)
    va, vb = float(np.var(xa, ddof=1)) / len(xa), float(np.var(xb, ddof=1)) / len(xb)
    if va + vb == 0.0:  # identical seeds on both sides: no spread to test against
        return Welch(diff, math.nan, math.nan, 1.0 if diff == 0.0 else 0.0)
    res = stats.ttest_ind(xa, xb, equal_var=False)
    dof = (va + vb) ** 2 / (va**2 / (len(xa) - 1) + vb**2 / (len(xb) - 1))
    return Welch(diff, float(res.statistic), float(dof), float(res.pvalue))
