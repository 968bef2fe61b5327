"""The tuned comparison's numbers (docs/tuning.md, "Report") from a tuned study's root: manifest.json,
trials/ and reruns/ run directories (``hpcnoise study --tune``, hpcnoise.tuning).

Selection is ``hpcnoise.tuning.select`` over ``hpcnoise.tuning.trial_rows``: validation metrics only. Every
number computed from the trials here is a validation or training number (the tuned settings, the best-of-k
curve, blown-up and diverged trials); test accuracy is read only from the reruns of the selected settings
(``hpcnoise.tuning.rerun_cells``), which are matched to their (workload, regime, budget) by run name.

Accuracies are 100 (1 - error). Means over rerun seeds carry the report's 95% Student-t interval
(``analysis.stats``); closures the delta-method interval of ``analysis.closure``. The comparisons the
verdict tests are declared here as data (``COMPARISONS``); their statistics are in ``analysis.tuned_stats``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from analysis.closure import Ratio, closure_ci
from analysis.load import Loaded, load
from analysis.runfiles import RunError, is_number, read_json
from analysis.stats import mean_ci, per_seed
from analysis.tuned_stats import ALPHA, best_of_k, holm, welch_test
from analysis.variants import REGIME_NAMES
from hpcnoise import tuning

BUDGETS = ("equal", "long")


@dataclass(frozen=True)
class Comparison:
    """A declared comparison of rerun test accuracy: cell ``a`` against cell ``b``, each (regime, budget)."""

    a: tuple[str, str]
    b: tuple[str, str]
    question: str


# Declared before any trial ran (docs/tuning.md), for each workload; Holm's correction is over all of them.
COMPARISONS = (
    Comparison(("diagf", "equal"), ("lb", "equal"), "DiagF+GBN vs LB+GBN at equal epochs"),
    Comparison(("diagf", "equal"), ("lb", "long"), "DiagF+GBN vs LB+GBN trained longer"),
    Comparison(("lb", "long"), ("lb", "equal"), "LB+GBN trained longer vs LB+GBN at equal epochs"),
)


@dataclass
class TunedStudy:
    """A tuned study as read from its root: the manifest, one row per trial (validation only), the
    selection, the planned reruns and the loaded rerun directories (``runs`` and ``gone``, the diverged,
    both with workload, regime and budget columns)."""

    root: Path
    manifest: dict[str, Any]
    trials: pd.DataFrame
    selected: dict[tuple[str, str], dict[str, Any]]
    planned: pd.DataFrame
    reruns: Loaded
    runs: pd.DataFrame
    gone: pd.DataFrame
    notes: list[str]


def regime_name(manifest: dict[str, Any], regime: str) -> str:
    """ "SB", "LB+GBN", "DiagF+GBN": the registry's name, +GBN when the regime's trials use ghost batch norm."""
    gbn = any(t["config"].get("ghost_bn") for t in manifest["trials"] if t["regime"] == regime)
    return REGIME_NAMES.get(regime, regime) + ("+GBN" if gbn else "")


def _blown_up_epoch(run_dir: Path) -> float:
    try:
        record = read_json(run_dir / "summary.json").get("blown_up")
    except (RunError, AttributeError):
        return math.nan
    return float(record["epoch"]) if isinstance(record, dict) and "epoch" in record else math.nan


def _trial_frame(root: Path, rows: list[dict[str, Any]], selected: dict[tuple[str, str], Any]) -> pd.DataFrame:
    """The trial rows with their validation accuracy, the epoch they blew up and whether they were selected."""
    chosen = {(w, r, t["trial"]) for (w, r), t in selected.items()}
    out = []
    for row in rows:
        err = row.get("final_val_error")
        out.append(
            {
                **{k: row[k] for k in ("workload", "regime", "trial", "run_name", "state", "blown_up")},
                "val_accuracy": 100.0 * (1.0 - err) if is_number(err) and row["state"] == "finished" else math.nan,
                "blown_up_epoch": _blown_up_epoch(root / "trials" / row["run_name"]) if row["blown_up"] else math.nan,
                "selected": (row["workload"], row["regime"], row["trial"]) in chosen,
            }
        )
    return pd.DataFrame(out)


def _planned(manifest: dict[str, Any], selected: dict[tuple[str, str], Any], root: Path) -> pd.DataFrame:
    """Every rerun the selection implies: run name, workload, regime, budget, seed and config (as JSON)."""
    rows = []
    for budget in (b for b in BUDGETS if b in manifest["budgets"]):
        for (workload, regime), trial in selected.items():
            for cfg in tuning.rerun_cells(manifest, {(workload, regime): trial}, budget, root):
                rows.append(
                    {
                        "run_name": cfg.run_name,
                        "workload": workload,
                        "regime": regime,
                        "budget": budget,
                        "trial": trial["trial"],
                        "seed": cfg.seed,
                        "epochs": cfg.epochs,
                        "config": json.dumps(cfg.to_dict(), sort_keys=True),
                    }
                )
    return pd.DataFrame(rows, columns=["run_name", "workload", "regime", "budget", "trial", "seed", "epochs", "config"])


def _with_cells(df: pd.DataFrame, planned: pd.DataFrame) -> pd.DataFrame:
    """``df`` (runs or diverged of the reruns) restricted to the planned reruns, with their cell columns."""
    cols = ["run_name", "workload", "budget"]  # the run's own regime column (from config.json) stays
    if df.empty:
        return pd.DataFrame(columns=[*df.columns, *cols, "regime"])
    own = df.drop(columns=[c for c in cols if c in df.columns])  # e.g. a diverged run's own run_name column
    return own.merge(planned[cols], left_on="run_id", right_on="run_name", how="inner")


def _selection_notes(root: Path, selected: dict[tuple[str, str], dict[str, Any]]) -> list[str]:
    """Where the study's own record disagrees with the selection made here, and reruns outside it."""
    notes = []
    path = root / tuning.SELECTED
    if path.exists():
        record = json.loads(path.read_text())
        for (w, r), t in selected.items():
            kept = record.get(w, {}).get(r, {}).get("trial")
            if kept is not None and kept != t["trial"]:
                notes.append(f"{w}/{r}: {tuning.SELECTED} records trial {kept}, the trials now select {t['trial']}")
    return notes


def read_study(root: Path) -> TunedStudy:
    """A tuned study's root read as a ``TunedStudy`` (ConfigError when its manifest is missing or foreign)."""
    manifest = tuning.read_manifest(root)
    rows = tuning.trial_rows(root)
    selected = tuning.select(manifest, rows)
    planned = _planned(manifest, selected, root)
    reruns = load(root / "reruns") if (root / "reruns").is_dir() else Loaded(root / "reruns", *[pd.DataFrame()] * 4)
    runs, gone = _with_cells(reruns.runs, planned), _with_cells(reruns.diverged, planned)
    notes = _selection_notes(root, selected)
    outside = sorted(set(reruns.runs.get("run_id", [])) - set(planned["run_name"]))
    if outside:
        notes.append(f"{len(outside)} run directories under reruns/ are not reruns of this selection (left out)")
    trials = _trial_frame(root, rows, selected)
    return TunedStudy(root, manifest, trials, selected, planned, reruns, runs, gone, notes)


# --- the tables -------------------------------------------------------------------------------------------------
def cells(study: TunedStudy) -> list[tuple[str, str, str]]:
    """Every (workload, regime, budget) with planned reruns, in the manifest's order."""
    m = study.manifest
    return [
        (w, r, b)
        for w in m["workloads"]
        for b in (b for b in BUDGETS if b in m["budgets"])
        for r in m["regimes"]
        if r in m["budgets"][b]["regimes"]
    ]


def _cell(df: pd.DataFrame, workload: str, regime: str, budget: str) -> pd.DataFrame:
    if df.empty:
        return df
    return df[(df["workload"] == workload) & (df["regime"] == regime) & (df["budget"] == budget)]


def accuracies(study: TunedStudy, workload: str, regime: str, budget: str) -> list[float]:
    """The cell's rerun test accuracies, one per seed (runs that repeat a seed averaged first)."""
    cell = _cell(study.runs, workload, regime, budget)
    return list(per_seed(cell, "test_accuracy")) if len(cell) else []


def hyperparameters(study: TunedStudy) -> pd.DataFrame:
    """The selected trial of each (workload, regime): its index, run name, validation accuracy and settings."""
    rows = []
    for (workload, regime), t in study.selected.items():
        cfg, noisy = t["config"], "noise_multiplier" in t["values"]
        trial = study.trials[(study.trials["run_name"] == t["run_name"])].iloc[0]
        # an imported selection (its trials ran elsewhere) carries the accuracy it was selected with
        imported = t.get("val_accuracy") if "imported" in study.manifest else None
        rows.append(
            {
                "workload": workload,
                "regime": regime,
                "label": regime_name(study.manifest, regime),
                "trial": t["trial"],
                "run_name": t["run_name"],
                "val_accuracy": float(imported) if imported is not None else trial["val_accuracy"],
                "lr": float(cfg["lr"]),
                "warmup_epochs": float(cfg["warmup_epochs"]),
                "warmup_fraction": float(t["values"].get("warmup_fraction", math.nan)),
                "noise_multiplier": float(cfg["noise_multiplier"]) if noisy else math.nan,
                "noise_fraction": float(cfg.get("noise_fraction", math.nan)) if noisy else math.nan,
            }
        )
    return pd.DataFrame(rows)


def accuracy_table(study: TunedStudy) -> pd.DataFrame:
    """Rerun test accuracy per (workload, regime, budget): mean and 95% t interval over seeds."""
    rows = []
    for w, r, b in cells(study):
        est = mean_ci(accuracies(study, w, r, b))
        cell = _cell(study.runs, w, r, b)
        rows.append(
            {
                "workload": w,
                "regime": r,
                "label": regime_name(study.manifest, r),
                "budget": b,
                "epochs": study.manifest["budgets"][b]["epochs"][w][r],
                "n_runs": len(cell),
                "n_seeds": est.n,
                "n_diverged": len(_cell(study.gone, w, r, b)),
                "n_planned": len(_cell(study.planned, w, r, b)),
                "accuracy": est.mean,
                "ci": est.ci,
                "ci_low": est.low,
                "ci_high": est.high,
            }
        )
    return pd.DataFrame(rows)


# (regime, budget) of the row, the LB baseline's budget, and what it answers; SB (equal) is 100% throughout.
_CLOSURES = (
    ("sb", "equal", "equal", "SB tuned: 100% by definition"),
    ("lb", "equal", "equal", "LB+GBN tuned: 0% by definition"),
    ("diagf", "equal", "equal", "DiagF+GBN tuned, against LB+GBN at equal epochs"),
    ("lb", "long", "equal", "LB+GBN trained longer, against LB+GBN at equal epochs"),
    ("diagf", "long", "long", "DiagF+GBN trained longer, against LB+GBN trained as long"),
)


def closure_table(study: TunedStudy) -> pd.DataFrame:
    """Closures (acc - acc_LB) / (acc_SB - acc_LB) of the tuned reruns with their delta-method intervals;
    SB is the tuned SB at equal epochs, LB the tuned LB+GBN at the budget named in ``lb_budget``."""
    present = set(cells(study))
    rows = []
    for w in study.manifest["workloads"]:
        sb = accuracies(study, w, "sb", "equal")
        for regime, budget, lb_budget, what in _CLOSURES:
            if (w, regime, budget) not in present or (w, "lb", lb_budget) not in present:
                continue
            lb = accuracies(study, w, "lb", lb_budget)
            by_definition = (regime, budget) in (("sb", "equal"), ("lb", "equal"))
            ratio = Ratio(math.nan, None) if by_definition else closure_ci(accuracies(study, w, regime, budget), lb, sb)
            rows.append(
                {
                    "workload": w,
                    "regime": regime,
                    "label": regime_name(study.manifest, regime),
                    "budget": budget,
                    "lb_budget": lb_budget,
                    "what": what,
                    "closure": 1.0 if regime == "sb" else 0.0 if by_definition else ratio.value,
                    "closure_ci": ratio.half if ratio.half is not None else math.nan,
                    "closure_low": ratio.low,
                    "closure_high": ratio.high,
                    "by_definition": by_definition,
                }
            )
    return pd.DataFrame(rows)


def best_of_k_table(study: TunedStudy) -> pd.DataFrame:
    """The best-of-k curve of each (workload, regime), k = 1..N, over its trials' validation accuracy."""
    rows = []
    for (w, r), group in study.trials.groupby(["workload", "regime"], sort=False):
        values = [float(v) for v in group["val_accuracy"]]
        for point in best_of_k(values, range(1, len(values) + 1)):
            rows.append({"workload": w, "regime": r, "label": regime_name(study.manifest, str(r)), **vars(point)})
    return pd.DataFrame(rows)


def _steps_to(epochs: pd.DataFrame, target: float) -> float:
    """The global step at the end of the first epoch whose validation accuracy reaches ``target`` (NaN: never)."""
    if "val_error" not in epochs or not math.isfinite(target):
        return math.nan
    ordered = epochs.sort_values("epoch")
    hit = ordered[100.0 * (1.0 - ordered["val_error"].astype(float)) >= target]
    return float(hit["step"].iloc[0]) if len(hit) else math.nan


def target_accuracy(study: TunedStudy, workload: str) -> float:
    """The tuned SB's median final validation accuracy over its equal-budget reruns (NaN without any)."""
    sb = _cell(study.runs, workload, "sb", "equal")
    if sb.empty or "final_val_error" not in sb:
        return math.nan
    val = 100.0 * (1.0 - sb["final_val_error"].astype(float))
    return float(np.nanmedian(val)) if val.notna().any() else math.nan


def steps_table(study: TunedStudy) -> pd.DataFrame:
    """Global steps of each cell's reruns and the steps each took to reach the tuned SB's median final
    validation accuracy (the median over those that reached it; how many did)."""
    epochs = study.reruns.epochs
    rows = []
    for w, r, b in cells(study):
        cell, target = _cell(study.runs, w, r, b), target_accuracy(study, w)
        per_run = [epochs[epochs["run_id"] == run_id] for run_id in cell["run_id"]] if len(cell) else []
        steps = [float(e["step"].max()) for e in per_run]
        reached = [s for s in (_steps_to(e, target) for e in per_run) if math.isfinite(s)]
        rows.append(
            {
                "workload": w,
                "regime": r,
                "label": regime_name(study.manifest, r),
                "budget": b,
                "n_runs": len(cell),
                "steps": float(np.median(steps)) if steps else math.nan,
                "target_val_accuracy": target,
                "n_reached": len(reached),
                "steps_to_target": float(np.median(reached)) if reached else math.nan,
            }
        )
    return pd.DataFrame(rows)


COMPARISON_COLUMNS = [
    "workload", "question", "a_regime", "a_budget", "b_regime", "b_budget", "n_a", "n_b", "accuracy_a",
    "accuracy_b", "diff", "t", "dof", "p",
]  # fmt: skip


def _test(study: TunedStudy, workload: str, c: Comparison) -> dict[str, Any]:
    a, b = accuracies(study, workload, *c.a), accuracies(study, workload, *c.b)
    res = welch_test(a, b)
    ea, eb = mean_ci(a), mean_ci(b)
    return {
        "workload": workload,
        "question": c.question,
        "a_regime": c.a[0],
        "a_budget": c.a[1],
        "b_regime": c.b[0],
        "b_budget": c.b[1],
        "n_a": ea.n,
        "n_b": eb.n,
        "accuracy_a": ea.mean,
        "accuracy_b": eb.mean,
        "diff": res.diff,
        "t": res.t,
        "dof": res.dof,
        "p": res.p,
    }


def declared(study: TunedStudy) -> list[tuple[str, Comparison]]:
    """The declared comparisons this study's manifest has both cells of: (workload, comparison)."""
    present = {(w, r, b) for w, r, b in cells(study)}
    return [
        (w, c)
        for w in study.manifest["workloads"]
        for c in COMPARISONS
        if (w, *c.a) in present and (w, *c.b) in present
    ]


def comparison_table(study: TunedStudy, alpha: float = ALPHA) -> pd.DataFrame:
    """Each declared comparison's Welch t-test on rerun test accuracy, with Holm's adjusted p-value over
    all of them and whether it survives at ``alpha``; a comparison without 2 seeds a side has p NaN (it
    counts as p = 1 in Holm's family)."""
    df = pd.DataFrame([_test(study, w, c) for w, c in declared(study)], columns=COMPARISON_COLUMNS)
    df["p_holm"] = holm([float(p) for p in df["p"]])
    df["survives"] = df["p_holm"] <= alpha
    return df


def problem_runs(study: TunedStudy) -> pd.DataFrame:
    """Blown-up and diverged trials and reruns: one row each (kind "trial" or "rerun")."""
    rows = []
    t = study.trials
    for _, r in t[(t["state"] == "diverged") | t["blown_up"].astype(bool)].iterrows():
        state = "diverged" if r["state"] == "diverged" else "blown up"
        epoch = r["blown_up_epoch"] if state == "blown up" else math.nan
        rows.append({"kind": "trial", **{k: r[k] for k in ("workload", "regime", "run_name")}, "state": state})
        rows[-1]["epoch"] = epoch
    for _, r in study.gone.iterrows():
        rows.append({"kind": "rerun", **{k: r[k] for k in ("workload", "regime", "run_name")}, "state": "diverged"})
        rows[-1]["epoch"] = r.get("diverged_epoch", math.nan)
    for _, r in study.runs.iterrows():
        epoch = _blown_up_epoch(Path(str(r["path"])))
        if math.isfinite(epoch):
            rows.append({"kind": "rerun", **{k: r[k] for k in ("workload", "regime", "run_name")}, "state": "blown up"})
            rows[-1]["epoch"] = epoch
    return pd.DataFrame(rows, columns=["kind", "workload", "regime", "run_name", "state", "epoch"])
