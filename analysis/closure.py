"""Gap closure: how much of the SB-vs-LB generalisation gap each regime variant closes, with a 95% interval.

For a (dataset, network) and a regime variant (a ``label``) trained under LR rule k (``lr_scaling``),

    closure = (acc - acc_LB) / (acc_SB - acc_LB),

acc = 100 (1 - final test error), each a mean over seeds (``analysis.tables.per_seed``: runs that repeat a
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

from analysis.load import NOISE_FREE, REGIME_NAMES
from analysis.tables import (
    LEVEL,
    Estimate,
    _matching,
    _n_diverged,
    _or_empty,
    _pooled_note,
    _seeds_text,
    fmt_estimate,
    markdown,
    mean_ci,
    per_seed,
    welch_diff,
)

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
class Ratio:
    """A closure and its interval: ``half`` is None when some group has fewer than 2 seeds (or no gap)."""

    value: float  # NaN when undefined (a group without runs, or acc_SB == acc_LB)
    half: float | None
    se: float = math.nan
    dof: float = math.nan

    @property
    def low(self) -> float:
        return self.value - self.half if self.half is not None else math.nan

    @property
    def high(self) -> float:
        return self.value + self.half if self.half is not None else math.nan


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


def closure_table(runs: pd.DataFrame, diverged: pd.DataFrame | None = None) -> tuple[pd.DataFrame, list[str]]:
    """(one row per (dataset, network, label) with its closure, notes on the cells left out).

    Every variant present (finished or diverged) of a (dataset, network) with an SB baseline (SB without
    ghost batch norm) gets a row, except a regime whose LR rule has no LB+GBN baseline: those, and every
    variant of a (dataset, network) without SB or without any LB+GBN, are left out with a note. ``role``:
    "SB baseline" | "LB baseline" | "regime"; the baselines' closures (1 and 0 by definition) are NaN.
    ``gap``: acc_SB - acc_LB of the row's rule with its Welch half-width ``gap_ci``.
    """
    diverged = _or_empty(diverged)
    keys: set[tuple[str, str, str]] = set()
    for df in (runs, diverged):
        if not df.empty:
            keys |= set(zip(df["dataset"], df["model"], df["label"]))
    out: list[dict[str, object]] = []
    left_out: list[str] = []
    for dataset, network, lab in sorted(keys):
        cell = _matching(runs, dataset=dataset, model=network, label=lab)
        gone = _matching(diverged, dataset=dataset, model=network, label=lab)
        first = (cell if len(cell) else gone).iloc[0]
        regime, gbn, rule = str(first["regime"]), bool(first["gbn"]), str(first["lr_scaling"])
        role = _role(regime, gbn)
        pair = _matching(runs, dataset=dataset, model=network)
        sb = pair[(pair["regime"] == "sb") & ~pair["gbn"].astype(bool)] if len(pair) else pair
        lbs = pair[(pair["regime"] == "lb") & pair["gbn"].astype(bool)] if len(pair) else pair
        lb = lbs[lbs["lr_scaling"] == rule] if len(lbs) else lbs
        where = f"{dataset}/{network} {lab}"
        if sb.empty:
            left_out.append(f"{where}: no finished SB baseline for {dataset}/{network}")
            continue
        if lbs.empty:
            left_out.append(f"{where}: no finished LB+GBN baseline for {dataset}/{network}")
            continue
        if role == "regime" and lb.empty:
            left_out.append(f"{where}: no finished LB+GBN baseline under {rule} LR scaling")
            continue
        acc = mean_ci(_accuracies(cell)) if len(cell) else Estimate(math.nan, None, 0)
        a_sb = _accuracies(sb)
        a_lb = _accuracies(lb) if len(lb) else []
        gap = welch_diff(a_sb, a_lb) if a_lb else Estimate(math.nan, None, 0)
        ratio = closure_ci(_accuracies(cell), a_lb, a_sb) if role == "regime" else Ratio(math.nan, None)
        noisy = regime not in NOISE_FREE
        out.append(
            {
                "dataset": dataset,
                "network": network,
                "label": lab,
                "role": role,
                "regime": regime,
                "gbn": gbn,
                "lr_scaling": rule,
                "noise_multiplier": float(first["noise_multiplier"]) if noisy else math.nan,
                "noise_calibration": str(first["noise_calibration"]) if noisy else "",
                "n_runs": len(cell),
                "n_seeds": acc.n,
                "n_diverged": len(gone),
                "seeds": _seeds_text(cell),
                "accuracy": acc.mean,
                "ci": acc.ci,
                "ci_low": acc.low,
                "ci_high": acc.high,
                "lb_label": str(lb["label"].iloc[0]) if len(lb) and role != "SB baseline" else "",
                "lb_accuracy": mean_ci(a_lb).mean if a_lb and role != "SB baseline" else math.nan,
                "sb_accuracy": mean_ci(a_sb).mean,
                "gap": gap.mean if role != "SB baseline" else math.nan,
                "gap_ci": gap.ci if role != "SB baseline" else math.nan,
                "closure": ratio.value,
                "closure_ci": ratio.half if ratio.half is not None else math.nan,
                "closure_low": ratio.low,
                "closure_high": ratio.high,
                "closure_se": ratio.se,
                "closure_dof": ratio.dof,
                "pooled": _pooled_note(cell),
            }
        )
    out.sort(key=lambda row: (row["dataset"], row["network"], *_order(row)))
    columns = [
        "dataset", "network", "label", "role", "regime", "gbn", "lr_scaling", "noise_multiplier",
        "noise_calibration", "n_runs", "n_seeds", "n_diverged", "seeds", "accuracy", "ci", "ci_low", "ci_high",
        "lb_label", "lb_accuracy", "sb_accuracy", "gap", "gap_ci", "closure", "closure_ci", "closure_low",
        "closure_high", "closure_se", "closure_dof", "pooled",
    ]  # fmt: skip
    return pd.DataFrame(out, columns=columns), left_out


# --- formatting -------------------------------------------------------------------------------------------------
def _pct(x: float) -> str:
    return f"{100.0 * x:.0f}%"


def fmt_closure(r: pd.Series) -> str:
    """A closure cell: "62% (31% to 93%)"; the baselines' by definition; no interval or no gap said so."""
    if r["role"] == "SB baseline":
        return "100% (by definition)"
    if r["role"] == "LB baseline":
        return "0% (by definition)"
    if not math.isfinite(r["closure"]):
        if int(r["n_seeds"]) == 0:
            return ""
        return "undefined (SB and LB equal)"
    if not math.isfinite(r["closure_ci"]):
        return f"{_pct(r['closure'])} (no interval: fewer than 2 seeds)"
    return f"{_pct(r['closure'])} ({_pct(r['closure_low'])} to {_pct(r['closure_high'])})"


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
            "Test accuracy (%)": fmt_estimate(
                r["accuracy"], r["ci"], int(r["n_seeds"]), int(r["n_runs"]), n_diverged=_n_diverged(r)
            ),
            "Gap closure (95% CI)": fmt_closure(r),
        }
        for _, r in df.iterrows()
    ]
    return markdown(pd.DataFrame(rows))


# --- the verdict ------------------------------------------------------------------------------------------------
def _setting(r: pd.Series) -> str:
    """ "DiagF+GBN (sqrt) x0.25 (sqrt LR scaling, lambda = 0.25)": the label, the LR rule and lambda."""
    where = f"{r['lr_scaling']} LR scaling"
    lam = r["noise_multiplier"]
    if isinstance(lam, float) and math.isfinite(lam):
        where += f", lambda = {lam:.3g}"
        if r["noise_calibration"] not in ("", "paper"):
            where += f", {r['noise_calibration']}-calibrated"
        elif lam == 1.0:
            where += ", the paper's"
    return f"{r['label']} ({where})"


def _with_interval(r: pd.Series) -> str:
    return f"{_setting(r)}: {fmt_closure(r)}"


def _points(est_mean: float, half: float) -> str:
    return f"{est_mean:.2f} ± {half:.2f}" if math.isfinite(half) else f"{est_mean:.2f} (no interval)"


def _gap_clause(lb: pd.Series) -> tuple[str, bool, bool]:
    """(the clause on SB vs this LB baseline, whether SB is better, whether that gap's interval includes 0)."""
    rule, gap, half = lb["lr_scaling"], float(lb["gap"]), float(lb["gap_ci"])
    if int(lb["n_seeds"]) == 0:
        return f"every {lb['label']} run diverged, so there is no LB baseline under {rule} LR scaling", False, False
    if not gap > 0:
        clause = (
            f"under {rule} LR scaling SB is not better than {lb['label']} ({lb['accuracy']:.2f}%, "
            f"SB - LB = {_points(gap, half)} points), so there is no gap to close"
        )
        return clause, False, False
    clause = f"{lb['label']} ({lb['accuracy']:.2f}%) is {_points(gap, half)} points below SB under {rule} LR scaling"
    if not math.isfinite(half):
        return clause + " (too few seeds for an interval)", True, True
    if gap - half <= 0:
        return clause + " (an interval that includes 0)", True, True
    return clause, True, False


def _pair_verdict(dataset: str, network: str, df: pd.DataFrame) -> str:
    sb = df[df["role"] == "SB baseline"].iloc[0]
    clauses, gapped, unclear = [], [], []
    for _, lb in df[df["role"] == "LB baseline"].iterrows():
        clause, has_gap, imprecise = _gap_clause(lb)
        clauses.append(clause)
        if has_gap:
            gapped.append(lb["lr_scaling"])
        if imprecise:
            unclear.append(lb["lr_scaling"])
    n_sb = int(sb["n_seeds"])
    text = (
        f"{dataset}/{network}: SB reaches {sb['accuracy']:.2f}% test accuracy ({n_sb} seed{'s' if n_sb != 1 else ''}); "
    )
    text += "; ".join(clauses) + ". "
    if not gapped:
        return text + "SB is not better than LB under any LR rule run: there is no generalisation gap to close."
    closure = df["closure"].astype(float)
    rows = df[(df["role"] == "regime") & df["lr_scaling"].isin(gapped) & np.isfinite(closure)]
    if rows.empty:
        return text + "No other variant was run under a rule with a gap, so nothing is measured to close it."
    best = rows.loc[rows["closure"].astype(float).idxmax()]
    text += f"The best closure is {fmt_closure(best)}, by {_setting(best)}"
    if math.isfinite(best["closure_low"]):
        if best["closure_low"] <= 1.0 <= best["closure_high"]:
            text += ", an interval that includes 100% (consistent with closing the whole gap)"
        elif best["closure_high"] < 1.0:
            text += ", an interval below 100% (it closes part of the gap at most)"
    text += ". "
    with_ci = rows[np.isfinite(rows["closure_low"].astype(float))]
    if with_ci.empty:
        return text + "No setting has 2 or more seeds in every group, so no closure has an interval."
    positive = with_ci[with_ci["closure_low"] > 0]
    negative = with_ci[with_ci["closure_high"] < 0]
    of = f"of the {len(with_ci)} setting{'s' if len(with_ci) != 1 else ''}"
    if len(with_ci) < len(rows):
        of += " with an interval"
    if positive.empty:
        text += f"None {of} closes the gap with an interval that excludes 0"
    else:
        verb = "closes" if len(positive) == 1 else "close"
        listed = "; ".join(_with_interval(r) for _, r in positive.iterrows())
        text += f"{len(positive)} {of} {verb} the gap with an interval that excludes 0 ({listed})"
    if negative.empty:
        text += "; none is significantly negative (worse than LB with an interval that excludes 0)."
    else:
        verb = "is" if len(negative) == 1 else "are"
        listed = "; ".join(_with_interval(r) for _, r in negative.iterrows())
        text += f"; {len(negative)} {verb} significantly negative, widening the gap ({listed})."
    if unclear:
        rules = " and ".join(r for r in unclear if r in gapped)
        text += f" The gap under {rules} LR scaling is not clearly above 0, so closures under it are imprecise."
    return text


def verdict(table: pd.DataFrame) -> str:
    """One paragraph per (dataset, network) of a ``closure_table``: the gap under each LR rule, the best
    closure and where it occurs, and which settings close the gap (or widen it) with an interval that
    excludes 0; says so instead when SB is not better than LB."""
    if table.empty:
        return (
            "No verdict: no (dataset, network) has both a finished SB baseline and a finished LB+GBN baseline, "
            "so the gap and its closure cannot be assessed."
        )
    paragraphs = [
        _pair_verdict(dataset, network, df) for (dataset, network), df in table.groupby(["dataset", "network"])
    ]
    return "\n\n".join(paragraphs)
