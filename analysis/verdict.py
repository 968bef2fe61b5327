"""The verdict in words: for each (dataset, network) of a ``closure_table`` (``analysis.closure``), is there an
SB-vs-LB gap under each LR rule, how many settings were evaluated on test, and which close (or widen) it
significantly. No setting is chosen as the best: every closure was measured on the test set, so the report is a
sensitivity study over the settings run (a choice of settings belongs to validation data: ``analysis.tuned``).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from analysis.formatting import fmt_closure


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


def _gaps(df: pd.DataFrame) -> tuple[str, list[str], list[str]]:
    """(the sentence on SB and each LB baseline, the LR rules with a gap, those whose gap is imprecise)."""
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
    text = f"SB reaches {sb['accuracy']:.2f}% test accuracy ({n_sb} seed{'s' if n_sb != 1 else ''}); "
    return text + "; ".join(clauses) + ". ", gapped, unclear


def _sensitivity(rows: pd.DataFrame) -> str:
    """The sentence on the settings evaluated on test: how many, and that none is selected among them (a
    sensitivity study: the largest closure of many, picked on the test set, would overstate the effect)."""
    n = len(rows)
    if n == 1:
        return f"1 setting was evaluated on the test set: {_with_interval(rows.iloc[0])}. "
    closures = rows["closure"].astype(float)
    return (
        f"{n} settings were evaluated on the test set and none is selected: this is a sensitivity study (the "
        "largest of several closures, picked on the test set, would overstate what any setting chosen in advance "
        f"achieves), so each closure stands with its own 95% interval, not corrected for the {n} settings; they "
        f"range from {100 * closures.min():.0f}% to {100 * closures.max():.0f}%. "
    )


def _significant(rows: pd.DataFrame, with_ci: pd.DataFrame) -> str:
    """Which of the settings with an interval (``with_ci``, of ``rows``) close or widen the gap significantly."""
    positive = with_ci[with_ci["closure_low"] > 0]
    negative = with_ci[with_ci["closure_high"] < 0]
    of = f"of the {len(with_ci)} setting{'s' if len(with_ci) != 1 else ''}"
    if len(with_ci) < len(rows):
        of += " with an interval"
    if positive.empty:
        text = f"None {of} closes the gap with an interval that excludes 0"
    else:
        verb = "closes" if len(positive) == 1 else "close"
        listed = "; ".join(_with_interval(r) for _, r in positive.iterrows())
        text = f"{len(positive)} {of} {verb} the gap with an interval that excludes 0 ({listed})"
    if negative.empty:
        return text + "; none is significantly negative (worse than LB with an interval that excludes 0)."
    verb = "is" if len(negative) == 1 else "are"
    listed = "; ".join(_with_interval(r) for _, r in negative.iterrows())
    return text + f"; {len(negative)} {verb} significantly negative, widening the gap ({listed})."


def _pair_verdict(dataset: str, network: str, df: pd.DataFrame) -> str:
    gaps, gapped, unclear = _gaps(df)
    text = f"{dataset}/{network}: {gaps}"
    if not gapped:
        return text + "SB is not better than LB under any LR rule run: there is no generalisation gap to close."
    closure = df["closure"].astype(float)
    rows = df[(df["role"] == "regime") & df["lr_scaling"].isin(gapped) & np.isfinite(closure)]
    if rows.empty:
        return text + "No other variant was run under a rule with a gap, so nothing is measured to close it."
    text += _sensitivity(rows)
    with_ci = rows[np.isfinite(rows["closure_low"].astype(float))]
    if with_ci.empty:
        return text + "No setting has 2 or more seeds in every group, so no closure has an interval."
    text += _significant(rows, with_ci)
    if unclear:
        rules = " and ".join(r for r in unclear if r in gapped)
        text += f" The gap under {rules} LR scaling is not clearly above 0, so closures under it are imprecise."
    return text


def verdict(table: pd.DataFrame) -> str:
    """One paragraph per (dataset, network) of a ``closure_table``: the gap under each LR rule, how many
    settings were evaluated on test (none selected; the range of their closures), and which close the gap
    (or widen it) with an interval that excludes 0; says so instead when SB is not better than LB."""
    if table.empty:
        return (
            "No verdict: no (dataset, network) has both a finished SB baseline and a finished LB+GBN baseline, "
            "so the gap and its closure cannot be assessed."
        )
    paragraphs = [
        _pair_verdict(dataset, network, df) for (dataset, network), df in table.groupby(["dataset", "network"])
    ]
    return "\n\n".join(paragraphs)
