"""hpcnoise's step side by side with the plain Horovod recipe, on the same model, batch and launcher.

    hpcnoise bench step [--models mlp,cnn1d,lenet5,resnet44] [--dtypes float32,bf16] [--channels-last]
                        [--batch 512] [--steps 5] [--rounds 5] [--profile N]
    horovodrun -np 2 -H localhost:2 hpcnoise bench step --threads 1

Per model and number format (``--dtypes``; bf16: float32 weights under bf16 autocast, every variant
alike, hpcnoise.precision) (hpcnoise's own builder, ghost batch norm at a quarter of the global batch, capped at 128 as
in the paper; synthetic data of its dataset's shape), every rank times, in interleaved rounds (one
block of ``--steps`` steps of each variant per round, so drifting load hits all alike):

- ``horovod``: the plain loop users already run: ``hvd.DistributedOptimizer`` (per-tensor async
  allreduce from backward hooks, Horovod's tensor fusion) over the same optimiser as hpcnoise's step
  (SGD, momentum 0.9, weight decay 5e-4); without a launcher, the same loop without Horovod;
- ``lb`` and ``lb fused``: hpcnoise's ``train_step`` (the regime ``lb``) with its gradient buckets
  reduced during backward (``allreduce=buckets``, the default) and with the one fused collective
  after backward (``allreduce=fused``);
- with ``--bucket-mb A,B,...``, ``lb B MiB`` and so on: ``lb`` with buckets of the other sizes alone
  (``min_buckets`` 1), to choose a layout side by side (``lb`` and ``diagf`` use the first size and
  the configured ``min_buckets``);
- ``diagf exact`` and, for convolutional networks, ``diagf spatial``: the step with diagonal-Fisher
  noise, diag F refreshed every step; and each one's ``floor``: lb's step with diag F's bytes in its
  buckets, plus the same curvature kernels and noise run on their own (hpcnoise.benchmarks.floor);
- ``backpack`` and its baseline ``plain nn.BN`` (float32 only): the Horovod loop with BackPACK's
  SumGradSquared (its sums allreduced too), on a copy of the network whose batch norms are nn.BatchNorm in eval mode
  (BackPACK refuses per-sample quantities under train-mode batch norm; hpcnoise.benchmarks.fisher_conv).

It prints samples/s (global), the ratio to ``horovod``, each curvature step in units of its own
baseline step (diagf over lb, BackPACK over plain nn.BN), and the step breakdown in ms: forward (a
forward with autograd graph, timed alone), backward (lb's forward+backward minus forward), curvature
(diagf's forward+backward minus lb's), communication wait (the reduction phase: what is left of the
collectives after backward), noise and optimiser (hpcnoise.step.PhaseTimer), and on CUDA the peak
memory of a block of steps above what was resident at its start (``torch.cuda.max_memory_allocated``:
the activations, gradients and temporaries a step of the variant needs on top of every variant's models).
Times are medians over rounds; each ratio is the median over rounds of the ratio of the two blocks
timed in the same round, with its interquartile range (IQR). Then the suite's targets for the device's
type (hpcnoise.benchmarks.step_targets), each marked met or not by the median ("within the rounds'
spread" where the bound lies inside the IQR). ``--profile N`` then runs torch.profiler over one block
of lb and diagf and prints where the step's time goes: the step's labelled parts (curvature hooks per
layer type, the noise's N(0, I) draw, the reduction, the noise) and the N slowest operators.
Figures only: nothing here asserts a speed. On one worker there is nothing to overlap, so ``lb`` and
``lb fused`` run the same step (hpcnoise.train.make_step_parts). The command line: hpcnoise.cli.bench.step.
"""

from __future__ import annotations

import copy
import itertools
import math
import statistics
import time
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hpcnoise.benchmarks.common import MODEL_DATA
from hpcnoise.benchmarks.floor import carry_sums, floor_step
from hpcnoise.comm import Comm
from hpcnoise.config import Config, ConvModeName
from hpcnoise.precision import autocast

WARMUP = 2  # untimed steps of each variant before the rounds
CONV = {"cnn1d", "lenet5", "resnet44", "vgg16_bn", "alexnet"}


def step_config(model: str, regime: str, batch: int, threads: int, **changes: Any) -> Config:
    """The step's configuration: synthetic data, ghost batch norm, one batch per epoch."""
    dataset = MODEL_DATA.get(model, "cifar10")
    return Config(
        dataset=dataset,
        model=model,
        regime=regime,
        batch_size=batch,
        small_batch=max(batch // 4, 1),
        ghost_bn=True,
        ghost_size=min(max(batch // 4, 1), 128),
        synthetic_data=True,
        train_samples=batch,
        test_samples=batch,
        lr=0.01,
        threads=threads,
        progress=False,
        **changes,
    )


Step = Callable[[], dict[str, float] | None]  # one step; its phase seconds, where it has them


def hpcnoise_step(cfg: Config, comm: Comm, model: nn.Module, x: Tensor, y: Tensor, carry: bool = False) -> Step:
    """``train_step`` of ``cfg`` on a copy of ``model``, on this rank's share (x, y) of one global batch;
    ``carry``: its gradient buckets also carry diag F's bytes (``floor.carry_sums``)."""
    from hpcnoise.step import PhaseTimer, StepInput, make_step_parts, train_step

    t = make_step_parts(cfg, comm, copy.deepcopy(model))
    if carry:
        carry_sums(t)
    regime = t.regime
    cache: dict[str, Any] = {}
    state: dict[str, Any] = {}
    count = [0]
    ghosts = cfg.batch_size // cfg.ghost_size

    def step() -> dict[str, float]:
        timer = PhaseTimer(comm.device)
        timer.start()
        inp = StepInput(count[0], cfg.lr, x, y, cfg.batch_size, ghosts, regime.noise is not None, False)
        train_step(t, inp, cache, state, timer)
        count[0] += 1
        return dict(timer.seconds)

    return step


def horovod_step(cfg: Config, comm: Comm, model: nn.Module, x: Tensor, y: Tensor, extend: bool = False) -> Step:
    """The plain loop on a copy of ``model``: hvd.DistributedOptimizer over the optimiser hpcnoise's step
    uses (SGD with ``cfg``'s momentum and weight decay), so the two differ only in the step (without
    Horovod, the bare optimiser). ``extend``: BackPACK's SumGradSquared in the backward, its sums allreduced."""
    from hpcnoise.step import make_optimizer

    net = copy.deepcopy(model)
    opt: torch.optim.Optimizer = make_optimizer(cfg, net)
    hvd = comm.hvd if comm.size > 1 else None
    if hvd is not None:
        opt = hvd.DistributedOptimizer(opt, named_parameters=net.named_parameters())
        hvd.broadcast_parameters(net.state_dict(), root_rank=0)
    context: Callable[[], Any] = nullcontext
    if extend:
        from backpack import backpack  # type: ignore[import-untyped]
        from backpack import extend as backpack_extend
        from backpack.extensions import SumGradSquared  # type: ignore[import-untyped]

        net = backpack_extend(net)
        context = lambda: backpack(SumGradSquared())  # noqa: E731

    mixed = cfg.dtype == "bf16"

    def step() -> None:
        opt.zero_grad()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # BackPACK's notes on containers and input hooks
            with context():
                with autocast(mixed, x.device):
                    loss = F.cross_entropy(net(x), y)
                loss.backward()
        if extend and hvd is not None:
            sums = [p.sum_grad_squared for p in net.parameters()]  # type: ignore[attr-defined]
            hvd.grouped_allreduce_(sums, op=hvd.Sum, name="bench.sum_grad_squared")
        opt.step()

    return step


def forward_step(model: nn.Module, x: Tensor, mixed: bool) -> Step:
    """A train-mode forward that builds the autograd graph (then dropped): the forward's share of a step."""
    net = copy.deepcopy(model)

    def step() -> None:
        with autocast(mixed, x.device):
            out = net(x)
        out.sum().item()  # wait for the device

    return step


def variants(
    model_name: str, cfg: Config, comm: Comm, model: nn.Module, x: Tensor, y: Tensor, other_mb: list[float]
) -> dict[str, Step]:
    """The steps to time, by name; ``other_mb``: more bucket sizes for ``lb``."""
    out: dict[str, Step] = {
        "horovod": horovod_step(cfg, comm, model, x, y),
        "forward": forward_step(model, x, cfg.dtype == "bf16"),
        "lb": hpcnoise_step(cfg, comm, model, x, y),
        "lb fused": hpcnoise_step(replace(cfg, allreduce="fused"), comm, model, x, y),
    }
    for mb in other_mb:  # the size alone decides the buckets (no min_buckets share)
        out[f"lb {mb:g} MiB"] = hpcnoise_step(replace(cfg, bucket_mb=mb, min_buckets=1), comm, model, x, y)
    modes: list[ConvModeName] = ["exact", "spatial"] if model_name in CONV else ["exact"]  # spatial: convolutions
    carrying = hpcnoise_step(cfg, comm, model, x, y, carry=True)  # lb moving diag F's bytes too
    for mode in modes:
        diagf = replace(cfg, regime="diagf", conv_mode=mode)
        out[f"diagf {mode}"] = hpcnoise_step(diagf, comm, model, x, y)
        out[f"diagf {mode} floor"] = floor_step(diagf, model, x, y, carrying)  # hpcnoise.benchmarks.floor
    try:  # BackPACK times float32 only (it has no autocast support)
        if cfg.dtype != "float32":
            raise ImportError("BackPACK: float32 only")
        from hpcnoise.benchmarks.fisher_conv import to_torch_batchnorm

        eval_copy = to_torch_batchnorm(copy.deepcopy(model), x[:2])
        out["plain nn.BN"] = horovod_step(cfg, comm, eval_copy, x, y)
        out["backpack"] = horovod_step(cfg, comm, eval_copy, x, y, extend=True)
    except ImportError:  # BackPACK is a dev dependency
        pass
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


Times = dict[str, list[float]]  # seconds per step of each variant, one per round


def _peak_reset(device: torch.device) -> float:
    """Start a block's peak-memory count; the memory resident at its start (bytes, 0 on the CPU)."""
    if device.type != "cuda":
        return 0.0
    torch.cuda.reset_peak_memory_stats(device)
    return float(torch.cuda.memory_allocated(device))


def _peak_mib(device: torch.device, resident: float) -> float:
    """The block's peak device memory above what was resident at its start (every variant's model,
    optimiser state and buffers), in MiB: what a step of this variant needs on top (CUDA's allocator; NaN
    on the CPU, which has no such count)."""
    return (torch.cuda.max_memory_allocated(device) - resident) / 2**20 if device.type == "cuda" else math.nan


@dataclass
class Timing:
    """What ``time_variants`` measured: seconds per step of each variant (one per round), the median phase
    seconds per step of the hpcnoise variants, and each variant's peak memory in a block above what was
    resident at its start (MiB, CUDA)."""

    times: dict[str, list[float]]
    phases: dict[str, dict[str, float]]
    peak_mib: dict[str, float]


def time_variants(steps: dict[str, Step], block: int, rounds: int, comm: Comm) -> Timing:
    """Time every variant in ``rounds`` interleaved rounds of ``block`` steps each."""
    for step in steps.values():
        for _ in range(WARMUP):
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    phases: dict[str, dict[str, list[float]]] = {name: {} for name in steps}
    peaks: dict[str, float] = {}
    for _ in range(rounds):
        for name, step in steps.items():
            comm.broadcast_object(None)  # every rank starts the block together
            _sync(comm.device)
            resident = _peak_reset(comm.device)
            t0 = time.perf_counter()
            sums: dict[str, float] = {}
            for _ in range(block):
                for phase, s in (step() or {}).items():
                    sums[phase] = sums.get(phase, 0.0) + s
            _sync(comm.device)
            times[name].append((time.perf_counter() - t0) / block)
            peaks[name] = _peak_mib(comm.device, resident)
            for phase, s in sums.items():
                phases[name].setdefault(phase, []).append(s / block)
    medians = {n: {p: statistics.median(v) for p, v in ph.items()} for n, ph in phases.items()}
    return Timing(times, medians, peaks)


PROFILED = ("lb", "diagf exact", "diagf spatial")  # the variants ``--profile`` looks inside


def profile_variants(steps: dict[str, Step], block: int, top: int, device: torch.device) -> str:
    """torch.profiler over ``block`` steps of each hpcnoise variant: per step, the time inside the step's
    labelled parts (``hpcnoise.*``: curvature hooks per layer type, the noise's N(0, I) draw, the
    reduction, the noise) and the ``top`` operators by self time. Profiling slows the step: these are
    shares, not the table's times."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    out = []
    for name in PROFILED:
        if name not in steps:
            continue
        with profile(activities=activities) as prof:
            for _ in range(block):
                steps[name]()
            _sync(device)
        events = prof.key_averages()
        labels = sorted((e for e in events if e.key.startswith("hpcnoise.")), key=lambda e: -e.cpu_time_total)
        out.append(f"profile of {name!r}, {block} steps; labelled parts, ms per step (CPU time, children included):")
        out += [f"  {e.key:40s} {e.cpu_time_total / block / 1e3:8.3f}" for e in labels]
        out.append(events.table(sort_by=sort, row_limit=top, max_name_column_width=40))
    return "\n".join(out)


def paired(times: Times, top: str, bottom: str) -> tuple[float, float, float]:
    """The ratio top / bottom of step times measured in the same round, over the rounds: (median,
    first quartile, third quartile). Pairing by round cancels the load drifting between rounds."""
    ratios = [a / b for a, b in zip(times[top], times[bottom], strict=True)]
    if len(ratios) < 2:
        return ratios[0], ratios[0], ratios[0]
    q1, q2, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
    return q2, q1, q3


BASE = {
    "diagf exact": "lb",
    "diagf spatial": "lb",
    "diagf exact floor": "lb",
    "diagf spatial floor": "lb",
    "backpack": "plain nn.BN",
}  # else: horovod


def model_rows(model: str, batch: int, dtype: str, timing: Timing) -> list[dict[str, Any]]:
    """The table's rows of one model and number format: samples/s, ratios (medians of per-round ratios,
    with their interquartile range), the breakdown (ms per step) and the peak memory of a block."""
    times, phases = timing.times, timing.phases
    median = {name: statistics.median(ts) for name, ts in times.items()}
    fwd = median["forward"]
    lb_fb = phases["lb"]["forward_backward"]
    rows = []
    for name, seconds in median.items():
        if name == "forward":
            continue
        ph = phases.get(name, {})
        fb = ph.get("forward_backward")
        faster = paired(times, "horovod", name)
        slower = paired(times, name, BASE.get(name, "horovod"))
        rows.append(
            {
                "model": model,
                "dtype": dtype,
                "variant": name,
                "batch": batch,
                "samples/s": batch / seconds,
                "step ms": 1e3 * seconds,
                "vs horovod": faster[0],
                "vs horovod IQR": f"{faster[1]:.2f}-{faster[2]:.2f}",
                "vs own base": slower[0],
                "own base IQR": f"{slower[1]:.2f}-{slower[2]:.2f}",
                "forward ms": 1e3 * fwd if fb is not None else None,
                "backward ms": 1e3 * (lb_fb - fwd) if fb is not None else None,
                "curvature ms": 1e3 * (fb - lb_fb) if fb is not None and "diagf" in name else None,
                "comm wait ms": 1e3 * ph["allreduce"] if "allreduce" in ph else None,
                "noise ms": 1e3 * ph["noise"] if "noise" in ph else None,
                "optimizer ms": 1e3 * ph["optimizer"] if "optimizer" in ph else None,
                "step peak MiB": timing.peak_mib.get(name),
            }
        )
    return rows


def compare(
    comm: Comm,
    models: list[str],
    batch: int,
    *,
    threads: int,
    device: str,
    bucket_mb: list[float],
    block: int,
    rounds: int,
    profile: int,
    dtypes: tuple[str, ...] = ("float32",),
    channels_last: bool = False,
) -> tuple[list[dict[str, Any]], list[str]]:
    """The table's rows of every model in every number format of ``dtypes`` (``block`` steps per variant in
    each of ``rounds`` rounds; buckets of ``bucket_mb[0]`` MiB, the other sizes as more lb variants;
    ``channels_last`` for the 2-D convolutional networks), and with ``profile`` > 0 each model's profile
    (the N = ``profile`` slowest operators)."""
    from hpcnoise.workload import data_and_model, is_conv2d

    rows: list[dict[str, Any]] = []
    profiles: list[str] = []
    for model_name, dtype in itertools.product(models, dtypes):
        layout = channels_last and is_conv2d(model_name, MODEL_DATA.get(model_name, "cifar10"))
        cfg = step_config(
            model_name, "lb", batch, threads, device=device, bucket_mb=bucket_mb[0], dtype=dtype, channels_last=layout
        )
        data, model = data_and_model(cfg, comm)
        local = batch // comm.size
        x = data.x_train[comm.rank * local : (comm.rank + 1) * local]
        y = data.y_train[comm.rank * local : (comm.rank + 1) * local]
        steps = variants(model_name, cfg, comm, model, x, y, bucket_mb[1:])
        rows += model_rows(model_name, batch, dtype, time_variants(steps, block, rounds, comm))
        if profile:
            profiles.append(f"[{model_name} {dtype}] " + profile_variants(steps, block, profile, comm.device))
        del steps, data, model
        if comm.device.type == "cuda":
            torch.cuda.empty_cache()  # the next model's peak memory starts from its own tensors
    return rows, profiles
