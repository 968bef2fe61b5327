"""Gradient buckets (hpcnoise.buckets): their assignment, their views, and that each bucket's sum
starts during backward, as soon as its last gradient has arrived."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hpcnoise.buckets import Buckets, assign
from hpcnoise.comm import Comm
from hpcnoise.curvature import CurvatureHooks


@dataclass
class LoggingComm(Comm):
    """Two "workers" whose sum doubles each bucket; logs when each collective starts and ends."""

    log: list[str] = field(default_factory=list)

    def allreduce_sum_async_(self, flat: Tensor, name: str) -> Any:
        self.log.append(f"start {name}")
        return (name, flat)

    def wait(self, handle: Any) -> None:
        name, flat = handle
        flat.mul_(2)
        self.log.append(f"done {name}")


def comm() -> LoggingComm:
    return LoggingComm(rank=0, size=2, local_rank=0, launcher="none", device=torch.device("cpu"))


def test_assignment_is_reverse_order_within_the_cap() -> None:
    params = [nn.Parameter(torch.zeros(n)) for n in (10, 30, 5, 50, 20)]  # float32: 4 bytes each
    sizes = [4 * p.numel() for p in params]
    buckets = assign(sizes, cap_bytes=160)  # 40 floats
    assert buckets == [[4], [3], [2, 1], [0]]  # 20 + 50 > 40; 50 alone; 5 + 30; 35 + 10 > 40
    assert sorted(i for b in buckets for i in b) == list(range(len(params)))
    for b in buckets:
        assert len(b) == 1 or sum(params[i].numel() * 4 for i in b) <= 160
    assert assign(sizes, cap_bytes=1) == [[4], [3], [2], [1], [0]]  # each larger than the cap: alone
    assert assign(sizes, cap_bytes=10**9) == [[4, 3, 2, 1, 0]]


def test_min_buckets_caps_each_bucket_at_a_share_of_the_gradients() -> None:
    sizes = [4 * n for n in (10, 30, 5, 50, 20)]  # 115 floats, 460 bytes
    assert assign(sizes, cap_bytes=10**9, min_buckets=1) == [[4, 3, 2, 1, 0]]
    # in bytes, reverse order: 80, 200, 20, 120, 40. min_buckets=4: at most 115 bytes, each alone
    assert assign(sizes, cap_bytes=10**9, min_buckets=4) == [[4], [3], [2], [1], [0]]
    # min_buckets=2: at most 230 bytes: 80 + 200 > 230; 200 + 20; + 120 > 230; 120 + 40
    assert assign(sizes, cap_bytes=10**9, min_buckets=2) == [[4], [3, 2], [1, 0]]
    assert assign(sizes, cap_bytes=160, min_buckets=2) == assign(sizes, cap_bytes=160)  # the smaller cap rules
    layout = Buckets([nn.Parameter(torch.zeros(n)) for n in (10, 30, 5, 50, 20)], 10**9, min_buckets=2)
    assert layout.members == [[4], [3, 2], [1, 0]]


def test_grads_are_views_and_buckets_start_during_backward() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    params = list(model.parameters())
    x = torch.randn(8, 6, requires_grad=True)  # so the first layer's full backward hook sees its input gradient
    reference = torch.autograd.grad(model(x).square().sum(), params)
    c = comm()
    buckets = Buckets(params, cap_bytes=4 * 20)  # 20 floats: [b3 w3 (15)], [b2 w2 (24)], [b1], [w1 (30)]
    assert len(buckets.members) >= 3
    model[0].register_full_backward_hook(lambda *_: c.log.append("first layer's backward"))
    buckets.arm(c)
    assert all(p.grad is not None and p.grad.data_ptr() == v.data_ptr() for p, v in zip(params, buckets.views))
    model(x).square().sum().backward()
    buckets.flush()
    summed = buckets.wait()
    first = c.log.index("first layer's backward")
    assert c.log.index("start hpcnoise.bucket0") < first  # the last layer's sum started before backward ended
    assert [e for e in c.log if e.startswith("start")] == [
        f"start hpcnoise.bucket{k}" for k in range(len(buckets.members))
    ]
    for p, g, ref in zip(params, summed, reference):
        assert p.grad is g
        torch.testing.assert_close(g, 2 * ref, rtol=0, atol=0)
    buckets.arm(c)  # the next step starts from zero, in the same buffers
    assert all(float(p.grad.abs().sum()) == 0 for p in params)  # type: ignore[union-attr]
    buckets.remove()


@dataclass
class SnapshotComm(LoggingComm):
    """Keeps a copy of each bucket as its collective starts."""

    snapshots: dict[str, Tensor] = field(default_factory=dict)

    def allreduce_sum_async_(self, flat: Tensor, name: str) -> Any:
        self.snapshots[name] = flat.clone()
        return super().allreduce_sum_async_(flat, name)


def test_curvature_sums_ride_with_their_gradients() -> None:
    """With ``extra=1`` every bucket holds its gradients, then the same parameters' curvature sums; the
    hooks have finished a layer's sums when its gradients arrive, so each bucket starts complete."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    params = list(model.parameters())
    x, y = torch.randn(8, 6), torch.randint(3, (8,))
    hooks = CurvatureHooks(model)
    with hooks.recording(8):  # the reference: the hooks' own buffer, scaled by m^2
        F.cross_entropy(model(x), y).backward()
    reference = [s.clone() for s in hooks.result()]
    c = SnapshotComm(rank=0, size=2, local_rank=0, launcher="none", device=torch.device("cpu"))
    buckets = Buckets(params, cap_bytes=4 * 20)
    (sums,) = buckets.arm(c, extra=1)
    assert [f.numel() for f in buckets.flats] == [2 * sum(params[i].numel() for i in b) for b in buckets.members]
    with hooks.recording(8, into={"sum_grad_squared": sums}):
        F.cross_entropy(model(x), y).backward()
    assert all(r is s for r, s in zip(hooks.result(), sums))  # the given tensors, left unscaled
    buckets.flush()
    for k, flat in enumerate(buckets.flats):
        assert torch.equal(c.snapshots[f"hpcnoise.bucket{k}"], flat)  # nothing was added after the start
    buckets.wait()  # the "sum over two workers" doubles gradients and curvature sums alike
    for s, ref, p in zip(sums, reference, params):
        assert s.shape == p.shape
        torch.testing.assert_close(s * 8**2, 2 * ref, rtol=1e-6, atol=0)
    assert buckets.arm(c) == []  # back to gradients alone
    assert sum(f.numel() for f in buckets.flats) == sum(p.numel() for p in params)
    with pytest.raises(ValueError, match="into: per-parameter quantities of this recording only"):
        with hooks.recording(8, into={"signed_sum": sums}):
            pass
    buckets.remove()
    hooks.remove()


def test_unused_parameter_is_flushed_as_zero() -> None:
    used, unused = nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(2))
    c = comm()
    buckets = Buckets([unused, used], cap_bytes=4)  # one bucket each; `unused` never gets a gradient
    buckets.arm(c)
    (used * 3).sum().backward()
    assert c.log == ["start hpcnoise.bucket0"]  # `used` (the last parameter) is bucket 0
    buckets.flush()
    assert c.log[-1] == "start hpcnoise.bucket1"
    g_unused, g_used = buckets.wait()
    assert torch.equal(g_used, torch.full((3,), 6.0)) and torch.equal(g_unused, torch.zeros(2))


def test_mixed_dtypes_are_refused() -> None:
    with pytest.raises(ValueError, match="one dtype and device"):
        Buckets([nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2, dtype=torch.float64))], 100)


def test_floor_carries_diag_fisher_bytes_and_leaves_lb_unchanged() -> None:
    """``bench step``'s floor runs lb's step with buckets as wide as diag F's (``floor.carry_sums``):
    the collective moves the gradients and one per-parameter sum each, and lb's result is unchanged."""
    from hpcnoise.benchmarks.floor import carry_sums
    from hpcnoise.benchmarks.step_compare import step_config
    from hpcnoise.models import build_model
    from hpcnoise.step import PhaseTimer, StepInput, make_step_parts, train_step

    cfg = step_config("mlp", "lb", 16, 1)
    torch.manual_seed(0)
    x, y = torch.randn(16, 40), torch.randint(0, 10, (16,))
    results = []
    for carry in (False, True):
        c = comm()
        torch.manual_seed(1)
        parts = make_step_parts(cfg, c, build_model("mlp", (40,), 10, ghost_size=4))
        if carry:
            carry_sums(parts)
        inp = StepInput(0, cfg.lr, x, y, 16, 4, False, False)
        train_step(parts, inp, {}, {}, PhaseTimer(c.device))
        assert parts.net.buckets is not None
        sizes = [f.numel() for f in parts.net.buckets.flats]
        per_bucket = [sum(parts.net.params[i].numel() for i in b) for b in parts.net.buckets.members]
        assert sizes == [(2 if carry else 1) * n for n in per_bucket]
        results.append([p.detach().clone() for p in parts.net.params])
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)
