"""The analysis: loading real run directories, the paper's tables with t intervals, figures and the report.

Run directories are made by the real training loop on a seconds-long MNIST-1D config (3 regimes x 2 seeds,
built once per module). sharpness.json and diagnostics.jsonl, which no command writes yet, are added by hand
in the formats of hpcnoise.rundir, with known numbers.
"""

from __future__ import annotations

import io
import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from analysis import figures, report, tables
from analysis.load import load
from analysis.published import PUBLISHED, published
from analysis.published import rows as published_rows
from hpcnoise.cli.report import main as report_main
from hpcnoise.comm import init
from hpcnoise.train import StepInfo, train
from tests.helpers.configs import small_config

REGIMES = (("sb", False), ("lb", True), ("diagf", True))
SEEDS = (0, 1)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six finished real runs: SB, LB+GBN, DiagF+GBN x seeds 0, 1 (2 epochs each)."""
    root = tmp_path_factory.mktemp("runs")
    for regime, gbn in REGIMES:
        for seed in SEEDS:
            cfg = small_config(out_dir=str(root), run_name=f"{regime}-s{seed}", regime=regime, ghost_bn=gbn, seed=seed)
            train(cfg, init("cpu"))
    return root


def _copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "runs"
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("report", "model.pt"))
    return dst


def _accuracies(root: Path, regime: str) -> list[float]:
    """Final test accuracy (%) per seed, read straight from summary.json."""
    return [
        100.0 * (1.0 - json.loads((root / f"{regime}-s{s}" / "summary.json").read_text())["final_test_error"])
        for s in SEEDS
    ]


def _t_interval(values: list[float]) -> tuple[float, float]:
    """(mean, half-width) of scipy's 95% t interval."""
    x = np.asarray(values)
    if stats.sem(x) == 0.0:  # identical values (scipy answers NaN for a zero scale)
        return float(x.mean()), 0.0
    low, high = stats.t.interval(0.95, len(x) - 1, loc=x.mean(), scale=stats.sem(x))
    return float(x.mean()), float(high - low) / 2


def test_ci_matches_scipy() -> None:
    for x in ([91.2, 92.0, 91.5], [0.1, 0.4, 0.35, 0.2, 0.9], [5.0, 7.0]):
        est = tables.mean_ci(x)
        mean, half = _t_interval(x)
        assert est.n == len(x)
        assert est.mean == pytest.approx(mean, rel=1e-12)
        assert est.half == pytest.approx(half, rel=1e-10)
        assert (est.low, est.high) == pytest.approx(stats.t.interval(0.95, len(x) - 1, loc=mean, scale=stats.sem(x)))
    assert tables.mean_ci([21.875, 21.875]).half == 0.0  # identical seeds: a zero-width interval, not NaN
    one = tables.mean_ci([93.25])
    assert (one.mean, one.half, one.n) == (93.25, None, 1)
    assert tables.fmt_estimate(one.mean, math.nan, 1) == "93.25 (n=1, no CI)"
    assert tables.fmt_estimate(93.151, 0.0449, 3) == "93.15 ± 0.04 (n=3)"
    assert tables.fmt_estimate(math.nan, math.nan, 0) == ""
    # The difference of means: Welch's interval, as scipy computes it.
    a, b = [12.1, 12.9, 12.4], [10.0, 10.3, 9.8, 10.6]
    diff = tables.welch_diff(a, b)
    ci = stats.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
    assert diff.mean == pytest.approx(np.mean(a) - np.mean(b))
    assert (diff.low, diff.high) == pytest.approx((ci.low, ci.high), rel=1e-9)


def test_published_table_cells() -> None:
    by_table = {t: [c for c in PUBLISHED if c.table == t] for t in ("table1", "table2", "table3")}
    assert [len(v) for v in by_table.values()] == [9 * 4 + 1, 4 * 5, 4 * 3]  # + Table 1's caption cell
    assert published_rows("table1")[0] == ("mnist", "mnist_mlp")
    assert published_rows("table1")[-1] == ("cifar100", "resnet44x2")
    assert published_rows("table3") == [
        ("cifar10", "vgg16_bn"),
        ("cifar100", "vgg16_bn"),
        ("cifar10", "resnet44"),
        ("cifar100", "resnet44x2"),
    ]
    cell = published("table1", "cifar10", "resnet44", "diagf+gbn")
    assert cell is not None and (cell.mean, cell.ci) == (92.72, 0.15)
    cell = published("table1", "fashion_mnist", "lenet5", "lb+gbn")
    assert cell is not None and (cell.mean, cell.ci) == (88.89, None) and "':'" in cell.note
    cell = published("table1", "cifar100", "alexnet", "trace+gbn")
    assert cell is not None and cell.mean is None and "N/A" in cell.note
    cell = published("table2", "cifar100", "resnet44x2", "kfac")
    assert cell is not None and cell.mean == 73.84
    cell = published("table3", "cifar100", "vgg16_bn", "diagf+gbn")
    assert cell is not None and cell.mean == 71.5 and "715" in cell.note
    cell = published("table1", "cifar10", "resnet44", "fullf")
    assert cell is not None and cell.mean == 93.22
    assert published("table3", "mnist", "mnist_mlp", "sb") is None
    # SB is the same in every table.
    assert {c.mean for c in PUBLISHED if c.dataset == "cifar10" and c.network == "vgg16_bn" and c.column == "sb"} == {
        93.25
    }


def test_load_real_runs(runs_root: Path) -> None:
    loaded = load(runs_root)
    assert loaded.skipped == [] and loaded.found == 6
    runs = loaded.runs.set_index("run_id")
    assert len(runs) == 6
    assert runs.loc["lb-s1", "variant"] == "lb+gbn" and runs.loc["lb-s1", "label"] == "LB+GBN"
    assert runs.loc["sb-s0", "variant"] == "sb" and runs.loc["sb-s0", "batch"] == 64
    assert (runs["lr_scaling"] == "linear").all()  # missing from config.json -> linear
    assert runs.loc["diagf-s0", "test_accuracy"] == pytest.approx(_accuracies(runs_root, "diagf")[0])
    assert len(loaded.epochs) == 6 * 2
    last = loaded.epochs[(loaded.epochs["run_id"] == "sb-s1") & (loaded.epochs["epoch"] == 2)].iloc[0]
    assert last["step"] == 2 * 2048 // 64
    assert last["test_error"] == pytest.approx(
        json.loads((runs_root / "sb-s1" / "summary.json").read_text())["final_test_error"]
    )


def test_report_from_real_runs(runs_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "report"
    assert report_main([str(runs_root), "--out", str(out)]) == 0
    assert str(out / "report.md") in capsys.readouterr().out
    md = (out / "report.md").read_text()
    # Our Table 1 row for MNIST-1D: each cell is scipy's t interval of the summaries' accuracies.
    cells = []
    for regime in ("sb", "lb", "diagf"):
        mean, half = _t_interval(_accuracies(runs_root, regime))
        cells.append(f"{mean:.2f} ± {half:.2f} (n=2)")
    assert f"| mnist1d | mlp | {cells[0]} |  | {cells[1]} |  |  |  | {cells[2]} |  |" in md
    assert "| cifar10 | resnet44 |  | 93.42 |  | 91.92 ± 0.29 |  | 92.31 ± 0.02 |  | 92.72 ± 0.15 |" in md
    table1 = pd.read_csv(out / "tables" / "table1.csv")
    sb = table1[(table1["dataset"] == "mnist1d") & (table1["column"] == "sb")].iloc[0]
    mean, half = _t_interval(_accuracies(runs_root, "sb"))
    assert (sb["n_runs"], sb["n_seeds"], sb["seeds"]) == (2, 2, "0,1")
    assert sb["accuracy"] == pytest.approx(mean) and sb["ci"] == pytest.approx(half)
    assert len(table1) == (9 + 1) * 4  # the paper's 9 rows + ours, 4 columns
    assert table1[table1["n_runs"] == 0]["accuracy"].isna().all()
    # Figures with data are real PNGs embedded by relative path; the others are skipped with a note.
    for name in ("fig3c_train_error.png", "fig4_val_error.png"):
        assert (out / "figures" / name).read_bytes()[:8] == PNG_MAGIC
        assert f"](figures/{name})" in md
    assert not (out / "figures" / "fig3a_fisher_norms.png").exists()
    assert "Not drawn: no run has Fisher norms" in md
    assert "Nothing was skipped." in md
    for name in ("table1", "table2", "table3", "results", "throughput", "runs", "skipped"):
        assert (out / "tables" / f"{name}.csv").stat().st_size > 0
    assert not list(out.rglob("*.tmp"))
    throughput = pd.read_csv(out / "tables" / "throughput.csv")
    assert len(throughput) == 3 and (throughput["efficiency"] == 1.0).all()


def test_report_lists_corrupt_and_unfinished_runs(runs_root: Path, tmp_path: Path) -> None:
    root = _copy(runs_root, tmp_path)

    # A real half-finished run: training stopped during its second epoch.
    class Stop(Exception):
        pass

    def stop(info: StepInfo) -> None:
        if info.step == 10:
            raise Stop

    with pytest.raises(Stop):
        train(small_config(out_dir=str(root), run_name="half", regime="lb", ghost_bn=True), init("cpu"), stop)
    # A finished run whose metrics.jsonl lost the end of its last line, one with a broken config.json, and a
    # good run with a corrupt optional sharpness.json.
    shutil.copytree(root / "lb-s0", root / "nested" / "truncated")
    metrics = root / "nested" / "truncated" / "metrics.jsonl"
    metrics.write_text(metrics.read_text()[:-25])
    shutil.copytree(root / "sb-s0", root / "badconfig")
    (root / "badconfig" / "config.json").write_text('{"config": {"dataset": "mnist1d", ')
    (root / "diagf-s1" / "sharpness.json").write_text('{"temperature": 1.2}')
    shutil.copytree(root / "sb-s1", root / "nokey")
    summary = json.loads((root / "nokey" / "summary.json").read_text())
    del summary["final_test_error"]
    (root / "nokey" / "summary.json").write_text(json.dumps(summary))

    loaded = load(root)
    reasons = {s.run: (s.what, s.reason) for s in loaded.skipped}
    assert reasons["half"] == ("run", "incomplete: no summary.json (1 epoch logged)")
    assert reasons["nested/truncated"][0] == "run"
    assert reasons["nested/truncated"][1].startswith("metrics.jsonl line 2: truncated or invalid JSON")
    assert reasons["badconfig"][1].startswith("config.json: invalid JSON")
    assert reasons["nokey"] == ("run", "summary.json: missing key final_test_error")
    assert reasons["diagf-s1"] == ("sharpness.json", "sharpness.json: missing key max_eigenvalue")
    assert len(loaded.runs) == 6 and loaded.found == 10

    out = tmp_path / "out"
    assert report_main([str(root), "--out", str(out)]) == 0
    md = (out / "report.md").read_text()
    assert "6 finished runs used, 4 skipped, of 10 run directories found" in md
    assert "- `half`: incomplete: no summary.json (1 epoch logged)" in md
    assert "- `nested/truncated`: metrics.jsonl line 2: truncated or invalid JSON" in md
    assert "- `diagf-s1` (sharpness.json ignored, run kept): sharpness.json: missing key max_eigenvalue" in md
    table1 = pd.read_csv(out / "tables" / "table1.csv")
    assert table1[table1["dataset"] == "mnist1d"]["n_seeds"].tolist() == [2, 2, 0, 2]
    skipped = pd.read_csv(out / "tables" / "skipped.csv")
    assert sorted(skipped["run"]) == ["badconfig", "diagf-s1", "half", "nested/truncated", "nokey"]


def test_sqrt_scaling_sharpness_diagnostics_throughput(runs_root: Path, tmp_path: Path) -> None:
    root = _copy(runs_root, tmp_path)
    # The LB runs again under square-root scaling (the field the config will carry) and on 2 workers.
    for seed in SEEDS:
        shutil.copytree(root / f"lb-s{seed}", root / f"lb-sqrt-s{seed}")
        path = root / f"lb-sqrt-s{seed}" / "config.json"
        record = json.loads(path.read_text())
        record["config"]["lr_scaling"] = "sqrt"
        path.write_text(json.dumps(record))
        shutil.copytree(root / f"lb-s{seed}", root / f"lb-w2-s{seed}")
        path = root / f"lb-w2-s{seed}" / "config.json"
        record = json.loads(path.read_text())
        record["world_size"] = 2
        path.write_text(json.dumps(record))
    eig = {"sb": [11.0, 13.0], "lb": [40.0, 46.0], "diagf": [21.0, 20.0]}
    for regime, values in eig.items():
        for seed, value in zip(SEEDS, values):
            run = root / f"{regime}-s{seed}"
            (run / "sharpness.json").write_text(json.dumps({"max_eigenvalue": value, "temperature": 1.5}))
            rows = [
                {
                    "epoch": e,
                    "fisher_frobenius": 10.0 * e + seed,
                    "diag_fisher_frobenius": 1.0 * e + seed,
                    "grad_variance": {
                        "lb": {"layer2": 1e-4, "layer10": 2e-4},
                        "diagf": {"layer2": 3e-3, "layer10": 5e-3},
                        "fullf": {"layer2": 4e-3, "layer10": 6e-3},
                    },
                }
                for e in (1, 2)
            ]
            (run / "diagnostics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    loaded = load(root)
    assert loaded.skipped == [] and len(loaded.runs) == 10
    assert len(loaded.fisher) == 6 * 2 * 2 and len(loaded.grad_variance) == 6 * 2 * 3 * 2

    t3 = tables.paper_table(loaded.runs, tables.TABLES["table3"])
    cell = t3[(t3["dataset"] == "mnist1d") & (t3["column"] == "lb+gbn")].iloc[0]
    mean, half = _t_interval(_accuracies(runs_root, "lb"))
    assert cell["n_seeds"] == 2 and cell["accuracy"] == pytest.approx(mean) and cell["ci"] == pytest.approx(half)
    t1 = tables.paper_table(loaded.runs, tables.TABLES["table1"])
    lb1 = t1[(t1["dataset"] == "mnist1d") & (t1["column"] == "lb+gbn")].iloc[0]
    assert lb1["n_runs"] == 4 and lb1["n_seeds"] == 2  # the 1- and 2-worker runs of each seed, not sqrt
    assert loaded.runs.set_index("run_id").loc["lb-sqrt-s0", "label"] == "LB+GBN (sqrt)"

    sharp = tables.sharpness_table(loaded.runs).set_index("regime")
    mean, half = _t_interval(eig["lb"])
    assert sharp.loc["LB+GBN", "max_eigenvalue"] == pytest.approx(mean)
    assert sharp.loc["LB+GBN", "ci"] == pytest.approx(half)
    assert sharp.loc["SB", "n_seeds"] == 2 and sharp.loc["DiagF+GBN", "max_eigenvalue"] == pytest.approx(20.5)

    thr = tables.throughput_table(loaded.runs, loaded.epochs)
    lb_thr = thr[thr["label"] == "LB+GBN"].set_index("world_size")
    epochs = loaded.epochs[loaded.epochs["epoch"] == 2]  # epoch 1 (start-up) is left out
    speed = epochs.set_index("run_id")["samples_per_s"]
    one = np.mean([speed["lb-s0"], speed["lb-s1"]])
    two = np.mean([speed["lb-w2-s0"], speed["lb-w2-s1"]])
    assert lb_thr.loc[1, "samples_per_s"] == pytest.approx(one)
    assert lb_thr.loc[2, "per_worker"] == pytest.approx(two / 2)
    assert lb_thr.loc[2, "efficiency"] == pytest.approx((two / 2) / one)

    drawn, skipped = figures.render(loaded)
    assert skipped == {}
    assert sorted(drawn) == sorted(f.name for f in figures.FIGURES)
    assert all(png[:8] == PNG_MAGIC for png in drawn.values())
    files = report.build(loaded)
    md = files["report.md"].decode()
    assert "| mnist1d | mlp | LB+GBN | " + tables.fmt_estimate(mean, half, 2, 2, 3) + " | 1.500 |" in md
    assert "## Table 3" in md and md.count("| mnist1d | mlp |") >= 3


def test_loads_files_written_by_measure(runs_root: Path, tmp_path: Path) -> None:
    """The contract with hpcnoise.measure: its sharpness.json and diagnostics.jsonl load and plot."""
    from hpcnoise.measure import diagnostics_row, load_run, sharpness_of
    from hpcnoise.rundir import append_jsonl, write_json_atomic

    root = _copy(runs_root, tmp_path)
    run = root / "diagf-s0"
    shutil.copy(runs_root / "diagf-s0" / "model.pt", run / "model.pt")
    comm = init("cpu")
    cfg, data, model = load_run(run, comm)
    sharp = sharpness_of(
        model, data.x_train, data.y_train, comm, samples=128, heldout=(data.x_test, data.y_test), max_products=40
    )
    write_json_atomic(run / "sharpness.json", sharp)
    row = diagnostics_row(model, data, cfg, comm, cfg.epochs, fisher_samples=64, draws=2, regimes=("lb", "diagf"))
    append_jsonl(run / "diagnostics.jsonl", row)

    loaded = load(root)
    assert loaded.skipped == []
    got = loaded.runs.set_index("run_id").loc["diagf-s0"]
    assert got["max_eigenvalue"] == pytest.approx(sharp["max_eigenvalue"]) and sharp["max_eigenvalue"] > 0
    assert got["temperature"] == pytest.approx(sharp["temperature"])
    norms = loaded.fisher.set_index("kind")["frobenius"]
    assert norms["full"] == pytest.approx(row["fisher_frobenius"])
    assert norms["diagonal"] == pytest.approx(row["diag_fisher_frobenius"])
    assert norms["full"] >= norms["diagonal"] > 0  # ||F||_F >= ||diag F||_F
    gv = loaded.grad_variance
    assert len(gv) == 2 * len(list(model.parameters())) and (gv["epoch"] == cfg.epochs).all()
    assert gv.set_index(["measured", "layer"])["variance"].to_dict() == pytest.approx(
        {(r, name): v for r, layers in row["grad_variance"].items() for name, v in layers.items()}
    )
    drawn, skipped = figures.render(loaded)
    assert skipped == {} and all(png[:8] == PNG_MAGIC for png in drawn.values())


def test_gap_summary_states_numbers(runs_root: Path) -> None:
    runs = load(runs_root).runs
    err = {r: [100.0 - a for a in _accuracies(runs_root, r)] for r in ("sb", "lb", "diagf")}
    text = report.gap_summary(runs)
    assert f"LB+GBN {np.mean(err['lb']):.2f}% vs SB {np.mean(err['sb']):.2f}% test error (2 and 2 seeds)" in text
    gap = tables.welch_diff(err["lb"], err["sb"])
    assert f"{gap.mean:.2f} ± {gap.half:.2f} points" in text
    closed = tables.welch_diff(err["lb"], err["diagf"])
    assert (
        f"DiagF+GBN ({np.mean(err['diagf']):.2f}%, 2 seeds) is {abs(closed.mean):.2f} ± {closed.half:.2f} points"
        in text
    )
    one_seed = report.gap_summary(runs[runs["seed"] == 0])
    assert "too few seeds for a confidence interval" in one_seed
    assert "cannot be assessed" in report.gap_summary(runs[runs["regime"] != "lb"])


def test_report_rejects_bad_input(runs_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    empty = tmp_path / "empty"
    empty.mkdir()
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    unfinished = tmp_path / "unfinished"
    shutil.copytree(runs_root / "sb-s0", unfinished / "r")
    (unfinished / "r" / "summary.json").unlink()
    cases = {
        str(tmp_path / "missing"): "does not exist",
        str(a_file): "is not a directory",
        str(empty): "no run directories",
        str(unfinished): "no finished runs",
    }
    for runs_dir, message in cases.items():
        assert report_main([runs_dir, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err and err.startswith("hpcnoise report: error:")
        assert not out.exists()
    assert report_main([str(empty)]) == 2 and not (empty / "report").exists()
    assert report_main([str(runs_root), "--out", str(a_file / "sub")]) == 2
    assert "is not a directory" in capsys.readouterr().err
    assert report_main([]) == 2
    assert capsys.readouterr().err.count("\n") == 1


# --- diverged runs ----------------------------------------------------------------------------------------------
def _diverged_run(
    root: Path, src: Path, name: str, epoch: int, message: str, last_good: bool, **config: object
) -> None:
    """A hand-made diverged run directory in the format hpcnoise.rundir writes: ``src``'s config.json with
    ``config`` changed, the metrics of the epochs before ``epoch``, a checkpoint, diverged.json, no summary."""
    run = root / name
    run.mkdir(parents=True)
    record = json.loads((src / "config.json").read_text())
    record["config"].update(config, run_name=run.name)
    (run / "config.json").write_text(json.dumps(record))
    rows = [json.loads(line) for line in (src / "metrics.jsonl").read_text().splitlines()][: epoch - 1]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "checkpoint.pt").write_bytes(b"last good checkpoint")
    step = 40 if rows else 3
    good = rows[-1] if last_good and rows else None
    (run / "diverged.json").write_text(
        json.dumps({"epoch": epoch, "step": step, "message": message, "last_good": good})
    )


def test_diverged_runs_are_counted_beside_every_mean(runs_root: Path, tmp_path: Path) -> None:
    root = _copy(runs_root, tmp_path)
    # LB+GBN seed 2 diverged in epoch 2, after a good first epoch; a Multiplicative run (a regime with no
    # finished run) diverged in its first epoch.
    _diverged_run(root, root / "lb-s0", "div/lb-s2", 2, "loss is nan at step 40\n(lr 0.2 | momentum 0.9)", True, seed=2)
    _diverged_run(root, root / "sb-s0", "div/mult-s0", 1, "loss is inf", False, regime="multiplicative")
    for seed, value in zip(SEEDS, (40.0, 46.0)):
        (root / f"lb-s{seed}" / "sharpness.json").write_text(json.dumps({"max_eigenvalue": value}))
    loaded = load(root)
    assert loaded.skipped == [] and len(loaded.runs) == 6 and loaded.found == 8
    div = loaded.diverged.set_index("run_id")
    assert sorted(div.index) == ["div/lb-s2", "div/mult-s0"]
    lb = div.loc["div/lb-s2"]
    assert (lb["label"], lb["seed"], lb["diverged_epoch"], lb["diverged_step"]) == ("LB+GBN", 2, 2, 40)
    assert lb["diverged_message"] == "loss is nan at step 40 (lr 0.2 | momentum 0.9)"  # one line
    first = json.loads((root / "lb-s0" / "metrics.jsonl").read_text().splitlines()[0])
    assert lb["last_good_epoch"] == 1 and lb["last_good_test_error"] == pytest.approx(first["test_error"])
    mult = div.loc["div/mult-s0"]
    assert mult["label"] == "Multiplicative" and math.isnan(mult["last_good_epoch"])
    assert set(loaded.runs["run_id"]) == {f"{r}-s{s}" for r, _ in REGIMES for s in SEEDS}  # not in the means

    # Table 1: the LB+GBN mean is still over the 2 finished seeds, with the diverged run counted beside it.
    mean, half = _t_interval(_accuracies(runs_root, "lb"))
    t1 = tables.paper_table(loaded.runs, tables.TABLES["table1"], loaded.diverged)
    cell = t1[(t1["dataset"] == "mnist1d") & (t1["column"] == "lb+gbn")].iloc[0]
    assert (cell["n_runs"], cell["n_seeds"], cell["n_diverged"]) == (2, 2, 1)
    assert cell["accuracy"] == pytest.approx(mean) and cell["ci"] == pytest.approx(half)
    assert t1[t1["column"] != "lb+gbn"]["n_diverged"].sum() == 0
    # Table 2 gets a MNIST-1D row from the diverged Multiplicative run alone.
    t2 = tables.paper_table(loaded.runs, tables.TABLES["table2"], loaded.diverged)
    cell = t2[(t2["dataset"] == "mnist1d") & (t2["column"] == "multiplicative")].iloc[0]
    assert (cell["n_runs"], cell["n_seeds"], cell["n_diverged"]) == (0, 0, 1) and math.isnan(cell["accuracy"])

    results = tables.results_table(loaded.runs, loaded.diverged).set_index("regime")
    assert results.loc["LB+GBN", ["n_runs", "n_seeds", "n_diverged"]].tolist() == [2, 2, 1]
    assert results.loc["Multiplicative", ["n_runs", "n_seeds", "n_diverged"]].tolist() == [0, 0, 1]
    assert results.loc["SB", "n_diverged"] == 0
    thr = tables.throughput_table(loaded.runs, loaded.epochs, loaded.diverged).set_index("label")
    assert thr.loc["LB+GBN", "n_diverged"] == 1 and thr.loc["SB", "n_diverged"] == 0
    sharp = tables.sharpness_table(loaded.runs, loaded.diverged).set_index("regime")
    assert sharp.loc["LB+GBN", ["n_seeds", "n_diverged"]].tolist() == [2, 1]

    files = report.build(loaded)
    md = files["report.md"].decode()
    assert "6 finished runs used, 2 diverged (not in the means; see Diverged runs), 0 skipped, of 8 run" in md
    lb_cell = tables.fmt_estimate(mean, half, 2, 2, n_diverged=1)
    assert lb_cell == f"{mean:.2f} ± {half:.2f} (n=2, 1 diverged)"
    sb_mean, sb_half = _t_interval(_accuracies(runs_root, "sb"))
    assert f"| mnist1d | mlp | {sb_mean:.2f} ± {sb_half:.2f} (n=2) |  | {lb_cell} |  |" in md  # Table 1
    assert "|  | none finished (1 diverged) |  |" in md  # Table 2's Multiplicative column
    assert f"| mnist1d | mlp | LB+GBN | {lb_cell} |" in md  # every regime variant
    assert "| mnist1d | mlp | Multiplicative | none finished (1 diverged) |" in md
    assert "(n=2, 1 diverged) |" in md.split("## Throughput")[1].split("## Sharpness")[0]
    assert "(n=2, 1 diverged) |" in md.split("## Sharpness")[1].split("## Figures")[0]
    gap = next(line for line in md.splitlines() if line.startswith("Generalisation gap ("))
    assert gap.endswith(". Not in these means: 1 diverged run (1 LB+GBN on mnist1d/mlp).")  # SB, LB, DiagF only
    section = md.split("## Diverged runs")[1].split("## Skipped")[0]
    assert "2 runs stopped because the loss became non-finite" in section
    assert (
        "| `div/lb-s2` | mnist1d | mlp | LB+GBN | 2 | 2 | 40 | loss is nan at step 40 (lr 0.2 \\| momentum 0.9) | "
        f"epoch 1, {100.0 * first['test_error']:.2f}% test error |"
    ) in section
    assert (
        "| `div/mult-s0` | mnist1d | mlp | Multiplicative | 0 | 1 | 3 | loss is inf | none (first epoch) |" in section
    )
    csv = pd.read_csv(io.BytesIO(files["tables/diverged.csv"]))
    assert csv["run_id"].tolist() == ["div/lb-s2", "div/mult-s0"] and csv["diverged_epoch"].tolist() == [2, 1]
    assert "diverged.csv" in md.split("## Files")[1]


def test_report_without_diverged_runs_says_so(runs_root: Path) -> None:
    files = report.build(load(runs_root))
    md = files["report.md"].decode()
    assert "## Diverged runs\n\nNo run diverged." in md and "diverged (not in the means" not in md
    assert "Not in these means" not in md and not re.search(r"\d diverged\)", md)  # no cell counts any
    assert pd.read_csv(io.BytesIO(files["tables/diverged.csv"])).empty


def test_only_diverged_runs_and_a_corrupt_marker(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """No finished run: one line naming the diverged runs, exit 2; a corrupt diverged.json is a skipped run."""
    root = tmp_path / "runs"
    cfg = {"dataset": "mnist1d", "model": "mlp", "regime": "lb", "seed": 0, "batch_size": 256, "ghost_bn": True}
    for name, marker in (("a", {"epoch": 3, "step": 7, "message": "loss is nan", "last_good": None}), ("b", None)):
        (root / name).mkdir(parents=True)
        (root / name / "config.json").write_text(json.dumps({"config": {**cfg, "run_name": name}}))
        (root / name / "diverged.json").write_text(json.dumps(marker) if marker else '{"epoch": 3, ')
    loaded = load(root)
    assert loaded.runs.empty and loaded.diverged["run_id"].tolist() == ["a"]
    assert loaded.diverged["label"].tolist() == ["LB+GBN"] and loaded.diverged["batch"].tolist() == [256]
    assert [(s.run, s.reason.split(" (")[0]) for s in loaded.skipped] == [("b", "diverged.json: invalid JSON")]
    assert report_main([str(root), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no finished runs" in err and "(1 diverged: a; 1 run directories skipped: b:" in err
    assert not (tmp_path / "out").exists()
