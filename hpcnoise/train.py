"""``train(cfg) -> summary``: the one training loop that the CLI, tests and sweeps all call.

One step on each of W workers (global batch M, local batch m = M / W):
1. forward + backward of the local MEAN loss; when the regime needs it, curvature hooks compute the
   local raw sum S_w = sum_i g_i^2 of squared per-sample gradients in the same backward pass;
2. ONE fused sum-allreduce of a flat buffer holding [local mean gradients | S_w | ghost-batch-norm
   statistic sums | loss and error counts]; then g_LB = sum / W, diag F = sum / M, and the batch-norm
   running statistics move towards the average over all ghost batches of the global batch;
3. the regime's noise, drawn from the (seed, step) stream: identical on every rank, no communication;
4. the optimiser step (SGD with momentum and weight decay), identical on every rank.
Parameters and buffers therefore stay bit-identical across ranks, and for a fixed global batch the
trajectory does not depend on W (up to float rounding of the sums).
"""

from __future__ import annotations

import math
from contextlib import nullcontext
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from hpcnoise.comm import Comm, init
from hpcnoise.config import Config, ConfigError, validate
from hpcnoise.curvature import SumGradSquared
from hpcnoise.data import DATASETS, Data, epoch_batches, local_share
from hpcnoise.models import GhostBatchNorm, build_model, ghost_norms
from hpcnoise.regimes import REGIMES, NoiseInput, Regime
from hpcnoise.rundir import RunDir, check_writable, default_run_name, git_hash
from hpcnoise.seeding import generator, stream_seed


def lr_at(cfg: Config, epoch: int, step_in_epoch: int, steps_per_epoch: int) -> float:
    """Learning rate of one step: linear warmup to cfg.lr over warmup_epochs, then step decay at epochs."""
    lr = cfg.lr
    done = epoch + (step_in_epoch + 1) / steps_per_epoch  # epochs completed after this step
    if done <= cfg.warmup_epochs:
        return lr * done / cfg.warmup_epochs
    for boundary in cfg.lr_decay_epochs:
        if epoch >= boundary:
            lr *= cfg.lr_decay_factor
    return lr


class FusedStep:
    """Packs everything a step must sum over workers into one flat buffer and unpacks the result.

    Layout: [local mean grads (all params) | S_w (all params, if needed) | per batch norm: summed ghost
    means and variances (2C) | local loss sum, local error count].
    """

    def __init__(self, params: list[nn.Parameter], norms: list[GhostBatchNorm], with_fisher: bool):
        self.params = params
        self.norms = norms
        self.with_fisher = with_fisher
        self.sizes = [p.numel() for p in params] * (2 if with_fisher else 1)
        self.sizes += [2 * bn.num_features for bn in norms] + [2]

    def pack(self, sq_sums: list[torch.Tensor] | None, loss_sum: torch.Tensor, errors: torch.Tensor) -> torch.Tensor:
        parts = [p.grad.reshape(-1) for p in self.params]  # type: ignore[union-attr]
        if self.with_fisher:
            parts += [s.reshape(-1) for s in sq_sums]  # type: ignore[union-attr]
        parts += [bn.stat_sums.reshape(-1) for bn in self.norms]  # type: ignore[union-attr]
        parts.append(torch.stack([loss_sum.detach(), errors.to(loss_sum.dtype)]))
        return torch.cat(parts)

    def unpack(
        self, flat: torch.Tensor, world: int, global_batch: int, ghosts: int
    ) -> tuple[list[torch.Tensor], list[torch.Tensor] | None, torch.Tensor]:
        """Set p.grad to g_LB, update batch-norm running stats; return (grads, diag F or None, [loss, err] sums)."""
        chunks = list(torch.split(flat, self.sizes))
        n = len(self.params)
        grads = []
        for p, c in zip(self.params, chunks[:n]):
            p.grad = c.view_as(p).div_(world)  # average of the W local means = the global mean
            grads.append(p.grad)
        diag_f = None
        if self.with_fisher:
            diag_f = [c.view_as(p).div_(global_batch) for p, c in zip(self.params, chunks[n : 2 * n])]
        offset = 2 * n if self.with_fisher else n
        for bn, c in zip(self.norms, chunks[offset : offset + len(self.norms)]):
            stats = c.view(2, -1).div(ghosts)  # averages over all ghost batches of the global batch
            bn.update_running_stats(stats[0], stats[1])
        return grads, diag_f, chunks[-1]


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


def _prepare_run(cfg: Config, comm: Comm) -> tuple[Config, RunDir | None, dict[str, Any] | None]:
    """Check the output location and pick the run directory on rank 0; agree on the outcome everywhere.

    Returns (cfg with run_name set, run directory on rank 0 else None, summary if already finished).
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
                raise ConfigError(
                    f"run directory {str(run.path)!r} exists but is unfinished (no summary.json); "
                    "remove it or choose another run_name"
                )
        except ConfigError as e:
            outcome = {"error": str(e)}
    outcome = comm.broadcast_object(outcome)
    if "error" in outcome:
        raise ConfigError(outcome["error"])
    cfg = replace(cfg, run_name=outcome["name"])
    run = RunDir(Path(cfg.out_dir) / cfg.run_name) if comm.is_main else None
    return cfg, run, outcome.get("finished")


@dataclass(frozen=True)
class StepInfo:
    """What one finished step exposes to a ``step_hook`` (tests and measurements; read-only use)."""

    step: int
    epoch: int
    lr: float
    grads: list[torch.Tensor]  # g_LB (before noise) as reduced over all workers
    diag_fisher: list[torch.Tensor] | None  # diag F of the global batch, when the regime needs it
    noise: list[torch.Tensor] | None  # the noise drawn at this step, None when off
    model: nn.Module  # after the optimiser step


StepHook = Callable[[StepInfo], None]


def train(cfg: Config, comm: Comm | None = None, step_hook: StepHook | None = None) -> dict[str, Any]:
    """Train one configuration; rank 0 writes its run directory. Returns the summary on every rank.

    ``step_hook``, if given, is called on every rank after every step with a ``StepInfo``.
    """
    comm = comm or init(cfg.device)
    validate(cfg, comm.size)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    cfg, run, finished = _prepare_run(cfg, comm)
    if finished is not None:
        if comm.is_main:
            print(f"hpcnoise: {run.path} is already finished; nothing to do")  # type: ignore[union-attr]
        return finished

    regime = REGIMES[cfg.regime]
    # Rank 0 loads first so that a dataset generated or cached on first use is built only once.
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
    if run is not None:
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
        run.create(record)
    return _train_loop(cfg, comm, regime, data, model, run, step_hook)


def _train_loop(
    cfg: Config,
    comm: Comm,
    regime: Regime,
    data: Data,
    model: nn.Module,
    run: RunDir | None,
    step_hook: StepHook | None,
) -> dict[str, Any]:
    params = list(model.parameters())
    norms = ghost_norms(model)
    fisher = SumGradSquared(model) if "diag_fisher" in regime.needs else None
    fused = FusedStep(params, norms, with_fisher=fisher is not None)
    opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    n_train = data.x_train.shape[0]
    show_bar = comm.is_main and cfg.progress and sys.stderr.isatty()
    bar = tqdm(total=cfg.epochs, desc=cfg.run_name, unit="epoch", disable=not show_bar, leave=True)
    step, history, t_start = 0, [], time.perf_counter()
    for epoch in range(cfg.epochs):
        global_batch = regime.batch(cfg, epoch)
        local_batch = global_batch // comm.size
        ghosts_per_step = global_batch // (cfg.ghost_size if cfg.ghost_bn else local_batch)
        batches = epoch_batches(n_train, global_batch, epoch, cfg.seed)
        noise_on = regime.noise is not None and epoch < cfg.noise_epochs
        sums = torch.zeros(2, dtype=torch.float64, device=comm.device)  # loss sum, error count
        t_epoch = time.perf_counter()
        for i, batch in enumerate(batches):
            lr = lr_at(cfg, epoch, i, len(batches))
            for group in opt.param_groups:
                group["lr"] = lr
            idx = local_share(batch, comm.rank, comm.size).to(comm.device)
            x, y = data.x_train[idx], data.y_train[idx]
            if data.augment is not None:
                x = data.augment(x, generator(cfg.seed, "augment", step, device=comm.device), comm.rank * local_batch, global_batch)
            opt.zero_grad(set_to_none=True)  # unpack left p.grad as views of the last fused buffer
            with fisher.recording(local_batch) if fisher is not None else nullcontext():
                out = model(x)
                loss = F.cross_entropy(out, y)
                loss.backward()
            sq_sums = fisher.result() if fisher is not None else None
            errors = (out.detach().argmax(1) != y).sum()
            flat = fused.pack(sq_sums, loss.detach() * local_batch, errors)
            comm.allreduce_sum_(flat)
            grads, diag_f, counts = fused.unpack(flat, comm.size, global_batch, ghosts_per_step)
            sums += counts.double()
            noise = None
            g_lb = [g.clone() for g in grads] if step_hook is not None else grads  # before noise
            if noise_on:
                stats = {"diag_fisher": diag_f} if diag_f is not None else {}
                gen = generator(cfg.seed, "noise", step, device=comm.device)
                noise = regime.noise(NoiseInput(cfg, grads, stats, gen))  # type: ignore[misc]
                if cfg.noise_placement == "gradient":
                    for g, z in zip(grads, noise):
                        g.add_(z)
            opt.step()
            if noise is not None and cfg.noise_placement == "parameter":
                with torch.no_grad():
                    for p, z in zip(params, noise):
                        p.add_(z, alpha=-lr)
            if step_hook is not None:
                step_hook(StepInfo(step, epoch, lr, g_lb, diag_f, noise, model))
            step += 1
        train_time = time.perf_counter() - t_epoch
        n_seen = len(batches) * global_batch
        test_loss, test_err = evaluate(model, data.x_test, data.y_test, comm)
        row = {
            "epoch": epoch + 1,
            "step": step,
            "train_loss": sums[0].item() / n_seen,
            "train_error": sums[1].item() / n_seen,
            "test_loss": test_loss,
            "test_error": test_err,
            "lr": lr,
            "noise": noise_on,
            "batch_size": global_batch,
            "epoch_time_s": train_time,
            "wall_time_s": time.perf_counter() - t_start,
            "samples_per_s": n_seen / train_time,
            "samples_per_s_per_worker": n_seen / train_time / comm.size,
        }
        if not all(math.isfinite(row[k]) for k in ("train_loss", "test_loss")):
            raise FloatingPointError(f"training diverged at epoch {epoch + 1} (loss is not finite); lower lr")
        history.append(row)
        if run is not None:
            run.log_epoch(row)
            msg = (
                f"epoch {epoch + 1:3d}/{cfg.epochs}  train loss {row['train_loss']:.4f} err {row['train_error']:.4f}"
                f"  test loss {test_loss:.4f} err {test_err:.4f}  lr {lr:.4g}  noise {'on ' if noise_on else 'off'}"
                f"  {row['samples_per_s']:.0f} samples/s"
            )
            bar.write(msg) if show_bar else print(msg, flush=True)
        bar.update(1)
    bar.close()
    if fisher is not None:
        fisher.remove()
    last = history[-1]
    summary = {
        "run_name": cfg.run_name,
        "regime": cfg.regime,
        "model": cfg.model,
        "dataset": cfg.dataset,
        "seed": cfg.seed,
        "world_size": comm.size,
        "epochs": cfg.epochs,
        "steps": step,
        "final_test_error": last["test_error"],
        "final_test_loss": last["test_loss"],
        "final_train_error": last["train_error"],
        "final_train_loss": last["train_loss"],
        "best_test_error": min(r["test_error"] for r in history),
        "total_time_s": time.perf_counter() - t_start,
        "mean_samples_per_s": sum(r["samples_per_s"] for r in history) / len(history),
    }
    if run is not None:
        run.save_model(model)
        run.finish(summary)
        print(f"hpcnoise: finished; results in {run.path}", flush=True)
    return summary
