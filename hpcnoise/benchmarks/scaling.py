"""A scaling MODEL for machines we do not have: the predicted step time and weak-scaling efficiency of
the training step at W = 8 ... 1024 GPUs, for each network and regime. It is a model, not a measurement.

    hpcnoise bench scaling [--models a,b] [--regimes lb,diagf] [--batch 128] [--workers 8,16,...,1024]
                           [--bucket-mb 25] [--min-buckets 16] [--gpus-per-node 8] [--intra-latency US]
                           [--intra-bandwidth GBPS] [--inter-latency US] [--inter-bandwidth GBPS]
                           [--write-times FILE | --times FILE]

Inputs
- Compute, measured here on one worker (or read with ``--times`` from the ``--write-times`` file of
  another machine, e.g. a GPU node): the real training step (``hpcnoise.step.train_step``, W = 1, random
  data of the dataset's shape at the LOCAL batch, the regime's statistics refreshed at every step, i.e.
  ``fisher_every = 1``), timed in phases: forward, backward, and "after" (everything the step does after
  backward on one worker: finishing the reduction, the noise, the optimiser). For every parameter the
  moment its gradient is ready is stamped by a post-accumulate-grad hook. On a GPU the stamps are CUDA
  events (no synchronisation inside the step). Each time is the median over ``--repeats`` steps after
  ``WARMUP`` warm-up steps. CPU compute is one to two orders of magnitude slower than a GPU's and makes
  communication look cheap: feed GPU times (``--times``) for predictions that mean anything at scale.
- Buckets: the gradients in reverse parameter order (the order backward produces them), a new bucket when
  the next gradient would take the current one past the cap: ``--bucket-mb`` MiB (default 25 MiB, DDP's
  ``bucket_cap_mb``) or 1/``--min-buckets`` of all the gradients (default 16), whichever is smaller, as
  the training step splits them (hpcnoise.buckets; a gradient larger than the cap gets a bucket of its
  own). Every bucket pays the latency term: ``--min-buckets 1`` models few large buckets. A bucket is
  ready when its last gradient is. Per-parameter curvature sums ride in the buckets with their
  parameters' gradients (``diagf``'s diagonal-Fisher sums, as large as the gradients: its buckets carry
  twice the bytes). The step's other tensors (the batch-norm statistic sums, the loss/error/stop counts,
  K-FAC factors) form one last bucket, ready when backward ends, as the training step's bucketed
  reduction sends them (one more collective after backward).
- Allreduce time, alpha-beta (Hockney) model of a ring of p ranks, latency alpha per step, bandwidth beta
  (NCCL's "bus bandwidth"), n bytes:

      ring(n, p, alpha, beta) = 2 (p - 1) alpha + 2 (p - 1) / p * n / beta

  and two-level on W = N nodes x G GPUs (reduce-scatter inside each node, G concurrent rings across the
  N nodes, each over n / G bytes and sharing the node's network bandwidth, all-gather inside each node;
  the two intra-node halves add up to one intra-node ring):

      T(n, W) = ring(n, min(W, G), alpha_intra, beta_intra) + ring(n, N, alpha_inter, beta_inter_node)

  with N = 1 for W <= G (W must be at most G or a multiple of it), and T(n, 1) = 0.
- Step, from the bucket sizes n_k, ready times r_k (from the start of the step) and t_fb = forward +
  backward:
      without overlap   T_step(W) = t_fb + sum_k T(n_k, W) + t_after
      with overlap      buckets reduced one at a time, in order, each once it is ready and the previous
                        one is done: s_k = max(r_k, e_{k-1}), e_k = s_k + T(n_k, W);
                        T_step(W) = max(t_fb, e_last) + t_after
  Weak scaling (the local batch fixed): efficiency(W) = T_step(1) / T_step(W), T_step(1) = t_fb + t_after.

What the model leaves out: contention between communication and compute (kernels, memory bandwidth),
the reduction arithmetic (folded into beta), per-collective framework costs (Horovod's negotiation and
cycle time), stragglers and jitter, network oversubscription and topology, and NCCL's tree algorithms
(at many nodes NCCL uses trees, whose latency grows as log N, so the ring's 2 (N - 1) alpha_inter
overstates the latency of small buckets). Gradients are sent as float32, uncompressed.

The command line (its options, checks and table): hpcnoise.cli.bench.scaling.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from hpcnoise.benchmarks.common import bench_config
from hpcnoise.benchmarks.network import Network
from hpcnoise.buckets import assign
from hpcnoise.comm import Comm
from hpcnoise.errors import ConfigError
from hpcnoise.files import git_hash, write_json_atomic
from hpcnoise.models import build_model
from hpcnoise.regimes import REGIMES
from hpcnoise.statistics import STATISTICS
from hpcnoise.step import Net, PhaseTimer, StepInput, make_step_parts, train_step
from hpcnoise.workload import dataset_shape

WARMUP = 2  # untimed steps first: the first pays allocation and kernel selection
TIMES_FORMAT = "hpcnoise-scaling-times-v1"


# --- measured compute ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ParamTime:
    name: str
    nbytes: int  # its gradient's bytes
    ready_s: float  # when its gradient is ready, from the start of the step


@dataclass(frozen=True)
class Measurement:
    """One (model, regime)'s compute on one worker: what the model needs, and what ``--times`` files hold."""

    model: str
    regime: str
    batch: int  # the local batch
    forward_s: float
    backward_s: float
    after_s: float  # after backward: finishing the reduction, the noise, the optimiser step
    params: tuple[ParamTime, ...]  # in parameter order
    rest_bytes: int  # the step's tensors besides the gradients: batch-norm sums, counts, curvature statistics

    @property
    def backward_end_s(self) -> float:
        return self.forward_s + self.backward_s

    @property
    def compute_s(self) -> float:
        """The step on one worker, without communication: T_step(1)."""
        return self.forward_s + self.backward_s + self.after_s


class _Clock:
    """Time stamps: wall time on the CPU, CUDA events on a GPU (read after one synchronisation)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def mark(self) -> Any:
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def seconds(self, start: Any, end: Any) -> float:
        if not self.cuda:
            return float(end - start)
        end.synchronize()
        return float(start.elapsed_time(end)) / 1e3


class _Laps(PhaseTimer):
    """The step's phase ends as time stamps (``train_step`` calls ``lap`` at the end of each phase)."""

    def __init__(self, clock: _Clock):
        super().__init__(torch.device("cpu"))
        self.clock = clock
        self.marks: dict[str, Any] = {}

    def lap(self, phase: str) -> None:
        self.marks[phase] = self.clock.mark()


def _rest_bytes(net: Net, statistics_names: frozenset[str], counts_bytes: int) -> int:
    """Bytes of the step's tensors other than the gradients (after a step: the hooks hold its sums)."""
    total = counts_bytes  # loss sum, error count, stop flag
    total += sum(bn.stat_sums.numel() * bn.stat_sums.element_size() for bn in net.norms if bn.stat_sums is not None)
    for name in sorted(statistics_names):
        assert net.hooks is not None
        total += sum(t.numel() * t.element_size() for t in STATISTICS[name].pack(net.hooks))
    return total


def measure(model: str, regime: str, batch: int, repeats: int, comm: Comm) -> Measurement:
    """Time ``repeats`` training steps of ``model`` under ``regime`` on one worker (after WARMUP more)."""
    cfg = replace(bench_config(model, regime, batch, 1, 0), device=comm.device.type)
    reg = REGIMES[regime]
    in_shape, classes = dataset_shape(cfg.dataset)
    network = build_model(model, in_shape, classes, ghost_size=cfg.ghost_size, bn_momentum=cfg.bn_momentum)
    network = network.to(comm.device)
    parts = make_step_parts(cfg, comm, network, buckets=True)  # the step's layout on several workers
    net = parts.net
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, *in_shape, generator=gen).to(comm.device)
    y = torch.randint(classes, (batch,), generator=gen).to(comm.device)
    ghosts = batch // cfg.ghost_size
    inp = StepInput(step=0, lr=cfg.lr, x=x, y=y, global_batch=batch, ghosts=ghosts, noise_on=True, stop=False)
    clock = _Clock(comm.device)
    laps = _Laps(clock)
    forward_end: list[Any] = [None]
    ready: list[Any] = [None] * len(net.params)

    def on_grad(i: int) -> Any:
        return lambda p: ready.__setitem__(i, clock.mark())

    handles = [network.register_forward_hook(lambda m, a, out: forward_end.__setitem__(0, clock.mark()))]
    handles += [p.register_post_accumulate_grad_hook(on_grad(i)) for i, p in enumerate(net.params)]
    cache: dict[str, Any] = {}
    state: dict[str, Any] = {}
    forwards, backwards, ends, readies = [], [], [], []  # seconds from the start of each timed step
    try:
        for r in range(WARMUP + repeats):
            ready[:] = [None] * len(ready)
            start = clock.mark()
            train_step(parts, inp, cache, state, laps)
            if r < WARMUP:
                continue
            forwards.append(clock.seconds(start, forward_end[0]))
            backwards.append(clock.seconds(start, laps.marks["forward_backward"]))
            ends.append(clock.seconds(start, laps.marks["optimizer"]))
            readies.append([backwards[-1] if t is None else clock.seconds(start, t) for t in ready])  # None: unused
        rest = _rest_bytes(net, reg.statistics, 3 * x.element_size())
    finally:
        for h in handles:
            h.remove()
        net.detach()
    # Medians of the time stamps, then differences: each stamp precedes the next in every step, so
    # their medians do too (every gradient is ready by the median end of backward).
    forward, backward, end = (statistics.median(v) for v in (forwards, backwards, ends))
    params = tuple(
        ParamTime(name, p.numel() * p.element_size(), statistics.median(t[i] for t in readies))
        for i, (name, p) in enumerate(network.named_parameters())
    )
    return Measurement(model, regime, batch, forward, backward - forward, end - backward, params, rest)


# --- buckets and the step ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Bucket:
    params: tuple[int, ...]  # parameter indices (empty: the last bucket of the step's other tensors)
    nbytes: int
    ready_s: float


def buckets_of(m: Measurement, cap_bytes: int, min_buckets: int) -> list[Bucket]:
    """The step's collectives in order: the gradient buckets, each with the per-parameter curvature sums
    of its parameters (diagonal Fisher, signed sums), then the one of the step's other tensors."""
    riding = sum(STATISTICS[s].per_parameter for s in REGIMES[m.regime].statistics)
    out = [
        Bucket(tuple(b), (1 + riding) * sum(m.params[i].nbytes for i in b), max(m.params[i].ready_s for i in b))
        for b in assign([p.nbytes for p in m.params], cap_bytes, min_buckets)
    ]
    rest = m.rest_bytes - riding * sum(p.nbytes for p in m.params)
    return [*out, Bucket((), rest, m.backward_end_s)]


def pipeline_end(ready_s: Sequence[float], comm_s: Sequence[float]) -> float:
    """When the last of the buckets, reduced one at a time in order, each once it is ready and the
    previous one is done, is summed: s_k = max(r_k, e_{k-1}), e_k = s_k + T_k."""
    end = 0.0
    for ready, duration in zip(ready_s, comm_s, strict=True):
        end = max(ready, end) + duration
    return end


def step_s(
    buckets: Sequence[Bucket], backward_end_s: float, after_s: float, comm_s: Sequence[float]
) -> tuple[float, float]:
    """(T_step without overlap, T_step with overlap) given each bucket's allreduce seconds ``comm_s``."""
    plain = backward_end_s + sum(comm_s) + after_s
    overlapped = max(backward_end_s, pipeline_end([b.ready_s for b in buckets], comm_s)) + after_s
    return plain, overlapped


def predict(
    m: Measurement, network: Network, workers: Sequence[int], cap_bytes: int, min_buckets: int
) -> list[dict[str, Any]]:
    """One row per world size: bytes, times and the weak-scaling efficiency without and with overlap."""
    buckets = buckets_of(m, cap_bytes, min_buckets)
    rows = []
    for w in workers:
        comm = [network.allreduce_s(b.nbytes, w) for b in buckets]
        plain, overlapped = step_s(buckets, m.backward_end_s, m.after_s, comm)
        rows.append(
            {
                "model": m.model,
                "regime": m.regime,
                "W": w,
                "nodes": network.nodes(w),
                "buckets": len(buckets),
                "MB/step": sum(b.nbytes for b in buckets) / 1e6,
                "compute ms": 1e3 * m.compute_s,
                "comm ms": 1e3 * sum(comm),
                "step ms": 1e3 * plain,
                "step ms overlap": 1e3 * overlapped,
                "eff": m.compute_s / plain,
                "eff overlap": m.compute_s / overlapped,
            }
        )
    return rows


# --- times files ---------------------------------------------------------------------------------------


def write_times(path: Path, measurements: Sequence[Measurement], facts: dict[str, Any]) -> None:
    write_json_atomic(path, {"format": TIMES_FORMAT, **facts, "measurements": [asdict(m) for m in measurements]})


def _measurement(d: Any) -> Measurement:
    """A Measurement from its JSON form; KeyError, TypeError or ValueError when it is not one."""
    params = tuple(ParamTime(str(p["name"]), int(p["nbytes"]), float(p["ready_s"])) for p in d["params"])
    m = Measurement(
        str(d["model"]),
        str(d["regime"]),
        int(d["batch"]),
        float(d["forward_s"]),
        float(d["backward_s"]),
        float(d["after_s"]),
        params,
        int(d["rest_bytes"]),
    )
    numbers = [m.forward_s, m.backward_s, m.after_s, *(p.ready_s for p in params)]
    if not params or not all(math.isfinite(v) and v >= 0 for v in numbers) or min(p.nbytes for p in params) < 0:
        raise ValueError(f"{m.model}/{m.regime}: times must be finite and >= 0, sizes >= 0, parameters non-empty")
    return m


def read_times(path: Path) -> tuple[list[Measurement], dict[str, Any]]:
    """The measurements and facts of a ``--write-times`` file; ConfigError saying why it is not one."""
    try:
        blob = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        reason = getattr(e, "strerror", None) or (str(e).splitlines() or [type(e).__name__])[0]
        raise ConfigError(f"--times {str(path)!r} is not readable JSON ({reason})") from e
    if not isinstance(blob, dict) or blob.get("format") != TIMES_FORMAT:
        raise ConfigError(f"--times {str(path)!r} is not a file written by --write-times (format {TIMES_FORMAT})")
    try:
        measurements = [_measurement(d) for d in blob["measurements"]]
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"--times {str(path)!r} holds a malformed measurement ({type(e).__name__}: {e})") from e
    return measurements, {k: v for k, v in blob.items() if k not in ("format", "measurements")}


def measure_here(
    pairs: Sequence[tuple[str, str]], batch: int, repeats: int, comm: Comm
) -> tuple[list[Measurement], dict[str, Any]]:
    """Each (model, regime) of ``pairs`` measured on this machine, and the facts a times file records
    with them (device, batch, repeats, git hash, versions)."""
    measurements = [measure(model, regime, batch, repeats, comm) for model, regime in pairs]
    versions = comm.versions()
    device = versions["gpu"] if comm.device.type == "cuda" else f"cpu, torch threads {torch.get_num_threads()}"
    facts = {"device": device, "batch": batch, "repeats": repeats, "warmup": WARMUP, "git": git_hash()}
    return measurements, facts | versions
