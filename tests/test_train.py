"""Single-process training: the loss goes down, run directories are complete, bad input is refused."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from hpcnoise.comm import init
from hpcnoise.config import Config, ConfigError, apply_overrides
from hpcnoise.train import lr_at, train
from hpcnoise.workload import validate
from tests.helpers.configs import small_config


@pytest.mark.parametrize(
    "regime,model",
    [
        ("lb", "mlp"),
        ("diagf", "mlp"),
        ("diagf", "cnn1d"),
        ("sb", "mlp"),
        ("trace", "mlp"),
        ("multiplicative", "mlp"),
        ("fullf", "cnn1d"),
        ("kfac", "cnn1d"),
        ("batchchange", "mlp"),
    ],
)
def test_loss_goes_down(tmp_path: Path, regime: str, model: str) -> None:
    cfg = small_config(
        out_dir=str(tmp_path),
        run_name="r",
        regime=regime,
        model=model,
        epochs=4,
        ghost_bn=regime not in ("sb", "batchchange"),
        batchchange_epochs=2,
    )
    summary = train(cfg, init("cpu"))
    rows = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 4
    assert rows[-1]["train_loss"] < 0.75 * rows[0]["train_loss"]
    assert summary["final_test_error"] < 0.8  # chance is 0.9
    noisy = regime in ("diagf", "trace", "multiplicative", "fullf", "kfac")
    assert all(r["noise"] == noisy for r in rows)
    if regime == "batchchange":
        assert [r["batch_size"] for r in rows] == [64, 64, 256, 256]


def test_run_directory_contents(tmp_path: Path) -> None:
    cfg = small_config(out_dir=str(tmp_path), run_name="r", regime="diagf")
    summary = train(cfg, init("cpu"))
    run = tmp_path / "r"
    assert sorted(p.name for p in run.iterdir()) == ["config.json", "metrics.jsonl", "model.pt", "summary.json"]
    record = json.loads((run / "config.json").read_text())
    assert record["config"] == json.loads(json.dumps(cfg.to_dict()))
    assert record["config"]["regime"] == "diagf" and record["world_size"] == 1
    assert {"torch", "host", "mpi"} <= record["versions"].keys()
    assert record["git"]
    assert abs(record["noise_scale"] - cfg.noise_scale) < 1e-15
    row = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    expected = {"train_loss", "train_error", "test_loss", "test_error", "lr", "noise", "wall_time_s", "samples_per_s"}
    assert expected <= row.keys()
    assert json.loads((run / "summary.json").read_text()) == summary


def test_finished_run_is_not_rerun(tmp_path: Path) -> None:
    cfg = small_config(out_dir=str(tmp_path), run_name="r", epochs=1)
    first = train(cfg, init("cpu"))
    before = (tmp_path / "r" / "metrics.jsonl").read_text()
    assert train(cfg, init("cpu")) == first
    assert (tmp_path / "r" / "metrics.jsonl").read_text() == before


def test_noise_scale() -> None:
    assert abs(Config(batch_size=4096, small_batch=128).noise_scale - 0.0870) < 1e-4


def test_lr_schedule_warmup_and_decay() -> None:
    cfg = Config(lr=1.0, warmup_epochs=2, lr_decay_epochs=(4, 6), lr_decay_factor=0.1)
    assert lr_at(cfg, 0, 0, 10) == pytest.approx(0.05)
    assert lr_at(cfg, 1, 9, 10) == pytest.approx(1.0)
    assert lr_at(cfg, 3, 5, 10) == 1.0
    assert lr_at(cfg, 4, 0, 10) == pytest.approx(0.1)
    assert lr_at(cfg, 6, 0, 10) == pytest.approx(0.01)


def test_overrides_are_type_checked() -> None:
    cfg = apply_overrides(Config(), ["--lr=0.5", "--ghost_bn=true", "--lr_decay_epochs=10,20", "epochs=3"])
    assert (cfg.lr, cfg.ghost_bn, cfg.lr_decay_epochs, cfg.epochs) == (0.5, True, (10, 20), 3)
    with pytest.raises(ConfigError, match="'lr' expects float, got 'fast'"):
        apply_overrides(Config(), ["--lr=fast"])
    with pytest.raises(ConfigError, match="'epochs' expects int"):
        apply_overrides(Config(), ["--epochs=2.5"])
    with pytest.raises(ConfigError, match="unknown config key 'learning_rate'; valid keys: dataset"):
        apply_overrides(Config(), ["--learning_rate=1"])


def test_validate_world_size_and_ghost_size() -> None:
    with pytest.raises(ConfigError, match="batch_size=4096 is not divisible by the world size 3"):
        validate(Config(), 3)
    with pytest.raises(ConfigError, match="ghost_size=100 must be positive and divide the local batch of 2048"):
        validate(Config(ghost_bn=True, ghost_size=100), 2)
    validate(Config(ghost_bn=True, ghost_size=128), 4)


BAD_INPUT = [
    ("--model=resnet9000", "unknown model 'resnet9000'; valid: alexnet, cnn1d, lenet5, mlp, mnist_mlp, resnet44"),
    ("--dataset=imagenet", "unknown dataset 'imagenet'; valid: "),
    ("--regime=magic", "unknown regime 'magic'; valid: "),
    ("--lr=0", "lr must be positive, got 0.0"),
    ("--lr=-1", "lr must be positive, got -1.0"),
    ("--batch_size=0", "batch_size must be a positive integer, got 0"),
    ("--small_batch=-5", "small_batch must be a positive integer"),
    ("--ghost_bn=true --ghost_size=100", "ghost_size=100 must be positive and divide the local batch of 512"),
    ("--batch_size=abc", "field 'batch_size' expects int, got 'abc'"),
    ("--bogus=1", "unknown config key 'bogus'"),
]


@pytest.mark.parametrize("args,message", BAD_INPUT)
def test_bad_input_cli(tmp_path: Path, args: str, message: str) -> None:
    out = tmp_path / "runs"
    cmd = [sys.executable, "-m", "hpcnoise.cli", "train", "--smoke", f"--out_dir={out}", *args.split()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hpcnoise: error: "), proc.stderr
    assert message in lines[0]
    assert not out.exists()


def test_unwritable_out_dir(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    cmd = [sys.executable, "-m", "hpcnoise.cli", "train", "--smoke", f"--out_dir={blocker}/runs"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"hpcnoise: error: out_dir '{blocker}/runs' is not usable: '{blocker}' is not a directory"
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_unknown_preset() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "hpcnoise.cli", "train", "nope"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2
    assert "unknown preset 'nope'; valid: mnist1d-diagf" in proc.stderr


def test_one_worker_has_no_buckets() -> None:
    """Buckets overlap communication with backward: on one worker make_step_parts leaves them out (nothing
    to overlap), unless asked for the layout of several workers (the scaling model's measurement)."""
    from hpcnoise.models import build_model
    from hpcnoise.step import make_step_parts

    cfg = Config(dataset="mnist1d", model="mlp", regime="lb", allreduce="buckets")
    one = init("cpu")
    assert one.size == 1
    assert make_step_parts(cfg, one, build_model("mlp", (40,), 10)).net.buckets is None
    assert make_step_parts(cfg, one, build_model("mlp", (40,), 10), buckets=True).net.buckets is not None
    fused = Config(dataset="mnist1d", model="mlp", regime="lb", allreduce="fused")
    assert make_step_parts(fused, one, build_model("mlp", (40,), 10), buckets=True).net.buckets is None
