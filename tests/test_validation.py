"""The validation split, noise on for a fraction of training, and older run directories (docs/tuning.md)."""

from __future__ import annotations

import io
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from hpcnoise.checkpoint import encode, same_config
from hpcnoise.comm import init
from hpcnoise.config import Config
from hpcnoise.data import hold_out, load_images, mnist1d
from hpcnoise.errors import ConfigError
from hpcnoise.rundir import load_config
from hpcnoise.train import StepInfo, evaluate, train
from hpcnoise.workload import check_workload, epoch_steps, load_run, noise_end
from tests.helpers.configs import overrides, small_config
from tests.helpers.launch import run_launched

NEW_FIELDS = ("val_samples", "noise_fraction", "stop_blown_up")  # added to Config with the tuned comparison
CPU = torch.device("cpu")


def _rows(run: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _same_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """For each row of ``a``, whether it equals some row of ``b``."""
    return (a.flatten(1)[:, None, :] == b.flatten(1)[None, :, :]).all(-1).any(1)


# --- the split ------------------------------------------------------------------------------------------
def test_hold_out_is_a_partition_fixed_by_the_data_seed() -> None:
    kept, held = hold_out(1000, 100, data_seed=7)
    assert len(held) == 100 and len(kept) == 900
    assert torch.equal(torch.cat([kept, held]).sort().values, torch.arange(1000))
    assert torch.equal(kept, kept.sort().values) and torch.equal(held, held.sort().values)
    again_kept, again_held = hold_out(1000, 100, data_seed=7)
    assert torch.equal(kept, again_kept) and torch.equal(held, again_held)
    assert not torch.equal(held, hold_out(1000, 100, data_seed=8)[1])


def test_image_split_holds_out_training_images() -> None:
    base = Config(dataset="cifar10", synthetic_data=True, train_samples=400, test_samples=50, data_seed=3)
    whole = load_images("cifar10", base, CPU)
    split = load_images("cifar10", replace(base, val_samples=60, seed=5), CPU)  # the run's seed plays no part
    assert whole.x_val.shape == (0, 3, 32, 32) and whole.y_val.shape == (0,)
    assert split.x_val.shape == (60, 3, 32, 32) and split.x_train.shape == (340, 3, 32, 32)
    kept, held = hold_out(400, 60, 3)
    assert torch.equal(split.x_train, whole.x_train[kept]) and torch.equal(split.y_train, whole.y_train[kept])
    assert torch.equal(split.x_val, whole.x_train[held]) and torch.equal(split.y_val, whole.y_train[held])
    assert not _same_rows(split.x_val, split.x_train).any() and not _same_rows(split.x_val, split.x_test).any()
    assert torch.equal(split.x_test, whole.x_test)


def test_mnist1d_validation_is_generated_apart() -> None:
    base = small_config()
    whole = mnist1d(base, CPU)
    split = mnist1d(replace(base, val_samples=200), CPU)
    assert torch.equal(split.x_train, whole.x_train) and torch.equal(split.x_test, whole.x_test)  # unchanged
    assert split.x_val.shape == (200, 40) and split.y_val.shape == (200,)
    assert set(split.y_val.tolist()) == set(range(10))  # the generator shuffles its classes
    assert not _same_rows(split.x_val, split.x_train).any() and not _same_rows(split.x_val, split.x_test).any()
    assert torch.equal(mnist1d(replace(base, val_samples=200, seed=9), CPU).x_val, split.x_val)
    assert not torch.equal(mnist1d(replace(base, val_samples=200, data_seed=43), CPU).x_val, split.x_val)


@pytest.mark.parametrize(
    "changes,message",
    [
        (dict(dataset="cifar10", model="resnet44", val_samples=50_000), "use 0 to 49999"),
        (dict(dataset="mnist", model="lenet5", val_samples=70_000), "use 0 to 59999"),
        (
            dict(dataset="cifar10", model="resnet44", synthetic_data=True, train_samples=300, val_samples=300),
            "use 0 to 299",
        ),
        (dict(val_samples=-1), "val_samples must be >= 0"),
        (dict(noise_fraction=1.5), "noise_fraction must be in [0, 1]"),
    ],
)
def test_bad_values_are_one_line(changes: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        check_workload(replace(Config(), **changes))  # type: ignore[arg-type]
    assert message in str(info.value) and "\n" not in str(info.value)


def test_any_mnist1d_validation_size_is_valid() -> None:
    check_workload(replace(Config(), val_samples=1_000_000))


def test_run_logs_validation_metrics(tmp_path: Path) -> None:
    cfg = small_config(out_dir=str(tmp_path), run_name="v", val_samples=300, regime="diagf")
    summary = train(cfg, init("cpu"))
    rows = _rows(tmp_path / "v")
    assert all({"val_loss", "val_error"} <= r.keys() for r in rows)
    assert summary["final_val_error"] == rows[-1]["val_error"] and summary["final_val_loss"] == rows[-1]["val_loss"]
    assert summary["best_val_error"] == min(r["val_error"] for r in rows)  # type: ignore[type-var]
    _, data, model = load_run(tmp_path / "v", init("cpu"))  # the final model on the same split
    assert data.x_val.shape[0] == 300
    assert evaluate(model, data.x_val, data.y_val, init("cpu")) == (rows[-1]["val_loss"], rows[-1]["val_error"])

    plain = train(replace(cfg, run_name="p", val_samples=0), init("cpu"))
    assert not any(k.startswith(("val_", "final_val", "best_val")) for k in plain)
    assert not any("val_loss" in r for r in _rows(tmp_path / "p"))
    assert plain["final_test_error"] == summary["final_test_error"]  # MNIST-1D: the training set unchanged


# --- noise for a fraction of training, in steps --------------------------------------------------------
def test_noise_end_in_steps() -> None:
    cfg = small_config(regime="batchchange", epochs=4, batchchange_epochs=2)  # 2048 samples, M_S 64, M_L 256
    assert epoch_steps(cfg, 2048) == [32, 32, 8, 8]
    assert noise_end(replace(cfg, noise_fraction=0.5), 2048) == 40
    assert noise_end(replace(cfg, noise_fraction=0.3), 2048) == 24  # round(24.0)
    assert noise_end(replace(cfg, noise_fraction=1.0), 2048) == 80
    assert noise_end(replace(cfg, noise_epochs=3), 2048) == 72  # the epoch rule, in steps
    assert noise_end(replace(cfg, noise_epochs=0), 2048) == 0


def test_noise_on_for_the_first_fraction_of_steps(tmp_path: Path) -> None:
    cfg = small_config(out_dir=str(tmp_path), run_name="f", regime="diagf", epochs=3, noise_fraction=0.3)
    total = 3 * 2048 // 256  # 24 steps
    noisy: list[bool] = []

    def hook(info: StepInfo) -> None:
        assert info.step == len(noisy)
        noisy.append(info.noise is not None)

    train(cfg, init("cpu"), step_hook=hook)
    assert noisy == [step < round(0.3 * total) for step in range(total)]  # the first 7 steps
    assert [r["noise"] for r in _rows(tmp_path / "f")] == [True, False, False]  # on at the epoch's first step


# --- run directories written before these fields --------------------------------------------------------
def test_same_config_fills_fields_added_since() -> None:
    current = Config().to_dict()
    older = {k: v for k, v in current.items() if k not in NEW_FIELDS}
    assert same_config(older, current)
    assert not same_config(older, replace(Config(), val_samples=10).to_dict())  # not what the older one trained
    assert not same_config({**older, "lr": 0.5}, current)
    assert not same_config({**current, "gone": 1}, current)  # a field this version does not know


def _strip_new_fields(run: Path) -> None:
    """Rewrite the run's config.json and checkpoint as a version before NEW_FIELDS wrote them."""
    record = json.loads((run / "config.json").read_text())
    record["config"] = {k: v for k, v in record["config"].items() if k not in NEW_FIELDS}
    (run / "config.json").write_text(json.dumps(record))
    header, _, body = (run / "checkpoint.pt").read_bytes().partition(b"\n")
    assert header.startswith(b"HPCNOISE-CHECKPOINT")
    payload = torch.load(io.BytesIO(body), weights_only=True)
    old = {k: v for k, v in payload["config"].items() if k not in NEW_FIELDS}
    (run / "checkpoint.pt").write_bytes(encode(old, payload["model"], payload["optimizer"], payload["position"]))


class _Stop(Exception):
    pass


def test_older_run_directory_resumes_and_loads(tmp_path: Path) -> None:
    cfg = small_config(out_dir=str(tmp_path), run_name="old", regime="diagf", epochs=3)
    reference = train(replace(cfg, run_name="ref"), init("cpu"))

    def stop_in_epoch_2(info: StepInfo) -> None:
        if info.epoch == 1:
            raise _Stop

    with pytest.raises(_Stop):  # killed in epoch 2, after epoch 1's checkpoint
        train(cfg, init("cpu"), step_hook=stop_in_epoch_2)
    run = tmp_path / "old"
    _strip_new_fields(run)
    resumed = train(cfg, init("cpu"))
    assert [r["train_loss"] for r in _rows(run)] == [r["train_loss"] for r in _rows(tmp_path / "ref")]
    assert resumed["final_test_error"] == reference["final_test_error"]
    assert not any(k in json.loads((run / "config.json").read_text())["config"] for k in NEW_FIELDS)
    assert load_config(run) == cfg  # older config.json: the new fields take their defaults
    loaded, _, _ = load_run(run, init("cpu"))  # what `hpcnoise sharpness` and analysis rebuild
    assert loaded == cfg


@pytest.mark.slow  # two ranks under mpirun
def test_split_and_noise_window_do_not_depend_on_the_world_size(tmp_path: Path) -> None:
    """The validation rows and the noise window of a 2-rank run are the 1-rank run's."""
    cfg = small_config(out_dir=str(tmp_path), regime="diagf", val_samples=300, noise_fraction=0.3, epochs=3)
    for launcher, np, name in (("none", 1, "one"), ("mpirun", 2, "two")):
        args = ["-m", "hpcnoise.cli", "train", *overrides(replace(cfg, run_name=name))]
        proc = run_launched(launcher, np, args)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    one, two = _rows(tmp_path / "one"), _rows(tmp_path / "two")
    assert [r["world_size"] for r in two] == [2, 2, 2]
    assert [r["noise"] for r in two] == [r["noise"] for r in one] == [True, False, False]
    for a, b in zip(one, two):
        for key in ("train_loss", "val_loss", "val_error", "test_error"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), key
