"""The report's throughput table with measured and predicted scaling efficiency.

Unit tests build run frames by hand and compute every expected number by brute force (plain loops over the
runs, no pandas grouping); the reader of RUN_DIR/scaling.json is tested on good and broken files. One test
runs ``hpcnoise bench train --out`` once alone and once under the real ``horovodrun -np 2 -H localhost:2``
into one directory, then ``hpcnoise report`` on it, and checks the table against the runs' own files.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from statistics import mean

import pandas as pd
import pytest

from analysis import sections, tables
from hpcnoise.benchmarks import throughput
from hpcnoise.benchmarks.network import Network
from hpcnoise.cli.report import main as report_main
from tests.helpers.launch import run_launched

KEY = dict(dataset="mnist1d", label="LB+GBN", device_used="cpu", precision="float32")

# (run_id, model, batch, world_size, samples/s of epochs 1..3, predicted efficiency or None)
RUNS = [
    ("mlp-w1-a", "mlp", 64, 1, [50.0, 1000.0, 1200.0], None),
    ("mlp-w1-b", "mlp", 64, 1, [40.0, 900.0, 1100.0], None),
    ("mlp-w2-a", "mlp", 64, 2, [30.0, 1500.0, 1700.0], 0.9),
    ("mlp-w2-b", "mlp", 64, 2, [20.0, 1300.0, 1500.0], 0.8),
    ("mlp-w2-c", "mlp", 64, 2, [10.0, 1400.0, 1400.0], None),  # measured, without a prediction
    ("mlp-b128-w2", "mlp", 128, 2, [10.0, 2000.0, 2200.0], 0.7),  # no 1-worker run at this batch
    ("cnn-w1", "cnn1d", 64, 1, [5.0, 300.0, 300.0], None),
    ("cnn-w2", "cnn1d", 64, 2, [5.0, 500.0, 520.0], 0.95),
]
NETWORK = "1 node x 2 ranks; intra-node alpha 2 us, beta 150 GB/s"


def _frames() -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    runs = pd.DataFrame([{"run_id": r, "model": m, "batch": b, "world_size": w, **KEY} for r, m, b, w, _, _ in RUNS])
    epochs = pd.DataFrame(
        [{"run_id": r, "epoch": e, "samples_per_s": v} for r, *_, speeds, _ in RUNS for e, v in enumerate(speeds, 1)]
    )
    predicted = pd.DataFrame(
        [{"run_id": r, "predicted_efficiency": p, "network": NETWORK} for r, *_, p in RUNS if p is not None]
    )
    return runs, epochs, predicted


def _expected() -> dict[tuple[str, int, int], dict[str, float]]:
    """Per (model, batch, W): mean samples/s, per worker, efficiency and prediction, by plain loops."""
    steady = {r: mean(speeds[1:]) for r, _, _, _, speeds, _ in RUNS}  # epoch 1 (start-up) left out
    cells: dict[tuple[str, int, int], list[tuple[str, float | None]]] = {}
    for r, m, b, w, _, p in RUNS:
        cells.setdefault((m, b, w), []).append((r, p))
    out = {}
    for (m, b, w), members in cells.items():
        total = mean(steady[r] for r, _ in members)
        per_worker = mean(steady[r] / w for r, _ in members)
        preds = [p for _, p in members if p is not None]
        out[(m, b, w)] = {
            "samples_per_s": total,
            "per_worker": per_worker,
            "predicted": mean(preds) if preds else math.nan,
            "n_predicted": len(preds),
        }
    for (m, b, _w), cell in out.items():
        base = out.get((m, b, 1))
        cell["efficiency"] = cell["per_worker"] / base["per_worker"] if base else math.nan
    return out


def _same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, rel=1e-12)


def test_efficiency_and_prediction_by_brute_force() -> None:
    runs, epochs, predicted = _frames()
    table = tables.throughput_table(runs, epochs, None, predicted)
    expected = _expected()
    assert len(table) == len(expected) == 5
    for _, row in table.iterrows():
        want = expected[(row["model"], int(row["batch"]), int(row["world_size"]))]
        for column, key in (
            ("samples_per_s", "samples_per_s"),
            ("per_worker", "per_worker"),
            ("efficiency", "efficiency"),
            ("predicted_efficiency", "predicted"),
        ):
            assert _same(float(row[column]), want[key]), (row["model"], row["batch"], row["world_size"], column)
        assert row["n_predicted"] == want["n_predicted"]
        assert row["network"] == (NETWORK if want["n_predicted"] else "")
    mlp2 = table[(table["model"] == "mlp") & (table["batch"] == 64) & (table["world_size"] == 2)].iloc[0]
    # by hand: W=1 runs 1100 and 1000 -> 1050/worker; W=2 runs 1600, 1400, 1400 -> 4400/3/2 per worker
    assert mlp2["efficiency"] == pytest.approx((4400 / 3 / 2) / 1050)
    assert mlp2["predicted_efficiency"] == pytest.approx(0.85) and mlp2["n_predicted"] == 2


def test_without_predictions_the_column_is_empty() -> None:
    runs, epochs, _ = _frames()
    table = tables.throughput_table(runs, epochs)
    assert table["predicted_efficiency"].isna().all() and (table["n_predicted"] == 0).all()
    assert table["efficiency"].notna().sum() == 4  # every cell with a 1-worker run at its batch


def test_markdown_has_both_columns() -> None:
    runs, epochs, predicted = _frames()
    text = tables.throughput_markdown(tables.throughput_table(runs, epochs, None, predicted))
    header = text.splitlines()[0]
    assert "Scaling efficiency (measured)" in header and "Predicted efficiency (model)" in header
    mlp2 = next(line for line in text.splitlines() if "| mlp |" in line and "| 64 | 2 |" in line)
    cells = [c.strip() for c in mlp2.strip("|").split("|")]
    assert cells[-2:] == [f"{(4400 / 3 / 2) / 1050:.2f}", "0.85"]
    no_base = next(line for line in text.splitlines() if "| 128 | 2 |" in line)
    assert [c.strip() for c in no_base.strip("|").split("|")][-2:] == ["", "0.70"]


def _prediction_file(path: Path, **changes: object) -> None:
    blob = {"format": throughput.PREDICTION_FORMAT, "efficiency": 0.6, "network_text": NETWORK, "world_size": 2}
    path.mkdir(parents=True)
    (path / throughput.PREDICTION_FILE).write_text(json.dumps({**blob, **changes}))


def test_prediction_files_are_read_and_broken_ones_noted(tmp_path: Path) -> None:
    assert (sections.PREDICTION_FILE, sections.PREDICTION_FORMAT) == (
        throughput.PREDICTION_FILE,
        throughput.PREDICTION_FORMAT,
    )
    _prediction_file(tmp_path / "good")
    _prediction_file(tmp_path / "world", world_size=4)
    _prediction_file(tmp_path / "nan", efficiency=float("nan"))
    _prediction_file(tmp_path / "format", format="other")
    (tmp_path / "none").mkdir()
    (tmp_path / "trunc").mkdir()
    (tmp_path / "trunc" / throughput.PREDICTION_FILE).write_text('{"format": ')
    names = ["good", "world", "nan", "format", "none", "trunc"]
    runs = pd.DataFrame([{"run_id": n, "path": str(tmp_path / n), "world_size": 2} for n in names])
    found, problems = sections.predictions(runs)
    assert found.to_dict("records") == [{"run_id": "good", "predicted_efficiency": 0.6, "network": NETWORK}]
    assert len(problems) == 4
    assert any("`world`" in p and "predicts for 4 workers but the run had 2" in p for p in problems)
    assert any("`nan`" in p and "not a positive number" in p for p in problems)
    assert any("`format`" in p and "not a hpcnoise-scaling-prediction-v1 file" in p for p in problems)
    assert any("`trunc`" in p and "not readable JSON" in p for p in problems)


def test_network_text_names_the_links_used() -> None:
    d = Network()
    text = throughput.network_text({**vars(d), "gpus_per_node": 2}, 2)
    assert text == "1 node x 2 ranks; intra-node alpha 2 us, beta 150 GB/s"
    assert "inter-node alpha 5 us, beta 25 GB/s" in throughput.network_text(vars(d), 16)


@pytest.mark.slow
def test_one_and_two_workers_under_horovodrun_fill_the_report(tmp_path: Path) -> None:
    """A 1- and a 2-worker ``bench train --out`` into one directory: the report's table has the measured
    efficiency (checked against the runs' metrics.jsonl) and the model's prediction beside it."""
    runs = tmp_path / "runs"
    args = ["-m", "hpcnoise.cli", "bench", "train", "--models", "mlp", "--regimes", "lb", "--batch", "64"]
    args += ["--steps", "3", "--threads", "1", "--out", str(runs)]
    for launcher, np in (("none", 1), ("horovodrun", 2)):
        proc = run_launched(launcher, np, args, timeout=120)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    dirs = sorted(p for p in runs.iterdir() if p.is_dir())
    assert [p.name.split("-")[4] for p in dirs] == ["w1", "w2"]
    assert not (dirs[0] / throughput.PREDICTION_FILE).exists()
    prediction = json.loads((dirs[1] / throughput.PREDICTION_FILE).read_text())
    assert prediction["world_size"] == 2 and prediction["local_batch"] == 32 and prediction["nodes"] == 1
    assert prediction["efficiency"] == pytest.approx(
        prediction["compute_global_batch_s"] / (2 * prediction["step_s"]), rel=1e-12
    )

    assert report_main([str(runs)]) == 0
    table = pd.read_csv(runs / "report" / "tables" / "throughput.csv").set_index("world_size")
    speed = {}
    for d in dirs:  # the second (last) epoch: the first is start-up
        last = json.loads((d / "metrics.jsonl").read_text().splitlines()[-1])
        speed[last["world_size"]] = last["samples_per_s"] / last["world_size"]
    assert table.loc[2, "efficiency"] == pytest.approx(speed[2] / speed[1], rel=1e-9)
    assert table.loc[2, "predicted_efficiency"] == pytest.approx(prediction["efficiency"], rel=1e-12)
    assert math.isnan(table.loc[1, "predicted_efficiency"]) and table.loc[1, "efficiency"] == 1.0
    report = (runs / "report" / "report.md").read_text()
    row = next(line for line in report.splitlines() if line.startswith("| mnist1d | mlp |") and "| 2 |" in line)
    assert row.rstrip().endswith(f"| {speed[2] / speed[1]:.2f} | {prediction['efficiency']:.2f} |")
    assert f"- {prediction['network_text']}: mlp LB+GBN batch 64 W=2." in report
    assert "NOT a measurement" in report
