"""A run's life across sessions: new, resumed from its checkpoint, or already finished.

Rank 0 decides from the run directory and every rank agrees (one broadcast). The checkpoint holds the
model, the optimiser and the ``Position``: the place in the schedule, this epoch's sums, the finished
epochs' metrics rows, the statistics cache and the regime's state. Every random stream is keyed by
(seed, stream, step or epoch), so resuming from it is bit-identical on CPU.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from hpcnoise.comm import Comm
from hpcnoise.config import Config
from hpcnoise.errors import ConfigError
from hpcnoise.files import check_writable, git_hash, save_torch_atomic
from hpcnoise.rundir import RunDir, default_run_name
from hpcnoise.step import Trainer


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


def prepare_run(cfg: Config, comm: Comm) -> tuple[Config, RunDir | None, dict[str, Any]]:
    """Check the output location and pick the run directory on rank 0; agree on the outcome everywhere.

    Returns (cfg with run_name set, run directory on rank 0 else None, outcome) where outcome may hold
    "finished" (the summary of a finished run) or "resume" (True when a checkpoint exists).
    """
    outcome: dict[str, Any] = {}
    if comm.is_main:
        try:
            check_writable(Path(cfg.out_dir))
            name = cfg.run_name or default_run_name(cfg)
            here = RunDir(Path(cfg.out_dir) / name)
            outcome = {"name": name}
            if here.is_finished():
                outcome["finished"] = here.read_summary()
            elif here.path.exists():
                previous = here.read_config()
                if previous is not None and previous["config"] != here.jsonable(cfg.to_dict() | {"run_name": name}):
                    raise ConfigError(
                        f"run directory {str(here.path)!r} holds a different configuration; "
                        "choose another run_name or remove it"
                    )
                outcome["resume"] = here.checkpoint_path.exists()
                outcome["exists"] = True
        except ConfigError as e:
            outcome = {"error": str(e)}
    outcome = comm.broadcast_object(outcome)
    if "error" in outcome:
        raise ConfigError(outcome["error"])
    cfg = replace(cfg, run_name=outcome["name"])
    run = RunDir(Path(cfg.out_dir) / cfg.run_name) if comm.is_main else None
    return cfg, run, outcome


def start_or_resume(cfg: Config, t: Trainer, run: RunDir | None, outcome: dict[str, Any]) -> Position:
    """Resume from the checkpoint, or record the new run's config.json; the position to start from."""
    if outcome.get("resume"):
        # every rank reads the checkpoint (a shared filesystem), so no parameters need broadcasting
        path = Path(cfg.out_dir) / cfg.run_name / "checkpoint.pt"
        ckpt = torch.load(path, map_location=t.comm.device, weights_only=False)
        t.net.model.load_state_dict(ckpt["model"])
        t.opt.load_state_dict(ckpt["optimizer"])
        position: Position = ckpt["position"]
        if run is not None:
            run.rewrite_metrics(position.history)
            print(f"hpcnoise: resuming {run.path} at epoch {position.epoch + 1}, step {position.step}", flush=True)
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
            "num_params": sum(p.numel() for p in t.net.params),
            "versions": t.comm.versions(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        if outcome.get("exists"):  # started before but stopped before its first checkpoint: start over
            run.restart(record)
        else:
            run.create(record)
    return Position()


def save_checkpoint(run: RunDir | None, t: Trainer, pos: Position) -> None:
    """Rank 0 writes model, optimiser and position atomically (the random streams are keyed by step)."""
    if run is not None:
        state = {"model": t.net.model.state_dict(), "optimizer": t.opt.state_dict(), "position": pos}
        save_torch_atomic(state, run.checkpoint_path)
