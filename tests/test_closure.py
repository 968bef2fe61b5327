"""Gap closure, its delta-method interval, the verdict, the lambda and tau figures, measured rows first.

The runs are hand-made run directories in the formats of hpcnoise.rundir (config.json from a real Config,
metrics.jsonl, summary.json, diagnostics.jsonl with the "temperature" entry of
``hpcnoise.measure.measured_temperature``) with chosen final test errors, so every closure is known in
closed form: a grid like the ``mnist1d-grid`` table (SB; LB+GBN and DiagF+GBN at lambda = 1/8 .. 1 and
temperature-calibrated, under linear and sqrt scaling; 3 seeds each).
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from analysis import closure, figures, report, tables
from analysis.load import load
from hpcnoise.cli.report import main as report_main
from hpcnoise.temperature import applied_multiplier
from tests.helpers.configs import small_config
from tests.test_analysis import PNG_MAGIC, _diverged_run

T4 = float(stats.t.ppf(0.975, 4))  # 3 seeds in each of three groups with equal spread: 4 degrees of freedom

# (regime, ghost_bn, lr_scaling, lambda, calibration) -> the accuracy (%) of seeds 0, 1, 2.
SB = ("sb", False, "none", 1.0, "paper")
LB_LIN = ("lb", True, "linear", 1.0, "paper")
LB_SQRT = ("lb", True, "sqrt", 1.0, "paper")
GRID: dict[tuple[str, bool, str, float, str], list[float]] = {
    SB: [90.0, 91.0, 92.0],
    LB_LIN: [80.0, 81.0, 82.0],  # gap 10 points
    LB_SQRT: [84.0, 85.0, 86.0],  # gap 6 points
    ("diagf", True, "linear", 1.0, "paper"): [70.0, 71.0, 72.0],  # closure -1, significantly negative
    ("diagf", True, "linear", 0.5, "paper"): [85.0, 86.0, 87.0],  # closure 0.5: the worked example
    ("diagf", True, "linear", 0.25, "paper"): [80.0, 82.0, 84.0],  # closure 0.1, interval includes 0
    ("diagf", True, "linear", 0.125, "paper"): [80.5, 81.0, 81.5],  # closure 0
    ("diagf", True, "linear", 1.0, "temperature"): [79.0, 81.0, 83.0],  # lambda = 0 under linear: closure 0
    ("diagf", True, "sqrt", 1.0, "paper"): [83.0, 84.0, 85.0],  # closure -1/6, interval includes 0
    ("diagf", True, "sqrt", 0.5, "paper"): [87.0, 88.0, 89.0],  # closure 1/2
    ("diagf", True, "sqrt", 0.25, "paper"): [89.0, 90.0, 91.0],  # closure 5/6: the best
    ("diagf", True, "sqrt", 0.125, "paper"): [85.0, 86.0, 87.0],  # closure 1/6
    ("diagf", True, "sqrt", 1.0, "temperature"): [88.0, 89.0, 90.0],  # lambda sqrt(1/3) at 256/64: closure 2/3
}
TAU = {"linear": 1.0, "sqrt": 0.5}  # tau of a noise-free LB step at 256/64: k M_S / M_L = 1 (linear), 1/2 (sqrt)


def _finished_run(
    root: Path,
    name: str,
    spec: tuple[str, bool, str, float, str],
    seed: int,
    accuracy: float,
    dataset: str = "mnist1d",
    tau: float | None = None,
) -> Path:
    """A finished run directory: config.json of a real Config, one epoch of metrics, summary.json with the
    final test error of ``accuracy``, and (``tau``) diagnostics.jsonl whose last row carries that tau."""
    regime, gbn, rule, lam, calibration = spec
    cfg = small_config(
        out_dir=str(root),
        run_name=name,
        dataset=dataset,
        regime=regime,
        ghost_bn=gbn,
        ghost_size=64,
        lr_scaling=rule,
        noise_multiplier=lam,
        noise_calibration=calibration,
        seed=seed,
    )
    run = root / name
    run.mkdir(parents=True)
    record = {"config": cfg.to_dict(), "world_size": 1, "device": "cpu", "noise_multiplier": applied_multiplier(cfg)}
    (run / "config.json").write_text(json.dumps(record))
    error = 1.0 - accuracy / 100.0
    batch = cfg.small_batch if regime == "sb" else cfg.batch_size
    metrics = {"epoch": 1, "step": 8, "train_error": 0.05, "test_error": error, "batch_size": batch}
    (run / "metrics.jsonl").write_text(json.dumps(metrics) + "\n")
    (run / "summary.json").write_text(json.dumps({"final_test_error": error, "final_train_error": 0.05, "seed": seed}))
    if tau is not None:
        rows = [
            {"epoch": 2, "temperature": {"tau": tau, "trace_c": 2.0, "injected_variance": 0.1, "batch": batch}},
            {"epoch": 1, "temperature": {"tau": 1e6, "trace_c": 1.0, "injected_variance": 0.0, "batch": batch}},
            {"epoch": 2, "fisher_frobenius": 3.0},  # no temperature: not the tau row
        ]
        (run / "diagnostics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run


def _name(spec: tuple[str, bool, str, float, str], seed: int) -> str:
    regime, _, rule, lam, calibration = spec
    return f"{regime}-{rule}-x{lam:g}-{calibration}-s{seed}"


def _tau(spec: tuple[str, bool, str, float, str], seed: int) -> float:
    return TAU.get(spec[2], 1.0) * (1.0 + spec[3]) * (1.0 + 0.01 * seed)


@pytest.fixture(scope="module")
def grid_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The grid (39 runs), a diverged 4th seed of the paper's DiagF+GBN, a DiagF run under the unscaled rule
    (no LB baseline for it) and a pair (mnist/mnist_mlp) with no SB run."""
    root = tmp_path_factory.mktemp("grid")
    for spec, accuracies in GRID.items():
        for seed, acc in enumerate(accuracies):
            _finished_run(root, _name(spec, seed), spec, seed, acc, tau=_tau(spec, seed))
    paper = ("diagf", True, "linear", 1.0, "paper")
    _diverged_run(root, root / _name(paper, 0), "div/diagf-s3", 2, "loss is nan", True, seed=3)
    _finished_run(root, "diagf-none-s0", ("diagf", True, "none", 1.0, "paper"), 0, 88.0)
    _finished_run(root, "mnist-lb-s0", LB_LIN, 0, 97.0, dataset="mnist")
    return root


def _row(table: pd.DataFrame, label: str) -> pd.Series:
    rows = table[table["label"] == label]
    assert len(rows) == 1, label
    return rows.iloc[0]


# --- the interval -----------------------------------------------------------------------------------------------
def test_closure_and_delta_interval_hand_computed() -> None:
    sb, lb = [90.0, 91.0, 92.0], [80.0, 81.0, 82.0]
    # closure (86 - 81) / (91 - 81) = 1/2; every group has sd 1 and n 3, so v = 1/3 and
    # se^2 = (1/3 + (1/2)^2 / 3 + (1/2)^2 / 3) / 10^2 = 0.5 / 100, nu = 0.5^2 / ((1/9 + 2 / 144) / 2) = 4.
    got = closure.closure_ci([85.0, 86.0, 87.0], lb, sb)
    assert got.value == pytest.approx(0.5, abs=1e-12)
    assert got.se == pytest.approx(math.sqrt(0.5) / 10, rel=1e-12)
    assert got.dof == pytest.approx(4.0, rel=1e-12)
    assert got.half == pytest.approx(T4 * math.sqrt(0.5) / 10, rel=1e-12)
    assert (got.low, got.high) == pytest.approx((0.5 - T4 * 0.0707107, 0.5 + T4 * 0.0707107), rel=1e-6)
    # closure -1: weights (1/3, 1/3, 4/3): se = sqrt(2) / 10, nu = 2^2 / ((1 + 1 + 16) / 9 / 2) = 4.
    neg = closure.closure_ci([70.0, 71.0, 72.0], lb, sb)
    assert neg.value == pytest.approx(-1.0) and neg.dof == pytest.approx(4.0)
    assert neg.half == pytest.approx(T4 * math.sqrt(2) / 10, rel=1e-12) and neg.high < 0
    # Unequal seeds and spreads: the Welch-Satterthwaite degrees of freedom, written out.
    r, lo, s = [60.0, 64.0, 65.0, 61.0], [55.0, 57.0], [70.0, 71.5, 69.0]
    c = (np.mean(r) - np.mean(lo)) / (np.mean(s) - np.mean(lo))
    w = np.array([np.var(r, ddof=1) / 4, c**2 * np.var(s, ddof=1) / 3, (1 - c) ** 2 * np.var(lo, ddof=1) / 2])
    nu = w.sum() ** 2 / (w[0] ** 2 / 3 + w[1] ** 2 / 2 + w[2] ** 2 / 1)
    got = closure.closure_ci(r, lo, s)
    assert got.value == pytest.approx(c) and got.dof == pytest.approx(nu)
    assert got.half == pytest.approx(stats.t.ppf(0.975, nu) * math.sqrt(w.sum()) / (np.mean(s) - np.mean(lo)))


def test_delta_standard_error_is_the_gradient_of_the_ratio() -> None:
    """se^2 = sum_i (dc/dmean_i)^2 v_i, the gradient taken numerically (the delta method's definition)."""
    groups = {"r": [61.0, 66.0, 63.5], "l": [58.0, 59.5, 57.0, 58.8], "s": [70.0, 73.0, 71.0]}
    means = {k: float(np.mean(v)) for k, v in groups.items()}

    def ratio(m: dict[str, float]) -> float:
        return (m["r"] - m["l"]) / (m["s"] - m["l"])

    var = 0.0
    for k, values in groups.items():
        h = 1e-6
        up, down = dict(means, **{k: means[k] + h}), dict(means, **{k: means[k] - h})
        var += ((ratio(up) - ratio(down)) / (2 * h)) ** 2 * float(np.var(values, ddof=1)) / len(values)
    got = closure.closure_ci(groups["r"], groups["l"], groups["s"])
    assert got.value == pytest.approx(ratio(means)) and got.se == pytest.approx(math.sqrt(var), rel=1e-6)


def test_closure_degenerate_cases() -> None:
    assert closure.closure_ci([85.0], [80.0, 81.0], [90.0, 91.0]).half is None  # one seed: no interval
    assert closure.closure_ci([85.0], [80.0, 81.0], [90.0, 91.0]).value == pytest.approx(85 / 10 - 80.5 / 10)
    assert math.isnan(closure.closure_ci([85.0, 86.0], [80.0, 82.0], [81.0, 81.0]).value)  # no gap
    assert math.isnan(closure.closure_ci([], [80.0], [90.0]).value)
    same = closure.closure_ci([85.0, 85.0], [80.0, 80.0], [90.0, 90.0])  # identical seeds: zero width
    assert (same.value, same.half) == (0.5, 0.0)


# --- the table --------------------------------------------------------------------------------------------------
def test_closure_table_on_the_grid(grid_root: Path) -> None:
    loaded = load(grid_root)
    assert loaded.skipped == [] and len(loaded.runs) == 39 + 2 and len(loaded.diverged) == 1
    table, left_out = closure.closure_table(loaded.runs, loaded.diverged)
    assert len(table) == 13 and table["label"].iloc[0] == "SB"  # SB first, then each rule's LB and regimes
    assert table["lr_scaling"].tolist()[1:7] == ["linear"] * 6 and table["lr_scaling"].tolist()[7:] == ["sqrt"] * 6
    assert table["role"].tolist()[1] == "LB baseline" and table["label"].iloc[7] == "LB+GBN (sqrt)"
    # lambda ascending within each rule, temperature-calibrated (0 under linear, sqrt(1/3) under sqrt) in place
    assert table["noise_multiplier"].iloc[2:7].tolist() == [0.0, 0.125, 0.25, 0.5, 1.0]
    assert table["noise_multiplier"].iloc[11] == pytest.approx(math.sqrt((1 / (2 * 64) - 1 / 256) / (1 / 64 - 1 / 256)))

    half = _row(table, "DiagF+GBN x0.5")
    assert (half["closure"], half["n_seeds"]) == (pytest.approx(0.5), 3)
    assert half["closure_ci"] == pytest.approx(T4 * math.sqrt(0.5) / 10, rel=1e-9)
    assert half["closure_low"] > 0 and half["lb_label"] == "LB+GBN" and half["gap"] == pytest.approx(10.0)
    assert half["accuracy"] == pytest.approx(86.0) and half["ci"] == pytest.approx(stats.t.ppf(0.975, 2) / math.sqrt(3))
    paper = _row(table, "DiagF+GBN")
    assert paper["closure"] == pytest.approx(-1.0) and paper["closure_high"] < 0
    assert (paper["n_seeds"], paper["n_diverged"]) == (3, 1)  # the diverged 4th seed is counted, not averaged
    assert _row(table, "DiagF+GBN (sqrt) x0.25")["closure"] == pytest.approx(5 / 6)  # against LB (sqrt), gap 6
    temp = _row(table, "DiagF+GBN (sqrt) x0.577 (temperature)")
    assert temp["closure"] == pytest.approx(2 / 3) and temp["noise_calibration"] == "temperature"
    assert _row(table, "DiagF+GBN x0 (temperature)")["closure"] == pytest.approx(0.0, abs=1e-9)
    baselines = table[table["role"] != "regime"]
    assert baselines["closure"].isna().all() and math.isnan(_row(table, "SB")["noise_multiplier"])
    assert left_out == [
        "mnist/mlp LB+GBN: no finished SB baseline for mnist/mlp",
        "mnist1d/mlp DiagF+GBN (unscaled LR): no finished LB+GBN baseline under none LR scaling",
    ]

    md = closure.closure_markdown(table)
    assert "| mnist1d | mlp | DiagF+GBN x0.5 | linear | 0.5 | 3 | 86.00 ± 2.48 (n=3) | 50% (30% to 70%) |" in md
    assert "| mnist1d | mlp | SB | — | — | 3 | 91.00 ± 2.48 (n=3) | 100% (by definition) |" in md
    assert "| DiagF+GBN | linear | 1 | 3 | 71.00 ± 2.48 (n=3, 1 diverged) | -100% (-139% to -61%) |" in md
    assert "| 0.577 (temperature) |" in md


def test_report_answers_the_question(grid_root: Path) -> None:
    files = report.build(load(grid_root))
    md = files["report.md"].decode()
    csv = pd.read_csv(io.BytesIO(files["tables/closure.csv"]))
    assert len(csv) == 13 and csv.loc[csv["label"] == "DiagF+GBN x0.5", "closure"].item() == pytest.approx(0.5)
    assert "delta method (not a bootstrap)" in md.split("## Gap closure")[1]
    assert "- mnist1d/mlp DiagF+GBN (unscaled LR): no finished LB+GBN baseline under none LR scaling." in md

    verdict = md.split("## Verdict\n\n")[1].split("\n")[0]
    assert verdict.startswith("mnist1d/mlp: SB reaches 91.00% test accuracy (3 seeds); LB+GBN (81.00%) is 10.00 ± ")
    assert "LB+GBN (sqrt) (85.00%) is 6.00 ± " in verdict
    # A sensitivity study: the 10 settings were evaluated on test, none is chosen (closures -100% to 5/6).
    assert "10 settings were evaluated on the test set and none is selected: this is a sensitivity study" in verdict
    assert "not corrected for the 10 settings; they range from -100% to 83%." in verdict
    assert "best closure" not in verdict.lower()
    # closures whose interval excludes 0 (hand-computed): linear x0.5 (0.50 - 0.20), sqrt x0.25 (0.83 - 0.35),
    # x0.5 (0.50 - 0.33) and temperature (0.67 - 0.33); not sqrt x0.125 (0.17 - 0.35) nor linear x0.25 (0.10 - 0.35)
    assert "4 of the 10 settings close the gap with an interval that excludes 0" in verdict
    assert "DiagF+GBN x0.5 (linear LR scaling, lambda = 0.5): 50% (30% to 70%)" in verdict
    temp = "DiagF+GBN (sqrt) x0.577 (temperature) (sqrt LR scaling, lambda = 0.577, temperature-calibrated)"
    assert f"{temp}: 67% (33% to 100%)" in verdict
    assert "DiagF+GBN x0.25 (linear" not in verdict.split("widening")[0]  # 10%, an interval that includes 0
    assert (
        "1 is significantly negative, widening the gap (DiagF+GBN (linear LR scaling, lambda = 1, the paper's): "
        "-100% (-139% to -61%))." in verdict
    )
    assert md.index("## Verdict") < md.index("## Gap closure") < md.index("## Generalisation gap")

    # Measured rows first: Table 1 has MNIST-1D only (its DiagF+GBN cell: lambda = 1 only, not the grid).
    t1 = md.split("## Table 1")[1].split("## Table 2")[0]
    assert "| mnist1d | mlp |" in t1 and "| cifar10 |" not in t1 and "| mnist | mnist_mlp |" not in t1
    assert "71.00 ± 2.48 (n=3, 1 diverged) |  |" in t1  # not pooled with lambda < 1
    assert "The paper's 9 other rows (not run here): [Published numbers not reproduced here]" in t1
    t3 = md.split("## Table 3")[1].split("## Every regime variant")[0]
    assert "| mnist1d | mlp | 91.00 ± 2.48 (n=3) |  | 85.00 ± 2.48 (n=3) |  | 84.00 ± 2.48 (n=3) |  |" in t3
    ref = md.split("## Published numbers not reproduced here")[1].split("## Diverged runs")[0]
    assert "| cifar10 | resnet44 |  | 93.42 |  | 91.92 ± 0.29 |  | 92.31 ± 0.02 |  | 92.72 ± 0.15 |" in ref
    assert "mnist1d" not in ref and ref.count("| cifar100 | resnet44x2 |") == 3
    table1 = pd.read_csv(io.BytesIO(files["tables/table1.csv"]))
    assert len(table1) == (9 + 2) * 4  # the paper's rows, MNIST-1D and mnist/mlp (its LB+GBN run)
    measured = table1[table1["row_measured"]][["dataset", "network"]].drop_duplicates()
    assert sorted(map(tuple, measured.to_numpy())) == [("mnist", "mlp"), ("mnist1d", "mlp")]
    assert "| mnist | mlp |  |  | 97.00 (n=1, no CI) |" in t1


def test_verdict_when_sb_is_not_better() -> None:
    """SB below LB under linear scaling: no gap there; no finished LB under sqrt: no baseline."""
    rows = []
    for label, role, rule, acc, n in (
        ("SB", "SB baseline", "none", [80.0, 81.0, 82.0], 3),
        ("LB+GBN", "LB baseline", "linear", [84.0, 85.0, 86.0], 3),
        ("LB+GBN (sqrt)", "LB baseline", "sqrt", [], 0),  # every run diverged
    ):
        est = tables.mean_ci(acc)
        gap = tables.welch_diff([80.0, 81.0, 82.0], acc)
        rows.append(
            {
                "dataset": "d", "network": "n", "label": label, "role": role, "lr_scaling": rule,
                "noise_multiplier": math.nan, "noise_calibration": "", "n_seeds": n, "n_runs": n, "accuracy": est.mean,
                "ci": est.ci, "gap": gap.mean if role != "SB baseline" else math.nan, "gap_ci": gap.ci,
                "closure": math.nan, "closure_ci": math.nan, "closure_low": math.nan, "closure_high": math.nan,
            }
        )  # fmt: skip
    text = closure.verdict(pd.DataFrame(rows))
    assert "under linear LR scaling SB is not better than LB+GBN (85.00%, SB - LB = -4.00 ± " in text
    assert "there is no generalisation gap to close" in text and "best closure" not in text
    assert "every LB+GBN (sqrt) run diverged, so there is no LB baseline under sqrt LR scaling" in text
    assert closure.verdict(pd.DataFrame()).startswith("No verdict: no (dataset, network) has both")


def test_no_gap_verdict_from_runs(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    for seed, (sb, lb, diag) in enumerate(((80.0, 84.0, 83.0), (81.0, 85.0, 84.0), (82.0, 86.0, 82.0))):
        _finished_run(root, f"sb-s{seed}", SB, seed, sb)
        _finished_run(root, f"lb-s{seed}", LB_LIN, seed, lb)
        _finished_run(root, f"diagf-s{seed}", ("diagf", True, "linear", 1.0, "paper"), seed, diag)
    files = report.build(load(root))
    md = files["report.md"].decode()
    assert "SB is not better than LB under any LR rule run: there is no generalisation gap to close." in md
    assert "Not drawn: no run with a noise multiplier other than the paper's lambda = 1" in md
    assert 'Not drawn: no run has a measured temperature (a "temperature" entry' in md
    assert "figures/accuracy_vs_lambda.png" not in files and "figures/accuracy_vs_tau.png" not in files
    assert "## Published numbers not reproduced here" in md


# --- figures and tau --------------------------------------------------------------------------------------------
def test_lambda_and_tau_figures(grid_root: Path, tmp_path: Path) -> None:
    loaded = load(grid_root)
    runs = loaded.runs.set_index("run_id")
    spec = ("diagf", True, "sqrt", 0.25, "paper")
    assert runs.loc[_name(spec, 1), "tau"] == pytest.approx(_tau(spec, 1))  # the last epoch's row, not 1e6
    assert runs.loc[_name(spec, 1), "tau_epoch"] == 2 and runs.loc[_name(spec, 1), "tau_trace_c"] == 2.0
    assert math.isnan(runs.loc["diagf-none-s0", "tau"])  # no diagnostics
    drawn, skipped = figures.render(loaded, figures.NOISE_FIGURES)
    assert skipped == {} and sorted(drawn) == ["accuracy_vs_lambda.png", "accuracy_vs_tau.png"]
    assert all(png[:8] == PNG_MAGIC for png in drawn.values())
    out = tmp_path / "report"
    assert report_main([str(grid_root), "--out", str(out)]) == 0
    md = (out / "report.md").read_text()
    for name in drawn:
        assert (out / "figures" / name).read_bytes()[:8] == PNG_MAGIC and f"](figures/{name})" in md
    assert (out / "tables" / "closure.csv").stat().st_size > 0
    # only lambda = 1 and no temperature diagnostics: both skipped, with the reason
    paper_only = loaded.runs[(loaded.runs["noise_multiplier"] == 1.0) & (loaded.runs["noise_calibration"] == "paper")]
    bare = type(loaded)(
        loaded.root, paper_only.assign(tau=math.nan), loaded.epochs, loaded.fisher, loaded.grad_variance
    )
    drawn, skipped = figures.render(bare, figures.NOISE_FIGURES)
    assert drawn == {} and "lambda = 1" in skipped["accuracy_vs_lambda.png"]
    assert "temperature" in skipped["accuracy_vs_tau.png"]


def test_bad_temperature_entry_drops_only_the_diagnostics(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    run = _finished_run(root, "lb-s0", LB_LIN, 0, 80.0)
    (run / "diagnostics.jsonl").write_text(json.dumps({"epoch": 1, "temperature": {"tau": "hot"}}) + "\n")
    loaded = load(root)
    assert len(loaded.runs) == 1 and math.isnan(loaded.runs["tau"].iloc[0])
    assert [(s.what, s.reason) for s in loaded.skipped] == [
        ("diagnostics.jsonl", "diagnostics.jsonl line 1: temperature['tau'] is 'hot', not a number")
    ]
    (run / "diagnostics.jsonl").write_text(json.dumps({"epoch": 1, "temperature": {"tau": float("nan")}}) + "\n")
    loaded = load(root)
    assert loaded.skipped == [] and math.isnan(loaded.runs["tau"].iloc[0])  # a NaN tau is not measured
