"""The blow-up rule (docs/tuning.md): the pure rule on hand-made losses, and a run it stops."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest

from hpcnoise.blowup import BLOWUP_EPOCHS, BLOWUP_FACTOR, blown_up, blowup_keys
from hpcnoise.comm import init
from hpcnoise.runstate import run_state, state_detail
from hpcnoise.train import train
from tests.helpers.configs import small_config


def test_constants_are_the_protocols() -> None:
    assert (BLOWUP_FACTOR, BLOWUP_EPOCHS) == (2, 2)


@pytest.mark.parametrize(
    "losses,fired",
    [
        ([], None),
        ([1.0], None),
        ([2.0, 1.0, 0.5, 0.4], None),  # going down
        ([1.0, 2.0, 2.0, 1.5], None),  # exactly 2x is not above it
        ([1.0, 2.5, 1.0, 2.5], None),  # one epoch above, then back: not two in a row
        ([1.0, 2.5, 1.9, 2.5], None),  # the streak is broken by an epoch at 1.9x
        ([1.0, 2.5, 3.0], (3, 3.0, 1.0)),  # two in a row: fires at the second
        ([1.0, 0.5, 1.2, 1.1, 5.0], (4, 1.1, 0.5)),  # against the lowest so far, not the first
        ([1.0, 2.5, 3.0, 4.0, 5.0], (3, 3.0, 1.0)),  # the first epoch it fired
        ([1.0, 2.5, math.inf, 3.0], None),  # a non-finite loss ends the streak (that is divergence)
        ([1.0, math.nan, 2.5, 2.6], (4, 2.6, 1.0)),  # ... and does not lower the best
    ],
)
def test_rule_on_hand_made_losses(losses: list[float], fired: tuple[int, float, float] | None) -> None:
    record = blown_up(losses)
    expected = None if fired is None else dict(zip(("epoch", "train_loss", "best_train_loss"), fired))
    assert record == expected


def test_summary_keys_only_when_something_happened() -> None:
    rows = [{"train_loss": x} for x in (1.0, 0.9, 0.8)]
    assert blowup_keys(rows, planned_epochs=3) == {}
    blown = [{"train_loss": x} for x in (1.0, 2.5, 3.0)]
    assert blowup_keys(blown, planned_epochs=3) == {"blown_up": blown_up([1.0, 2.5, 3.0])}
    assert blowup_keys(blown, planned_epochs=5)["stopped_early"] is True


def _rows(run: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_blown_up_run_stops_early_and_finishes(tmp_path: Path) -> None:
    """lr = 50 without warmup: the MLP's loss grows about a thousandfold an epoch, finite all along, so the
    rule fires at epoch 3 (epochs 2 and 3 above twice epoch 1's); the run stops there and finishes."""
    cfg = small_config(out_dir=str(tmp_path), run_name="r", regime="lb", epochs=5, lr=50.0)
    cfg_stop = replace(cfg, run_name="s", stop_blown_up=True, sharpness=True)
    summary = train(cfg_stop, init("cpu"))
    run = tmp_path / "s"
    rows = _rows(run)
    losses = [float(r["train_loss"]) for r in rows]  # type: ignore[arg-type]
    assert len(rows) == 3 and all(math.isfinite(x) for x in losses)
    record = {"epoch": 3, "train_loss": losses[2], "best_train_loss": losses[0]}
    assert summary["blown_up"] == record and summary["stopped_early"] is True
    assert summary["epochs"] == 5 and summary["steps"] == 3 * 2048 // 256  # planned epochs, steps taken
    assert summary["final_train_loss"] == losses[2] and summary["final_test_error"] == rows[2]["test_error"]
    assert "max_eigenvalue" not in summary and "stopped early" in summary["sharpness_skipped"]
    assert json.loads((run / "summary.json").read_text()) == summary
    names = sorted(p.name for p in run.iterdir())
    assert names == ["config.json", "metrics.jsonl", "model.pt", "summary.json"]  # no checkpoint, no sharpness
    assert run_state(run) == "finished" and state_detail(run, "finished").startswith("final test error")
    assert train(cfg_stop, init("cpu")) == summary  # finished: not rerun

    # Without stop_blown_up the same run trains on, and its summary records where the rule fired.
    full = train(replace(cfg, epochs=4), init("cpu"))
    assert full["blown_up"] == record and "stopped_early" not in full
    assert len(_rows(tmp_path / "r")) == 4


def test_run_that_does_not_blow_up_has_no_new_keys(tmp_path: Path) -> None:
    summary = train(small_config(out_dir=str(tmp_path), run_name="r", stop_blown_up=True), init("cpu"))
    assert not {"blown_up", "stopped_early", "sharpness_skipped"} & summary.keys()
    assert len(_rows(tmp_path / "r")) == 2
