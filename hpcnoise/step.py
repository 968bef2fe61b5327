"""One training step, as functions of explicit inputs (the loop in hpcnoise.train only schedules).

One step on each of W workers (global batch M, local batch m = M / W), in three parts:
(a) ``local_contribution``: forward + backward of the local MEAN loss; when statistics are due, the
    curvature hooks compute their local sums in the same backward pass. Returns the named groups of
    tensors to sum over workers: the local mean gradients, the ghost-batch-norm statistic sums, the
    loss/error counts with the stop flag, and each due statistic's packed sums.
(b) ``start_reduction`` sums every group over all workers in ONE collective (a flat buffer), or, with
    gradient buckets, the gradients (with the per-parameter curvature sums) bucket by bucket during
    backward; ``finish`` turns the sums into g_LB = sum / W (set as p.grad), the batch-norm running
    statistics (the average over all ghost batches of the global batch) and the normalised statistics
    (``STATISTICS[...].unpack``).
(c) ``update``: the regime's noise, drawn from the (seed, step) stream (identical on every rank, no
    communication), added to the gradient or to the parameters, and the optimiser step.
Every rank runs the same (b) and (c) on the same sums, so parameters and buffers stay bit-identical
across ranks, and for a fixed global batch the trajectory does not depend on W (up to float rounding).

Adding W workers' local contributions and running (b) and (c) once equals the step of W ranks; that is
what tests/test_step.py checks in-process, and what hpcnoise.measure reuses for frozen-network draws.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.profiler import record_function

from hpcnoise import faults, precision
from hpcnoise.buckets import Buckets
from hpcnoise.comm import Comm
from hpcnoise.config import Config
from hpcnoise.curvature import CurvatureHooks
from hpcnoise.models import GhostBatchNorm, SumOverWorkers, ghost_norms, synchronized, update_running_stats
from hpcnoise.regimes import REGIMES, NoiseInput, Regime, standard_normal_like
from hpcnoise.seeding import generator
from hpcnoise.statistics import STATISTICS, quantities

Groups = dict[str, list[Tensor]]  # named tensors summed over workers in one collective


@dataclass(frozen=True)
class Net:
    """The model as the step sees it: its parameters, its ghost batch norms, its curvature hooks and
    (when the gradients are reduced bucket by bucket during backward) its gradient buckets."""

    model: nn.Module
    params: list[nn.Parameter]
    norms: list[GhostBatchNorm]
    hooks: CurvatureHooks | None  # None when the regime needs no statistics
    buckets: Buckets | None = None  # None: one fused collective after backward
    mixed: bool = False  # forward (and so backward) under bf16 autocast (dtype=bf16, hpcnoise.precision)

    @staticmethod
    def attach(
        model: nn.Module,
        statistics: frozenset[str],
        conv_mode: str,
        record_eval: bool = False,
        bucket_mb: float | None = None,
        min_buckets: int = 1,
        mixed: bool = False,
    ) -> Net:
        """Hooks for the hook quantities of ``statistics`` (none when empty); gradient buckets of at most
        ``bucket_mb`` MiB and 1/``min_buckets`` of the gradients when given (the training step's, see
        hpcnoise.buckets)."""
        wanted = quantities(statistics)
        hooks = (
            CurvatureHooks(model, conv_mode=conv_mode, record_eval=record_eval, quantities=wanted) if wanted else None
        )
        params = list(model.parameters())
        buckets = Buckets(params, int(bucket_mb * 2**20), min_buckets) if bucket_mb is not None else None
        return Net(model, params, ghost_norms(model), hooks, buckets, mixed)

    def detach(self) -> None:
        if self.hooks is not None:
            self.hooks.remove()
        if self.buckets is not None:
            self.buckets.remove()


@dataclass(frozen=True)
class Reduced:
    """A step's result after the reduction, identical on every rank."""

    grads: list[Tensor]  # g_LB: the average of the W local mean gradients (also each p.grad)
    loss_sum: Tensor  # summed per-sample losses of the global batch (0-dim, on the device)
    errors: Tensor  # misclassified samples of the global batch (0-dim, on the device)
    stop: bool  # some rank got SIGTERM/SIGUSR1
    finite: bool  # the loss sum is finite


def bn_sum(cfg: Config, comm: Comm) -> SumOverWorkers | None:
    """The collective through which batch norms normalise the global batch (``sync_bn`` without ghost
    batches, on several workers); None when each worker's batch norms see only its own samples."""
    return comm.allreduce_sum_ if cfg.sync_bn and not cfg.ghost_bn and comm.size > 1 else None


def due_statistics(regime: Regime, cfg: Config, step: int, cache: dict[str, Any]) -> frozenset[str]:
    """The statistics this step recomputes (while the noise is on): due ones, and any not cached yet."""
    return frozenset(s for s in regime.statistics if s not in cache or STATISTICS[s].due(cfg, step))


def rademacher(gen: torch.Generator, n: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """n independent +-1 signs from ``gen``."""
    return (torch.randint(0, 2, (n,), generator=gen) * 2 - 1).to(device, dtype)


def rank_signs(cfg: Config, step: int, global_batch: int, comm: Comm, dtype: torch.dtype) -> Tensor:
    """This rank's share of the step's Rademacher signs, drawn for the whole global batch, so the signs
    differ per sample and rank and do not depend on W."""
    local = global_batch // comm.size
    signs = rademacher(generator(cfg.seed, "rademacher", step), global_batch, comm.device, dtype)
    return signs[comm.rank * local : (comm.rank + 1) * local]


def local_contribution(
    net: Net,
    x: Tensor,
    y: Tensor,
    statistics: frozenset[str],
    signs: Tensor | None = None,
    stop: bool = False,
    reset_grads: bool = True,
    into: dict[str, list[Tensor]] | None = None,
) -> Groups:
    """(a) One worker's forward and backward of its mean loss; the groups to sum over workers.

    p.grad holds the local mean gradient afterwards (the ``grad`` group is those tensors).
    ``reset_grads=False``: p.grad already holds zeroed bucket views (``Buckets.arm``), which backward
    fills in place while their sums start. ``into``: bucket views for per-parameter curvature
    quantities, which the hooks then fill unscaled (``CurvatureHooks.recording``).
    """
    if reset_grads:
        for p in net.params:
            p.grad = None  # the last step left p.grad as views of its fused buffer
    active = quantities(statistics)
    hooks = net.hooks
    with hooks.recording(len(y), signs, active, into) if hooks is not None and active else nullcontext():
        with precision.autocast(net.mixed, x.device):
            out = net.model(x)
            loss = F.cross_entropy(out, y)  # float32 under autocast
        with torch.no_grad():
            flag = torch.full((), float(stop), dtype=loss.dtype, device=loss.device)  # a fill: no host copy
            errors = (out.argmax(1) != y).sum().to(loss.dtype)
            small: Groups = {
                "bn": [bn.stat_sums for bn in net.norms],  # type: ignore[misc]
                "counts": [torch.stack([loss * len(y), errors, flag])],
            }
        loss.backward()  # type: ignore[no-untyped-call]  # unannotated in torch
    groups: Groups = {"grad": [p.grad for p in net.params], **small}  # type: ignore[misc]
    for name in sorted(statistics):
        groups[name] = STATISTICS[name].pack(hooks)  # type: ignore[arg-type]
    return groups


def _flatten(groups: Groups) -> tuple[Tensor, Groups]:
    """One flat copy of every tensor of every group, and views of it shaped alike."""
    flat = torch.cat([t.reshape(-1) for ts in groups.values() for t in ts])
    views: Groups = {}
    offset = 0
    for name, ts in groups.items():
        views[name] = []
        for t in ts:
            views[name].append(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()
    return flat, views


@dataclass
class PendingSum:
    """Groups whose sum over workers was started in the background (``start_sum``)."""

    comm: Comm
    handle: Any
    views: Groups

    def wait(self) -> Groups:
        self.comm.wait(self.handle)
        return self.views


def start_sum(comm: Comm, groups: Groups, name: str) -> PendingSum:
    """Start summing the groups over workers in one background collective (a flat copy of them). On one
    worker the sum is the groups themselves: nothing is copied."""
    if comm.size == 1:
        return PendingSum(comm, None, groups)
    flat, views = _flatten(groups)
    return PendingSum(comm, comm.allreduce_sum_async_(flat, name), views)


@dataclass
class Reduction:
    """(b) in flight: the groups' sums over workers, started by ``start_reduction``."""

    buckets: Buckets | None
    pending: list[PendingSum]
    riding: dict[str, tuple[list[Tensor], float]]  # statistic -> (its bucket views, m^p undoing the 1/m)

    def wait(self) -> Groups:
        out: Groups = {}
        for p in self.pending:
            out |= p.wait()
        if self.buckets is None:
            return out
        grads = self.buckets.wait()
        # the mean loss's 1/m undone after the sum, into new tensors: the buckets' are zeroed next step
        # (one multi-tensor kernel per statistic, not one per parameter)
        riding = {name: list(torch._foreach_mul(views, scale)) for name, (views, scale) in self.riding.items()}
        return {"grad": grads, **riding, **out}


def start_reduction(
    comm: Comm, groups: Groups, buckets: Buckets | None, riding: dict[str, float] | None = None
) -> Reduction:
    """(b) Start summing the groups over workers: in one fused collective, or (``buckets``) the gradients
    in their buckets, started during backward, with the per-parameter curvature sums of ``riding``
    (statistic -> the factor m^p that undoes the mean loss's 1/m, applied after the sum), and everything
    else (batch-norm sums, counts with the stop flag, K-FAC factors) in one more collective with the last
    bucket. That rest is small next to the gradients; started before backward on its own it cost
    Horovod one more negotiation per step."""
    if buckets is None:
        return Reduction(None, [start_sum(comm, groups, "hpcnoise.fused")], {})
    riding = riding or {}
    buckets.flush()
    rest = {k: v for k, v in groups.items() if k != "grad" and k not in riding}
    carried = {name: (groups[name], scale) for name, scale in riding.items()}
    return Reduction(buckets, [start_sum(comm, rest, "hpcnoise.rest")], carried)


def finish(net: Net, summed: Groups, workers: int, global_batch: int, ghosts: int, cache: dict[str, Any]) -> Reduced:
    """(b) From the summed groups: g_LB into p.grad, the batch-norm running statistics (``ghosts``: ghost
    batches in the global batch), and the normalised statistics into ``cache``."""
    grads = summed["grad"]
    if workers > 1:
        torch._foreach_div_(grads, float(workers))  # average of the W local means
    for p, g in zip(net.params, grads):
        if p.grad is not g:  # with buckets p.grad already is the summed view
            p.grad = g
    update_running_stats(net.norms, summed["bn"], ghosts)
    for name in STATISTICS:
        if name in summed:
            cache[name] = STATISTICS[name].unpack(summed[name], global_batch, net.hooks)  # type: ignore[arg-type]
    counts = summed["counts"][0]
    loss_sum, _, flag = counts.tolist()  # the step's one host sync; the loss and error sums stay on the device
    return Reduced(grads, counts[0], counts[1], flag > 0, math.isfinite(loss_sum))


def update(
    net: Net, opt: torch.optim.Optimizer, cfg: Config, lr: float, grads: list[Tensor], noise: list[Tensor] | None
) -> None:
    """(c) Apply the noise where ``noise_placement`` says and take the optimiser step at rate ``lr``.

    ``gradient``: g_LB + noise goes through momentum and weight decay, as small-batch noise does;
    ``parameter``: theta -= lr * noise after the optimiser step (see hpcnoise.regimes).
    """
    for group in opt.param_groups:
        group["lr"] = lr
    if noise is not None and cfg.noise_placement == "gradient":
        torch._foreach_add_(grads, noise)
    opt.step()
    if noise is not None and cfg.noise_placement == "parameter":
        with torch.no_grad():
            params: list[Tensor] = list(net.params)
            torch._foreach_add_(params, noise, alpha=-lr)


class PhaseTimer:
    """Seconds per phase of a step, summed over an epoch. On the CPU, wall time between laps; on a GPU,
    each lap records a CUDA event instead (no synchronisation inside the step), and the events are
    read once, when ``seconds`` is asked for (at the epoch's end)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self._seconds: dict[str, float] = {}
        self._events: list[tuple[str, Any, Any]] = []  # (phase, start event, end event), not read yet
        self._last: Any = None
        self._t = 0.0

    def _event(self) -> Any:
        e = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]  # unannotated in torch
        e.record()
        return e

    def start(self) -> None:
        if self.cuda:
            self._last = self._event()
        else:
            self._t = time.perf_counter()

    def lap(self, phase: str) -> None:
        if self.cuda:
            end = self._event()
            self._events.append((phase, self._last, end))
            self._last = end
            return
        now = time.perf_counter()
        self._seconds[phase] = self._seconds.get(phase, 0.0) + now - self._t
        self._t = now

    @property
    def seconds(self) -> dict[str, float]:
        if self._events:
            self._events[-1][2].synchronize()
            for phase, start, end in self._events:
                self._seconds[phase] = self._seconds.get(phase, 0.0) + start.elapsed_time(end) / 1000
            self._events.clear()
        return self._seconds


@dataclass(frozen=True)
class StepParts:
    """What every step of one run shares: its config, communicator, regime, network (hooks, buckets) and
    optimiser; built once per run by ``make_step_parts``. The loop is ``hpcnoise.train``."""

    cfg: Config
    comm: Comm
    regime: Regime
    net: Net
    opt: torch.optim.Optimizer


def make_optimizer(cfg: Config, model: nn.Module) -> torch.optim.SGD:
    """SGD with momentum; weight decay on batch-norm and bias parameters (1-D tensors) is optional.

    torch's fused kernel (one pass per parameter for weight decay, momentum and update, no temporary):
    on the CPU benchmark the per-tensor loop's weight-decay temporaries cost more than the update."""
    params = list(model.parameters())
    if cfg.decay_bn_and_bias:
        groups = [{"params": params, "weight_decay": cfg.weight_decay}]
    else:
        groups = [
            {"params": [p for p in params if p.dim() > 1], "weight_decay": cfg.weight_decay},
            {"params": [p for p in params if p.dim() <= 1], "weight_decay": 0.0},
        ]
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, fused=True)


def make_step_parts(cfg: Config, comm: Comm, model: nn.Module, buckets: bool | None = None) -> StepParts:
    """The step's shared parts for ``model``: its regime, hooks, gradient buckets and optimiser, as every
    run builds them (benchmarks too). Buckets (``allreduce=buckets``) overlap communication with backward,
    so one worker, with nothing to overlap, goes without them unless ``buckets`` asks for the layout of
    several workers."""
    regime = REGIMES[cfg.regime]
    bucketed = cfg.allreduce == "buckets" and (comm.size > 1 if buckets is None else buckets)
    bucket_mb = cfg.bucket_mb if bucketed else None
    net = Net.attach(
        model,
        regime.statistics,
        cfg.conv_mode,
        bucket_mb=bucket_mb,
        min_buckets=cfg.min_buckets,
        mixed=cfg.dtype == "bf16",
    )
    return StepParts(cfg, comm, regime, net, make_optimizer(cfg, model))


@dataclass(frozen=True)
class StepInput:
    """One step's position and this rank's samples."""

    step: int  # steps taken before this one: keys the random streams
    lr: float
    x: Tensor  # this rank's share of the global batch
    y: Tensor
    global_batch: int
    ghosts: int  # ghost batches (batch-norm statistic groups) in the global batch
    noise_on: bool
    stop: bool  # this rank got SIGTERM/SIGUSR1


@dataclass(frozen=True)
class StepOutput:
    reduced: Reduced
    g_lb: list[Tensor]  # g_LB before the noise (a copy when asked for, else the noisy p.grad itself)
    noise: list[Tensor] | None  # the noise drawn at this step, None when off
    refreshed: frozenset[str]  # statistics recomputed at this step


def train_step(
    t: StepParts,
    inp: StepInput,
    cache: dict[str, Any],
    state: dict[str, Any],
    timer: PhaseTimer,
    keep_g_lb: bool = False,
) -> StepOutput:
    """(a), (b), (c) for one step. ``cache``: the statistics, reused between refreshes; ``state``: the
    regime's own state (K-FAC square roots). Both persist across steps and go into checkpoints."""
    refresh = due_statistics(t.regime, t.cfg, inp.step, cache) if inp.noise_on else frozenset()
    signed = any(STATISTICS[s].needs_signs for s in refresh)
    signs = rank_signs(t.cfg, inp.step, inp.global_batch, t.comm, inp.x.dtype) if signed else None
    buckets = t.net.buckets
    riding: dict[str, float] = {}  # per-parameter statistics summed in the gradient buckets
    into: dict[str, list[Tensor]] = {}
    if buckets is not None:
        names = sorted(s for s in refresh if STATISTICS[s].per_parameter)
        for name, views in zip(names, buckets.arm(t.comm, len(names)), strict=True):
            into[STATISTICS[name].quantity] = views
            riding[name] = float(len(inp.y)) ** STATISTICS[name].mean_loss_power
    with synchronized(t.net.model, bn_sum(t.cfg, t.comm)):
        groups = local_contribution(
            t.net,
            inp.x,
            inp.y,
            refresh,
            signs,
            inp.stop,
            reset_grads=buckets is None,
            into=into,
        )
    timer.lap("forward_backward")
    reduction = start_reduction(t.comm, groups, buckets, riding)
    noise_fn = t.regime.noise if inp.noise_on else None
    gen = generator(t.cfg.seed, "noise", inp.step, device=t.comm.device) if noise_fn is not None else None
    # the noise's N(0, I) draw needs no data: it runs while the sums are in flight
    with record_function("hpcnoise.normals"):
        normals = standard_normal_like(t.net.params, gen) if gen is not None and t.regime.draws_normals else None
    timer.lap("noise")
    with record_function("hpcnoise.reduction"):
        reduced = finish(t.net, reduction.wait(), t.comm.size, inp.global_batch, inp.ghosts, cache)
    timer.lap("allreduce")
    faults.reached("step")  # between the collective and the update: a crash inside a step
    g_lb = [g.clone() for g in reduced.grads] if keep_g_lb else reduced.grads
    noise = None
    if noise_fn is not None and gen is not None:
        with record_function("hpcnoise.noise"):
            noise = noise_fn(NoiseInput(t.cfg, reduced.grads, cache, gen, state, refresh, normals, inp.step))
    timer.lap("noise")
    update(t.net, t.opt, t.cfg, inp.lr, reduced.grads, noise)
    timer.lap("optimizer")
    return StepOutput(reduced, g_lb, noise, refresh)
