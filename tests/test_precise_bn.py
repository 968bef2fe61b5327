"""Precise BN: running statistics re-estimated over global training batches, world-size invariant."""

from __future__ import annotations

import torch

from hpcnoise.comm import init
from hpcnoise.data import Data, local_share
from hpcnoise.models import build_model, ghost_norms
from hpcnoise.precise_bn import local_sums, precise_batches, precise_bn, set_running_stats

N, BATCH, GHOST = 512, 128, 32


def setup() -> tuple[torch.nn.Module, Data]:
    torch.manual_seed(0)
    x = torch.randn(N, 40, dtype=torch.float64) * 3 + 1
    y = torch.randint(0, 10, (N,))
    model = build_model("mlp", (40,), 10, ghost_size=GHOST, seed=1).double()
    return model, Data(x, y, x[:64], y[:64], 10)


def stats(model: torch.nn.Module) -> list[torch.Tensor]:
    return [t.clone() for bn in ghost_norms(model) for t in (bn.running_mean, bn.running_var)]


def sharded(model: torch.nn.Module, data: Data, world: int, batches: int) -> list[torch.Tensor]:
    """What W ranks compute: each its local shares, the flat sums added (the allreduce), then applied."""
    order = precise_batches(N, BATCH, batches, seed=0, epoch=3)
    total = None
    for rank in range(world):
        idx = torch.cat([local_share(b, rank, world) for b in order])
        part = local_sums(model, data.x_train[idx], len(order))
        total = part if total is None else total + part
    set_running_stats(model, total)  # type: ignore[arg-type]
    return stats(model)


def test_one_rank_equals_two_and_four() -> None:
    """1 x 128, 2 x 64 and 4 x 32 samples per global batch give the same running statistics."""
    model, data = setup()
    one = sharded(model, data, 1, 3)
    for world in (2, 4):
        for a, b in zip(one, sharded(model, data, world, 3), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_first_layer_matches_the_population_statistic() -> None:
    """The first batch norm sees the first Linear's outputs: its statistic is exactly their mean and
    unbiased variance over the chosen samples (brute force)."""
    model, data = setup()
    order = precise_batches(N, BATCH, 2, seed=0, epoch=0)
    precise_bn(model, data, init("cpu"), BATCH, 2, seed=0, epoch=0)
    first_linear = next(m for m in model.modules() if isinstance(m, torch.nn.Linear))
    with torch.no_grad():
        h = first_linear(data.x_train[order.reshape(-1)].flatten(1))
    bn = ghost_norms(model)[0]
    torch.testing.assert_close(bn.running_mean, h.mean(0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(bn.running_var, h.var(0), rtol=1e-10, atol=1e-12)


def test_changes_lagging_statistics_and_leaves_parameters() -> None:
    model, data = setup()
    params = [p.clone() for p in model.parameters()]
    before = stats(model)  # the initial 0 / 1: far from the data's statistics
    assert precise_bn(model, data, init("cpu"), BATCH, 2, seed=0, epoch=0) == 2
    after = stats(model)
    assert max((a - b).abs().max().item() for a, b in zip(before, after)) > 0.5
    assert all(torch.equal(p, q) for p, q in zip(params, model.parameters()))
    assert model.training  # the mode is restored
    # more batches than the training set holds: as many as fit
    assert precise_bn(model, data, init("cpu"), BATCH, 100, seed=0, epoch=0) == N // BATCH
