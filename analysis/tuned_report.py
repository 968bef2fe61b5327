"""The tuned comparison's report (docs/tuning.md, "Report"): its Markdown sections, tables (CSV) and the
best-of-k figure, from a ``TunedStudy`` (``analysis.tuned``). ``analysis.report.make`` writes this report
instead of the paper's when the root holds manifest.json.
"""

from __future__ import annotations

import math
import time

import pandas as pd
import seaborn as sns
from matplotlib.ticker import MaxNLocator

from analysis import plotting, tuned
from analysis.formatting import fmt_estimate, markdown
from analysis.tuned_stats import ALPHA, BAND, BOOTSTRAP_B, BOOTSTRAP_SEED
from hpcnoise import tuning

FIGURE = "best_of_k.png"
CSV_NAMES = (
    "tuned_hyperparameters",
    "tuned_accuracy",
    "tuned_closure",
    "best_of_k",
    "tuned_steps",
    "tuned_comparisons",
    "tuned_trials",
)
_BUDGET_WORDS = {"equal": "equal epochs", "long": "trained longer"}


def _csv(df: pd.DataFrame) -> bytes:
    text: str = df.to_csv(index=False)
    return text.encode()


def _num(x: float, fmt: str = ".4g", empty: str = "—") -> str:
    return format(x, fmt) if isinstance(x, (int, float)) and math.isfinite(x) else empty


def _pct(c: float) -> str:
    return f"{100.0 * c:.0f}%"


def protocol(study: tuned.TunedStudy) -> str:
    """What was tuned how, where the test set was read, and the long budget's reuse of the settings."""
    m = study.manifest
    n, seeds = m["trials_per_regime"], len(m["rerun_seeds"])
    text = ""
    if "imported" in m:
        src = m["imported"]
        text = (
            f"**The settings were tuned elsewhere, not in this study**: by `{src['command']}` (selected on "
            f"{src['selected_on']}, commit `{src['commit'][:12]}`; hpcnoise/tuned_settings.json, docs/results.md). "
            "This study ran no trial; it reruns the selected settings with fresh seeds. In that study, "
        )
    text += (
        ("e" if text else "E")
        + f"very regime was tuned alike: {n} trials per (workload, regime), scrambled Halton points of search "
        "spaces of the same width, the study's seed for every trial. The settings were selected on the held-out "
        "validation split, by the rule recorded in manifest.json before any trial ran (highest final validation "
        "accuracy, ties to the lower trial index, diverged trials last; `hpcnoise.tuning.select`), never on test "
        f"data: the test set was read only by the reruns of the selected settings ({seeds} fresh seeds each, "
        "full length), and every test accuracy below is theirs."
    )
    if "long" in m["budgets"]:
        k = m["budgets"]["long"]["factor"]
        text += (
            f" The long budget trains the large-batch regimes {k:g} times as many epochs with the settings tuned "
            "at equal epochs, stretched (warmup and decay epochs in proportion; noise_fraction unchanged): "
            "they were not tuned at that length."
        )
    return text


def _survivor(r: pd.Series, study: tuned.TunedStudy) -> str:
    a = f"{tuned.regime_name(study.manifest, r['a_regime'])} ({_BUDGET_WORDS[r['a_budget']]})"
    b = f"{tuned.regime_name(study.manifest, r['b_regime'])} ({_BUDGET_WORDS[r['b_budget']]})"
    side = "above" if r["diff"] > 0 else "below"
    return (
        f"{r['workload']}: {a} is {abs(r['diff']):.2f} points {side} {b} ({r['accuracy_a']:.2f}% vs "
        f"{r['accuracy_b']:.2f}%; p = {r['p']:.3g}, Holm-adjusted {r['p_holm']:.3g})"
    )


def verdict(study: tuned.TunedStudy, comparisons: pd.DataFrame) -> str:
    """The tuned verdict: how many declared comparisons were made and which survive Holm's correction."""
    m = len(comparisons)
    if m == 0:
        return "No verdict: the manifest declares no comparison whose two cells it reruns."
    untested = comparisons[comparisons["p"].isna()]
    survive = comparisons[comparisons["survives"]]
    text = (
        f"{m} comparison{'s were' if m != 1 else ' was'} declared and made (per workload: "
        + "; ".join(c.question for c in tuned.COMPARISONS)
        + f"), each a two-sided Welch t-test on the reruns' test accuracy, with Holm's step-down correction at "
        f"alpha = {ALPHA:g} over all {m}. "
    )
    if len(untested):
        text += f"{len(untested)} could not be tested (fewer than 2 finished reruns on a side) and count as p = 1. "
    if survive.empty:
        return text + "None survives the correction: no declared difference is established at this level."
    listed = "; ".join(_survivor(r, study) for _, r in survive.iterrows())
    n = len(survive)
    return text + f"{n} of {m} survive{'s' if n == 1 else ''} the correction: {listed}."


def _hyper_md(df: pd.DataFrame) -> str:
    rows = [
        {
            "Workload": r["workload"],
            "Regime": r["label"],
            "Trial": f"{int(r['trial'])} (`{r['run_name']}`)",
            "Validation accuracy (%)": _num(r["val_accuracy"], ".2f"),
            "LR": _num(r["lr"]),
            "Warmup (epochs)": f"{_num(r['warmup_epochs'], '.3g')} ({_num(100 * r['warmup_fraction'], '.1f')}%)",
            "λ": _num(r["noise_multiplier"]),
            "Noise fraction": _num(r["noise_fraction"], ".3g"),
        }
        for _, r in df.iterrows()
    ]
    return markdown(pd.DataFrame(rows))


def _accuracy_md(df: pd.DataFrame) -> str:
    rows = [
        {
            "Workload": r["workload"],
            "Regime": r["label"],
            "Budget": f"{r['budget']} ({int(r['epochs'])} epochs)",
            "Test accuracy (%)": fmt_estimate(
                r["accuracy"], r["ci"], int(r["n_seeds"]), int(r["n_runs"]), 2, int(r["n_diverged"])
            )
            or "no finished rerun",
            "Reruns (finished / planned)": f"{int(r['n_runs'])} / {int(r['n_planned'])}",
        }
        for _, r in df.iterrows()
    ]
    return markdown(pd.DataFrame(rows))


def _closure_cell(r: pd.Series) -> str:
    if r["by_definition"]:
        return f"{_pct(r['closure'])} (by definition)"
    if not math.isfinite(r["closure"]):
        return "undefined (no reruns, or SB and LB equal)"
    if not math.isfinite(r["closure_ci"]):
        return f"{_pct(r['closure'])} (no interval: fewer than 2 seeds)"
    return f"{_pct(r['closure'])} ({_pct(r['closure_low'])} to {_pct(r['closure_high'])})"


def _closure_md(df: pd.DataFrame) -> str:
    rows = [
        {"Workload": r["workload"], "Regime": r["label"], "Budget": r["budget"], "Closure (95% CI)": _closure_cell(r)}
        | {"Against": r["what"]}
        for _, r in df.iterrows()
    ]
    return markdown(pd.DataFrame(rows))


def _best_md(df: pd.DataFrame) -> str:
    wide = []
    for (w, label), g in df.groupby(["workload", "label"], sort=False):
        cells = {f"k={int(r['k'])}": f"{_num(r['mean'], '.2f')} [{_num(r['low'], '.2f')}, {_num(r['high'], '.2f')}]"
                 for _, r in g.iterrows()}  # fmt: skip
        wide.append({"Workload": w, "Regime": label, **cells})
    return markdown(pd.DataFrame(wide))


def _steps_md(df: pd.DataFrame) -> str:
    def reached(r: pd.Series) -> str:
        if not math.isfinite(r["target_val_accuracy"]):
            return "no target (no SB rerun with validation accuracy)"
        if r["n_reached"] == 0:
            return "not reached"
        return f"{r['steps_to_target']:.0f} ({int(r['n_reached'])} of {int(r['n_runs'])} reruns reached it)"

    rows = [
        {
            "Workload": r["workload"],
            "Regime": r["label"],
            "Budget": r["budget"],
            "Global steps": _num(r["steps"], ".0f"),
            "Target: SB's median val. accuracy (%)": _num(r["target_val_accuracy"], ".2f"),
            "Steps to reach it (median)": reached(r),
        }
        for _, r in df.iterrows()
    ]
    return markdown(pd.DataFrame(rows))


def _comparisons_md(df: pd.DataFrame, study: tuned.TunedStudy) -> str:
    rows = [
        {
            "Workload": r["workload"],
            "Comparison": r["question"],
            "Difference (points)": _num(r["diff"], "+.2f"),
            "n (a, b)": f"{int(r['n_a'])}, {int(r['n_b'])}",
            "Welch t (dof)": f"{_num(r['t'], '.2f')} ({_num(r['dof'], '.1f')})",
            "p": _num(r["p"], ".3g", "not tested"),
            "Holm-adjusted p": _num(r["p_holm"], ".3g"),
            f"Survives (alpha {ALPHA:g})": "yes" if r["survives"] else "no",
        }
        for _, r in df.iterrows()
    ]
    return markdown(pd.DataFrame(rows))


def _trial_counts(study: tuned.TunedStudy) -> str:
    rows = []
    for (w, regime), g in study.trials.groupby(["workload", "regime"], sort=False):
        rows.append(
            {
                "Workload": w,
                "Regime": tuned.regime_name(study.manifest, str(regime)),
                "Trials": len(g),
                "Finished": int((g["state"] == "finished").sum()),
                "Blown up (stopped early)": int(g["blown_up"].astype(bool).sum()),
                "Diverged": int((g["state"] == "diverged").sum()),
                "Missing": int((g["state"] == "missing").sum()),
            }
        )
    return markdown(pd.DataFrame(rows))


def best_of_k_figure(table: pd.DataFrame) -> bytes:
    """One panel per workload: the expected best validation accuracy after k trials, per regime, with the
    bootstrap's band; dashed: the exact expectation."""
    panels = plotting.panels(table, ["workload"])
    fig, axes = plotting.grid(len(panels))
    labels = list(dict.fromkeys(table["label"]))
    colours = dict(zip(labels, sns.color_palette("tab10", n_colors=max(len(labels), 1))))
    for ax, (title, df) in zip(axes, panels):
        for lab, g in df.groupby("label", sort=False):
            ax.plot(g["k"], g["mean"], marker="o", color=colours[lab], label=lab)
            ax.fill_between(g["k"], g["low"], g["high"], color=colours[lab], alpha=0.2)
            ax.plot(g["k"], g["exact"], linestyle="--", color=colours[lab], linewidth=0.8)
        ax.set(title=title, xlabel="trials k", ylabel="best validation accuracy (%)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize="small")
    return plotting.png(fig)


def header(study: tuned.TunedStudy) -> list[str]:
    m, runs = study.manifest, study.runs
    gits = sorted({str(g) for g in runs["git"].dropna()}) if "git" in runs else []
    return [
        "# hpcnoise report: the tuned comparison",
        "",
        (
            f"Study root: `{study.root}` ({tuning.MANIFEST}: seed {m['seed']}, workloads "
            f"{', '.join(m['workloads'])}, regimes {', '.join(m['regimes'])}, "
            + ("settings tuned elsewhere" if "imported" in m else f"{m['trials_per_regime']} trials each")
            + f"). Reruns: {len(runs)} finished, {len(study.gone)} diverged, of {len(study.planned)} planned. "
            f"Generated {time.strftime('%Y-%m-%d %H:%M:%S %Z')}."
        ),
        "",
        f"Source commits of the reruns: {', '.join(f'`{g}`' for g in gits) or 'unknown'}.",
        "",
    ]


def sections(study: tuned.TunedStudy, files: dict[str, bytes]) -> list[str]:
    """The tuned report's Markdown lines (verdict first); its tables and figure go into ``files``."""
    tables = {
        "tuned_hyperparameters": tuned.hyperparameters(study),
        "tuned_accuracy": tuned.accuracy_table(study),
        "tuned_closure": tuned.closure_table(study),
        "best_of_k": tuned.best_of_k_table(study),
        "tuned_steps": tuned.steps_table(study),
        "tuned_comparisons": tuned.comparison_table(study),
        "tuned_trials": tuned.problem_runs(study),
    }
    files.update({f"tables/{name}.csv": _csv(df) for name, df in tables.items()})
    md = ["## Verdict", "", verdict(study, tables["tuned_comparisons"]), "", protocol(study), ""]
    md += [f"- {note}." for note in study.notes] + ([""] if study.notes else [])
    md += ["## Tuned hyperparameters", "", "The selected trial of each (workload, regime), chosen on validation.", ""]
    md += [_hyper_md(tables["tuned_hyperparameters"]), ""]
    md += ["## Rerun test accuracy", "", "Mean ± 95% Student-t half-width over the rerun seeds.", ""]
    md += [_accuracy_md(tables["tuned_accuracy"]), ""]
    md += ["## Gap closure (tuned)", "", _CLOSURE_NOTE, "", _closure_md(tables["tuned_closure"]), ""]
    imported = "imported" in study.manifest
    elsewhere = (
        "The trials ran in the study that tuned the settings (see the verdict's paragraph); its report has this."
    )
    md += _best_of_k_lines(study, tables["best_of_k"], files) if not imported else ["## Best-of-k", "", elsewhere, ""]
    md += ["## Steps", "", _STEPS_NOTE, "", _steps_md(tables["tuned_steps"]), ""]
    md += ["## Declared comparisons", "", _comparisons_md(tables["tuned_comparisons"], study), ""]
    md += ["## Blown-up and diverged trials", "", _trial_counts(study) if not imported else elsewhere, ""]
    problems = tables["tuned_trials"]
    md += [f"- {r['kind']} `{r['run_name']}`: {r['state']}" + (f" at epoch {r['epoch']:.0f}" if
           math.isfinite(r["epoch"]) else "") for _, r in problems.iterrows()]  # fmt: skip
    return md + ([""] if len(problems) else ["No trial or rerun blew up or diverged.", ""])


_CLOSURE_NOTE = (
    "Closure = (acc - acc_LB) / (acc_SB - acc_LB) of the reruns' mean test accuracy; SB is the tuned SB at "
    "equal epochs, LB the tuned LB+GBN at the budget named; the 95% interval is the delta method's "
    "(`analysis.closure`)."
)
_STEPS_NOTE = (
    "Global steps of the reruns (median over seeds) and the global step at the end of the first epoch whose "
    "validation accuracy reaches the tuned SB's median final validation accuracy (median over the reruns that "
    "reach it)."
)


def _best_of_k_lines(study: tuned.TunedStudy, table: pd.DataFrame, files: dict[str, bytes]) -> list[str]:
    md = [
        "## Best-of-k",
        "",
        f"The expected best validation accuracy (%) after k trials, k = 1..{study.manifest['trials_per_regime']}: "
        f"k of the regime's trials resampled with replacement {BOOTSTRAP_B} times (seed {BOOTSTRAP_SEED}), "
        f"mean [{100 * BAND:.0f}% band]; a trial without a validation accuracy (diverged, missing) ranks last. "
        "Dashed in the figure: the exact expectation. Validation data only.",
        "",
    ]
    if table.empty or table["mean"].isna().all():
        return md + ["Not drawn: no trial has a validation accuracy.", ""]
    files[f"figures/{FIGURE}"] = best_of_k_figure(table)
    return md + [f"![Best-of-k](figures/{FIGURE})", "", _best_md(table), ""]
