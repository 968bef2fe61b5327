"""Run directories: what rank 0 writes, written so that nothing half-written is ever seen.

A run directory holds:
- config.json: {"config": the Config as a dict, "git", "world_size", "launcher", "device", "versions", ...}
- metrics.jsonl: one JSON line per epoch (appended and flushed): epoch, step, train_loss, train_error,
  test_loss, test_error, lr, noise, batch_size, epoch_time_s, wall_time_s, samples_per_s, ...
- checkpoint.pt: model, optimiser and training position (rank 0, atomically, every checkpoint_every
  epochs and on SIGTERM/SIGUSR1; tensors and plain values only, checksummed: hpcnoise.checkpoint); a
  run restarted in the same directory resumes from it. checkpoint.prev.pt: the one before, kept until
  the new one is complete, the fallback when checkpoint.pt is unusable. Both removed when the run
  finishes.
- diverged.json: written instead of summary.json when the loss became non-finite (epoch, step,
  message, last good metrics row); such a run is not retried.
- .lock: rank 0 holds an exclusive flock on it for the whole run, so two jobs never write one
  directory (a held lock means running). It stays after a stopped run and is removed when the run
  is finished or diverged.
- model.pt: the final model's state_dict (written before summary.json).
- summary.json: written once at the end; its presence marks a finished run.
- sharpness.json (optional, `hpcnoise sharpness`): {"max_eigenvalue", "temperature", "samples", ...}.
- diagnostics.jsonl (optional): Fisher norms and gradient variances logged during training.
JSON and model files are written to a temporary file in the same directory and renamed into place.
"""

from __future__ import annotations

import fcntl
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from hpcnoise.config import Config, config_from_dict
from hpcnoise.errors import ConfigError, RunLocked
from hpcnoise.files import append_jsonl, rewrite_jsonl, save_torch_atomic, write_json_atomic


def default_run_name(cfg: Any) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    what = cfg.preset or f"{cfg.dataset}-{cfg.regime}"
    return f"{what}-{cfg.model}-s{cfg.seed}-{stamp}"


class RunDir:
    """Rank 0's view of one run directory."""

    def __init__(self, path: Path):
        self.path = path
        self.config_path = path / "config.json"
        self.metrics_path = path / "metrics.jsonl"
        self.summary_path = path / "summary.json"
        self.checkpoint_path = path / "checkpoint.pt"
        self.previous_checkpoint_path = path / "checkpoint.prev.pt"  # kept until a new one is complete
        self.model_path = path / "model.pt"
        self.diverged_path = path / "diverged.json"
        self.lock_path = path / ".lock"
        self._lock_fd: int | None = None
        self._lock_created = False

    # --- one writer per run directory ---------------------------------------------------------------
    def lock(self, lock_path: Path | None = None) -> None:
        """Take the run directory's exclusive lock (rank 0, for the whole run) or raise RunLocked.

        An flock is released by the kernel when its process dies, so a job killed with SIGKILL leaves
        no stale lock behind; the lock file itself may stay.
        """
        path = lock_path or self.lock_path
        self._lock_created = not path.exists()
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunLocked(
                f"run directory {str(self.path)!r} is in use by another job (it holds {self.lock_path.name}); "
                "wait for that job or choose another run_name"
            ) from None
        self._lock_fd = fd

    def release_done(self) -> None:
        """Remove the lock file and release the lock of a finished or diverged run, leaving the directory
        with its results only. Safe: such a directory is never written again (a job that still locks the
        unlinked file, or a new lock file, finds it done and does nothing)."""
        if self._lock_fd is not None:
            self.lock_path.unlink(missing_ok=True)
        self.unlock()

    def remove_temporaries(self) -> None:
        """Remove the temporary files (``.NAME.*.tmp``) that a killed writer left behind; call holding the
        lock, so no live writer owns them."""
        for tmp in self.path.glob(".*.tmp"):
            tmp.unlink(missing_ok=True)

    def unlock(self, discard: bool = False) -> None:
        """Release the lock; ``discard``: also remove the lock file if this process created it (a run
        that refused to start leaves its directory as it found it)."""
        if self._lock_fd is not None:
            if discard and self._lock_created:
                self.lock_path.unlink(missing_ok=True)
            os.close(self._lock_fd)  # closing the descriptor releases the flock
            self._lock_fd = None

    def is_finished(self) -> bool:
        return self.summary_path.exists()

    def is_diverged(self) -> bool:
        return self.diverged_path.exists()

    def mark_diverged(self, record: dict[str, Any]) -> None:
        """diverged.json: {"epoch", "step", "message", "last_good"} (last_good: the last finished
        epoch's metrics row or None). The last good checkpoint stays; the run is not retried."""
        write_json_atomic(self.diverged_path, record)

    @staticmethod
    def jsonable(obj: Any) -> Any:
        """``obj`` as it reads back from JSON (tuples become lists), for comparisons with stored files."""
        return json.loads(json.dumps(obj))

    def read_config(self) -> dict[str, Any] | None:
        """The stored config.json record, or None when missing or unreadable."""
        return self.read_json(self.config_path)

    @staticmethod
    def read_json(path: Path) -> dict[str, Any] | None:
        """A JSON file's content, or None when missing or unreadable."""
        try:
            record: dict[str, Any] = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        return record

    def restart(self, config_record: dict[str, Any]) -> None:
        """Start an unfinished run with no checkpoint over: new config.json, no metrics."""
        write_json_atomic(self.config_path, config_record)
        self.metrics_path.unlink(missing_ok=True)

    def rewrite_metrics(self, rows: list[dict[str, Any]]) -> None:
        """Replace metrics.jsonl with the rows a checkpoint holds, and drop diagnostics logged after it."""
        rewrite_jsonl(self.metrics_path, rows)
        diagnostics = self.path / "diagnostics.jsonl"
        if diagnostics.exists():
            kept = []
            for line in diagnostics.read_text().splitlines():
                try:
                    row = json.loads(line)
                except ValueError:
                    continue  # a line cut by the kill
                if row.get("epoch", 0) <= len(rows):
                    kept.append(row)
            rewrite_jsonl(diagnostics, kept)

    def create(self, config_record: dict[str, Any]) -> None:
        """Make the directory and write config.json; the directory appears only with its config in it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=self.path.parent, prefix=f".{self.path.name}."))
        try:
            self.lock(tmp / self.lock_path.name)  # the lock moves with the directory (same inode)
            write_json_atomic(tmp / "config.json", config_record)
            os.rename(tmp, self.path)
        except BaseException as e:
            self.unlock()
            for f in tmp.iterdir():
                f.unlink()
            tmp.rmdir()
            if isinstance(e, OSError) and self.path.exists():
                raise RunLocked(f"run directory {str(self.path)!r} was just created by another job") from e
            raise

    def log_epoch(self, row: dict[str, Any]) -> None:
        append_jsonl(self.metrics_path, row)

    def log_diagnostics(self, row: dict[str, Any]) -> None:
        append_jsonl(self.path / "diagnostics.jsonl", row)

    def write_sharpness(self, result: dict[str, Any]) -> None:
        write_json_atomic(self.path / "sharpness.json", result)

    def save_model(self, model: Any) -> None:
        save_torch_atomic({k: v.detach().cpu() for k, v in model.state_dict().items()}, self.model_path)

    def finish(self, summary: dict[str, Any], model: Any = None) -> None:
        """Mark the run finished: model.pt (when given), then summary.json; the checkpoints, superseded
        by model.pt, are removed."""
        if model is not None:
            self.save_model(model)
        write_json_atomic(self.summary_path, summary)
        self.checkpoint_path.unlink(missing_ok=True)
        self.previous_checkpoint_path.unlink(missing_ok=True)

    def read_summary(self) -> dict[str, Any]:
        summary: dict[str, Any] = json.loads(self.summary_path.read_text())
        return summary


def load_config(run_dir: Path) -> Config:
    """The Config of a finished run directory; ConfigError (one clear line) for anything missing."""
    run = RunDir(run_dir)
    if not run_dir.is_dir():
        raise ConfigError(f"run directory {str(run_dir)!r} does not exist")
    for path in (run.config_path, run.summary_path, run.model_path):
        if not path.exists():
            what = "unfinished run" if path != run.config_path else "not a run directory"
            raise ConfigError(f"{str(run_dir)!r}: {what}, no {path.name}")
    try:
        return config_from_dict(json.loads(run.config_path.read_text())["config"])
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{str(run.config_path)!r} does not hold a valid config: {e}") from e
