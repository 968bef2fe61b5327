"""``train(cfg) -> summary``: the one training loop that the CLI, tests and sweeps all call.

The loop schedules, evaluates, logs and checkpoints; the step itself (local contribution, one fused
allreduce, noise and optimiser) is hpcnoise.step. Phases of a run:
1. check the config and the run directory (rank 0 decides, everyone agrees): finished, resume or new;
2. build the workload (data, model) and the step's parts (regime, hooks for its statistics, buckets, SGD);
3. epochs of steps; after each epoch evaluate, log a metrics row, maybe diagnostics and a checkpoint;
4. the summary (and the final model's sharpness), written last: it marks a finished run.

Every random stream is a function of (seed, stream, step or epoch) (hpcnoise.seeding), so a checkpoint
holding the model, optimiser, position, statistics cache and regime state resumes bit-identically on
CPU. Rank 0 writes one every ``checkpoint_every`` epochs and after the step during which any rank got
SIGTERM or SIGUSR1 (the flag travels in the fused allreduce, so all ranks stop after the same step).
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, NoReturn

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from hpcnoise import faults, precision
from hpcnoise.blowup import blowup_keys, history_blown_up
from hpcnoise.comm import Comm, init
from hpcnoise.config import Config
from hpcnoise.data import Data, epoch_batches, local_share
from hpcnoise.errors import Diverged, Preempted, WriteFailed
from hpcnoise.lifecycle import Position, StopFlag, open_run, save_checkpoint, start_or_resume
from hpcnoise.measure import diagnostics_row, sharpness_of
from hpcnoise.precise_bn import precise_bn
from hpcnoise.regimes import REGIMES
from hpcnoise.rundir import RunDir
from hpcnoise.seeding import generator
from hpcnoise.step import PhaseTimer, StepInput, StepParts, bn_sum, make_step_parts, train_step
from hpcnoise.workload import check_batches, check_workload, data_and_model, noise_end, validate

__all__ = ["Preempted", "StepInfo", "evaluate", "lr_at", "train"]


def lr_at(cfg: Config, epoch: int, step_in_epoch: int, steps_per_epoch: int) -> float:
    """Learning rate of one step: linear warmup to cfg.lr over warmup_epochs, then step decay at epochs
    (times the regime's factor for the epoch, e.g. BatchChange's small-batch epochs)."""
    lr = cfg.lr * REGIMES[cfg.regime].lr_factor(cfg, epoch)
    done = epoch + (step_in_epoch + 1) / steps_per_epoch  # epochs completed after this step
    if done <= cfg.warmup_epochs:
        return lr * done / cfg.warmup_epochs
    for boundary in cfg.lr_decay_epochs:
        if epoch >= boundary:
            lr *= cfg.lr_decay_factor
    return lr


@torch.no_grad()
def evaluate(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, comm: Comm, chunk: int = 4096, mixed: bool = False
) -> tuple[float, float]:
    """(mean loss, error rate) on a split; each rank takes a contiguous shard, sums are allreduced.
    ``mixed``: the forward under bf16 autocast, as the run trains (dtype=bf16)."""
    faults.reached("evaluate")
    model.eval()
    n = x.shape[0]
    lo, hi = n * comm.rank // comm.size, n * (comm.rank + 1) // comm.size
    sums = torch.zeros(2, dtype=torch.float64, device=x.device)
    for start in range(lo, hi, chunk):
        xb, yb = x[start : min(start + chunk, hi)], y[start : min(start + chunk, hi)]
        with precision.autocast(mixed, x.device):  # the loss too: autocast forms it in float32
            out = model(xb)
            sums[0] += F.cross_entropy(out, yb, reduction="sum").double()
        sums[1] += (out.argmax(1) != yb).sum()
    comm.allreduce_sum_(sums)
    model.train()
    return sums[0].item() / n, sums[1].item() / n


@dataclass(frozen=True)
class StepInfo:
    """What one finished step exposes to a ``step_hook`` (tests and measurements; read-only use)."""

    step: int
    epoch: int
    lr: float
    grads: list[torch.Tensor]  # g_LB (before noise) as reduced over all workers
    diag_fisher: list[torch.Tensor] | None  # diag F of the global batch, when the regime uses it
    noise: list[torch.Tensor] | None  # the noise drawn at this step, None when off
    model: nn.Module  # after the optimiser step


StepHook = Callable[[StepInfo], None]


def train(cfg: Config, comm: Comm | None = None, step_hook: StepHook | None = None) -> dict[str, Any]:
    """Train one configuration; rank 0 writes its run directory. Returns the summary on every rank.

    A run directory that holds a checkpoint is resumed; a finished one is returned as it is. Raises
    Preempted (stopped by a signal after a checkpoint), Diverged (loss not finite; diverged.json
    written), RunLocked (another job holds the directory), WriteFailed (disk full), CheckpointError
    (no usable checkpoint) and ConfigError (bad input).
    ``step_hook``, if given, is called on every rank after every step with a ``StepInfo``.
    """
    if comm is None:
        check_workload(cfg)  # before init: e.g. a cuda device on a machine without one
        comm = init(cfg.device, timeline=cfg.horovod_timeline)
    validate(cfg, comm.size)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    cfg, run, outcome = open_run(cfg, comm)
    try:
        if "finished" in outcome:
            if run is not None:
                print(f"hpcnoise: {run.path} is already finished; nothing to do", flush=True)
            finished: dict[str, Any] = outcome["finished"]
            return finished
        return _run(cfg, comm, run, outcome, step_hook)
    finally:
        if run is not None:
            run.release_done() if run.is_finished() or run.is_diverged() else run.unlock()


def _run(
    cfg: Config, comm: Comm, run: RunDir | None, outcome: dict[str, Any], step_hook: StepHook | None
) -> dict[str, Any]:
    """Build the workload and the step's parts, start or resume, train the epochs and finish."""
    data, model = data_and_model(cfg, comm)
    check_batches(cfg, data)
    t = make_step_parts(cfg, comm, model)
    pos = start_or_resume(cfg, t, run, outcome)
    timeline = _start_timeline(t, run)
    try:
        _train_epochs(t, data, pos, run, step_hook)
    finally:
        t.net.detach()
        if timeline:
            comm.stop_timeline()
    return _finish(t, data, pos, run)


TIMELINE = "horovod_timeline.json"


def _start_timeline(t: StepParts, run: RunDir | None) -> bool:
    """With ``horovod_timeline``, Horovod records this session's collectives into RUN_DIR/TIMELINE (rank 0
    writes it; every rank starts it). Without Horovod there is no timeline: a note says so."""
    if not t.cfg.horovod_timeline:
        return False
    path = t.comm.broadcast_object(str(run.path / TIMELINE) if run is not None else None)
    if path is None or not t.comm.start_timeline(path):
        if t.comm.is_main:
            print(
                "hpcnoise: horovod_timeline needs a run under horovodrun/mpirun/srun with a run directory, "
                "and Horovod started with HOROVOD_TIMELINE=DYNAMIC (hpcnoise train sets it); no timeline",
                flush=True,
            )
        return False
    return True


def _on_rank0(comm: Comm, run: RunDir | None, write: Callable[[RunDir], None]) -> None:
    """Rank 0's writes, and every rank learns whether they failed: a full disk stops all ranks together
    (none is left waiting in a collective) with WriteFailed, and what was written before is intact."""
    error = None
    if run is not None:
        try:
            write(run)
        except OSError as e:
            error = f"cannot write to {run.path}: {e.strerror or e}"
    error = comm.broadcast_object(error)
    if error is not None:
        raise WriteFailed(f"{error}; the last checkpoint and metrics are intact: free space and rerun to resume")


class _Session:
    """What the epochs of one session share: the stop flag, the run directory, the clock and the bar."""

    def __init__(self, t: StepParts, pos: Position, run: RunDir | None, stop: StopFlag):
        cfg = t.cfg
        self.stop, self.run = stop, run
        self.show_bar = t.comm.is_main and cfg.progress and sys.stderr.isatty()
        self.bar = tqdm(total=cfg.epochs, initial=pos.epoch, desc=cfg.run_name, unit="epoch", disable=not self.show_bar)
        self.t_session = time.perf_counter()

    def session_time(self) -> float:
        return time.perf_counter() - self.t_session

    def restart_clock(self) -> float:
        """Seconds of this session so far; the session clock starts again."""
        elapsed = self.session_time()
        self.t_session = time.perf_counter()
        return elapsed


@dataclass(frozen=True)
class _Epoch:
    """The schedule of one epoch."""

    index: int  # 0-based
    global_batch: int
    batches: torch.Tensor  # (steps, global_batch) sample indices
    local: torch.Tensor  # (steps, local batch): this rank's shares, on its device (moved once an epoch)
    sums: torch.Tensor  # the epoch's loss sum and error count so far, float64 on the device (no host sync)
    timer: PhaseTimer
    started: float  # perf_counter at the start of this session's part of the epoch
    noise_end: int  # a noise regime's noise is on for the global steps [0, noise_end) (workload.noise_end)

    def book_sums(self, pos: Position) -> None:
        """The device sums into ``pos`` (for the epoch's row or a checkpoint: one host copy)."""
        pos.sums = self.sums.tolist()


def _train_epochs(t: StepParts, data: Data, pos: Position, run: RunDir | None, step_hook: StepHook | None) -> None:
    """Epochs from ``pos`` to cfg.epochs: steps, then evaluation, logging, diagnostics and checkpoints."""
    cfg = t.cfg
    with StopFlag() as stop:
        session = _Session(t, pos, run, stop)
        while pos.epoch < cfg.epochs:
            global_batch = t.regime.batch(cfg, pos.epoch)
            batches = epoch_batches(data.x_train.shape[0], global_batch, pos.epoch, cfg.seed)
            device = t.comm.device
            local = torch.stack([local_share(b, t.comm.rank, t.comm.size) for b in batches]).to(device)
            sums = torch.tensor(pos.sums, dtype=torch.float64, device=device)
            end = noise_end(cfg, data.x_train.shape[0])
            ep = _Epoch(pos.epoch, global_batch, batches, local, sums, PhaseTimer(device), time.perf_counter(), end)
            while pos.batch < len(batches):
                _one_step(t, data, pos, ep, session, step_hook)
            row = _epoch_row(t, data, pos, ep, session)
            if not all(math.isfinite(row[k]) for k in ("train_loss", "test_loss")):
                _diverge(t, pos, ep, session, "the loss is not finite at the end of the epoch")
            pos.history.append(row)
            pos.epoch, pos.batch, pos.sums, pos.epoch_time_s = ep.index + 1, 0, [0.0, 0.0], 0.0
            stopping = cfg.stop_blown_up and history_blown_up(pos.history) is not None  # finish after this epoch
            diag = None
            if cfg.diagnostics_every and pos.epoch % cfg.diagnostics_every == 0:
                diag = diagnostics_row(t.net.model, data, cfg, t.comm, pos.epoch)
            checkpoint = bool(cfg.checkpoint_every) and pos.epoch % cfg.checkpoint_every == 0
            checkpoint = checkpoint and pos.epoch < cfg.epochs and not stopping  # a finishing run needs none
            if checkpoint:
                pos.elapsed_s += session.restart_clock()
            _on_rank0(t.comm, run, partial(_write_epoch, t=t, row=row, diag=diag, pos=pos if checkpoint else None))
            _print_epoch(t, row, session)
            faults.reached("epoch-end")
            if stopping:  # stop_blown_up: the run finishes here (hpcnoise.blowup)
                if run is not None:
                    print(f"hpcnoise: blown up at epoch {pos.epoch} (stop_blown_up); stopping early", flush=True)
                break
        session.bar.close()
        pos.elapsed_s += session.restart_clock()


def _step_input(t: StepParts, data: Data, pos: Position, ep: _Epoch, stop: bool) -> StepInput:
    """The schedule of the step at ``pos``: its learning rate, this rank's (augmented) samples, noise on/off."""
    cfg, comm = t.cfg, t.comm
    local_batch = ep.global_batch // comm.size
    idx = ep.local[pos.batch]
    x, y = data.x_train[idx], data.y_train[idx]
    if data.augment is not None:
        gen = generator(cfg.seed, "augment", pos.step, device=comm.device)
        x = data.augment(x, gen, comm.rank * local_batch, ep.global_batch)
    return StepInput(
        step=pos.step,
        lr=lr_at(cfg, ep.index, pos.batch, len(ep.batches)),
        x=x,
        y=y,
        global_batch=ep.global_batch,
        ghosts=ep.global_batch // (cfg.ghost_size if cfg.ghost_bn else local_batch),
        noise_on=t.regime.noise is not None and pos.step < ep.noise_end,
        stop=stop,
    )


def _one_step(
    t: StepParts, data: Data, pos: Position, ep: _Epoch, session: _Session, step_hook: StepHook | None
) -> None:
    """Take the step at ``pos`` and book it; when any rank was asked to stop, checkpoint and raise
    ``Preempted`` (all ranks, after this same step)."""
    ep.timer.start()
    inp = _step_input(t, data, pos, ep, session.stop.raised)
    out = train_step(t, inp, pos.statistics, pos.regime_state, ep.timer, keep_g_lb=step_hook is not None)
    ep.sums.add_(torch.stack([out.reduced.loss_sum, out.reduced.errors]).to(torch.float64))
    if step_hook is not None:
        diag = pos.statistics.get("diag_fisher")
        step_hook(StepInfo(inp.step, ep.index, inp.lr, out.g_lb, diag, out.noise, t.net.model))
    pos.batch, pos.step = pos.batch + 1, pos.step + 1
    if not out.reduced.finite:  # the same reduced value on every rank: all stop
        _diverge(t, pos, ep, session, f"the training loss is not finite in step {pos.step} of the run")
    if out.reduced.stop:
        ep.book_sums(pos)
        pos.epoch_time_s += time.perf_counter() - ep.started
        pos.elapsed_s += session.restart_clock()
        # every rank waits for rank 0's checkpoint: launchers kill the remaining ranks as soon as one
        # exits, which must not happen while the checkpoint is being written
        _on_rank0(t.comm, session.run, lambda r: save_checkpoint(r, t, pos))
        raise Preempted(f"stopped by signal at epoch {ep.index + 1}, step {pos.step}; checkpoint written")


def _diverge(t: StepParts, pos: Position, ep: _Epoch, session: _Session, what: str) -> NoReturn:
    """Mark the run directory diverged (diverged.json, the last good checkpoint kept) and stop all ranks."""
    lr = lr_at(t.cfg, ep.index, min(pos.batch, len(ep.batches) - 1), len(ep.batches))
    message = (
        f"training diverged in epoch {ep.index + 1}: {what}; try a lower lr (now {lr:.4g}), a longer "
        "warmup_epochs or less noise"
    )
    record = {
        "epoch": ep.index + 1,
        "step": pos.step,  # steps taken, the failing one included (1-based number of the failing step)
        "message": message,
        "last_good": pos.history[-1] if pos.history else None,
    }
    _on_rank0(t.comm, session.run, lambda r: r.mark_diverged(record))
    raise Diverged(message)


def _write_epoch(
    run: RunDir, t: StepParts, row: dict[str, Any], diag: dict[str, Any] | None, pos: Position | None
) -> None:
    """Rank 0's files after an epoch: the metrics row, the diagnostics row, the checkpoint (when given)."""
    run.log_epoch(row)
    if diag is not None:
        run.log_diagnostics(diag)
    if pos is not None:
        save_checkpoint(run, t, pos)


def _epoch_row(t: StepParts, data: Data, pos: Position, ep: _Epoch, session: _Session) -> dict[str, Any]:
    """The epoch's metrics.jsonl row (after evaluating on the test split)."""
    train_time = pos.epoch_time_s + time.perf_counter() - ep.started
    ep.book_sums(pos)
    n_seen = len(ep.batches) * ep.global_batch
    if t.cfg.precise_bn_batches:
        precise_bn(
            t.net.model,
            data,
            t.comm,
            ep.global_batch,
            t.cfg.precise_bn_batches,
            t.cfg.seed,
            ep.index,
            bn_sum(t.cfg, t.comm),
            t.net.mixed,
        )
    test_loss, test_err = evaluate(t.net.model, data.x_test, data.y_test, t.comm, mixed=t.net.mixed)
    val = {}
    if data.x_val.shape[0]:  # the validation split, evaluated like test (same precise-BN state)
        val = dict(
            zip(("val_loss", "val_error"), evaluate(t.net.model, data.x_val, data.y_val, t.comm, mixed=t.net.mixed))
        )
    row = {
        "epoch": ep.index + 1,
        "step": pos.step,
        "train_loss": pos.sums[0] / n_seen,
        "train_error": pos.sums[1] / n_seen,
        "test_loss": test_loss,
        "test_error": test_err,
        **val,
        "lr": lr_at(t.cfg, ep.index, len(ep.batches) - 1, len(ep.batches)),
        "noise": t.regime.noise is not None and pos.step - len(ep.batches) < ep.noise_end,  # at its first step
        "batch_size": ep.global_batch,
        "world_size": t.comm.size,
        "epoch_time_s": train_time,
        "wall_time_s": pos.elapsed_s + session.session_time(),
        "samples_per_s": n_seen / train_time,
        "samples_per_s_per_worker": n_seen / train_time / t.comm.size,
        # seconds per phase this epoch, this session (hook work is inside forward_backward)
        **{f"time_{k}_s": v for k, v in ep.timer.seconds.items()},
    }
    return row


def _print_epoch(t: StepParts, row: dict[str, Any], session: _Session) -> None:
    """Rank 0 prints the epoch's line; everyone advances the bar."""
    if session.run is not None:
        msg = (
            f"epoch {row['epoch']:3d}/{t.cfg.epochs}  "
            f"train loss {row['train_loss']:.4f} err {row['train_error']:.4f}  "
            f"test loss {row['test_loss']:.4f} err {row['test_error']:.4f}  "
            + (f"val err {row['val_error']:.4f}  " if "val_error" in row else "")
            + f"lr {row['lr']:.4g}  "
            f"noise {'on ' if row['noise'] else 'off'}"
            f"  {row['samples_per_s']:.0f} samples/s"
        )
        session.bar.write(msg) if session.show_bar else print(msg, flush=True)
    session.bar.update(1)


def _outcome_keys(cfg: Config, pos: Position) -> dict[str, Any]:
    """Summary keys that only some runs have (absent otherwise, so other runs' files are as before):
    the validation split's, ``blown_up`` when the rule fired, ``stopped_early`` when it stopped the run."""
    keys: dict[str, Any] = {}
    last = pos.history[-1]
    if "val_error" in last:
        keys |= {"final_val_error": last["val_error"], "final_val_loss": last["val_loss"]}
        keys["best_val_error"] = min(r["val_error"] for r in pos.history)
    return keys | blowup_keys(pos.history, cfg.epochs)


def _finish(t: StepParts, data: Data, pos: Position, run: RunDir | None) -> dict[str, Any]:
    """The run's summary on every rank (with the final model's sharpness when asked); rank 0 writes
    model.pt and then summary.json, which marks the run finished."""
    cfg, history = t.cfg, pos.history
    last = history[-1]
    summary = {
        "run_name": cfg.run_name,
        "regime": cfg.regime,
        "model": cfg.model,
        "dataset": cfg.dataset,
        "seed": cfg.seed,
        "world_size": t.comm.size,
        "epochs": cfg.epochs,
        "steps": pos.step,
        "final_test_error": last["test_error"],
        "final_test_loss": last["test_loss"],
        "final_train_error": last["train_error"],
        "final_train_loss": last["train_loss"],
        "best_test_error": min(r["test_error"] for r in history),
        **_outcome_keys(cfg, pos),
        "total_time_s": pos.elapsed_s,
        "mean_samples_per_s": sum(r["samples_per_s"] for r in history) / len(history),
    }
    model = t.net.model
    if cfg.sharpness and summary.get("stopped_early"):
        summary["sharpness_skipped"] = "stopped early (blown up); the model is not a trained one"
    elif cfg.sharpness:
        samples = min(cfg.sharpness_samples, data.x_train.shape[0])
        sharp = sharpness_of(
            model, data.x_train, data.y_train, t.comm, samples=samples, heldout=(data.x_test, data.y_test)
        )
        summary["max_eigenvalue"] = sharp["max_eigenvalue"]
        _on_rank0(t.comm, run, lambda r: r.write_sharpness(sharp))
    _on_rank0(t.comm, run, partial(RunDir.finish, summary=summary, model=model))
    if run is not None:
        print(f"hpcnoise: finished; results in {run.path}", flush=True)
    return summary
