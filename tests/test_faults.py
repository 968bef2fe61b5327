"""Fault tolerance: kills at any point, damaged checkpoints, a full disk, a held lock and divergence.

Every run is tiny (MNIST-1D, 256 train / 128 test samples, 4 steps of 64 per epoch, float64, one thread
per process), so a test costs seconds beyond its process start-ups. Counts are fixed and seeded:

1. ``test_random_kills_resume_bit_identical`` (about 85 s): 2 ranks under mpirun, 6 epochs. A reference
   run, and one run directory SIGKILLed (HPCNOISE_FAULT) at 10 points drawn by
   ``numpy.random.default_rng(12)`` -- every fault point at least once, rank 1 three times, resumes
   from checkpoint.prev.pt after kills at checkpoint-swapped -- and rerun after each kill, then
   finished without a fault: 12 launches of 2 ranks. model.pt and metrics.jsonl (timing columns
   dropped) equal the reference bit for bit; a kill leaves a .lock that blocks nobody.
2. ``test_damaged_checkpoint*`` (about 15 s): a run SIGKILLed after epoch 2 of 4 (1 CLI process);
   checkpoint.pt damaged 12 ways (8 flipped bytes at seeded offsets, 2 of them in the header line;
   4 truncations, to 0 bytes, into the header, into the payload, one byte short), each resumed
   in-process from checkpoint.prev.pt; both files damaged: one error in-process and from the CLI
   (1 process); a checkpoint of another config (seed 1) refused, alone and in both places.
3. ``test_disk_full`` (4 cases, about 1 s each): ENOSPC from a half-done write() or from fsync(), of
   the checkpoint or of the metrics row of epoch 3 of 4, in-process; then a rerun without it.
4. ``test_locked_run_directory_*``: a started run directory whose .lock this process holds is
   refused in-process and by the CLI (2 CLI processes), and resumes once released.
5. ``test_divergence_*``: lr=1000 in float32 overflows in epoch 3 of 6; the run is marked diverged and
   not retried (in-process, and 2 CLI processes).

The CLI's exit codes for RunLocked (73), WriteFailed and CheckpointError (74) and Diverged (65) are
asserted last in each test, after everything they would otherwise hide.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import hpcnoise.files
import hpcnoise.lifecycle
import hpcnoise.rundir
from hpcnoise import faults
from hpcnoise.comm import init
from hpcnoise.config import Config
from hpcnoise.errors import (
    EXIT_DIVERGED,
    EXIT_IO,
    EXIT_LOCKED,
    CheckpointError,
    Diverged,
    RunLocked,
    WriteFailed,
)
from hpcnoise.runstate import lock_held
from hpcnoise.train import train
from tests.helpers.configs import small_config
from tests.helpers.launch import launcher_cmd, needs_launcher

STEPS = 4  # steps per epoch: 256 training samples in global batches of 64


def tiny(**changes: Any) -> Config:
    """A second-long run: 256 / 128 samples, 4 steps of 64 per epoch, float64 on the CPU."""
    base: dict[str, Any] = dict(
        train_samples=256,
        test_samples=128,
        batch_size=64,
        small_batch=16,
        epochs=4,
        dtype="float64",
        device="cpu",
        checkpoint_every=1,
    )
    return small_config(**(base | changes))


def cli_args(cfg: Config) -> list[str]:
    """Every field as --key=value: the CLI starts from its default preset, not from Config()."""

    def text(v: Any) -> str:
        return ",".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)

    return [f"--{k}={text(v)}" for k, v in cfg.to_dict().items()]


def train_cmd(cfg: Config, launcher: str = "none", np_: int = 1) -> list[str]:
    return launcher_cmd(launcher, np_) + [sys.executable, "-m", "hpcnoise.cli", "train", *cli_args(cfg)]


def run_cmd(cmd: list[str], fault: str | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
    env = os.environ.copy()
    env.pop("HPCNOISE_FAULT", None)
    if fault is not None:
        env["HPCNOISE_FAULT"] = fault
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)


def run_path(cfg: Config) -> Path:
    return Path(cfg.out_dir) / cfg.run_name


def is_timing(key: str) -> bool:
    return "time" in key or "wall" in key or "samples_per_s" in key


def comparable(run: Path) -> tuple[list[dict[str, Any]], dict[str, torch.Tensor]]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rows = [{k: v for k, v in r.items() if not is_timing(k)} for r in rows]
    return rows, torch.load(run / "model.pt", weights_only=True)


def assert_same_result(run: Path, ref: Path) -> None:
    """run finished with the same metrics (timing columns dropped) and the same model, bit for bit."""
    assert (run / "summary.json").exists(), f"{run} did not finish"
    rows, model = comparable(run)
    rows_ref, model_ref = comparable(ref)
    assert rows == rows_ref
    assert model.keys() == model_ref.keys()
    for key in model_ref:
        assert model[key].dtype == model_ref[key].dtype, key
        assert torch.equal(model[key], model_ref[key]), key
    assert not (run / "checkpoint.pt").exists() and not (run / "checkpoint.prev.pt").exists()


def snapshot(path: Path) -> dict[str, tuple[int, int, str]]:
    """Every file of a directory (hidden ones too): name -> (size, mtime_ns, SHA-256)."""
    return {
        p.name: (p.stat().st_size, p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
        for p in sorted(path.iterdir())
    }


def contents(path: Path) -> dict[str, str]:
    """Every file of a directory: name -> SHA-256 (what byte-identical means, whatever the mtimes)."""
    return {name: digest for name, (_, _, digest) in snapshot(path).items()}


def temporaries(path: Path) -> list[str]:
    return [p.name for p in path.iterdir() if p.name.endswith(".tmp") or (p.name.startswith(".") and p.name != ".lock")]


def stderr_lines(done: subprocess.CompletedProcess) -> list[str]:
    return [line for line in done.stderr.splitlines() if line.strip()]


class Interrupt(Exception):
    """Raised in-process at a fault point: the files are left as a SIGKILL there would leave them."""


def interrupted(cfg: Config, monkeypatch: pytest.MonkeyPatch, point: str, n: int) -> None:
    """Train ``cfg`` in this process until the n-th time it reaches fault point ``point``."""
    seen = 0

    def reached(p: str) -> None:
        nonlocal seen
        if p == point:
            seen += 1
            if seen == n:
                raise Interrupt(f"{point}:{n}")

    with monkeypatch.context() as m:
        m.setattr(faults, "reached", reached)
        with pytest.raises(Interrupt):
            train(cfg, init("cpu"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Callable[[Config], Path]:
    """The finished run directory of an uninterrupted in-process run of a config (made once per config)."""
    done: dict[Config, Path] = {}
    out = tmp_path_factory.mktemp("reference")

    def get(cfg: Config) -> Path:
        key = replace(cfg, out_dir="", run_name="")
        if key not in done:
            ref = replace(cfg, out_dir=str(out), run_name=f"ref{len(done)}")
            train(ref, init("cpu"))
            done[key] = run_path(ref)
        return done[key]

    return get


# --- 1. random SIGKILLs under a real launcher -----------------------------------------------------------
POINTS = faults.POINTS
KILLS = 10
EPOCHS = 6


def reachable(point: str, rank: int, left: int) -> int:
    """How many times rank ``rank`` reaches ``point`` in a session with ``left`` epochs to go.

    Checkpoints are written by rank 0 only and after every epoch but the last. Rank 1 is not killed at
    the last epoch-end: rank 0 would be writing model.pt and summary.json meanwhile.
    """
    if point == "step":
        return left * STEPS
    if point == "evaluate":
        return left
    if point == "epoch-end":
        return left if rank == 0 else left - 1
    return left - 1 if rank == 0 else 0


def checkpointed_after(point: str, n: int, done: int) -> int:
    """Epochs in the newest complete checkpoint after a kill at the n-th ``point`` of a session that
    started from ``done`` epochs (counts restart with each session, which resumes from there)."""
    if point == "step":
        return done + (n - 1) // STEPS  # the epochs finished before the kill wrote theirs
    if point == "epoch-end":
        return min(done + n, EPOCHS - 1)  # the n-th epoch's files are written; the last has no checkpoint
    return done + n - 1  # evaluate, checkpoint-staged, checkpoint-swapped: the n-th epoch's is missing


def draw_kills(seed: int) -> list[tuple[str, int, int, int, str]]:
    """(point, count, rank, epochs checkpointed before, checkpoint resumed from) for each killed session.

    The point is drawn among those reachable in that session (ones not drawn yet first), rank 1 with
    probability 0.3 where it reaches the point, and the count among the first few reachable ones, so
    that the run advances slowly and is killed at many places of its schedule.
    """
    rng = np.random.default_rng(seed)
    done, source, used, plan = 0, "checkpoint.pt", set(), []
    for _ in range(KILLS):
        left = EPOCHS - done
        valid = [p for p in POINTS if reachable(p, 0, left) >= 1]
        fresh = [p for p in valid if p not in used] or valid
        point = fresh[int(rng.integers(len(fresh)))]
        rank = int(reachable(point, 1, left) >= 1 and rng.random() < 0.3)
        cap = STEPS + 1 if point == "step" else 2
        n = int(rng.integers(1, min(cap, reachable(point, rank, left)) + 1))
        used.add(point)
        plan.append((point, n, rank, done, source))
        after = checkpointed_after(point, n, done)
        if point == "checkpoint-swapped":
            source = "checkpoint.prev.pt"  # checkpoint.pt is missing, its predecessor kept
        elif after > done:
            source = "checkpoint.pt"
        done = after
    plan.append(("", 0, 0, done, source))  # the final session, without a fault
    return plan


@pytest.mark.slow
def test_random_kills_resume_bit_identical(tmp_path: Path) -> None:
    needs_launcher("mpirun")
    plan = draw_kills(seed=12)
    assert {p for p, *_ in plan[:-1]} == set(POINTS) and any(rank == 1 for _, _, rank, *_ in plan[:-1]), plan
    assert len({done for *_, done, _ in plan}) >= 4, plan  # killed at many places of the schedule
    assert any(done and source == "checkpoint.prev.pt" for *_, done, source in plan), plan

    ref_cfg = tiny(out_dir=str(tmp_path), run_name="ref", epochs=EPOCHS)
    reference = run_cmd(train_cmd(ref_cfg, "mpirun", 2))
    assert reference.returncode == 0, reference.stderr[-3000:]

    cfg = replace(ref_cfg, run_name="cut")
    run = run_path(cfg)
    for i, (point, n, rank, done, source) in enumerate(plan):
        fault = f"{point}:{n}:{rank}" if point else None
        what = f"session {i + 1} ({fault or 'no fault'}, after {plan[:i]})"
        session = run_cmd(train_cmd(cfg, "mpirun", 2), fault=fault)
        if done:
            where = f"resuming {run} at epoch {done + 1}, step {done * STEPS} from {source}"
            assert where in session.stdout, f"{what}: {session.stdout[-2000:]}"
        else:
            assert "resuming" not in session.stdout, what
        if fault is None:
            assert session.returncode == 0, f"{what}: {session.stderr[-3000:]}"
            break
        assert session.returncode != 0, f"{what} was not killed: the fault point was not reached"
        assert f"process rank {rank} " in session.stderr and "signal 9" in session.stderr, session.stderr[-2000:]
        assert not (run / "summary.json").exists(), what
        if i == 0:  # the killed job's lock file stays, and holds no lock
            assert (run / ".lock").exists()
            assert not lock_held(run)
    assert_same_result(run, run_path(ref_cfg))
    # the checkpoints that kills interrupted left temporaries behind; the resumed run removed them
    assert not list(run.glob(".*.tmp")), sorted(p.name for p in run.iterdir())


# --- 2. damaged checkpoints --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Config, Path]]:
    """A run stopped by SIGKILL after epoch 2 of 4 (checkpoint.pt: epoch 2, checkpoint.prev.pt: epoch 1)
    and a pristine copy of its directory."""
    out = tmp_path_factory.mktemp("stopped")
    cfg = tiny(out_dir=str(out / "runs"), run_name="cut")
    done = run_cmd(train_cmd(cfg), fault="epoch-end:2")
    assert done.returncode == -9, done.stderr[-3000:]
    run = run_path(cfg)
    assert {"checkpoint.pt", "checkpoint.prev.pt"} <= {p.name for p in run.iterdir()}
    pristine = out / "pristine"
    shutil.copytree(run, pristine)
    yield cfg, pristine


def restore(cfg: Config, pristine: Path) -> Path:
    """The stopped run directory as it was left (a checkpoint names its directory, so it stays put)."""
    run = run_path(cfg)
    shutil.rmtree(run, ignore_errors=True)
    shutil.copytree(pristine, run)
    return run


def damages(data: bytes, seed: int = 7) -> list[tuple[str, bytes]]:
    """8 single flipped bytes (2 in the header line, 6 in the payload) and 4 truncations (0 bytes, in
    the header, in the payload, one byte short), at seeded offsets."""
    rng = np.random.default_rng(seed)
    header = data.index(b"\n") + 1
    offsets = [*rng.choice(header, 2, replace=False), *(header + rng.choice(len(data) - header, 6, replace=False))]
    out = []
    for offset in sorted(int(o) for o in offsets):
        damaged = bytearray(data)
        damaged[offset] ^= int(rng.integers(1, 256))
        out.append((f"byte {offset} of {len(data)} flipped", bytes(damaged)))
    for length in (0, int(rng.integers(1, header)), int(rng.integers(header, len(data) - 1)), len(data) - 1):
        out.append((f"truncated to {length} of {len(data)} bytes", data[:length]))
    return out


def test_damaged_checkpoint_resumes_from_previous(
    stopped_run: tuple[Config, Path], reference: Callable[[Config], Path], capsys: pytest.CaptureFixture[str]
) -> None:
    cfg, pristine = stopped_run
    ref = reference(cfg)
    cases = damages((pristine / "checkpoint.pt").read_bytes())
    assert len(cases) == 12
    for what, data in cases:
        run = restore(cfg, pristine)
        (run / "checkpoint.pt").write_bytes(data)
        capsys.readouterr()
        train(cfg, init("cpu"))
        out = capsys.readouterr().out
        assert f"hpcnoise: warning: {run / 'checkpoint.pt'} is unusable (" in out, what
        assert f"resuming {run} at epoch 2, step {STEPS} from checkpoint.prev.pt" in out, what
        assert_same_result(run, ref)


def damage_both(run: Path) -> None:
    ckpt = bytearray((run / "checkpoint.pt").read_bytes())
    ckpt[len(ckpt) // 2] ^= 0xFF
    (run / "checkpoint.pt").write_bytes(bytes(ckpt))
    prev = (run / "checkpoint.prev.pt").read_bytes()
    (run / "checkpoint.prev.pt").write_bytes(prev[: len(prev) // 2])


def test_damaged_checkpoints_both_is_one_error(
    stopped_run: tuple[Config, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    cfg, pristine = stopped_run
    run = restore(cfg, pristine)
    damage_both(run)
    before = snapshot(run)
    with pytest.raises(CheckpointError) as e:
        train(cfg, init("cpu"))
    message = str(e.value)
    assert "\n" not in message and str(run) in message
    assert "checkpoint.pt: corrupt" in message and "checkpoint.prev.pt: truncated" in message
    assert snapshot(run) == before
    out = capsys.readouterr().out
    assert out.count("hpcnoise: warning:") == 2 and "resuming" not in out


def test_damaged_checkpoints_both_cli_exit_74(stopped_run: tuple[Config, Path]) -> None:
    cfg, pristine = stopped_run
    run = restore(cfg, pristine)
    damage_both(run)
    before = snapshot(run)
    done = run_cmd(train_cmd(cfg))
    assert snapshot(run) == before
    assert "resuming" not in done.stdout
    lines = stderr_lines(done)
    assert done.returncode == EXIT_IO, done.stderr[-3000:]
    assert len(lines) == 1 and "checkpoint.pt" in lines[0] and str(run) in lines[0], lines


def test_damaged_checkpoint_of_another_config_is_refused(
    stopped_run: tuple[Config, Path],
    reference: Callable[[Config], Path],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    cfg, pristine = stopped_run
    other = replace(cfg, run_name="other", seed=1)
    interrupted(other, monkeypatch, "epoch-end", 2)
    foreign = run_path(other) / "checkpoint.pt"

    run = restore(cfg, pristine)
    shutil.copyfile(foreign, run / "checkpoint.pt")
    capsys.readouterr()
    train(cfg, init("cpu"))
    out = capsys.readouterr().out
    assert f"warning: {run / 'checkpoint.pt'} is unusable (it belongs to a different configuration)" in out
    assert f"resuming {run} at epoch 2, step {STEPS} from checkpoint.prev.pt" in out
    assert_same_result(run, reference(cfg))

    run = restore(cfg, pristine)
    shutil.copyfile(foreign, run / "checkpoint.pt")
    shutil.copyfile(foreign, run / "checkpoint.prev.pt")
    before = snapshot(run)
    with pytest.raises(CheckpointError, match="different configuration"):
        train(cfg, init("cpu"))
    assert snapshot(run) == before


# --- 3. a full disk ------------------------------------------------------------------------------------------
def enospc() -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


class FullDisk:
    """A file on a disk that fills up during a write: half the data goes out, then ENOSPC."""

    def __init__(self, f: Any):
        self._f = f

    def write(self, data: bytes) -> int:
        self._f.write(bytes(data[: len(data) // 2]))
        raise enospc()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)

    def __enter__(self) -> FullDisk:
        return self

    def __exit__(self, *exc: Any) -> Any:
        return self._f.__exit__(*exc)


def fail_syscall(m: pytest.MonkeyPatch, syscall: str) -> None:
    """From now until ``m`` is undone, hpcnoise.files' writes (write or fsync) fail with ENOSPC."""
    if syscall == "fsync":

        def fsync(fd: int) -> None:
            raise enospc()

        m.setattr(hpcnoise.files.os, "fsync", fsync)
    else:
        real_fdopen, real_open = os.fdopen, open
        m.setattr(hpcnoise.files.os, "fdopen", lambda *a, **k: FullDisk(real_fdopen(*a, **k)))
        m.setattr(hpcnoise.files, "open", lambda *a, **k: FullDisk(real_open(*a, **k)), raising=False)


@pytest.mark.parametrize("syscall", ["write", "fsync"])
@pytest.mark.parametrize("target", ["checkpoint", "metrics"])
def test_disk_full(
    tmp_path: Path,
    reference: Callable[[Config], Path],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    target: str,
    syscall: str,
) -> None:
    cfg = tiny(out_dir=str(tmp_path), run_name="full")
    run = run_path(cfg)
    failing_epoch = 3  # before it: checkpoint.pt (epoch 2) and checkpoint.prev.pt (epoch 1)
    before: dict[str, str] = {}
    calls = 0

    def failing(real: Callable[..., None]) -> Callable[..., None]:
        def write(path: Path, *args: Any, **kwargs: Any) -> None:
            nonlocal calls
            if path.name == f"{target}.{'pt' if target == 'checkpoint' else 'jsonl'}":
                calls += 1
                if calls == failing_epoch:
                    before.update(contents(run))
                    with monkeypatch.context() as m:
                        fail_syscall(m, syscall)
                        real(path, *args, **kwargs)
                    return
            real(path, *args, **kwargs)

        return write

    with monkeypatch.context() as m:
        if target == "checkpoint":
            m.setattr(hpcnoise.lifecycle, "write_bytes_atomic", failing(hpcnoise.lifecycle.write_bytes_atomic))
        else:
            m.setattr(hpcnoise.rundir, "append_jsonl", failing(hpcnoise.rundir.append_jsonl))
        with pytest.raises(WriteFailed) as e:
            train(cfg, init("cpu"))
    assert calls == failing_epoch and before
    assert f"cannot write to {run}: No space left on device" in str(e.value)
    assert contents(run) == before  # checkpoints and metrics.jsonl as they were, no temporary file
    assert not temporaries(run)
    assert {"checkpoint.pt", "checkpoint.prev.pt", "metrics.jsonl"} <= before.keys()
    rows = (run / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == (failing_epoch if target == "checkpoint" else failing_epoch - 1)
    assert not (run / "summary.json").exists()

    capsys.readouterr()
    train(cfg, init("cpu"))
    assert f"resuming {run} at epoch {failing_epoch}, step {2 * STEPS} from checkpoint.pt" in capsys.readouterr().out
    assert_same_result(run, reference(cfg))
    assert not temporaries(run)


# --- 4. a locked run directory -----------------------------------------------------------------------------
@contextmanager
def held_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Config, Path, dict]]:
    """A started run directory whose lock this process holds: (config, run directory, its snapshot).

    flock belongs to the open file description, so train's own attempt is refused."""
    cfg = tiny(out_dir=str(tmp_path), run_name="held")
    interrupted(cfg, monkeypatch, "epoch-end", 1)
    run = run_path(cfg)
    fd = os.open(run / ".lock", os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        yield cfg, run, snapshot(run)
    finally:
        os.close(fd)


def test_locked_run_directory_is_refused_in_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with held_run(tmp_path, monkeypatch) as (cfg, run, before):
        with pytest.raises(RunLocked, match="another job") as e:
            train(cfg, init("cpu"))
        assert ".lock" in str(e.value) and "\n" not in str(e.value)
        assert snapshot(run) == before
    train(cfg, init("cpu"))
    assert (run / "summary.json").exists()


def test_locked_run_directory_cli_exit_73(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with held_run(tmp_path, monkeypatch) as (cfg, run, before):
        locked = run_cmd(train_cmd(cfg))
        assert snapshot(run) == before  # names, sizes, mtimes and contents
        assert "resuming" not in locked.stdout
    resumed = run_cmd(train_cmd(cfg))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming {run} at epoch 2, step {STEPS} from checkpoint.pt" in resumed.stdout
    assert (run / "summary.json").exists()

    lines = stderr_lines(locked)
    assert locked.returncode == EXIT_LOCKED, locked.stderr[-3000:]
    assert len(lines) == 1 and "another job" in lines[0] and ".lock" in lines[0], lines


# --- 5. divergence -------------------------------------------------------------------------------------------
def divergent(out: Path, name: str) -> Config:
    """lr=1000 in float32: the loss overflows within a few epochs."""
    return tiny(out_dir=str(out), run_name=name, dtype="float32", lr=1000.0, epochs=6)


def check_diverged_dir(run: Path, epoch_in_message: str) -> dict[str, Any]:
    record = json.loads((run / "diverged.json").read_text())
    assert {"epoch", "step", "message", "last_good"} <= record.keys()
    assert not (run / "summary.json").exists() and not (run / "model.pt").exists()
    assert f"epoch {record['epoch']}" in epoch_in_message and record["message"] in epoch_in_message
    metrics = run / "metrics.jsonl"
    rows = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
    assert len(rows) == record["epoch"] - 1
    assert record["last_good"] == (rows[-1] if rows else None)
    assert 0 < record["step"] <= record["epoch"] * STEPS
    return record


def test_divergence_in_process(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = divergent(tmp_path, "div")
    with pytest.raises(Diverged) as e:
        train(cfg, init("cpu"))
    message = str(e.value)
    assert "\n" not in message and message.startswith("training diverged in epoch ")
    record = check_diverged_dir(run_path(cfg), message)
    assert record["epoch"] > 1  # a last good row to keep (lr=1000 overflows in epoch 3 here)
    before = snapshot(run_path(cfg))
    capsys.readouterr()
    with pytest.raises(Diverged, match="diverged earlier"):
        train(cfg, init("cpu"))
    assert snapshot(run_path(cfg)) == before
    assert "epoch" not in capsys.readouterr().out  # it did not train again


def test_divergence_cli_exit_65(tmp_path: Path) -> None:
    cfg = divergent(tmp_path, "div")
    run = run_path(cfg)
    first = run_cmd(train_cmd(cfg))
    assert (run / "diverged.json").exists(), first.stderr[-3000:]
    record = check_diverged_dir(run, json.loads((run / "diverged.json").read_text())["message"])
    before = snapshot(run)
    again = run_cmd(train_cmd(cfg))
    assert snapshot(run) == before
    assert "epoch" not in again.stdout  # no training

    lines = stderr_lines(first)
    assert first.returncode == EXIT_DIVERGED, first.stderr[-3000:]
    assert len(lines) == 1 and f"epoch {record['epoch']}" in lines[0], lines
    lines = stderr_lines(again)
    assert again.returncode == EXIT_DIVERGED, again.stderr[-3000:]
    assert len(lines) == 1 and "diverged earlier" in lines[0], lines
