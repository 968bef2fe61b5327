"""Checkpoint and exact resume: a run killed at any point and rerun ends bit-identical to an uninterrupted one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.helpers.configs import overrides, small_config
from tests.helpers.launch import launcher_cmd, needs_launcher

# Every case starts, signals and restarts training processes (2 ranks under mpirun, or 3 plain ones of
# 10-20 s each); tests/test_faults.py covers resuming in one process.
pytestmark = pytest.mark.slow

TIMING = ("epoch_time_s", "wall_time_s", "samples_per_s", "samples_per_s_per_worker")


def cmd(launcher: str, np: int, out: Path, name: str) -> list[str]:
    cfg = small_config(
        out_dir=str(out),
        run_name=name,
        regime="kfac",
        kfac_every=3,
        model="cnn1d",
        ghost_bn=True,
        ghost_size=32,
        epochs=6,
        small_batch=64,
        batch_size=128,
        train_samples=1024,
    )
    return launcher_cmd(launcher, np) + [sys.executable, "-m", "hpcnoise.cli", "train", *overrides(cfg)]


def comparable(run: Path) -> tuple[list[dict], dict[str, torch.Tensor]]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rows = [{k: v for k, v in r.items() if k not in TIMING and not k.startswith("time_")} for r in rows]
    return rows, torch.load(run / "model.pt")


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    end = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, f"run ended before {path.name} appeared"
        assert time.time() < end, f"{path} did not appear"
        time.sleep(0.05)


@pytest.mark.parametrize(
    "launcher,np,sig",
    [
        ("none", 1, signal.SIGTERM),
        ("none", 1, signal.SIGKILL),
        ("mpirun", 2, signal.SIGUSR1),
        ("mpirun", 2, signal.SIGKILL),
    ],
)
def test_kill_and_resume_is_bit_identical(tmp_path: Path, launcher: str, np: int, sig: signal.Signals) -> None:
    needs_launcher(launcher)
    env = os.environ.copy()
    reference = subprocess.run(cmd(launcher, np, tmp_path, "ref"), capture_output=True, text=True, env=env, timeout=300)
    assert reference.returncode == 0, reference.stderr[-3000:]

    proc = subprocess.Popen(
        cmd(launcher, np, tmp_path, "cut"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )
    wait_for(tmp_path / "cut" / "checkpoint.pt", proc)  # at least one epoch done
    if sig == signal.SIGKILL:
        os.killpg(proc.pid, sig)  # the whole process group, no chance to checkpoint
    else:
        proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    if sig == signal.SIGKILL:
        assert proc.returncode != 0
    else:
        assert proc.returncode == 75, err[-3000:]
        assert "checkpoint written" in err
    assert not (tmp_path / "cut" / "summary.json").exists()

    resumed = subprocess.run(cmd(launcher, np, tmp_path, "cut"), capture_output=True, text=True, env=env, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming" in resumed.stdout
    rows_ref, model_ref = comparable(tmp_path / "ref")
    rows_cut, model_cut = comparable(tmp_path / "cut")
    assert rows_cut == rows_ref
    assert model_cut.keys() == model_ref.keys()
    for key in model_ref:
        assert torch.equal(model_cut[key], model_ref[key]), key
    assert not (tmp_path / "cut" / "checkpoint.pt").exists()
