"""The step's distributed semantics, in-process and without a launcher (float64, milliseconds per case).

The property (hpcnoise.step's module docstring): for a global batch of M samples split into W contiguous
shards of m = M / W, running (a) ``local_contribution`` on W identical replicas (one shard each, each
replica with its own hooks), adding the W groups elementwise (what the fused allreduce does), and then
running (b) ``finish`` with workers=W and (c) ``update`` with the regime's noise from the (seed, step)
stream gives the same step as ONE replica holding the whole batch (W = 1). Why it holds:

- every group is a SUM over samples: the grad group is m * (local mean gradient), since the mean over
  the global batch is (1/W) sum_r (local mean_r) when all shards have m samples; the hooks undo the
  local 1/m, so the statistic groups are sums of per-sample quantities (sum g_i^2, sum sigma_i g_i,
  the K-FAC factor sums) and ``unpack`` normalises by M; the bn group is the sum over ghost batches of
  ghost means and variances, and ``finish`` divides by the number of ghost batches of the GLOBAL batch;
- the Rademacher signs are drawn for the whole global batch and each rank takes its slice, so sample i
  gets the same sign for every W; the noise generator is keyed by (seed, step) only;
- batch norm couples the samples of one ghost batch only. With ghost BN (ghost_size dividing m) the
  ghost batches are the same M / ghost_size groups of samples for every W. Plain BN normalises over
  each worker's local batch, so W shards of plain BN equal ONE worker with ghost_size = m (both use the
  same W groups of samples), but NOT one worker with plain BN over all M samples (see the sensitivity
  tests): for plain BN the trajectory depends on W, by design.

So after each step the parameters, the BN running statistics, the momentum buffers, g_LB, the
normalised statistics (diag F, signed sums, K-FAC factors), the regime state (K-FAC square roots), the
noise and the loss/error sums agree with the W = 1 step up to float rounding (only the order of the
sums differs): to 1e-12 relative (per tensor, relative to its largest entry) in float64. The W replicas
of one run are bit-identical (torch.equal): each runs (b) and (c) on the same summed tensors.
Several consecutive steps are run, including steps at which ``fisher_every`` / ``kfac_every`` make a
statistic cached rather than refreshed (``due_statistics``).
"""

from __future__ import annotations

import copy
import functools
import threading
from dataclasses import dataclass, field, replace
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from hpcnoise.comm import Comm
from hpcnoise.config import Config
from hpcnoise.curvature import KFactors
from hpcnoise.models import GhostBatchNorm, build_model, cnn1d, mlp
from hpcnoise.regimes import REGIMES, NoiseInput
from hpcnoise.seeding import generator
from hpcnoise.statistics import STATISTICS
from hpcnoise.step import (
    Groups,
    Net,
    PhaseTimer,
    StepInput,
    StepParts,
    due_statistics,
    finish,
    local_contribution,
    make_optimizer,
    rademacher,
    rank_signs,
    train_step,
    update,
)
from hpcnoise.workload import validate
from tests.helpers.regimes import ALTERNATE

IN_SHAPE, CLASSES = (40,), 10  # MNIST-1D's shape
STEPS = 3
SEED = 7
CPU = torch.device("cpu")
RTOL = 1e-12  # per tensor: max |a - b| <= RTOL * max |b|


@dataclass(frozen=True)
class Case:
    """One configuration of the comparison."""

    regime: str
    model: str = "mlp"
    width: int | None = 8  # hidden width / channels of the tiny network; None: build_model's defaults
    ghost_bn: bool = True
    ghost_size: int = 4
    sync_bn: bool = False  # without ghost BN: global batch norm (the default of Config) or local (here)
    fisher_every: int = 1
    kfac_every: int = 1
    placement: str = "gradient"
    conv_mode: str = "exact"
    bucket_bytes: int | None = None  # gradient buckets of this many bytes in train_step (None: fused)

    def config(self) -> Config:
        return Config(
            regime=self.regime,
            model=self.model,
            batch_size=32,  # M_L
            small_batch=16,  # M_S: `sb`'s batch and `batchchange`'s batch in its first epoch
            batchchange_epochs=1,
            ghost_bn=self.ghost_bn,
            ghost_size=self.ghost_size,
            sync_bn=self.sync_bn,
            fisher_every=self.fisher_every,
            kfac_every=self.kfac_every,
            noise_placement=self.placement,
            conv_mode=self.conv_mode,
            lr=0.1,
            momentum=0.9,
            weight_decay=5e-4,
            dtype="float64",
            device="cpu",
            seed=SEED,
        )

    def global_batch(self) -> int:
        """The regime's global batch in epoch 0 (taken as given; ``batchchange`` starts with M_S)."""
        return REGIMES[self.regime].batch(self.config(), 0)


# Every regime of REGIMES, with ghost BN; diag F and K-FAC also with cached steps and on the CNN.
CASES = {
    "sb": Case("sb"),
    "lb": Case("lb"),
    "diagf": Case("diagf"),
    "diagf-fisher_every2": Case("diagf", fisher_every=2),
    "diagf-parameter-noise": Case("diagf", placement="parameter"),
    "diagf-cnn1d": Case("diagf", model="cnn1d"),
    "diagf-cnn1d-spatial": Case("diagf", model="cnn1d", conv_mode="spatial"),
    "trace": Case("trace", fisher_every=2),
    "multiplicative": Case("multiplicative"),
    "fullf": Case("fullf"),
    "fullf-cnn1d": Case("fullf", model="cnn1d"),
    "kfac-kfac_every2": Case("kfac", kfac_every=2),
    "kfac-cnn1d-fisher_every2": Case("kfac", model="cnn1d", fisher_every=2),
    "batchchange": Case("batchchange"),
    ALTERNATE: Case(ALTERNATE),  # the tests' own regime (tests.helpers.regimes)
}
assert {c.regime for c in CASES.values()} == set(REGIMES), "every regime must be covered"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors gain nothing from intra-op threads, and on a busy 2-core machine they cost 10x."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def initial_model(case: Case) -> nn.Module:
    """The case's network in float64, from a fixed seed (its weights do not depend on ghost_size)."""
    ghost = case.ghost_size if case.ghost_bn else 0
    if case.width is None:
        return build_model(case.model, IN_SHAPE, CLASSES, ghost_size=ghost, seed=SEED).double()

    def norm(c: int) -> nn.Module:
        return GhostBatchNorm(c, ghost_size=ghost)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        return {"mlp": mlp, "cnn1d": cnn1d}[case.model](IN_SHAPE, CLASSES, norm, width=case.width).double()


def batches(case: Case) -> list[tuple[Tensor, Tensor]]:
    """STEPS global batches of synthetic MNIST-1D-shaped samples (a new batch every step)."""
    gen = torch.Generator().manual_seed(123)
    m = case.global_batch()
    return [
        (torch.randn(m, *IN_SHAPE, generator=gen, dtype=torch.float64), torch.randint(0, CLASSES, (m,), generator=gen))
        for _ in range(STEPS)
    ]


def ghost_count(cfg: Config, global_batch: int, workers: int) -> int:
    """Ghost batches in the global batch, as hpcnoise.train builds StepInput.ghosts."""
    return global_batch // (cfg.ghost_size if cfg.ghost_bn else global_batch // workers)


def comm(rank: int, size: int) -> Comm:
    return Comm(rank=rank, size=size, local_rank=0, launcher="none", device=CPU)


@dataclass(frozen=True)
class Fault:
    """A deliberate mistake in the composition, for the sensitivity tests (the default: none)."""

    finish_workers: int | None = None  # workers passed to finish (None: W)
    scale: tuple[str, float] | None = None  # (group, factor): e.g. average the diag-F sums over W
    same_signs: bool = False  # every rank uses the first m signs of the stream (not its own slice)
    local_ghosts: bool = False  # finish divides by the ghost batches of ONE worker


@dataclass
class Replica:
    net: Net
    opt: torch.optim.Optimizer
    cache: dict[str, Any] = field(default_factory=dict)
    state: dict[str, Any] = field(default_factory=dict)
    steps: list[dict[str, Tensor]] = field(default_factory=list)  # what each step produced
    refreshed: list[frozenset[str]] = field(default_factory=list)


def replicas(case: Case, workers: int) -> tuple[Config, list[Replica]]:
    """W deep copies of the case's initial network, each with its own hooks and optimiser."""
    cfg = case.config()
    validate(cfg, workers)
    model = initial_model(case)
    regime = REGIMES[cfg.regime]
    out = []
    for _ in range(workers):
        replica = copy.deepcopy(model)
        mb = case.bucket_bytes / 2**20 if case.bucket_bytes is not None else None
        net = Net.attach(replica, regime.statistics, cfg.conv_mode, bucket_mb=mb)
        out.append(Replica(net, make_optimizer(cfg, replica)))
    return cfg, out


def flat_statistics(prefix: str, values: dict[str, Any]) -> dict[str, Tensor]:
    """Statistics or regime state as named tensors (K-FAC factors and square roots split into A and G)."""
    out: dict[str, Tensor] = {}
    for name, value in sorted(values.items()):
        for i, v in enumerate(value):
            if isinstance(v, KFactors):
                out[f"{prefix}.{name}.{i}.A"], out[f"{prefix}.{name}.{i}.G"] = v.A.clone(), v.G.clone()
            elif isinstance(v, tuple):  # kfac_sqrt: (A^1/2, G^1/2, layer)
                out[f"{prefix}.{name}.{i}.A"], out[f"{prefix}.{name}.{i}.G"] = v[0].clone(), v[1].clone()
            else:
                out[f"{prefix}.{name}.{i}"] = v.clone()
    return out


def model_state(r: Replica) -> dict[str, Tensor]:
    """Parameters, BN running statistics and momentum buffers after a step."""
    out = {f"param.{k}": v.detach().clone() for k, v in r.net.model.named_parameters()}
    out |= {f"buffer.{k}": v.clone() for k, v in r.net.model.named_buffers()}
    for i, p in enumerate(r.net.params):
        out[f"momentum.{i}"] = r.opt.state[p]["momentum_buffer"].clone()
    return out


def record(r: Replica, refresh: frozenset[str], loss_sum: float, errors: float, g_lb, noise) -> None:
    rec = {"loss_sum": torch.as_tensor(loss_sum, dtype=torch.float64), "errors": torch.as_tensor(errors)}
    rec |= {f"g_lb.{i}": g for i, g in enumerate(g_lb)}
    rec |= {f"noise.{i}": z.clone() for i, z in enumerate(noise or [])}
    rec |= flat_statistics("stat", r.cache) | flat_statistics("state", r.state) | model_state(r)
    r.steps.append(rec)
    r.refreshed.append(refresh)


def sum_groups(groups: list[Groups]) -> Groups:
    """Elementwise sum over workers, in rank order: what the fused allreduce computes."""
    return {name: [functools.reduce(torch.add, ts) for ts in zip(*(g[name] for g in groups))] for name in groups[0]}


@functools.cache
def run_shards(case: Case, workers: int, fault: Fault = Fault()) -> tuple[Replica, ...]:
    """STEPS steps of W replicas by (a) on each shard, the sum of the groups, (b) and (c) on every replica.

    Returns the replicas, each with what every step produced (``Replica.steps``). Cached: read only.
    """
    cfg, reps = replicas(case, workers)
    regime = REGIMES[cfg.regime]
    lr = cfg.lr * regime.lr_factor(cfg, 0)
    noise_on = regime.noise is not None
    for step, (x, y) in enumerate(batches(case)):
        big_m = len(y)
        m = big_m // workers
        refresh = [due_statistics(regime, cfg, step, r.cache) if noise_on else frozenset() for r in reps]
        assert all(f == refresh[0] for f in refresh)
        signed = any(STATISTICS[s].needs_signs for s in refresh[0])
        groups = []
        for rank, r in enumerate(reps):
            signs = None
            if signed:
                signs = rank_signs(cfg, step, big_m, comm(rank, workers), x.dtype)
                if fault.same_signs:
                    signs = rademacher(generator(cfg.seed, "rademacher", step), m, CPU, x.dtype)
            shard = slice(rank * m, (rank + 1) * m)  # contiguous, as hpcnoise.data.local_share
            groups.append(local_contribution(r.net, x[shard], y[shard], refresh[rank], signs))
        summed = sum_groups(groups)
        if fault.scale is not None and fault.scale[0] in summed:
            summed[fault.scale[0]] = [t * fault.scale[1] for t in summed[fault.scale[0]]]
        ghosts = ghost_count(cfg, big_m, workers)
        if fault.local_ghosts:
            ghosts //= workers
        for r, fresh in zip(reps, refresh):
            mine = {name: [t.clone() for t in ts] for name, ts in summed.items()}  # each rank's own buffer
            reduced = finish(r.net, mine, fault.finish_workers or workers, big_m, ghosts, r.cache)
            g_lb = [g.clone() for g in reduced.grads]
            noise = None
            if noise_on:
                gen = generator(cfg.seed, "noise", step)
                noise = regime.noise(NoiseInput(cfg, reduced.grads, r.cache, gen, r.state, fresh))
            update(r.net, r.opt, cfg, lr, reduced.grads, noise)
            record(r, fresh, reduced.loss_sum, reduced.errors, g_lb, noise)
    for r in reps:
        r.net.detach()
    return tuple(reps)


@dataclass
class ThreadedComm(Comm):
    """A Comm whose allreduce sums the ranks' buffers in rank order, the ranks being threads of one process."""

    world: Any = None  # (threading.Barrier, slots)

    def allreduce_sum_(self, flat: Tensor, name: str = "") -> Tensor:
        barrier, slots = self.world
        slots[self.rank] = flat
        barrier.wait()
        total = functools.reduce(torch.add, slots)
        barrier.wait()  # everyone has read every buffer before any is overwritten
        return flat.copy_(total)

    def allreduce_sum_async_(self, flat: Tensor, name: str) -> Any:
        self.allreduce_sum_(flat, name)  # at once: the ranks start the same buckets in the same order
        return None


def run_train_step(case: Case, workers: int) -> tuple[Replica, ...]:
    """The same steps through ``train_step`` itself: W ranks as threads joined by ThreadedComm (W = 1:
    the plain single-process Comm, whose allreduce is a no-op)."""
    cfg, reps = replicas(case, workers)
    regime = REGIMES[cfg.regime]
    data = batches(case)
    world = (threading.Barrier(workers, timeout=60), [None] * workers)
    errors: list[BaseException] = []

    def rank_main(rank: int) -> None:
        r = reps[rank]
        c = ThreadedComm(rank, workers, 0, "none", CPU, world=world) if workers > 1 else comm(0, 1)
        t = StepParts(cfg, c, regime, r.net, r.opt)
        try:
            for step, (x, y) in enumerate(data):
                m = len(y) // workers
                inp = StepInput(
                    step=step,
                    lr=cfg.lr * regime.lr_factor(cfg, 0),
                    x=x[rank * m : (rank + 1) * m],
                    y=y[rank * m : (rank + 1) * m],
                    global_batch=len(y),
                    ghosts=ghost_count(cfg, len(y), workers),
                    noise_on=regime.noise is not None,
                    stop=False,
                )
                out = train_step(t, inp, r.cache, r.state, PhaseTimer(CPU), keep_g_lb=True)
                red = out.reduced
                record(r, out.refreshed, red.loss_sum, red.errors, out.g_lb, out.noise)
        except BaseException as e:
            errors.append(e)
            world[0].abort()

    threads = [threading.Thread(target=rank_main, args=(rank,)) for rank in range(workers)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=120)
    assert not any(th.is_alive() for th in threads), "a rank hung"
    if errors:
        raise errors[0]
    for r in reps:
        r.net.detach()
    return tuple(reps)


def rel_diffs(a: Replica, b: Replica) -> dict[str, float]:
    """max |a - b| / max |b| for every tensor of every step (same names and shapes required)."""
    assert len(a.steps) == len(b.steps) == STEPS
    assert a.refreshed == b.refreshed
    out = {}
    for s, (ra, rb) in enumerate(zip(a.steps, b.steps)):
        assert ra.keys() == rb.keys(), f"step {s}: {sorted(ra.keys() ^ rb.keys())}"
        for k in ra:
            assert ra[k].shape == rb[k].shape, (s, k)
            scale = rb[k].abs().max().item()
            diff = (ra[k] - rb[k]).abs().max().item()
            out[f"step{s}.{k}"] = diff / scale if scale > 0 else diff
    return out


def assert_close_replica(a: Replica, b: Replica, rtol: float = RTOL) -> None:
    bad = {k: v for k, v in rel_diffs(a, b).items() if not v <= rtol}
    assert not bad, f"{len(bad)} tensors differ by more than {rtol:g}: {dict(list(bad.items())[:8])}"


def assert_equal_replica(a: Replica, b: Replica) -> None:
    assert a.refreshed == b.refreshed
    for s, (ra, rb) in enumerate(zip(a.steps, b.steps, strict=True)):
        assert ra.keys() == rb.keys()
        for k in ra:
            assert torch.equal(ra[k], rb[k]), f"step {s}: {k} not bit-identical"


def expected_refresh(case: Case) -> list[frozenset[str]]:
    """The statistics recomputed at each step, from the schedule (every step at step 0)."""
    regime = REGIMES[case.regime]
    every = {"diag_fisher": case.fisher_every, "kfac": case.kfac_every, "signed_sum": 1}
    if regime.noise is None:
        return [frozenset()] * STEPS
    return [frozenset(s for s in regime.statistics if step % every[s] == 0) for step in range(STEPS)]


def tolerance(case: Case) -> float:
    """K-FAC takes matrix square roots of singular factors (the softmax output gradients sum to zero, and
    a layer may have more inputs than the batch has samples): sqrt is not Lipschitz at a zero eigenvalue,
    so rounding-level differences of a factor's zero eigenvalues become ~1e-8 relative differences of the
    square roots, the noise and from then on everything (observed: <= 5e-8). Its factors, diag F, g_LB
    and the BN statistics of step 0 (before any noise) are still checked at RTOL."""
    return 1e-6 if case.regime == "kfac" else RTOL


@pytest.mark.parametrize("workers", [2, 4])
@pytest.mark.parametrize("name", list(CASES))
def test_shards_match_one_worker(name: str, workers: int) -> None:
    """W shards summed, then (b) and (c), equal one worker holding the global batch; replicas bit-identical."""
    case = CASES[name]
    one, *_ = run_shards(case, 1)
    reps = run_shards(case, workers)
    assert one.refreshed == expected_refresh(case)
    assert_close_replica(reps[0], one, tolerance(case))
    if case.regime == "kfac":  # before the first noise every tensor meets RTOL
        step0 = {k: v for k, v in rel_diffs(reps[0], one).items() if k.startswith("step0.") and "noise" not in k}
        step0 = {k: v for k, v in step0.items() if "kfac_sqrt" not in k and "param" not in k and "momentum" not in k}
        assert step0 and max(step0.values()) <= RTOL, step0
    for r in reps[1:]:
        assert_equal_replica(r, reps[0])
    # the comparison is not vacuous: the noise is on where the regime has one, and the parameters move
    noise_keys = [k for k in one.steps[0] if k.startswith("noise.")]
    assert bool(noise_keys) == (REGIMES[case.regime].noise is not None)
    assert any(torch.sum(z.abs()) > 0 for k, z in one.steps[0].items() if k.startswith("noise.")) or not noise_keys
    init = {f"param.{k}": v for k, v in initial_model(case).named_parameters()}
    assert all(not torch.equal(one.steps[-1][k], v) for k, v in init.items())


def test_registered_network() -> None:
    """The same for build_model's MLP (2 x 512 units) on two workers."""
    case = Case("diagf", width=None)
    one, *_ = run_shards(case, 1)
    reps = run_shards(case, 2)
    assert_close_replica(reps[0], one)
    assert_equal_replica(reps[1], reps[0])
    assert sum(p.numel() for p in initial_model(case).parameters()) > 250_000


@pytest.mark.parametrize("name", ["diagf-fisher_every2", "trace", "kfac-kfac_every2", "kfac-cnn1d-fisher_every2"])
def test_cached_statistics_are_reused(name: str) -> None:
    """At a step where a statistic is not due, the cache keeps the last refresh's value, bit for bit."""
    case = CASES[name]
    for r in (run_shards(case, 1)[0], run_shards(case, 2)[0]):
        for step in range(1, STEPS):
            for stat in REGIMES[case.regime].statistics - r.refreshed[step]:
                keys = [k for k in r.steps[step] if k.startswith(f"stat.{stat}.")]
                assert keys
                for k in keys:
                    assert torch.equal(r.steps[step][k], r.steps[step - 1][k]), (step, k)
            for stat in r.refreshed[step]:
                k = next(k for k in r.steps[step] if k.startswith(f"stat.{stat}."))
                assert not torch.equal(r.steps[step][k], r.steps[step - 1][k]), (step, k)


PLAIN_BN = {
    "diagf": Case("diagf", ghost_bn=False),
    "kfac": Case("kfac", ghost_bn=False, kfac_every=2),
    "fullf-cnn1d": Case("fullf", model="cnn1d", ghost_bn=False),
}


@pytest.mark.parametrize("workers", [2, 4])
@pytest.mark.parametrize("name", list(PLAIN_BN))
def test_plain_batch_norm_matches_one_worker_with_local_ghosts(name: str, workers: int) -> None:
    """Without ghost BN each worker normalises over its own m samples (ghosts = W), which equals ONE
    worker with ghost BN of ghost_size = m: the same W groups of samples are normalised together."""
    case = PLAIN_BN[name]
    m = case.global_batch() // workers
    one = run_shards(replace(case, ghost_bn=True, ghost_size=m), 1)[0]
    reps = run_shards(case, workers)
    assert_close_replica(reps[0], one, tolerance(case))
    for r in reps[1:]:
        assert_equal_replica(r, reps[0])


GLOBAL_BN = {"sb": Case("sb", ghost_bn=False)} | PLAIN_BN
GLOBAL_BN = {name: replace(case, sync_bn=True) for name, case in GLOBAL_BN.items()}


@pytest.mark.parametrize("workers", [2, 4])
@pytest.mark.parametrize("name", list(GLOBAL_BN))
def test_global_batch_norm_matches_one_worker(name: str, workers: int) -> None:
    """With ``sync_bn`` (no ghost BN), W ranks through ``train_step`` (threads joined by ThreadedComm)
    normalise the GLOBAL batch: gradients, curvature statistics, noise and running statistics equal
    ONE worker's plain batch norm over all M samples, and the ranks stay bit-identical. (Without it
    they do not: ``test_plain_batch_norm_depends_on_world_size``.)"""
    case = GLOBAL_BN[name]
    one = run_shards(case, 1)[0]
    reps = run_train_step(case, workers)
    assert_close_replica(reps[0], one, tolerance(case))
    for r in reps[1:]:
        assert_equal_replica(r, reps[0])


@pytest.mark.parametrize("name", ["sb", "diagf", "fullf-cnn1d", "kfac-kfac_every2"])
@pytest.mark.parametrize("workers", [1, 2, 4])
def test_helper_is_train_step(name: str, workers: int) -> None:
    """``run_shards`` composes (a), (b), (c) exactly as ``train_step`` does, bit for bit: on one worker
    (the plain Comm, a no-op allreduce) and on W ranks run as threads whose allreduce sums the fused
    buffers in rank order, the order ``sum_groups`` adds the groups in (elementwise, so equal bits)."""
    case = CASES[name]
    mine = run_shards(case, workers)
    real = run_train_step(case, workers)
    for r in real:
        assert_equal_replica(r, mine[0])


@pytest.mark.parametrize("name", ["lb", "diagf", "fullf-cnn1d", "kfac-kfac_every2"])
@pytest.mark.parametrize("workers", [1, 2])
def test_gradient_buckets_equal_the_fused_collective(name: str, workers: int) -> None:
    """Gradients summed bucket by bucket during backward (buckets of 200 bytes: several per network,
    some parameters alone in theirs), with the per-parameter curvature sums in the same buckets, give the
    fused collective's step, bit for bit (m is a power of two: m^2 scales exactly before or after the sum)."""
    case = CASES[name]
    bucketed = replace(case, bucket_bytes=200)
    assert len(replicas(bucketed, 1)[1][0].net.buckets.members) > 3  # type: ignore[union-attr]
    fused = run_shards(case, workers)
    riding = sum(STATISTICS[s].per_parameter for s in REGIMES[case.regime].statistics)  # diag F, signed sums
    for r in run_train_step(bucketed, workers):
        assert_equal_replica(r, fused[0])
        # the last step's buckets carried the per-parameter curvature sums after the gradients
        assert r.net.buckets is not None
        assert sum(f.numel() for f in r.net.buckets.flats) == (1 + riding) * sum(p.numel() for p in r.net.params)


def test_rank_signs_are_slices_of_one_global_draw() -> None:
    cfg = Case("fullf").config()
    whole = rank_signs(cfg, 5, 32, comm(0, 1), torch.float64)
    assert set(whole.tolist()) == {-1.0, 1.0}
    for w in (2, 4):
        assert torch.equal(torch.cat([rank_signs(cfg, 5, 32, comm(r, w), torch.float64) for r in range(w)]), whole)
    assert not torch.equal(rank_signs(cfg, 6, 32, comm(0, 1), torch.float64), whole)  # new signs every step


# Each deliberate mistake, the case it shows in, and the tensors it must visibly change (> 1e-3).
FAULTS = {
    "finish-with-workers-1": ("diagf", Fault(finish_workers=1), "g_lb."),
    "diag-F-averaged-over-W": ("diagf", Fault(scale=("diag_fisher", 0.5)), "stat.diag_fisher."),
    "same-signs-on-every-rank": ("fullf", Fault(same_signs=True), "stat.signed_sum."),
    "ghost-count-of-one-worker": ("diagf", Fault(local_ghosts=True), "buffer."),
    "kfac-factors-averaged-over-W": ("kfac-kfac_every2", Fault(scale=("kfac", 0.5)), "stat.kfac."),
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_wrong_composition_is_detected(fault: str) -> None:
    """The comparison is sensitive: each mistake (on W = 2) leaves the tolerance far behind."""
    name, bad, prefix = FAULTS[fault]
    case = CASES[name]
    one = run_shards(case, 1)[0]
    diffs = rel_diffs(run_shards(case, 2, bad)[0], one)
    hit = {k: v for k, v in diffs.items() if k.split(".", 1)[1].startswith(prefix)}
    assert hit and max(hit.values()) > 1e-3, hit
    assert max(rel_diffs(run_shards(case, 2)[0], one).values()) <= tolerance(case)  # the control


@pytest.mark.parametrize("workers", [2, 4])
def test_plain_batch_norm_depends_on_world_size(workers: int) -> None:
    """Plain BN over m samples per worker is NOT BN over all M: W shards differ from one worker with
    plain BN, which is why the invariance above needs ghost BN (or ghost_size = m on the one worker)."""
    case = PLAIN_BN["diagf"]
    diffs = rel_diffs(run_shards(case, workers)[0], run_shards(case, 1)[0])
    assert max(v for k, v in diffs.items() if ".g_lb." in k) > 1e-3
    assert max(v for k, v in diffs.items() if ".buffer." in k and "running_var" in k) > 1e-3
