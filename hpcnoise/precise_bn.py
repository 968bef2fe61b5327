"""Precise batch norm (pycls's "precise BN"): re-estimate the running statistics before evaluation.

Running statistics are an exponential average with momentum 0.1 applied once per step. A large-batch
run takes few steps per epoch (14 at 4096 of MNIST-1D's 60k), so its statistics lag far behind the
weights, and an evaluation then measures the lag as much as the network. With ``precise_bn_batches``
K > 0, before every evaluation each batch-norm layer's running mean and variance are replaced by the
mean and (unbiased) variance of its inputs over K global training batches, forwarded in training mode
as the step forwards them (ghost batches where the run uses them).

World-size invariance: the K global batches come from their own (seed, "precise-bn", epoch) stream;
every rank forwards its contiguous share of each, and the per-channel sums of x and x^2 over all
samples (and positions) and the sample count are summed over ranks in one allreduce, so the result
is the statistic of the whole K global batches, whatever W is (up to float rounding of the sums), when
the run uses ghost batch norm or global batch norm (``sync_bn``: the forwards then normalise each
global batch, as the step does); with local batch norm, each rank's share is normalised alone (as in
training), so the inputs of deeper layers depend on the local batch. The sums are accumulated in float64.
Hand-written because the statistic must be the global one under Horovod; torch's own helpers (e.g.
``torch.optim.swa_utils.update_bn``) average per local batch.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from hpcnoise import precision
from hpcnoise.comm import Comm
from hpcnoise.data import Data, local_share
from hpcnoise.models import SumOverWorkers, ghost_norms, synchronized
from hpcnoise.seeding import generator


def precise_batches(n: int, global_batch: int, batches: int, seed: int, epoch: int) -> Tensor:
    """(batches, global_batch) sample indices: the first batches * global_batch of a seeded permutation."""
    k = min(batches, n // global_batch)
    perm = torch.randperm(n, generator=generator(seed, "precise-bn", epoch))
    return perm[: k * global_batch].view(k, global_batch)


@torch.no_grad()
def local_sums(model: nn.Module, x: Tensor, chunks: int, mixed: bool = False) -> Tensor:
    """This rank's flat float64 sums (per layer: sum x, sum x^2 per channel, then the element count)
    of every batch-norm input, forwarding ``x`` in ``chunks`` pieces (the local shares of global batches);
    ``mixed``: under bf16 autocast, as the run trains."""
    norms = ghost_norms(model)
    acc = {bn: torch.zeros(2 * bn.num_features + 1, dtype=torch.float64, device=x.device) for bn in norms}

    def record(module: nn.Module, inputs: tuple[Tensor, ...]) -> None:
        inp = inputs[0].double().transpose(0, 1).reshape(inputs[0].shape[1], -1)  # (C, samples x positions)
        c = inp.shape[0]
        acc[module][:c] += inp.sum(1)  # type: ignore[index]
        acc[module][c : 2 * c] += inp.square().sum(1)  # type: ignore[index]
        acc[module][-1] += inp.shape[1]  # type: ignore[index]

    handles = [bn.register_forward_pre_hook(record) for bn in norms]
    was_training = model.training
    model.train()  # batch statistics in every layer, as the step forwards
    try:
        for piece in x.tensor_split(chunks):
            with precision.autocast(mixed, x.device):
                model(piece)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return torch.cat([acc[bn] for bn in norms]) if norms else torch.zeros(0, dtype=torch.float64)


@torch.no_grad()
def set_running_stats(model: nn.Module, summed: Tensor) -> None:
    """Running mean and unbiased variance from the summed ``local_sums`` of all ranks."""
    offset = 0
    for bn in ghost_norms(model):
        c = bn.num_features
        s1, s2, n = summed[offset : offset + c], summed[offset + c : offset + 2 * c], summed[offset + 2 * c]
        offset += 2 * c + 1
        mean = s1 / n
        var = (s2 - n * mean.square()) / (n - 1)
        bn.running_mean.copy_(mean)
        bn.running_var.copy_(var.clamp_min(0))


def precise_bn(
    model: nn.Module,
    data: Data,
    comm: Comm,
    global_batch: int,
    batches: int,
    seed: int,
    epoch: int,
    bn_sum: SumOverWorkers | None = None,
    mixed: bool = False,
) -> int:
    """Re-estimate every batch norm's running statistics over ``batches`` global training batches (on
    every rank); returns the number of batches used (fewer when the training set is smaller).
    ``bn_sum``: the step's global-batch-norm collective (``hpcnoise.step.bn_sum``), if any; ``mixed``:
    the forwards under bf16 autocast (dtype=bf16)."""
    if not ghost_norms(model) or batches <= 0:
        return 0
    order = precise_batches(data.x_train.shape[0], global_batch, batches, seed, epoch)
    idx = torch.cat([local_share(b, comm.rank, comm.size) for b in order]).to(data.x_train.device)
    with synchronized(model, bn_sum):
        flat = local_sums(model, data.x_train[idx], len(order), mixed)
    comm.allreduce_sum_(flat)
    set_running_stats(model, flat)
    return len(order)
