"""``train(cfg) -> summary``: the one training loop that the CLI, tests and sweeps all call.

One step on each of W workers (global batch M, local batch m = M / W):
1. forward + backward of the local MEAN loss; when the regime needs curvature statistics, module hooks
   compute the local sums (squared per-sample gradients, Rademacher-signed sums, K-FAC factors) in the
   same backward pass;
2. ONE fused sum-allreduce of a flat buffer holding the local mean gradients, those sums, the
   ghost-batch-norm statistic sums, the loss/error counts and the stop flag; then g_LB = sum / W,
   diag F = sum / M, and batch-norm running statistics move towards the average over all ghost
   batches of the global batch;
3. the regime's noise, drawn from the (seed, step) stream: identical on every rank, no communication;
4. the optimiser step (SGD with momentum and weight decay), identical on every rank.
Parameters and buffers therefore stay bit-identical across ranks, and for a fixed global batch the
trajectory does not depend on W (up to float rounding of the sums).

Every random stream is a function of (seed, stream, step or epoch) (hpcnoise.seeding), so a checkpoint
holding the model, optimiser, position and regime state resumes bit-identically on CPU. Rank 0 writes
one every ``checkpoint_every`` epochs and after the step during which any rank got SIGTERM or SIGUSR1
(the flag travels in the fused allreduce, so all ranks stop after the same step).
"""

from __future__ import annotations

import math
import signal
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from hpcnoise.comm import Comm, init
from hpcnoise.config import Config, ConfigError, validate
from hpcnoise.curvature import CurvatureHooks
from hpcnoise.data import DATASETS, Data, epoch_batches, local_share, save_atomic
from hpcnoise.models import build_model, ghost_norms
from hpcnoise.regimes import HOOK_QUANTITY, REGIMES, KFacLayer, NoiseInput, Regime
from hpcnoise.rundir import RunDir, check_writable, default_run_name, git_hash
from hpcnoise.seeding import generator, stream_seed


class Preempted(Exception):
    """Training stopped on SIGTERM/SIGUSR1 after writing a checkpoint; rerun the same command to resume."""


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


def fused_allreduce(comm: Comm, groups: dict[str, list[torch.Tensor]]) -> dict[str, list[torch.Tensor]]:
    """Sum every tensor of every group over all workers in ONE collective; return views shaped alike."""
    tensors = [t for ts in groups.values() for t in ts]
    flat = torch.cat([t.reshape(-1) for t in tensors])
    comm.allreduce_sum_(flat)
    out: dict[str, list[torch.Tensor]] = {}
    offset = 0
    for name, ts in groups.items():
        out[name] = []
        for t in ts:
            out[name].append(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()
    return out


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, comm: Comm, chunk: int = 4096) -> tuple[float, float]:
    """(mean loss, error rate) on a split; each rank takes a contiguous shard, sums are allreduced."""
    model.eval()
    n = x.shape[0]
    lo, hi = n * comm.rank // comm.size, n * (comm.rank + 1) // comm.size
    sums = torch.zeros(2, dtype=torch.float64, device=x.device)
    for start in range(lo, hi, chunk):
        xb, yb = x[start : min(start + chunk, hi)], y[start : min(start + chunk, hi)]
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


@dataclass
class Position:
    """Where training stands: everything besides model and optimiser that a checkpoint must restore."""

    epoch: int = 0  # current epoch (0-based)
    batch: int = 0  # next batch index within the epoch
    step: int = 0  # steps taken so far
    sums: list[float] = field(default_factory=lambda: [0.0, 0.0])  # this epoch's loss sum, error count
    epoch_time_s: float = 0.0  # training time spent in this epoch so far
    history: list[dict[str, Any]] = field(default_factory=list)  # finished epochs' metrics rows
    regime_state: dict[str, Any] = field(default_factory=dict)  # cached statistics (diag F, K-FAC roots)
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


def _prepare_run(cfg: Config, comm: Comm) -> tuple[Config, RunDir | None, dict[str, Any]]:
    """Check the output location and pick the run directory on rank 0; agree on the outcome everywhere.

    Returns (cfg with run_name set, run directory on rank 0 else None, outcome) where outcome may hold
    "finished" (the summary of a finished run) or "resume" (True when a checkpoint exists).
    """
    outcome: dict[str, Any] = {}
    if comm.is_main:
        try:
            check_writable(Path(cfg.out_dir))
            name = cfg.run_name or default_run_name(cfg)
            run = RunDir(Path(cfg.out_dir) / name)
            outcome = {"name": name}
            if run.is_finished():
                outcome["finished"] = run.read_summary()
            elif run.path.exists():
                previous = run.read_config()
                if previous is not None and previous["config"] != run.jsonable(cfg.to_dict() | {"run_name": name}):
                    raise ConfigError(
                        f"run directory {str(run.path)!r} holds a different configuration; "
                        "choose another run_name or remove it"
                    )
                outcome["resume"] = run.checkpoint_path.exists()
                outcome["exists"] = True
        except ConfigError as e:
            outcome = {"error": str(e)}
    outcome = comm.broadcast_object(outcome)
    if "error" in outcome:
        raise ConfigError(outcome["error"])
    cfg = replace(cfg, run_name=outcome["name"])
    run = RunDir(Path(cfg.out_dir) / cfg.run_name) if comm.is_main else None
    return cfg, run, outcome


def data_and_model(cfg: Config, comm: Comm) -> tuple[Data, nn.Module]:
    """The run's data (in its dtype, on its device) and its freshly initialised model.

    Rank 0 loads first, so that a dataset generated or cached on first use is built only once.
    """
    data = DATASETS[cfg.dataset].load(cfg, comm.device) if comm.is_main else None
    comm.broadcast_object("data ready")
    data = data or DATASETS[cfg.dataset].load(cfg, comm.device)
    dtype = getattr(torch, cfg.dtype)
    data.x_train, data.x_test = data.x_train.to(dtype), data.x_test.to(dtype)
    model = build_model(
        cfg.model,
        data.in_shape,
        data.num_classes,
        ghost_size=cfg.ghost_size if cfg.ghost_bn else 0,
        bn_momentum=cfg.bn_momentum,
        seed=stream_seed(cfg.seed, "init"),
    ).to(comm.device, dtype)
    return data, model


def train(cfg: Config, comm: Comm | None = None, step_hook: StepHook | None = None) -> dict[str, Any]:
    """Train one configuration; rank 0 writes its run directory. Returns the summary on every rank.

    A run directory that holds a checkpoint is resumed; a finished one is returned as it is.
    ``step_hook``, if given, is called on every rank after every step with a ``StepInfo``.
    """
    comm = comm or init(cfg.device)
    validate(cfg, comm.size)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    cfg, run, outcome = _prepare_run(cfg, comm)
    if "finished" in outcome:
        if run is not None:
            print(f"hpcnoise: {run.path} is already finished; nothing to do", flush=True)
        return outcome["finished"]

    regime = REGIMES[cfg.regime]
    data, model = data_and_model(cfg, comm)
    for batch_key in regime.batch_keys:
        if getattr(cfg, batch_key) > data.x_train.shape[0]:
            raise ConfigError(
                f"{batch_key}={getattr(cfg, batch_key)} exceeds the {data.x_train.shape[0]} training samples "
                f"of {cfg.dataset}"
            )
    opt = make_optimizer(cfg, model)
    position = Position()
    if outcome.get("resume"):
        # every rank reads the checkpoint (a shared filesystem), so no parameters need broadcasting
        ckpt = torch.load(
            Path(cfg.out_dir) / cfg.run_name / "checkpoint.pt", map_location=comm.device, weights_only=False
        )
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        position = ckpt["position"]
        if run is not None:
            run.rewrite_metrics(position.history)
            print(f"hpcnoise: resuming {run.path} at epoch {position.epoch + 1}, step {position.step}", flush=True)
    elif run is not None:
        record = {
            "config": cfg.to_dict(),
            "git": git_hash(),
            "world_size": comm.size,
            "launcher": comm.launcher,
            "device": str(comm.device),
            "torch_threads": torch.get_num_threads(),
            "noise_scale": cfg.noise_scale,
            "num_params": sum(p.numel() for p in model.parameters()),
            "versions": comm.versions(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        if outcome.get("exists"):  # started before but stopped before its first checkpoint: start over
            run.restart(record)
        else:
            run.create(record)
    return _train_loop(cfg, comm, regime, data, model, opt, position, run, step_hook)


def make_optimizer(cfg: Config, model: nn.Module) -> torch.optim.SGD:
    """SGD with momentum; weight decay on batch-norm and bias parameters (1-D tensors) is optional."""
    params = list(model.parameters())
    if cfg.decay_bn_and_bias:
        groups = [{"params": params, "weight_decay": cfg.weight_decay}]
    else:
        groups = [
            {"params": [p for p in params if p.dim() > 1], "weight_decay": cfg.weight_decay},
            {"params": [p for p in params if p.dim() <= 1], "weight_decay": 0.0},
        ]
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)


class PhaseTimer:
    """Seconds per phase of a step, summed over an epoch (synchronising the GPU at phase ends)."""

    def __init__(self, device: torch.device):
        self.sync = device.type == "cuda"
        self.seconds: dict[str, float] = {}
        self._t = 0.0

    def start(self) -> None:
        self._t = time.perf_counter()

    def lap(self, phase: str) -> None:
        if self.sync:
            torch.cuda.synchronize()
        now = time.perf_counter()
        self.seconds[phase] = self.seconds.get(phase, 0.0) + now - self._t
        self._t = now


def _train_loop(
    cfg: Config,
    comm: Comm,
    regime: Regime,
    data: Data,
    model: nn.Module,
    opt: torch.optim.SGD,
    pos: Position,
    run: RunDir | None,
    step_hook: StepHook | None,
) -> dict[str, Any]:
    params = list(model.parameters())
    norms = ghost_norms(model)
    quantities = tuple(HOOK_QUANTITY[s] for s in sorted(regime.needs))
    hooks = CurvatureHooks(model, conv_mode=cfg.conv_mode, quantities=quantities) if quantities else None
    n_train = data.x_train.shape[0]
    show_bar = comm.is_main and cfg.progress and sys.stderr.isatty()
    bar = tqdm(total=cfg.epochs, initial=pos.epoch, desc=cfg.run_name, unit="epoch", disable=not show_bar)
    t_session = time.perf_counter()
    stats = pos.regime_state  # cached statistics, reused between refreshes
    with StopFlag() as stop:
        while pos.epoch < cfg.epochs:
            epoch = pos.epoch
            global_batch = regime.batch(cfg, epoch)
            local_batch = global_batch // comm.size
            ghosts_per_step = global_batch // (cfg.ghost_size if cfg.ghost_bn else local_batch)
            batches = epoch_batches(n_train, global_batch, epoch, cfg.seed)
            noise_on = regime.noise is not None and epoch < cfg.noise_epochs
            timer = PhaseTimer(comm.device)
            t_epoch = time.perf_counter()
            while pos.batch < len(batches):
                i, step = pos.batch, pos.step
                timer.start()
                lr = lr_at(cfg, epoch, i, len(batches))
                for group in opt.param_groups:
                    group["lr"] = lr
                idx = local_share(batches[i], comm.rank, comm.size).to(comm.device)
                x, y = data.x_train[idx], data.y_train[idx]
                if data.augment is not None:
                    gen = generator(cfg.seed, "augment", step, device=comm.device)
                    x = data.augment(x, gen, comm.rank * local_batch, global_batch)
                # Which statistics this step recomputes (only while the noise is on).
                refresh = set()
                if noise_on:
                    refresh = {s for s in regime.needs if s == "signed_sum" or s not in stats}
                    if "diag_fisher" in regime.needs and step % cfg.fisher_every == 0:
                        refresh.add("diag_fisher")
                    if "kfac" in regime.needs and step % cfg.kfac_every == 0:
                        refresh.add("kfac")
                signs = None
                if "signed_sum" in refresh:  # Rademacher signs for the global batch, this rank's share
                    gen = generator(cfg.seed, "rademacher", step)
                    signs = (torch.randint(0, 2, (global_batch,), generator=gen) * 2 - 1).to(
                        comm.device, data.x_train.dtype
                    )
                    signs = signs[comm.rank * local_batch : (comm.rank + 1) * local_batch]
                opt.zero_grad(set_to_none=True)  # the last step left p.grad as views of its fused buffer
                active = tuple(HOOK_QUANTITY[s] for s in sorted(refresh))
                with hooks.recording(local_batch, signs, active) if hooks and active else nullcontext():
                    out = model(x)
                    loss = F.cross_entropy(out, y)
                    loss.backward()
                timer.lap("forward_backward")
                groups: dict[str, list[torch.Tensor]] = {
                    "grad": [p.grad for p in params],  # type: ignore[misc]
                    "bn": [bn.stat_sums for bn in norms],  # type: ignore[misc]
                    "counts": [
                        torch.stack(
                            [
                                loss.detach() * local_batch,
                                (out.detach().argmax(1) != y).sum().to(loss.dtype),
                                torch.tensor(float(stop.raised), dtype=loss.dtype, device=loss.device),
                            ]
                        )
                    ],
                }
                if "diag_fisher" in refresh:
                    groups["diag_fisher"] = hooks.result("sum_grad_squared")  # type: ignore[union-attr]
                if "signed_sum" in refresh:
                    groups["signed_sum"] = hooks.result("signed_sum")  # type: ignore[union-attr]
                if "kfac" in refresh:
                    factors = hooks.kfac_result()  # type: ignore[union-attr]
                    groups["kfac_A"] = [f.A for f in factors]
                    groups["kfac_G"] = [f.G for f in factors]
                red = fused_allreduce(comm, groups)
                timer.lap("allreduce")
                grads = [g.div_(comm.size) for g in red["grad"]]  # average of the W local means
                for p, g in zip(params, grads):
                    p.grad = g
                for bn, c in zip(norms, red["bn"]):
                    mean_var = c.view(2, -1).div(ghosts_per_step)  # averages over all ghost batches
                    bn.update_running_stats(mean_var[0], mean_var[1])
                if "diag_fisher" in refresh:
                    stats["diag_fisher"] = [s.div_(global_batch) for s in red["diag_fisher"]]
                if "signed_sum" in refresh:
                    stats["signed_sum"] = red["signed_sum"]
                if "kfac" in refresh:
                    stats["kfac"] = [
                        KFacLayer(a.div_(global_batch), g.div_(global_batch), f.weight, f.bias)
                        for a, g, f in zip(red["kfac_A"], red["kfac_G"], factors)
                    ]
                counts = red["counts"][0]
                pos.sums[0] += counts[0].item()
                pos.sums[1] += counts[1].item()
                noise = None
                g_lb = [g.clone() for g in grads] if step_hook is not None else grads  # before noise
                if noise_on:
                    gen = generator(cfg.seed, "noise", step, device=comm.device)
                    noise = regime.noise(NoiseInput(cfg, grads, stats, gen, stats, frozenset(refresh)))  # type: ignore[misc]
                    if cfg.noise_placement == "gradient":
                        for g, z in zip(grads, noise):
                            g.add_(z)
                timer.lap("noise")
                opt.step()
                if noise is not None and cfg.noise_placement == "parameter":
                    with torch.no_grad():
                        for p, z in zip(params, noise):
                            p.add_(z, alpha=-lr)
                timer.lap("optimizer")
                if step_hook is not None:
                    step_hook(StepInfo(step, epoch, lr, g_lb, stats.get("diag_fisher"), noise, model))
                pos.batch, pos.step = i + 1, step + 1
                if counts[2].item() > 0:  # some rank was asked to stop: all stop after this same step
                    pos.epoch_time_s += time.perf_counter() - t_epoch
                    pos.elapsed_s += time.perf_counter() - t_session
                    _checkpoint(run, model, opt, pos)
                    # every rank waits for rank 0's checkpoint: launchers kill the remaining ranks as soon
                    # as one exits, which must not happen while the checkpoint is being written
                    comm.broadcast_object("checkpointed")
                    raise Preempted(f"stopped by signal at epoch {epoch + 1}, step {pos.step}; checkpoint written")
            train_time = pos.epoch_time_s + time.perf_counter() - t_epoch
            n_seen = len(batches) * global_batch
            test_loss, test_err = evaluate(model, data.x_test, data.y_test, comm)
            row = {
                "epoch": epoch + 1,
                "step": pos.step,
                "train_loss": pos.sums[0] / n_seen,
                "train_error": pos.sums[1] / n_seen,
                "test_loss": test_loss,
                "test_error": test_err,
                "lr": lr_at(cfg, epoch, len(batches) - 1, len(batches)),
                "noise": noise_on,
                "batch_size": global_batch,
                "world_size": comm.size,
                "epoch_time_s": train_time,
                "wall_time_s": pos.elapsed_s + time.perf_counter() - t_session,
                "samples_per_s": n_seen / train_time,
                "samples_per_s_per_worker": n_seen / train_time / comm.size,
                # seconds per phase this epoch, this session (hook work is inside forward_backward)
                **{f"time_{k}_s": v for k, v in timer.seconds.items()},
            }
            if not all(math.isfinite(row[k]) for k in ("train_loss", "test_loss")):
                raise FloatingPointError(f"training diverged at epoch {epoch + 1} (loss is not finite); lower lr")
            pos.history.append(row)
            pos.epoch, pos.batch, pos.sums, pos.epoch_time_s = epoch + 1, 0, [0.0, 0.0], 0.0
            if run is not None:
                run.log_epoch(row)
                msg = (
                    f"epoch {epoch + 1:3d}/{cfg.epochs}  "
                    f"train loss {row['train_loss']:.4f} err {row['train_error']:.4f}  "
                    f"test loss {test_loss:.4f} err {test_err:.4f}  lr {row['lr']:.4g}  "
                    f"noise {'on ' if noise_on else 'off'}"
                    f"  {row['samples_per_s']:.0f} samples/s"
                )
                bar.write(msg) if show_bar else print(msg, flush=True)
            bar.update(1)
            if cfg.diagnostics_every and pos.epoch % cfg.diagnostics_every == 0:
                from hpcnoise.measure import diagnostics_row  # measure imports this module

                diag = diagnostics_row(model, data, cfg, comm, pos.epoch)
                if run is not None:
                    run.log_diagnostics(diag)
            if cfg.checkpoint_every and pos.epoch % cfg.checkpoint_every == 0 and pos.epoch < cfg.epochs:
                pos.elapsed_s += time.perf_counter() - t_session
                t_session = time.perf_counter()
                _checkpoint(run, model, opt, pos)
    bar.close()
    if hooks is not None:
        hooks.remove()
    history = pos.history
    last = history[-1]
    summary = {
        "run_name": cfg.run_name,
        "regime": cfg.regime,
        "model": cfg.model,
        "dataset": cfg.dataset,
        "seed": cfg.seed,
        "world_size": comm.size,
        "epochs": cfg.epochs,
        "steps": pos.step,
        "final_test_error": last["test_error"],
        "final_test_loss": last["test_loss"],
        "final_train_error": last["train_error"],
        "final_train_loss": last["train_loss"],
        "best_test_error": min(r["test_error"] for r in history),
        "total_time_s": pos.elapsed_s + time.perf_counter() - t_session,
        "mean_samples_per_s": sum(r["samples_per_s"] for r in history) / len(history),
    }
    if cfg.sharpness:
        from hpcnoise.measure import sharpness_of

        sharp = sharpness_of(
            model,
            data.x_train,
            data.y_train,
            comm,
            samples=min(cfg.sharpness_samples, n_train),
            heldout=(data.x_test, data.y_test),
        )
        summary["max_eigenvalue"] = sharp["max_eigenvalue"]
        if run is not None:
            run.write_sharpness(sharp)
    if run is not None:
        run.save_model(model)
        run.finish(summary)
        print(f"hpcnoise: finished; results in {run.path}", flush=True)
    return summary


def _checkpoint(run: RunDir | None, model: nn.Module, opt: torch.optim.SGD, pos: Position) -> None:
    """Rank 0 writes model, optimiser and position atomically (the random streams are keyed by step)."""
    if run is not None:
        save_atomic({"model": model.state_dict(), "optimizer": opt.state_dict(), "position": pos}, run.checkpoint_path)
