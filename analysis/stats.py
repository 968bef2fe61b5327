"""The statistics every table, figure and sentence of the report uses: means over seeds with t intervals.

A mean over seeds carries a 95% Student-t confidence interval: mean +- t_{0.975, n-1} sd / sqrt(n) (sd with
n - 1 degrees of freedom); with one value there is none. Differences of two means carry a Welch-Satterthwaite
t interval. Runs that repeat a seed are averaged first (``per_seed``), so n counts seeds, not runs.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats

LEVEL = 0.95


class Interval:
    """The bounds of ``centre`` +- ``half`` (NaN when there is no half-width)."""

    half: float | None

    @property
    def centre(self) -> float:
        raise NotImplementedError

    @property
    def low(self) -> float:
        return self.centre - self.half if self.half is not None else math.nan

    @property
    def high(self) -> float:
        return self.centre + self.half if self.half is not None else math.nan


@dataclass(frozen=True)
class Estimate(Interval):
    """Mean of n values and the half-width of its confidence interval (None when n < 2)."""

    mean: float
    half: float | None
    n: int

    @property
    def centre(self) -> float:
        return self.mean

    @property
    def ci(self) -> float:
        """The half-width, NaN when there is none (as the tables store it)."""
        return self.half if self.half is not None else math.nan


def mean_ci(values: Iterable[float], level: float = LEVEL) -> Estimate:
    """Mean and Student-t confidence half-width of the finite values (NaN mean when there are none)."""
    x = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    n = len(x)
    if n == 0:
        return Estimate(math.nan, None, 0)
    if n == 1:
        return Estimate(float(x[0]), None, 1)
    sd = float(np.std(x, ddof=1))
    return Estimate(float(x.mean()), float(stats.t.ppf(0.5 + level / 2, n - 1) * sd / math.sqrt(n)), n)


def ci_band(values: Sequence[float]) -> tuple[float, float]:
    """(low, high) of mean_ci for seaborn's ``errorbar=``; a single value gives a zero-width band."""
    est = mean_ci(values)
    return (est.mean, est.mean) if est.half is None else (est.low, est.high)


def welch_diff(a: Sequence[float], b: Sequence[float], level: float = LEVEL) -> Estimate:
    """mean(a) - mean(b) with a Welch-Satterthwaite t interval (None when either side has < 2 values)."""
    xa, xb = (np.asarray([v for v in x if math.isfinite(v)], dtype=float) for x in (a, b))
    ea, eb = mean_ci(xa), mean_ci(xb)
    diff = ea.mean - eb.mean
    if ea.n < 2 or eb.n < 2:
        return Estimate(diff, None, min(ea.n, eb.n))
    va, vb = float(np.var(xa, ddof=1)) / ea.n, float(np.var(xb, ddof=1)) / eb.n
    se = math.sqrt(va + vb)
    if se == 0.0:
        return Estimate(diff, 0.0, min(ea.n, eb.n))
    dof = (va + vb) ** 2 / (va**2 / (ea.n - 1) + vb**2 / (eb.n - 1))
    return Estimate(diff, float(stats.t.ppf(0.5 + level / 2, dof) * se), min(ea.n, eb.n))


def per_seed(runs: pd.DataFrame, column: str) -> pd.Series:
    """``column`` averaged over runs that share a seed: one value per seed."""
    return runs.groupby("seed")[column].mean()
