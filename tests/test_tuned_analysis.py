"""The tuned comparison's report (analysis.tuned, analysis.tuned_stats, analysis.tuned_report).

The study is a hand-made one, no training: manifest.json from hpcnoise.tuning.write_manifest (smoke
presets), trial and rerun directories in the formats hpcnoise.train writes (config.json, metrics.jsonl with
the validation rows, summary.json with final_val_error and blown_up; diverged.json), with chosen numbers.
The central check: every test metric of every run directory changed to other values leaves the selection,
the reruns and the declared comparisons as they were.
"""

from __future__ import annotations

import io
import json
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from analysis import report, tuned, tuned_report
from analysis.load import load
from analysis.tuned_stats import best_of_k, expected_best, holm, welch_test
from hpcnoise import tuning

WORKLOADS = ["mlp", "cnn1d"]
REGIMES = ["sb", "lb", "diagf"]
N_TRIALS = 4
BUDGETS = {"equal": 1.0, "long": 2.0}
RERUN_SEEDS = [1, 2, 3, 4, 5]
# Mean rerun test (and validation) accuracy (%) per (regime, budget): diagF+GBN well above LB+GBN at equal
# epochs; LB+GBN longer in between.
RERUN_ACCURACY = {("sb", "equal"): 90.0, ("lb", "equal"): 80.0, ("diagf", "equal"): 88.0,
                  ("lb", "long"): 85.0, ("diagf", "long"): 89.0}  # fmt: skip


# --- the hand-made study ----------------------------------------------------------------------------------------
def _metrics(cfg: dict[str, Any], val: float, test: float, epochs: int) -> list[dict[str, Any]]:
    """Per-epoch rows whose errors fall linearly to ``val`` and ``test`` at ``epochs`` (of cfg's epochs)."""
    batch = cfg["small_batch"] if cfg["regime"] == "sb" else cfg["batch_size"]
    per_epoch = cfg["train_samples"] // batch
    rows = []
    for e in range(1, epochs + 1):
        late = e / epochs
        rows.append(
            {
                "epoch": e, "step": e * per_epoch, "train_loss": 1.0 / e, "train_error": 0.3 / e,
                "test_loss": 2.0 * test, "test_error": 0.9 - (0.9 - test) * late,
                "val_loss": 2.0 * val, "val_error": 0.9 - (0.9 - val) * late, "batch_size": batch,
                "samples_per_s": 1000.0,
            }
        )  # fmt: skip
    return rows


def _write_run(path: Path, cfg: dict[str, Any], val: float, test: float, **outcome: Any) -> None:
    """A run directory: config.json, metrics.jsonl and summary.json (or diverged.json when ``diverged``)."""
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"config": cfg, "world_size": 1, "device": "cpu"}))
    epochs = outcome.get("stop_epoch", cfg["epochs"])
    rows = _metrics(cfg, val, test, epochs)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if outcome.get("diverged"):
        diverged = {"epoch": 2, "step": rows[0]["step"] + 1, "message": "loss is nan", "last_good": rows[0]}
        (path / "diverged.json").write_text(json.dumps(diverged))
        (path / "metrics.jsonl").write_text(json.dumps(rows[0]) + "\n")
        return
    last = rows[-1]
    summary = {
        "run_name": cfg["run_name"], "regime": cfg["regime"], "model": cfg["model"], "dataset": cfg["dataset"],
        "seed": cfg["seed"], "world_size": 1, "epochs": cfg["epochs"], "steps": last["step"],
        "final_test_error": last["test_error"], "final_test_loss": last["test_loss"],
        "final_train_error": last["train_error"], "final_train_loss": last["train_loss"],
        "best_test_error": min(r["test_error"] for r in rows), "final_val_error": last["val_error"],
        "final_val_loss": last["val_loss"], "best_val_error": min(r["val_error"] for r in rows),
    }  # fmt: skip
    if "stop_epoch" in outcome:
        summary |= {"blown_up": {"epoch": epochs, "train_loss": 9.0, "best_train_loss": 1.0}, "stopped_early": True}
    (path / "summary.json").write_text(json.dumps(summary))


def build_study(root: Path) -> dict[str, Any]:
    """Trials (one diverged, one blown up and stopped early per (workload, regime) where N allows) and the
    reruns of the selection, at both budgets."""
    manifest = tuning.write_manifest(root, WORKLOADS, REGIMES, N_TRIALS, 0, BUDGETS, RERUN_SEEDS, smoke=True)
    rng = np.random.default_rng(7)
    for t in manifest["trials"]:
        val, test = rng.uniform(0.05, 0.3), rng.uniform(0.05, 0.3)  # test unrelated to validation
        outcome: dict[str, Any] = {}
        if t["trial"] == 1:
            outcome = {"diverged": True}
        elif t["trial"] == 2 and t["regime"] != "sb":
            outcome = {"stop_epoch": 2}
        _write_run(root / "trials" / t["run_name"], t["config"], val, test, **outcome)
    selected = tuning.select(manifest, tuning.trial_rows(root))
    for budget in BUDGETS:
        for cfg in tuning.rerun_cells(manifest, selected, budget, root):
            acc = RERUN_ACCURACY[(cfg.regime, budget)] + rng.normal(0.0, 0.5)
            err = 1.0 - acc / 100.0
            _write_run(root / "reruns" / cfg.run_name, cfg.to_dict(), err + 0.002, err)
    return manifest


@pytest.fixture(scope="module")
def study_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tuned")
    build_study(root)
    return root


def _poison(root: Path, seed: int) -> None:
    """Every test metric of every run directory under ``root`` set to other (random) values."""
    rng = np.random.default_rng(seed)
    for path in sorted(root.rglob("metrics.jsonl")):
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        for r in rows:
            r.update({k: float(rng.uniform(0, 1)) for k in r if "test" in k})
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    for name in ("summary.json", "diverged.json"):
        for path in sorted(root.rglob(name)):
            blob = json.loads(path.read_text())
            blob.update({k: float(rng.uniform(0, 1)) for k in blob if "test" in k})
            if isinstance(blob.get("last_good"), dict):
                blob["last_good"].update({k: float(rng.uniform(0, 1)) for k in blob["last_good"] if "test" in k})
            path.write_text(json.dumps(blob))


# --- the statistics ---------------------------------------------------------------------------------------------
def test_expected_best_hand_computed() -> None:
    # 3 trials 70, 80, 90; k draws with replacement: P(best <= a_(i)) = (i/3)^k.
    values = [80.0, 70.0, 90.0]
    assert expected_best(values, 1) == pytest.approx(80.0)
    assert expected_best(values, 2) == pytest.approx((70 * 1 + 80 * 3 + 90 * 5) / 9)  # 84.44
    assert expected_best(values, 3) == pytest.approx((70 * 1 + 80 * 7 + 90 * 19) / 27)  # 86.67
    # A diverged trial ranks last; the expectation is over draws with a finished one: (80 * 3 + 90 * 5) / 8.
    assert expected_best([math.nan, 80.0, 90.0], 2) == pytest.approx(690 / 8)
    assert math.isnan(expected_best([math.nan, math.nan], 2))


def test_best_of_k_bootstrap_matches_the_exact_expectation() -> None:
    values = [80.0, 70.0, 90.0]
    exact = {1: 80.0, 2: 760 / 9, 3: 2340 / 27}
    points = best_of_k(values, [1, 2, 3], b=2000, seed=3)
    for p in points:
        second = (70**2 * 1 + 80**2 * 3 + 90**2 * 5) / 9 if p.k == 2 else None
        sd = math.sqrt(second - exact[2] ** 2) if second else 10.0  # k=1: sd of (70, 80, 90) is 8.2
        assert abs(p.mean - exact[p.k]) < 4 * sd / math.sqrt(2000), p
        assert p.exact == pytest.approx(exact[p.k]) and p.none_finished == 0.0
        assert 70.0 <= p.low <= p.mean <= p.high <= 90.0
    assert points[0].low == 70.0 and points[2].high == 90.0
    assert best_of_k(values, [2], seed=3) == best_of_k(values, [2], seed=3)  # fixed seed: reproducible
    with_nan = best_of_k([math.nan, 80.0, 90.0], [1], b=4000, seed=1)[0]
    assert with_nan.none_finished == pytest.approx(1 / 3, abs=0.03) and with_nan.mean == pytest.approx(85.0, abs=0.5)


def test_holm_hand_computed() -> None:
    # sorted: 0.005 x 4 = 0.02; 0.01 x 3 = 0.03; 0.03 x 2 = 0.06; 0.04 x 1 = 0.04 -> non-decreasing: 0.06.
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.6]) == pytest.approx([1.0, 1.0])  # capped at 1
    assert holm([0.01, math.nan]) == pytest.approx([0.02, 1.0])  # untested: p = 1, still in the family
    assert holm([0.2]) == [0.2] and holm([]) == []


def test_welch_test_matches_scipy() -> None:
    from scipy import stats

    a, b = [88.0, 88.5, 87.2, 88.9], [80.1, 81.0, 79.5]
    got = welch_test(a, b)
    ref = stats.ttest_ind(a, b, equal_var=False)
    assert (got.t, got.p) == pytest.approx((ref.statistic, ref.pvalue))
    assert got.diff == pytest.approx(np.mean(a) - np.mean(b))
    assert math.isnan(welch_test([1.0], b).p)


# --- the study --------------------------------------------------------------------------------------------------
def _blind_parts(root: Path) -> dict[str, Any]:
    """What must not depend on any test metric: the selection, the reruns it implies, the comparisons, and
    every table computed from validation data."""
    study = tuned.read_study(root)
    comparisons = tuned.comparison_table(study)
    return {
        "selected": {"/".join(k): v["run_name"] for k, v in study.selected.items()},
        "trial_rows": tuning.trial_rows(root),
        "planned": study.planned.to_dict("records"),
        "comparisons": comparisons[["workload", "question", "a_regime", "a_budget", "b_regime", "b_budget"]].to_dict(
            "records"
        ),
        "hyperparameters": tuned.hyperparameters(study).to_dict("records"),
        "best_of_k": tuned.best_of_k_table(study).to_dict("records"),
        "test": tuned.accuracy_table(study)["accuracy"].tolist(),
    }


def _text(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def test_selection_is_blind_to_test(study_root: Path, tmp_path: Path) -> None:
    import shutil

    root = tmp_path / "study"
    shutil.copytree(study_root, root)
    before = _blind_parts(root)
    files_before = report.build_tuned(tuned.read_study(root))
    _poison(root, seed=11)
    after = _blind_parts(root)
    assert after["test"] != before["test"]  # the poison reached the reruns' test accuracy
    for key in ("selected", "trial_rows", "planned", "comparisons", "hyperparameters", "best_of_k"):
        assert _text(after[key]) == _text(before[key]), key  # as text: NaN equals NaN
    files_after = report.build_tuned(tuned.read_study(root))
    for name in ("tuned_hyperparameters", "best_of_k"):
        assert files_after[f"tables/{name}.csv"] == files_before[f"tables/{name}.csv"]
    # The selection is the validation-best finished trial of each (workload, regime).
    study = tuned.read_study(root)
    for (w, r), t in study.selected.items():
        trials = study.trials[(study.trials["workload"] == w) & (study.trials["regime"] == r)]
        assert t["trial"] == int(trials.loc[trials["val_accuracy"].idxmax(), "trial"])


def test_study_tables(study_root: Path) -> None:
    study = tuned.read_study(study_root)
    assert study.notes == [] and len(study.runs) == len(study.planned) == 2 * (3 + 2) * 5
    acc = tuned.accuracy_table(study)
    assert len(acc) == 2 * 5 and (acc["n_seeds"] == 5).all()
    assert acc.loc[(acc["regime"] == "lb") & (acc["budget"] == "long"), "epochs"].tolist() == [8, 8]
    closures = tuned.closure_table(study)
    diag = closures[(closures["regime"] == "diagf") & (closures["budget"] == "equal")]
    assert diag["closure"].tolist() == pytest.approx([0.8, 0.8], abs=0.1) and (diag["closure_low"] > 0).all()
    assert closures["by_definition"].sum() == 4  # SB and LB+GBN at equal epochs, per workload
    cmp = tuned.comparison_table(study)
    assert len(cmp) == 6 and cmp["survives"].all()  # differences of 3-8 points, sd 0.5
    hyper = tuned.hyperparameters(study)
    assert hyper["noise_multiplier"].isna().tolist() == [True, True, False] * 2  # noise settings: DiagF+GBN only
    problems = tuned.problem_runs(study)
    assert sorted(problems["state"].value_counts().items()) == [("blown up", 4), ("diverged", 6)]
    steps = tuned.steps_table(study)
    sb_row = steps[(steps["workload"] == "mlp") & (steps["regime"] == "sb")].iloc[0]
    assert sb_row["steps"] == 4 * (4096 // 64) and sb_row["n_reached"] >= 2
    lb_row = steps[(steps["workload"] == "mlp") & (steps["regime"] == "lb") & (steps["budget"] == "equal")].iloc[0]
    assert lb_row["n_reached"] == 0  # 80% never reaches SB's 90%
    boks = tuned.best_of_k_table(study)
    assert (
        len(boks) == 2 * 3 * N_TRIALS and (boks.groupby(["workload", "regime"])["mean"].is_monotonic_increasing).all()
    )


def test_section_renders(study_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "report"
    loaded = report.make(study_root, out)
    assert len(loaded.runs) == 50
    md = (out / "report.md").read_text()
    assert md.startswith("# hpcnoise report: the tuned comparison")
    assert "selected on the held-out validation split" in md and "the test set was read only by the reruns" in md
    assert "6 comparisons were declared and made" in md and "6 of 6 survive the correction" in md
    assert "Holm" in md and "## Best-of-k" in md and "![Best-of-k](figures/best_of_k.png)" in md
    assert "not reached" in md
    assert (out / "figures" / "best_of_k.png").read_bytes().startswith(b"\x89PNG")
    for name in ("tuned_accuracy", "tuned_closure", "tuned_comparisons", "best_of_k", "tuned_trials"):
        assert not pd.read_csv(io.BytesIO((out / "tables" / f"{name}.csv").read_bytes())).empty
    assert "## Table 1" not in md  # not the paper's report: the trials' test numbers are nowhere


def test_tuned_report_without_reruns(study_root: Path, tmp_path: Path) -> None:
    import shutil

    root = tmp_path / "study"
    shutil.copytree(study_root, root, ignore=shutil.ignore_patterns("reruns"))
    with pytest.raises(report.ReportError, match="no finished reruns"):
        report.make(root, tmp_path / "out")
    assert not (tmp_path / "out" / "report.md").exists()


def test_old_runs_without_validation_load(tmp_path: Path) -> None:
    manifest = tuning.plan(tmp_path, ["mlp"], ["sb"], 1, 0, {"equal": 1.0}, RERUN_SEEDS, smoke=True)[0]
    cfg = manifest["trials"][0]["config"]
    _write_run(tmp_path / "old", cfg, 0.1, 0.2)
    for path in (tmp_path / "old" / "metrics.jsonl", tmp_path / "old" / "summary.json"):
        text = path.read_text()
        blobs = [json.loads(line) for line in text.splitlines()]
        blobs = [{k: v for k, v in b.items() if "val_" not in k} for b in blobs]
        path.write_text("".join(json.dumps(b) + "\n" for b in blobs))
    loaded = load(tmp_path)
    assert loaded.skipped == [] and len(loaded.runs) == 1
    for col in ("final_val_error", "final_val_loss", "best_val_error"):
        assert loaded.runs[col].isna().all()
    assert loaded.epochs["val_error"].isna().all() and loaded.epochs["val_loss"].isna().all()
    assert loaded.runs["test_accuracy"].iloc[0] == pytest.approx(80.0)


def test_blown_up_and_diverged_reruns_are_listed(study_root: Path, tmp_path: Path) -> None:
    """A rerun trains full length (no blow-up stop) but may still blow up or diverge: the report lists it,
    with its epoch, beside the trials that did."""
    root = tmp_path / "study"
    shutil.copytree(study_root, root)
    reruns = sorted((root / "reruns").iterdir())
    blown, gone = reruns[0], reruns[1]
    summary = json.loads((blown / "summary.json").read_text())
    summary["blown_up"] = {"epoch": 3, "train_loss": 5.0, "best_train_loss": 1.0}
    (blown / "summary.json").write_text(json.dumps(summary))
    first = json.loads((gone / "metrics.jsonl").read_text().splitlines()[0])
    (gone / "summary.json").unlink()
    (gone / "diverged.json").write_text(json.dumps({"epoch": 2, "step": 9, "message": "nan", "last_good": first}))
    study = tuned.read_study(root)
    problems = tuned.problem_runs(study)
    reruns_listed = problems[problems["kind"] == "rerun"].set_index("run_name")
    assert reruns_listed.loc[blown.name, "state"] == "blown up" and reruns_listed.loc[blown.name, "epoch"] == 3
    assert reruns_listed.loc[gone.name, "state"] == "diverged"
    assert len(study.runs) == len(study.planned) - 1  # the diverged rerun is not among the finished
    files: dict[str, bytes] = {}
    text = "\n".join(tuned_report.sections(study, files))
    assert f"- rerun `{blown.name}`: blown up at epoch 3" in text
    assert f"- rerun `{gone.name}`: diverged" in text
