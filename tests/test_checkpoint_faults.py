"""Unusable inputs that must end in one line, not a traceback: a checkpoint whose payload the weights-only
loader refuses, and a malformed HPCNOISE_FAULT.

1. A checkpoint with a valid header and SHA-256 whose payload pickles a function of this module (written
   by ``torch.save``, not by hpcnoise.checkpoint.encode) is one more kind of unusable checkpoint: a
   warning naming the file and resume from checkpoint.prev.pt (bit-identical to an uninterrupted run),
   or, when both files are such, CheckpointError in-process and exit 74 with one line from the CLI. The
   pickled function would create a marker file if it ran; it never does, and nothing advises
   ``weights_only=False``. Tiny runs (256 / 128 MNIST-1D samples, 4 steps per epoch, float64), in-process
   except one CLI process.
2. A malformed HPCNOISE_FAULT: ConfigError in-process, and from ``hpcnoise train --smoke`` (the venv's
   binary, one process per value) exit 2 with one line, no traceback and nothing written.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from hpcnoise import faults
from hpcnoise.comm import init
from hpcnoise.config import Config
from hpcnoise.errors import EXIT_IO, EXIT_USAGE, CheckpointError, ConfigError
from hpcnoise.train import train

STEPS = 4  # steps per epoch: 256 training samples in global batches of 64
HPCNOISE = Path(sys.executable).parent / "hpcnoise"  # the venv's command


def tiny(out_dir: Path, run_name: str) -> Config:
    """A second-long run: 256 / 128 samples, 4 steps of 64 per epoch, 4 epochs, float64 on the CPU."""
    return Config(
        train_samples=256,
        test_samples=128,
        batch_size=64,
        small_batch=16,
        epochs=4,
        lr=0.2,
        dtype="float64",
        device="cpu",
        checkpoint_every=1,
        progress=False,
        threads=1,
        out_dir=str(out_dir),
        run_name=run_name,
    )


def run_path(cfg: Config) -> Path:
    return Path(cfg.out_dir) / cfg.run_name


class Interrupt(Exception):
    """Raised at a fault point in-process: the files are left as a SIGKILL there would leave them."""


def _touch(path: str) -> None:
    """What the crafted checkpoint would run if it were unpickled with code: it creates a marker file."""
    Path(path).write_text("ran")


class Trap:
    """Pickles as a call of ``_touch``: a foreign global that the weights-only loader must refuse."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return _touch, (self.marker,)


def with_foreign_payload(data: bytes, marker: Path) -> bytes:
    """A checkpoint's bytes with a ``Trap`` added to its payload, behind a valid header and SHA-256."""
    header, _, body = data.partition(b"\n")
    payload = torch.load(io.BytesIO(body), weights_only=True)
    payload["extra"] = Trap(marker)
    buf = io.BytesIO()
    torch.save(payload, buf)
    body = buf.getvalue()
    magic, fmt, _, _ = header.split(b" ")
    return b"%s %s %d %s\n" % (magic, fmt, len(body), hashlib.sha256(body).hexdigest().encode()) + body


@pytest.fixture(scope="module")
def stopped(tmp_path_factory: pytest.TempPathFactory) -> tuple[Config, Path, Path]:
    """(config, a copy of its run stopped after epoch 2 of 4, the same run finished without a stop)."""
    out = tmp_path_factory.mktemp("runs")
    ref = tiny(out, "reference")
    train(ref, init("cpu"))
    cfg = tiny(out, "stopped")
    seen = 0

    def reached(point: str) -> None:
        nonlocal seen
        seen += point == "epoch-end"
        if seen == 2:
            raise Interrupt

    with pytest.MonkeyPatch.context() as m:
        m.setattr(faults, "reached", reached)
        with pytest.raises(Interrupt):
            train(cfg, init("cpu"))
    assert {"checkpoint.pt", "checkpoint.prev.pt"} <= {p.name for p in run_path(cfg).iterdir()}
    pristine = tmp_path_factory.mktemp("pristine") / "stopped"
    shutil.copytree(run_path(cfg), pristine)
    return cfg, pristine, run_path(ref)


def restore(cfg: Config, pristine: Path) -> Path:
    """The stopped run directory as it was left (a checkpoint names its directory, so it stays put)."""
    run = run_path(cfg)
    shutil.rmtree(run, ignore_errors=True)
    shutil.copytree(pristine, run)
    return run


def snapshot(path: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir())}


def assert_no_advice(text: str) -> None:
    assert "Traceback" not in text and "weights_only=False" not in text and "`weights_only`" not in text, text


def test_the_trap_would_run_code(stopped: tuple[Config, Path, Path], tmp_path: Path) -> None:
    """The crafted file is what it claims: loaded with code allowed, it runs ``_touch``."""
    _, pristine, _ = stopped
    marker = tmp_path / "marker"
    data = with_foreign_payload((pristine / "checkpoint.pt").read_bytes(), marker)
    torch.load(io.BytesIO(data.partition(b"\n")[2]), weights_only=False)
    assert marker.exists()


def test_foreign_payload_falls_back_to_previous(
    stopped: tuple[Config, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg, pristine, ref = stopped
    run = restore(cfg, pristine)
    marker = tmp_path / "marker"
    (run / "checkpoint.pt").write_bytes(with_foreign_payload((run / "checkpoint.pt").read_bytes(), marker))
    capsys.readouterr()
    train(cfg, init("cpu"))
    captured = capsys.readouterr()
    out = captured.out
    assert f"hpcnoise: warning: {run / 'checkpoint.pt'} is unusable (foreign payload: it holds a pickled " in out
    assert f"{__name__}._touch, not only tensors and plain values)" in out
    assert f"resuming {run} at epoch 2, step {STEPS} from checkpoint.prev.pt" in out
    assert_no_advice(out + captured.err)
    assert not marker.exists()
    assert (run / "summary.json").exists()
    model, model_ref = torch.load(run / "model.pt"), torch.load(ref / "model.pt")
    assert model.keys() == model_ref.keys() and all(torch.equal(model[k], model_ref[k]) for k in model_ref)


def both_foreign(run: Path, marker: Path) -> None:
    for name in ("checkpoint.pt", "checkpoint.prev.pt"):
        (run / name).write_bytes(with_foreign_payload((run / name).read_bytes(), marker))


def test_foreign_payloads_both_is_one_error(
    stopped: tuple[Config, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg, pristine, _ = stopped
    run = restore(cfg, pristine)
    marker = tmp_path / "marker"
    both_foreign(run, marker)
    before = snapshot(run)
    capsys.readouterr()
    with pytest.raises(CheckpointError) as e:
        train(cfg, init("cpu"))
    message = str(e.value)
    assert "\n" not in message and str(run) in message
    assert "checkpoint.pt: foreign payload" in message and "checkpoint.prev.pt: foreign payload" in message
    assert e.value.exit_code == EXIT_IO
    captured = capsys.readouterr()
    assert captured.out.count("hpcnoise: warning:") == 2 and "resuming" not in captured.out
    assert_no_advice(message + captured.out + captured.err)
    assert snapshot(run) == before and not marker.exists()


def cli_args(cfg: Config) -> list[str]:
    """Every field as --key=value: the CLI starts from its default preset, not from Config()."""

    def text(v: Any) -> str:
        return ",".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)

    return [f"--{k}={text(v)}" for k, v in cfg.to_dict().items()]


def test_foreign_payloads_both_cli_exit_74(stopped: tuple[Config, Path, Path], tmp_path: Path) -> None:
    cfg, pristine, _ = stopped
    run = restore(cfg, pristine)
    marker = tmp_path / "marker"
    both_foreign(run, marker)
    before = snapshot(run)
    done = subprocess.run([str(HPCNOISE), "train", *cli_args(cfg)], capture_output=True, text=True, timeout=180)
    assert snapshot(run) == before and not marker.exists()
    assert "resuming" not in done.stdout
    assert_no_advice(done.stdout + done.stderr)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == EXIT_IO, done.stderr[-3000:]
    assert len(lines) == 1 and "no usable checkpoint" in lines[0] and str(run) in lines[0], lines
    assert "checkpoint.pt: foreign payload" in lines[0] and "checkpoint.prev.pt: foreign payload" in lines[0]


# --- 2. a malformed HPCNOISE_FAULT ---------------------------------------------------------------------------
MALFORMED = ["step", "nowhere:1", "step:0", "epoch-end:1:x"]


@pytest.mark.parametrize(
    "spec,plan",
    [("step:2", ("step", 2, 0)), ("checkpoint-swapped:3:1", ("checkpoint-swapped", 3, 1)), ("", None)],
)
def test_fault_plans(monkeypatch: pytest.MonkeyPatch, spec: str, plan: tuple[str, int, int] | None) -> None:
    monkeypatch.setenv("HPCNOISE_FAULT", spec)
    faults.check()
    assert faults._plan() == plan


@pytest.mark.parametrize("spec", MALFORMED + ["step:1:2:3", "step:-1", ":1"])
def test_malformed_fault_in_process(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, spec: str) -> None:
    monkeypatch.setenv("HPCNOISE_FAULT", spec)
    with pytest.raises(ConfigError) as e:
        train(tiny(tmp_path / "out", "run"), init("cpu"))
    message = str(e.value)
    assert "\n" not in message and "HPCNOISE_FAULT" in message and "valid: POINT:N[:RANK]" in message
    assert all(point in message for point in faults.POINTS)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("spec", MALFORMED)
def test_malformed_fault_cli_exit_2(tmp_path: Path, spec: str) -> None:
    env = {**os.environ, "HPCNOISE_FAULT": spec}
    done = subprocess.run(
        [str(HPCNOISE), "train", "--smoke"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180
    )
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    assert done.returncode == EXIT_USAGE, done.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("hpcnoise: error: HPCNOISE_FAULT"), lines
    assert repr(spec.split(":")[0]) in lines[0] or repr(spec) in lines[0], lines
    assert not list(tmp_path.iterdir())  # no runs/ directory, nothing at all
