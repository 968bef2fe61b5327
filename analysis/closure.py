"""Gap closure: how much of the SB-vs-LB generalisation gap each regime variant closes, with a 95% interval.

For a (dataset, network) and a regime variant (a ``label``) trained under LR rule k (``lr_scaling``),

    closure = (acc - acc_LB) / (acc_SB - acc_LB),

acc = 100 (1 - final test error), each a mean over seeds (``analysis.stats.per_seed``: runs that repeat a
seed are averaged first). LB is the LB+GBN baseline trained under the same rule k, SB the small-batch baseline
of that (dataset, network). 0: no better than LB; 1: as good as SB; negative: worse than LB.

Interval: the delta method. The closure is a smooth function of three independent group means; to first
order its variance is

    se^2 = (v + c^2 v_SB + (1 - c)^2 v_LB) / (acc_SB - acc_LB)^2,    v = sd^2 / n of each group's seeds,

and the interval is c +- t_{0.975, nu} se, nu the Welch-Satterthwaite degrees of freedom of that linear
combination, nu = (sum w_i)^2 / sum (w_i^2 / (n_i - 1)), w = (v, c^2 v_SB, (1 - c)^2 v_LB). With 2 seeds of
every group it reduces to a t interval; with fewer there is none. It is a first-order approximation: it
is trustworthy when the gap acc_SB - acc_LB is large against its own uncertainty, which the verdict reports.

Diverged runs are not in the means; each row counts them (``n_diverged``), as every table does.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats

from analysis.cells import matching, or_empty, pooled_note, seeds_text, variants_present
from analysis.formatting import fmt_cell, fmt_closure, markdown
from analysis.stats import LEVEL, Estimate, Interval, mean_ci, per_seed, welch_diff
from analysis.variants import NOISE_FREE, REGIME_NAMES
from analysis.verdict import verdict

__all__ = [  # defined here, but fmt_closure (analysis.formatting) and verdict (analysis.verdict)
    "CLOSURE_COLUMNS",
    "METHOD",
    "ROLES",
    "Ratio",
    "closure_ci",
    "closure_markdown",
    "closure_table",
    "fmt_closure",
    "fmt_lambda",
    "verdict",
]

METHOD = (
    "Gap closure = (acc - acc_LB) / (acc_SB - acc_LB), with acc = 100 (1 - final test error), each a mean "
    "over seeds; LB is the LB+GBN baseline trained under the same learning-rate rule (linear or sqrt), SB the "
    "small-batch baseline of the same dataset and network. 0 means no better than LB, 100% as good as SB, "
    "negative worse than LB. Its 95% interval is from the delta method (not a bootstrap): the first-order "
    "standard error of the ratio of the three independent group means, se^2 = (v + c^2 v_SB + (1 - c)^2 "
    "v_LB) / (acc_SB - acc_LB)^2 with v = sd^2 / n per group, times the Student-t quantile at the "
    "Welch-Satterthwaite degrees of freedom. It needs 2 or more seeds in every group, and is only as good as "
    "the gap is clear of 0. Test accuracy: mean ± 95% Student-t half-width over seeds."
)

ROLES = ("SB baseline", "LB baseline", "regime")
_RULES = ("linear", "sqrt", "none")


@dataclass(frozen=True)
class Ratio(Interval):
    """A closure and its interval: ``half`` is None when some group has fewer than 2 seeds (or no gap)."""

    value: float  # NaN when undefined (a group without runs, or acc_SB == acc_LB)
    half: float | None
    se: float = math.nan
    dof: float = math.nan

    @property
    def centre(self) -> float:
        return self.value


def _finite(values: Iterable[float]) -> np.ndarray:
    return np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=float)


def closure_ci(regime: Iterable[float], lb: Iterable[float], sb: Iterable[float], level: float = LEVEL) -> Ratio:
    """(mean(regime) - mean(lb)) / (mean(sb) - mean(lb)) and its delta-method t interval (see the module)."""
    r, lo, s = _finite(regime), _finite(lb), _finite(sb)
    if min(len(r), len(lo), len(s)) == 0:
        return Ratio(math.nan, None)
    gap = float(s.mean() - lo.mean())
    if gap == 0.0:
        return Ratio(math.nan, None)
    c = float(r.mean() - lo.mean()) / gap
    if min(len(r), len(lo), len(s)) < 2:
        return Ratio(c, None)
    groups = [(r, 1.0), (s, c), (lo, 1.0 - c)]  # (seeds, coefficient of the group's mean, times the gap)
    w = [a * a * float(np.var(x, ddof=1)) / len(x) for x, a in groups]
    total = sum(w)
    se = math.sqrt(total) / abs(gap)
    if total == 0.0:
        return Ratio(c, 0.0, 0.0, math.inf)
    dof = total**2 / sum(wi * wi / (len(x) - 1) for wi, (x, _) in zip(w, groups) if wi > 0)
    return Ratio(c, float(stats.t.ppf(0.5 + level / 2, dof) * se), se, dof)


# --- the table --------------------------------------------------------------------------------------------------
def _role(regime: str, gbn: bool) -> str:
    if regime == "sb" and not gbn:
        return "SB baseline"
    if regime == "lb" and gbn:
        return "LB baseline"
    return "regime"


def _order(row: dict[str, object]) -> tuple[object, ...]:
    """SB first; then per LR rule: the LB baseline, then the regimes in the paper's order, by lambda."""
    rule = str(row["lr_scaling"])
    regimes = list(REGIME_NAMES)
    lam = row["noise_multiplier"]
    return (
        row["role"] != "SB baseline",
        _RULES.index(rule) if rule in _RULES else len(_RULES),
        rule,
        row["role"] != "LB baseline",
        regimes.index(str(row["regime"])) if row["regime"] in regimes else len(regimes),
        str(row["regime"]),
        bool(row["gbn"]),
        float(lam) if isinstance(lam, float) and math.isfinite(lam) else -1.0,
        str(row["noise_calibration"]),
        str(row["label"]),
    )


def _accuracies(cell: pd.DataFrame) -> list[float]:
    return list(per_seed(cell, "test_accuracy")) if len(cell) else []


CLOSURE_COLUMNS = [
    "dataset", "network", "label", "role", "regime", "gbn", "lr_scaling", "noise_multiplier",
    "noise_calibration", "n_runs", "n_seeds", "n_diverged", "seeds", "accuracy", "ci", "ci_low", "ci_high",
    "lb_label", "lb_accuracy", "sb_accuracy", "gap", "gap_ci", "closure", "closure_ci", "closure_low",
    "closure_high", "closure_se", "closure_dof", "pooled",
]  # fmt: skip


@dataclass(frozen=True)
class _Baselines:
    """A (dataset, network)'s finished baselines: SB, every LB+GBN, and the LB+GBN of one LR rule."""

    sb: pd.DataFrame
    lbs: pd.DataFrame
    lb: pd.DataFrame

    @classmethod
    def of(cls, runs: pd.DataFrame, dataset: str, network: str, rule: str) -> _Baselines:
        pair = matching(runs, dataset=dataset, model=network)
        sb = pair[(pair["regime"] == "sb") & ~pair["gbn"].astype(bool)] if len(pair) else pair
        lbs = pair[(pair["regime"] == "lb") & pair["gbn"].astype(bool)] if len(pair) else pair
        lb = lbs[lbs["lr_scaling"] == rule] if len(lbs) else lbs
        return cls(sb, lbs, lb)

    def missing(self, dataset: str, network: str, role: str, rule: str) -> str | None:
        """Why a variant of this role and rule has no closure row (None: it has one)."""
        if self.sb.empty:
            return f"no finished SB baseline for {dataset}/{network}"
        if self.lbs.empty:
            return f"no finished LB+GBN baseline for {dataset}/{network}"
        if role == "regime" and self.lb.empty:
            return f"no finished LB+GBN baseline under {rule} LR scaling"
        return None


def _variant_columns(first: pd.Series, cell: pd.DataFrame, gone: pd.DataFrame) -> dict[str, object]:
    """Which variant a closure row is (from its first run, finished or diverged) and its own accuracy."""
    regime = str(first["regime"])
    noisy = regime not in NOISE_FREE
    acc = mean_ci(_accuracies(cell)) if len(cell) else Estimate(math.nan, None, 0)
    return {
        "regime": regime,
        "gbn": bool(first["gbn"]),
        "lr_scaling": str(first["lr_scaling"]),
        "noise_multiplier": float(first["noise_multiplier"]) if noisy else math.nan,
        "noise_calibration": str(first["noise_calibration"]) if noisy else "",
        "n_runs": len(cell),
        "n_seeds": acc.n,
        "n_diverged": len(gone),
        "seeds": seeds_text(cell),
        "accuracy": acc.mean,
        "ci": acc.ci,
        "ci_low": acc.low,
        "ci_high": acc.high,
    }


def _closure_columns(cell: pd.DataFrame, role: str, base: _Baselines) -> dict[str, object]:
    """The baselines' accuracies, the gap of the row's rule and the row's closure with its interval."""
    a_sb = _accuracies(base.sb)
    a_lb = _accuracies(base.lb) if len(base.lb) else []
    gap = welch_diff(a_sb, a_lb) if a_lb else Estimate(math.nan, None, 0)
    ratio = closure_ci(_accuracies(cell), a_lb, a_sb) if role == "regime" else Ratio(math.nan, None)
    sb_row = role == "SB baseline"
    return {
        "lb_label": str(base.lb["label"].iloc[0]) if len(base.lb) and not sb_row else "",
        "lb_accuracy": mean_ci(a_lb).mean if a_lb and not sb_row else math.nan,
        "sb_accuracy": mean_ci(a_sb).mean,
        "gap": gap.mean if not sb_row else math.nan,
        "gap_ci": gap.ci if not sb_row else math.nan,
        "closure": ratio.value,
        "closure_ci": ratio.half if ratio.half is not None else math.nan,
        "closure_low": ratio.low,
        "closure_high": ratio.high,
        "closure_se": ratio.se,
        "closure_dof": ratio.dof,
    }


def closure_table(runs: pd.DataFrame, diverged: pd.DataFrame | None = None) -> tuple[pd.DataFrame, list[str]]:
    """(one row per (dataset, network, label) with its closure, notes on the cells left out).

    Every variant present (finished or diverged) of a (dataset, network) with an SB baseline (SB without
    ghost batch norm) gets a row, except a regime whose LR rule has no LB+GBN baseline: those, and every
    variant of a (dataset, network) without SB or without any LB+GBN, are left out with a note. ``role``:
    "SB baseline" | "LB baseline" | "regime"; the baselines' closures (1 and 0 by definition) are NaN.
    ``gap``: acc_SB - acc_LB of the row's rule with its Welch half-width ``gap_ci``.
    """
    diverged = or_empty(diverged)
    out: list[dict[str, object]] = []
    left_out: list[str] = []
    for dataset, network, lab in variants_present(runs, diverged):
        cell = matching(runs, dataset=dataset, model=network, label=lab)
        gone = matching(diverged, dataset=dataset, model=network, label=lab)
        first = (cell if len(cell) else gone).iloc[0]
        role, rule = _role(str(first["regime"]), bool(first["gbn"])), str(first["lr_scaling"])
        base = _Baselines.of(runs, dataset, network, rule)
        reason = base.missing(dataset, network, role, rule)
        if reason is not None:
            left_out.append(f"{dataset}/{network} {lab}: {reason}")
            continue
        out.append(
            {
                "dataset": dataset,
                "network": network,
                "label": lab,
                "role": role,
                **_variant_columns(first, cell, gone),
                **_closure_columns(cell, role, base),
                "pooled": pooled_note(cell),
            }
        )
    out.sort(key=lambda row: (row["dataset"], row["network"], *_order(row)))
    return pd.DataFrame(out, columns=CLOSURE_COLUMNS), left_out


# --- formatting -------------------------------------------------------------------------------------------------
def fmt_lambda(r: pd.Series) -> str:
    lam = r["noise_multiplier"]
    if not isinstance(lam, float) or not math.isfinite(lam):
        return "—"
    return f"{lam:.3g}" + (f" ({r['noise_calibration']})" if r["noise_calibration"] not in ("", "paper") else "")


def _rule(r: pd.Series) -> str:
    return "—" if r["role"] == "SB baseline" else str(r["lr_scaling"])


def closure_markdown(df: pd.DataFrame) -> str:
    rows = [
        {
            "Dataset": r["dataset"],
            "Network": r["network"],
            "Regime": r["label"],
            "LR rule": _rule(r),
            "λ": fmt_lambda(r),
            "Seeds": int(r["n_seeds"]),
            "Test accuracy (%)": fmt_cell(r),
            "Gap closure (95% CI)": fmt_closure(r),
        }
        for _, r in df.iterrows()
    ]
    return markdown(pd.DataFrame(rows))
