"""The state of a run directory as a job array sees it: finished, running, preempted, diverged, failed,
not started (first match wins; see ``hpcnoise sweep status`` (hpcnoise.cli.sweep)). Reads, never writes."""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path
from typing import Any

# --- the state of a run directory --------------------------------------------------------------------------
STATES = ("finished", "running", "preempted", "diverged", "failed", "not started")
LOCK_NAME = ".lock"  # hpcnoise.rundir.RunDir.lock_path


def lock_held(run_dir: Path) -> bool:
    """Whether a process holds the flock on RUN_DIR/.lock, i.e. a job is running in the directory.

    Rank 0 of a running job holds an exclusive ``flock`` on RUN_DIR/.lock for the whole run; the file may
    stay after the run, and the kernel drops the lock of a process that dies, so only a held lock means
    running. The probe never blocks and never creates the file: it opens the file read-only and tries a
    non-blocking lock, which fails (BlockingIOError) exactly when the job's exclusive lock is held, and
    otherwise releases it at once (closing the descriptor). It asks for a *shared* lock: that conflicts with
    the job's exclusive lock just as an exclusive one would, but not with another probe (two ``status``
    calls at once do not see each other as running), and a read-only descriptor may take it on every file
    system (NFS emulates flock with fcntl locks, whose exclusive kind needs a writable descriptor). A job
    that tries to take its lock in the microseconds a probe holds it is refused as locked (EXIT_LOCKED).
    A missing or unopenable lock file, or a file system without locks: False.
    """
    try:
        fd = os.open(run_dir / LOCK_NAME, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:  # no lock support here: cannot tell
        return False
    finally:
        os.close(fd)  # releases the probe's lock when it got one
    return False


def run_state(run_dir: Path) -> str:
    """The state of a cell's run directory, one of ``STATES``, decided in this order:

    finished: summary.json; diverged: diverged.json (the loss became non-finite; not retried); running: a
    job holds RUN_DIR/.lock (``lock_held``); preempted: checkpoint.pt or checkpoint.prev.pt (stopped after
    a checkpoint, by preemption or the time limit; rerunning resumes it); failed: config.json and none of
    the above (it stopped before its first checkpoint, or its checkpoints are gone); not started: no such
    directory, or one without config.json or a checkpoint.
    """
    if (run_dir / "summary.json").exists():
        return "finished"
    if (run_dir / "diverged.json").exists():
        return "diverged"
    if lock_held(run_dir):
        return "running"
    if (run_dir / "checkpoint.pt").exists() or (run_dir / "checkpoint.prev.pt").exists():
        return "preempted"
    if (run_dir / "config.json").exists():
        return "failed"
    return "not started"


def _json_object(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def diverged_text(run_dir: Path) -> str:
    """One line on where a diverged run diverged, from its diverged.json."""
    data = _json_object(run_dir / "diverged.json")
    if data is None:
        return "diverged (diverged.json unreadable)"
    message = " ".join(str(data.get("message") or "").split())
    return f"diverged in epoch {data.get('epoch', '?')}" + (f": {message}" if message else "")


def state_detail(run_dir: Path, state: str) -> str:
    """What ``status --list`` prints after a cell's state: the final test error, where it diverged, or how
    many epochs are logged."""
    if state == "finished":
        error = (_json_object(run_dir / "summary.json") or {}).get("final_test_error")
        if isinstance(error, (int, float)) and not isinstance(error, bool):
            return f"final test error {100.0 * error:.2f}%"
        return ""
    if state == "diverged":
        return diverged_text(run_dir).removeprefix("diverged ")
    if state == "not started":
        return ""
    try:
        n = sum(1 for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip())
    except (OSError, UnicodeDecodeError):
        n = 0
    return f"{n} epoch{'s' if n != 1 else ''} logged"
