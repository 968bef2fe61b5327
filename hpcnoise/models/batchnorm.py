"""(Ghost) batch norm, the one normalisation every network uses, and its once-per-step statistics.

``GhostBatchNorm`` normalises ghost batches (or, inside ``synchronized``, the global batch over all
workers through ``_GlobalBatchNorm``); it leaves its statistics' sums for the training step, which sums
them over workers in its one fused allreduce and applies them with ``update_running_stats``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

SumOverWorkers = Callable[[Tensor, str], Tensor]  # sums a tensor over all workers in place (collective name)


class GhostBatchNorm(nn.Module):
    """Batch norm whose statistics come from ghost batches of ``ghost_size`` samples (Hoffer et al. 2017).

    Works on (N, C), (N, C, L) and (N, C, H, W). ``ghost_size=0`` means one ghost batch per forward
    (the whole local batch): plain batch norm. All ghost batches are normalised by one native
    batch-norm call on a (ghost_size, ghosts * C, ...) rearrangement of the batch, not a loop over chunks.
    A ghost batch with one value per channel normalises to 0 (its output is the bias).

    Running statistics are NOT updated in ``forward``. Instead, each training forward leaves
    ``stat_sums``: the sum over its ghost batches of the ghost means and of the unbiased ghost
    variances. The training step adds these sums to its one fused allreduce and calls
    ``update_running_stats`` with the sums over all ghost batches of the global batch, once per
    step, with momentum ``momentum``: running <- (1 - momentum) * running + momentum * average.
    This differs from Hoffer et al., who update sequentially per ghost batch (an effective per-step
    momentum of 1 - (1 - momentum)^K for K ghost batches, weighted towards the last one); averaging is
    order-independent, so buffers are identical across ranks and world sizes.

    Without ghost batches (``ghost_size=0``) a forward normalises the local batch, which depends on the
    world size W. Inside ``synchronized`` it normalises the GLOBAL batch instead (sync batch norm,
    ``_GlobalBatchNorm``): the statistics and the backward's sums are summed over workers, so W ranks
    of m samples compute what one rank of W * m does. ``stat_sums`` then holds the global mean and
    unbiased variance on every rank (one "ghost batch" per rank, so the step's average over the W
    ranks' sums gives them back).
    """

    running_mean: torch.Tensor  # buffers, declared for type checkers (nn.Module types attributes loosely)
    running_var: torch.Tensor

    def __init__(self, num_features: int, ghost_size: int = 0, eps: float = 1e-5, momentum: float = 0.1):
        super().__init__()
        self.num_features = num_features
        self.ghost_size = ghost_size
        self.eps = eps
        self.momentum = momentum
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.stat_sums: torch.Tensor | None = None  # (2, C): summed ghost means, summed ghost variances
        self.ghost_count = 0  # ghost batches behind stat_sums
        self.save_xhat = False  # set by curvature hooks that need the normalised input
        self.saved_xhat: torch.Tensor | None = None
        self.sum_over_workers: SumOverWorkers | None = None  # set inside ``synchronized``
        self.name = "bn"  # names its collectives; set by ``synchronized``

    def extra_repr(self) -> str:
        return f"{self.num_features}, ghost_size={self.ghost_size}, eps={self.eps}, momentum={self.momentum}"

    def _shape(self, x: torch.Tensor) -> list[int]:
        return [1, -1] + [1] * (x.dim() - 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Under bf16 autocast (hpcnoise.precision) x arrives in bfloat16: normalise in the weights' float32,
        # so the statistics, their sums over workers and the saved normalised input stay float32.
        x = x.to(self.weight.dtype)
        if not self.training:
            xhat = (x - self.running_mean.view(self._shape(x))) * torch.rsqrt(
                self.running_var.view(self._shape(x)) + self.eps
            )
            return xhat * self.weight.view(self._shape(x)) + self.bias.view(self._shape(x))
        n, c = x.shape[0], x.shape[1]
        g = self.ghost_size or n
        if n % g:
            raise ValueError(f"ghost_size {g} does not divide the local batch of {n} samples")
        k = n // g  # ghost batches
        count = x.numel() // (k * c)  # values per channel per ghost batch
        if self.sum_over_workers is not None and k == 1:
            return self._global(x)
        if count == 1:  # a lone value is its own mean: xhat = 0 (gradient 0) and the variance is 0
            return self._single_value(x, k)
        # Every (ghost batch, channel) pair becomes a channel of its own, (k*g, C, ...) -> (g, k*C, ...),
        # so one native batch-norm call normalises them all over contiguous memory (on CPU several times
        # faster, forward and backward, than reductions over the strided ghost dimension). The kernel
        # writes each pair's mean and unbiased variance into ``stats`` (momentum 1 replaces the zeros).
        rest = x.shape[2:]

        def back(t: torch.Tensor) -> torch.Tensor:  # (g, k*C, ...) -> (k*g, C, ...)
            return t if k == 1 else t.reshape(g, k, c, *rest).transpose(0, 1).reshape(x.shape)

        xt = x if k == 1 else x.reshape(k, g, c, *rest).transpose(0, 1).reshape(g, k * c, *rest)
        stats = x.new_zeros(2, k * c)
        weight, bias = (self.weight, self.bias) if k == 1 else (self.weight.repeat(k), self.bias.repeat(k))
        yt, mean, invstd = torch.native_batch_norm(xt, weight, bias, stats[0], stats[1], True, 1.0, self.eps)
        with torch.no_grad():
            self.stat_sums = stats.view(2, k, c).sum(1)
            self.ghost_count = k
            if self.save_xhat:  # the normalised input, from the kernel's own ghost means and 1/std,
                # formed in x's own layout (ghost batch k as a leading dimension), so no transposing copy
                per_ghost = [k, 1, c] + [1] * len(rest)
                xv = x.detach().reshape(k, g, c, *rest)
                self.saved_xhat = (xv - mean.view(per_ghost)).mul_(invstd.view(per_ghost)).view(x.shape)
        out = back(yt)
        if x.dim() == 4 and k > 1 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
            out = out.contiguous(memory_format=torch.channels_last)  # keep channels-last for the next conv
        return out

    def _single_value(self, x: torch.Tensor, k: int) -> torch.Tensor:
        """Training forward when each ghost batch holds one value per channel: the output is the bias."""
        xhat = x * 0  # keeps x in the graph, so earlier layers receive (zero) gradients
        with torch.no_grad():
            self.stat_sums = torch.stack([x.reshape(k, -1).sum(0), x.new_zeros(x.shape[1])])
            self.ghost_count = k
            if self.save_xhat:
                self.saved_xhat = xhat.detach()
        return xhat * self.weight.view(self._shape(x)) + self.bias.view(self._shape(x))

    def _global(self, x: torch.Tensor) -> torch.Tensor:
        """Training forward over the global batch (statistics summed over workers)."""
        assert self.sum_over_workers is not None
        outputs: tuple[Tensor, Tensor, Tensor] = _GlobalBatchNorm.apply(
            x, self.weight, self.bias, self.eps, self.running_mean, self.sum_over_workers, self.name
        )
        y, xhat, stats = outputs
        self.stat_sums = stats
        self.ghost_count = 1
        if self.save_xhat:
            self.saved_xhat = xhat
        return y


@torch.no_grad()
def update_running_stats(norms: list[GhostBatchNorm], sums: list[torch.Tensor], ghosts: int) -> None:
    """Move every batch norm's running statistics towards the global ghost-batch averages, once per step:
    running <- (1 - momentum) running + momentum * (sum / ghosts), with ``sums`` the batch norms'
    ``stat_sums`` summed over workers and ``ghosts`` the ghost batches in the global batch. Multi-tensor
    (foreach) kernels over all batch norms of one momentum, not four small operations per layer."""
    by_momentum: dict[float, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
    for bn, c in zip(norms, sums, strict=True):
        running, stats = by_momentum.setdefault(bn.momentum, ([], []))
        running += [bn.running_mean, bn.running_var]
        stats += list(c.view(2, -1))  # the summed ghost means, then the summed ghost variances
    for momentum, (running, stats) in by_momentum.items():
        torch._foreach_mul_(running, 1 - momentum)
        torch._foreach_add_(running, stats, alpha=momentum / ghosts)


def ghost_norms(model: nn.Module) -> list[GhostBatchNorm]:
    """All batch norms of a model, in module order (the order their statistics are packed in)."""
    return [m for m in model.modules() if isinstance(m, GhostBatchNorm)]


class _GlobalBatchNorm(torch.autograd.Function):
    """Batch norm over the global batch, each worker holding a share of it (sync batch norm).

    Hand-written because Horovod's SyncBatchNorm (and torch's) runs on CUDA only, updates the running
    statistics inside every forward and is a different module (other state_dict keys, no ``stat_sums``
    for the step's once-per-step update, no normalised input for the curvature hooks). Per channel,
    with N the global count: forward sums sum(x - K) and sum((x - K)^2) over workers in one collective,
    K the running mean (the same on every rank); backward sums sum(dy) and sum(dy * xhat) and forms
    dx = weight / std * (dy - sum(dy) / N - xhat * sum(dy * xhat) / N), the gradient of the SUM of the
    workers' losses with respect to this worker's inputs. The step averages the W workers' gradients,
    so the result is the gradient of the global mean loss, as with one worker.
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        weight: Tensor,
        bias: Tensor,
        eps: float,
        shift: Tensor,
        sum_over_workers: SumOverWorkers,
        name: str,
    ) -> tuple[Tensor, Tensor, Tensor]:
        dims = [0, *range(2, x.dim())]  # every dimension but the channel
        shape = [1, -1] + [1] * (x.dim() - 2)
        # One collective: the sums of x - K and (x - K)^2 about a shift K identical on every rank (the
        # running mean), so var = E(x - K)^2 - (mean - K)^2 cancels only (mean - K)^2 / var, small once
        # the running mean follows the batch (at the start, K = 0: the raw moments of the layer input).
        shifted = x - shift.view(shape)
        sums = torch.cat([shifted.sum(dims), shifted.square().sum(dims), x.new_full((1,), x.numel() // x.shape[1])])
        sum_over_workers(sums, f"{name}.stats")  # a fill above, not a host copy, for the count
        c = shift.numel()
        n = sums[-1]
        offset = sums[:c] / n  # mean - K
        var = (sums[c : 2 * c] / n - offset.square()).clamp_min(0)  # biased, for normalising
        mean = shift + offset
        invstd = torch.rsqrt(var + eps)
        xhat = (shifted - offset.view(shape)) * invstd.view(shape)
        ctx.save_for_backward(xhat, weight, invstd, n)
        ctx.sum_over_workers, ctx.name, ctx.dims, ctx.shape = sum_over_workers, name, dims, shape
        stats = torch.stack([mean, var * n / (n - 1).clamp_min(1)])  # mean and unbiased variance
        ctx.mark_non_differentiable(xhat, stats)
        return xhat * weight.view(shape) + bias.view(shape), xhat, stats

    @staticmethod
    def backward(
        ctx: Any, dy: Tensor, _dxhat: Tensor, _dstats: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, None, None, None, None]:
        xhat, weight, invstd, n = ctx.saved_tensors
        dims, shape = ctx.dims, ctx.shape
        local = torch.stack([dy.sum(dims), (dy * xhat).sum(dims)])  # the local d(bias), d(weight)
        summed = ctx.sum_over_workers(local.clone(), f"{ctx.name}.grad")
        dx = (weight * invstd).view(shape) * (dy - summed[0].div(n).view(shape) - xhat * summed[1].div(n).view(shape))
        return dx, local[1], local[0], None, None, None, None


@contextmanager
def synchronized(model: nn.Module, sum_over_workers: SumOverWorkers | None) -> Iterator[None]:
    """Inside, every batch norm without ghost batches normalises the global batch (``None``: no-op)."""
    norms = ghost_norms(model) if sum_over_workers is not None else []
    for i, bn in enumerate(norms):
        bn.sum_over_workers, bn.name = sum_over_workers, f"hpcnoise.bn{i}"
    try:
        yield
    finally:
        for bn in norms:
            bn.sum_over_workers = None
