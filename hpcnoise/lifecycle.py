"""A run's life across sessions: new, resumed from its checkpoint, finished or diverged.

Rank 0 decides from the run directory, holding its lock, and every rank agrees (one broadcast). The
checkpoint holds the model, the optimiser and the ``Position``: the place in the schedule, this epoch's
sums, the finished epochs' metrics rows, the statistics cache and the regime's state. Every random
stream is keyed by (seed, stream, step or epoch), so resuming from it is bit-identical on CPU.

The file itself (header, checksum, weights-only payload) is hpcnoise.checkpoint. The previous
checkpoint is kept as checkpoint.prev.pt until the new one is complete, and is the fallback when
checkpoint.pt is unusable.
"""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch

from hpcnoise import faults
from hpcnoise.checkpoint import decode, encode, same_config
from hpcnoise.comm import Comm
from hpcnoise.config import Config
from hpcnoise.errors import CheckpointError, ConfigError, Diverged, RunLocked
from hpcnoise.files import check_writable, git_hash, write_bytes_atomic
from hpcnoise.rundir import RunDir, default_run_name
from hpcnoise.statistics import STATISTICS
from hpcnoise.step import StepParts
from hpcnoise.temperature import applied_multiplier, calibration_note


@dataclass
class Position:
    """Where training stands: everything besides model and optimiser that a checkpoint must restore."""

    epoch: int = 0  # current epoch (0-based)
    batch: int = 0  # next batch index within the epoch
    step: int = 0  # steps taken so far
    sums: list[float] = field(default_factory=lambda: [0.0, 0.0])  # this epoch's loss sum, error count
    epoch_time_s: float = 0.0  # training time spent in this epoch so far
    history: list[dict[str, Any]] = field(default_factory=list)  # finished epochs' metrics rows
    statistics: dict[str, Any] = field(default_factory=dict)  # cached statistics (diag F, K-FAC factors)
    regime_state: dict[str, Any] = field(default_factory=dict)  # the regime's own state (K-FAC square roots)
    elapsed_s: float = 0.0  # wall time of earlier sessions of this run


class StopFlag:
    """Set by SIGTERM/SIGUSR1 (what Slurm sends before preemption or the time limit)."""

    def __init__(self) -> None:
        self.raised = False
        self._old: dict[int, Any] = {}

    def __enter__(self) -> StopFlag:
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.raised = True

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


# --- checkpoints of a run -------------------------------------------------------------------------------
def save_checkpoint(run: RunDir | None, t: StepParts, pos: Position) -> None:
    """Rank 0 writes the checkpoint atomically, keeping the previous one until the new one is complete."""
    if run is not None:
        position = {f.name: getattr(pos, f.name) for f in fields(pos)}
        position["statistics"] = {name: STATISTICS[name].to_plain(v) for name, v in pos.statistics.items()}
        data = encode(t.cfg.to_dict(), t.net.model.state_dict(), t.opt.state_dict(), position)
        on = lambda moment: faults.reached(f"checkpoint-{moment}")  # noqa: E731
        write_bytes_atomic(run.checkpoint_path, data, previous=run.previous_checkpoint_path, on=on)


def load_checkpoint(run_path: Path, cfg: Config, comm: Comm) -> tuple[dict[str, Any], Path]:
    """The newest usable checkpoint of a run (checkpoint.pt, else checkpoint.prev.pt) and its path.

    Every rank reads it (a shared filesystem) and reaches the same verdict on the same bytes. An
    unusable file is reported by rank 0 and never used; with none usable, CheckpointError.
    """
    run = RunDir(run_path)
    problems = []
    for path in (run.checkpoint_path, run.previous_checkpoint_path):
        if not path.exists():
            continue
        try:
            payload = decode(path.read_bytes(), cfg.to_dict(), comm.device)
            position = payload["position"]
            position["statistics"] = {n: STATISTICS[n].from_plain(v) for n, v in position["statistics"].items()}
            payload["position"] = Position(**position)
            return payload, path
        except (CheckpointError, RuntimeError, KeyError, TypeError, ValueError) as e:
            problems.append(f"{path.name}: {e}")
            if comm.is_main:
                print(f"hpcnoise: warning: {path} is unusable ({e})", flush=True)
    raise CheckpointError(
        f"no usable checkpoint in {str(run_path)!r} ({'; '.join(problems) or 'none found'}); remove "
        f"{run.checkpoint_path.name} and {run.previous_checkpoint_path.name} there to start the run over"
    )


# --- deciding what to do with a run directory -----------------------------------------------------------
def _inspect(cfg: Config, run: RunDir) -> dict[str, Any]:
    """Rank 0, holding the lock of an existing run directory: finished, diverged, resume or restart."""
    if run.is_finished():
        return {"finished": run.read_summary()}
    if run.is_diverged():
        return {"diverged": run.read_json(run.diverged_path)}
    previous = run.read_config()
    if previous is not None and not same_config(previous["config"], cfg.to_dict()):
        raise ConfigError(
            f"run directory {str(run.path)!r} holds a different configuration; choose another run_name or remove it"
        )
    has_checkpoint = run.checkpoint_path.exists() or run.previous_checkpoint_path.exists()
    return {"resume": has_checkpoint, "exists": True}


def open_run(cfg: Config, comm: Comm) -> tuple[Config, RunDir | None, dict[str, Any]]:
    """Check the output location and take the run directory on rank 0; agree on its fate everywhere.

    Returns (cfg with run_name set, run directory on rank 0 else None, outcome) where outcome may hold
    "finished" (the summary of a finished run), "diverged" (its diverged.json) or "resume" (True when
    a checkpoint exists). Rank 0 holds the directory's lock from here until ``RunDir.unlock``. First,
    every rank checks its HPCNOISE_FAULT (ConfigError before anything is written).
    """
    faults.check()
    outcome: dict[str, Any] = {}
    run = None
    if comm.is_main:
        try:
            check_writable(Path(cfg.out_dir))
            name = cfg.run_name or default_run_name(cfg)
            run = RunDir(Path(cfg.out_dir) / name)
            outcome = {"name": name}
            if run.path.exists():
                run.lock()
                run.remove_temporaries()  # e.g. a checkpoint being written when the last job was killed
                outcome |= _inspect(replace(cfg, run_name=name), run)
        except (ConfigError, RunLocked) as e:
            if run is not None:
                run.unlock(discard=True)
            outcome = {"error": str(e), "locked": isinstance(e, RunLocked)}
    outcome = comm.broadcast_object(outcome)
    if "error" in outcome:
        raise (RunLocked if outcome["locked"] else ConfigError)(outcome["error"])
    if "diverged" in outcome:
        if run is not None:
            run.unlock(discard=True)
        record = outcome["diverged"]
        raise Diverged(f"{cfg.out_dir}/{outcome['name']} diverged earlier: {record.get('message', '')}; nothing to do")
    return replace(cfg, run_name=outcome["name"]), run, outcome


def start_or_resume(cfg: Config, t: StepParts, run: RunDir | None, outcome: dict[str, Any]) -> Position:
    """Resume from the checkpoint, or record the new run's config.json; the position to start from."""
    if outcome.get("resume"):
        ckpt, path = load_checkpoint(Path(cfg.out_dir) / cfg.run_name, cfg, t.comm)
        t.net.model.load_state_dict(ckpt["model"])
        t.opt.load_state_dict(ckpt["optimizer"])
        position: Position = ckpt["position"]
        if run is not None:
            run.rewrite_metrics(position.history)
            where = f"epoch {position.epoch + 1}, step {position.step}"
            print(f"hpcnoise: resuming {run.path} at {where} from {path.name}", flush=True)
        return position
    if run is not None:
        record = {
            "config": cfg.to_dict(),
            "git": git_hash(),
            "world_size": t.comm.size,
            "launcher": t.comm.launcher,
            "device": str(t.comm.device),
            "torch_threads": torch.get_num_threads(),
            "noise_scale": cfg.noise_scale,
            "noise_multiplier": applied_multiplier(cfg),  # lambda actually used (hpcnoise.temperature)
            "num_params": sum(p.numel() for p in t.net.params),
            "versions": t.comm.versions(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        note = calibration_note(cfg)
        if note is not None:
            print(f"hpcnoise: note: {note}", flush=True)
        if outcome.get("exists"):  # started before but stopped before its first checkpoint: start over
            run.restart(record)
        else:
            run.create(record)
    return Position()
