"""The generalisation gap in words: did the SB-vs-LB gap appear, and did DiagF at the paper's noise close it?

``gap_summary`` is the report's paragraph on it (``analysis.report``): test error in percent, mean over seeds,
with 95% Welch t intervals of the differences, in Table 1's setting (linear LR scaling, lambda = 1).
"""

from __future__ import annotations

import pandas as pd

from analysis.stats import mean_ci, per_seed, welch_diff


def _errors(runs: pd.DataFrame) -> list[float]:
    """Final test error in percent, one value per seed."""
    return list(100.0 * per_seed(runs, "final_test_error"))


def _pick(runs: pd.DataFrame, regime: str, gbn: bool | None) -> pd.DataFrame:
    """Runs of ``regime``, preferring those with ghost batch norm as ``gbn`` says (any if none match)."""
    sel = runs[runs["regime"] == regime]
    if gbn is not None and (sel["gbn"] == gbn).any():
        return sel[sel["gbn"] == gbn]
    if (sel["gbn"]).any():
        return sel[sel["gbn"]]
    return sel


def _gap_sentence(dataset: str, network: str, cell: pd.DataFrame) -> str | None:
    sb = cell[cell["regime"] == "sb"]
    lb = _pick(cell, "lb", True)  # the paper's baseline is LB with ghost batch norm
    if sb.empty or lb.empty:
        return None
    e_sb, e_lb = _errors(sb), _errors(lb)
    lb_name = lb["label"].iloc[0]
    gap = welch_diff(e_lb, e_sb)
    text = (
        f"{dataset}/{network}: {lb_name} {mean_ci(e_lb).mean:.2f}% vs SB "
        f"{mean_ci(e_sb).mean:.2f}% test error ({len(e_lb)} and {len(e_sb)} seeds): "
    )
    significant = False
    if gap.half is None:
        text += f"gap {gap.mean:.2f} points, but too few seeds for a confidence interval (2 or more per regime needed)"
    elif gap.low > 0:
        significant = True
        text += f"gap {gap.mean:.2f} ± {gap.half:.2f} points"
    elif gap.high < 0:
        text += f"no generalisation gap: LB is {-gap.mean:.2f} ± {gap.half:.2f} points better than SB"
    else:
        text += f"no clear gap: {gap.mean:.2f} ± {gap.half:.2f} points, an interval that includes 0"
    diag = _pick(_paper_noise(cell), "diagf", bool(lb["gbn"].iloc[0]))
    if diag.empty:
        return text + "; no DiagF runs at the paper's noise (lambda = 1) to test its closure."
    e_d = _errors(diag)
    closed = welch_diff(e_lb, e_d)  # LB error - DiagF error: positive = DiagF better
    d_name, d_err = diag["label"].iloc[0], mean_ci(e_d).mean
    pm = f" ± {closed.half:.2f}" if closed.half is not None else ""
    unsure = closed.half is not None and closed.low <= 0 <= closed.high
    text += f"; {d_name} ({d_err:.2f}%, {len(e_d)} seeds) is {abs(closed.mean):.2f}{pm} points "
    if closed.mean <= 0:
        return text + "worse than LB" + (", so it does not close the gap." if significant else ".")
    text += "better than LB"
    if significant:
        text += f", closing {100.0 * closed.mean / gap.mean:.0f}% of the gap"
    return text + (" (an interval that includes 0)." if unsure else ".")


def _paper_noise(runs: pd.DataFrame) -> pd.DataFrame:
    """The runs at the paper's noise: multiplier lambda = 1, not calibrated (other multipliers: the closure)."""
    if runs.empty or "noise_multiplier" not in runs:
        return runs
    calibration = runs["noise_calibration"] if "noise_calibration" in runs else pd.Series("paper", index=runs.index)
    return runs[(runs["noise_multiplier"].fillna(1.0) == 1.0) & (calibration.fillna("paper") == "paper")]


def _linear(runs: pd.DataFrame) -> pd.DataFrame:
    """SB and the linear-scaling runs: Table 1's setting."""
    return runs[(runs["regime"] == "sb") | (runs["lr_scaling"] == "linear")] if not runs.empty else runs


def _diverged_note(diverged: pd.DataFrame, pairs: set[tuple[str, str]]) -> str:
    """The sentence naming the diverged SB, LB and DiagF runs of the (dataset, network) pairs discussed."""
    discussed = pd.Series([(d, m) in pairs for d, m in zip(diverged["dataset"], diverged["model"])], dtype=bool)
    gone = diverged[discussed.to_numpy() & diverged["regime"].isin(["sb", "lb", "diagf"]).to_numpy()]
    if gone.empty:
        return ""
    counts = gone.groupby(["dataset", "model", "label"], sort=True).size()
    parts = [f"{n} {lab} on {d}/{m}" for (d, m, lab), n in counts.items()]
    return f" Not in these means: {len(gone)} diverged run{'s' if len(gone) != 1 else ''} ({', '.join(parts)})."


def gap_summary(runs_df: pd.DataFrame, diverged: pd.DataFrame | None = None) -> str:
    """One paragraph, with numbers, on whether the SB-vs-LB generalisation gap appeared and DiagF closed it.

    Uses linear-scaling runs (Table 1's setting) and DiagF at the paper's noise (lambda = 1); test error in
    percent, mean over seeds; intervals are 95% Welch t intervals of differences of means. Says so plainly
    when there is no gap or too few seeds, and names the diverged runs (``Loaded.diverged``) of the
    (dataset, network) pairs it discusses, which are not in its means.
    """
    if runs_df.empty:
        return "No finished runs, so the generalisation gap cannot be assessed."
    runs = _linear(runs_df)
    sentences, pairs = [], set()
    for (dataset, network), cell in runs.groupby(["dataset", "model"], sort=True):
        sentence = _gap_sentence(dataset, network, cell)
        if sentence is not None:
            sentences.append(sentence)
            pairs.add((dataset, network))
    if not sentences:
        return (
            "No (dataset, network) has both SB and LB runs with linear learning-rate scaling, so the "
            "generalisation gap cannot be assessed."
        )
    note = _diverged_note(_linear(diverged), pairs) if diverged is not None and not diverged.empty else ""
    return (
        "Generalisation gap (final test error, mean over seeds; ± is a 95% Welch t interval of the difference). "
        + " ".join(sentences)
        + note
    )
