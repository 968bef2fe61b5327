"""Gradient variance at a frozen network (Fig. 3b) and the diagnostics row logged during training.

A draw is a global batch as a regime would draw it, and its gradient is what the regime's step would use:
computed by the step's own functions (hpcnoise.step), so measurement and training cannot drift apart.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from hpcnoise.comm import Comm
from hpcnoise.config import Config
from hpcnoise.data import Data
from hpcnoise.measure.fisher import fisher_norms
from hpcnoise.measure.sharpness import fixed_subset
from hpcnoise.regimes import REGIMES, NoiseInput, Regime
from hpcnoise.seeding import generator
from hpcnoise.statistics import STATISTICS
from hpcnoise.step import Net, local_contribution, rademacher
from hpcnoise.temperature import applied_multiplier, temperature_ratio
from hpcnoise.workload import epoch_steps, noise_end


def _draw_gradient(
    net: Net, x: Tensor, y: Tensor, pieces: int, statistics: frozenset[str], signs: Tensor | None
) -> tuple[list[Tensor], dict[str, Any]]:
    """Mean gradient of one draw of m samples and its normalised statistics, over ``pieces`` forwards.

    Each piece is one worker's local contribution (hpcnoise.step), and the pieces are combined as the
    fused allreduce combines workers: gradients as the size-weighted mean, statistic sums added, then
    normalised by m. p.grad is left as it was.
    """
    m = x.shape[0]
    saved: list[Tensor | None] = [p.grad for p in net.params]
    grads = [torch.zeros_like(p) for p in net.params]
    sums: dict[str, list[Tensor]] = {}
    try:
        for piece in torch.arange(m, device=x.device).tensor_split(pieces):
            k = piece.numel()
            piece_signs = signs[piece] if signs is not None else None
            groups = local_contribution(net, x[piece], y[piece], statistics, piece_signs)
            for g, pg in zip(grads, groups["grad"], strict=True):
                g.add_(pg, alpha=k / m)  # the draw's mean = piece means weighted by piece sizes
            for name in statistics:
                part = groups[name]
                sums[name] = part if name not in sums else [a + b for a, b in zip(sums[name], part, strict=True)]
    finally:
        for p, old in zip(net.params, saved, strict=True):
            p.grad = old
    stats = {name: STATISTICS[name].unpack(sums[name], m, net.hooks) for name in statistics}  # type: ignore[arg-type]
    return grads, stats


def gradient_variance(
    model: nn.Module,
    data: Data,
    regime_name: str,
    cfg: Config,
    batches: int = 8,
    *,
    comm: Comm | None = None,
    epoch: int = 0,
    train_mode: bool = True,
    seed: int | None = None,
) -> dict[str, float]:
    """Per parameter tensor: the mean over its coordinates of the variance, over ``batches`` draws, of the
    gradient a regime's step would use at this frozen network.

    A draw is a random global batch of the regime's size at (0-based) ``epoch`` (sb: M_S; lb, diagf: M_L)
    from the training set, without replacement, and the step's gradient: the batch-mean gradient plus
    the regime's noise (whatever ``noise_epochs`` says), built from the draw's own curvature statistics
    by the same hooks and noise functions as training (diagf: s * sqrt(diag F) * xi). Draws come from a
    (seed, batch size, draw) stream, so regimes of equal batch size share batches (common random
    numbers) and results do not depend on the world size. ``train_mode``: batch norm with batch
    statistics as in training (ghost batches of the model's ghost size; without ghost BN over M / W
    samples, like the workers' local batches), else running statistics, where samples are independent.
    Parameters, buffers and .grad are left as they were. With ``comm`` the draws are shared out over
    ranks and combined in one sum-allreduce.
    """

    regime = REGIMES[regime_name]
    if batches < 2:
        raise ValueError(f"a variance needs at least 2 draws, got {batches}")
    rank, size = (comm.rank, comm.size) if comm is not None else (0, 1)
    seed = cfg.seed if seed is None else seed
    named = list(model.named_parameters())
    sums = torch.zeros(2, sum(p.numel() for _, p in named), dtype=torch.float64, device=data.x_train.device)
    pieces = size if train_mode and not cfg.ghost_bn else 1
    statistics = regime.statistics if regime.noise is not None else frozenset()
    net = Net.attach(model, statistics, cfg.conv_mode, record_eval=not train_mode)
    was_training = model.training
    model.train(train_mode)
    try:
        for draw in range(rank, batches, size):
            flat = _step_gradient(net, regime, cfg, data, epoch, pieces, statistics, seed, draw)
            sums[0] += flat
            sums[1] += flat.square()
    finally:
        model.train(was_training)
        net.detach()
    if comm is not None:
        comm.allreduce_sum_(sums)
    mean = sums[0] / batches
    var = ((sums[1] - batches * mean.square()) / (batches - 1)).clamp_min(0)  # unbiased, per coordinate
    out, offset = {}, 0
    for name, p in named:
        out[name] = var[offset : offset + p.numel()].mean().item()
        offset += p.numel()
    return out


def _step_gradient(
    net: Net,
    regime: Regime,
    cfg: Config,
    data: Data,
    epoch: int,
    pieces: int,
    statistics: frozenset[str],
    seed: int,
    draw: int,
) -> Tensor:
    """The flattened float64 gradient (plus noise) a regime's step would use on draw ``draw``."""
    m = regime.batch(cfg, epoch)
    device = data.x_train.device
    idx = torch.randperm(data.x_train.shape[0], generator=generator(seed, "gradvar", m, draw))[:m].to(device)
    signs = None
    if any(STATISTICS[s].needs_signs for s in statistics):  # Rademacher signs of the draw's samples
        signs = rademacher(generator(seed, "gradvar-rademacher", draw), m, device, data.x_train.dtype)
    grads, stats = _draw_gradient(net, data.x_train[idx], data.y_train[idx], pieces, statistics, signs)
    if regime.noise is not None:
        gen = generator(seed, "gradvar-noise", draw, device=device)
        noise = regime.noise(NoiseInput(cfg, grads, stats, gen, {}, statistics))
        grads = [g + z for g, z in zip(grads, noise, strict=True)]
    return torch.cat([g.reshape(-1) for g in grads]).double()


def measured_temperature(
    model: nn.Module, data: Data, cfg: Config, comm: Comm | None = None, *, epoch: int = 0, draws: int = 2
) -> dict[str, float]:
    """The temperature ratio tau of the run's regime at this frozen network, relative to small-batch SGD.

    tau = lr (tr C / M + V) / (lr_S tr C / M_S) (hpcnoise.temperature), from ``draws`` global batches of
    the regime's size at 0-based ``epoch`` (the gradient-variance draws), each as the step computes it:
    tr C = tr(diag F) - |g_LB|^2 (the centred per-sample second moment; diag F from the hooks), and V,
    the regime's injected variance at this epoch (0 when its noise is off), from the same statistics.
    lr / lr_S is the learning-rate rule's ratio k (1 for ``sb``). Batch norm as in training.
    """
    regime = REGIMES[cfg.regime]
    m = regime.batch(cfg, epoch)
    rank, size = (comm.rank, comm.size) if comm is not None else (0, 1)
    # the noise's window as training has it (noise_epochs, or noise_fraction of the planned steps), at the
    # epoch's first step
    n_train = data.x_train.shape[0]
    noise_on = regime.noise is not None and sum(epoch_steps(cfg, n_train)[:epoch]) < noise_end(cfg, n_train)
    statistics = frozenset({"diag_fisher"}) | (regime.statistics_for_variance() if noise_on else frozenset())
    net = Net.attach(model, statistics, cfg.conv_mode)
    pieces = 1 if cfg.ghost_bn or cfg.sync_bn else size  # local batch norm: one forward per worker share
    sums = torch.zeros(2, dtype=torch.float64, device=data.x_train.device)  # tr C, V summed over draws
    was_training = model.training
    model.train(True)
    try:
        for draw in range(rank, draws, size):
            gen = generator(cfg.seed, "gradvar", m, draw)
            idx = torch.randperm(data.x_train.shape[0], generator=gen)[:m].to(data.x_train.device)
            grads, stats = _draw_gradient(net, data.x_train[idx], data.y_train[idx], pieces, statistics, None)
            trace_c = sum(float(f.sum()) for f in stats["diag_fisher"]) - sum(float(g.square().sum()) for g in grads)
            injected = regime.injected_variance(NoiseInput(cfg, grads, stats, gen, {}, statistics)) if noise_on else 0.0
            sums += torch.tensor([trace_c, injected], dtype=torch.float64, device=sums.device)
    finally:
        model.train(was_training)
        net.detach()
    if comm is not None:
        comm.allreduce_sum_(sums)
    trace_c, injected = (sums / draws).tolist()
    k = regime.lr_ratio(cfg, epoch)
    return {
        "tau": temperature_ratio(k, m, cfg.small_batch, trace_c, injected),
        "trace_c": trace_c,
        "injected_variance": injected,
        "lr_ratio": k,
        "noise_multiplier": applied_multiplier(cfg) if noise_on else 0.0,
        "batch": m,
    }


def diagnostics_row(
    model: nn.Module,
    data: Data,
    cfg: Config,
    comm: Comm,
    epoch: int,
    *,
    fisher_samples: int = 512,
    draws: int = 8,
    regimes: Sequence[str] = ("sb", "lb", "diagf"),
    chunk: int = 128,
) -> dict[str, Any]:
    """One row of RUN_DIR/diagnostics.jsonl at a frozen network; call on every rank, write on rank 0.

    ``epoch``: epochs completed (the metrics.jsonl convention); the regimes' batch sizes are those of
    0-based epoch max(epoch - 1, 0). Fisher norms over a fixed seeded subset of ``fisher_samples``
    training samples (the same every epoch); gradient variances over ``draws`` batches per regime.
    """
    t0 = time.perf_counter()
    n = data.x_train.shape[0]
    idx = fixed_subset(n, min(fisher_samples, n), cfg.seed).to(data.x_train.device)
    norms = fisher_norms(model, data.x_train[idx], data.y_train[idx], comm, chunk=chunk)
    variances = {r: gradient_variance(model, data, r, cfg, draws, comm=comm, epoch=max(epoch - 1, 0)) for r in regimes}
    return {
        "epoch": epoch,
        "fisher_frobenius": norms["fisher_frobenius"],
        "diag_fisher_frobenius": norms["diag_fisher_frobenius"],
        "fisher_trace": norms["fisher_trace"],
        "fisher_samples": norms["samples"],
        "draws": draws,
        "grad_variance": variances,
        "temperature": measured_temperature(model, data, cfg, comm, epoch=max(epoch - 1, 0)),
        "wall_time_s": time.perf_counter() - t0,
    }
