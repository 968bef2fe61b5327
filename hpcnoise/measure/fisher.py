"""Fisher norms (Fig. 3a): per-sample gradients (torch.func vmap of grad) in eval mode, where batch norm uses
running statistics and samples are independent: ||F||_F from the Gram matrix of per-sample gradients (never
forming the d x d F) beside ||diag F||_F.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hpcnoise.comm import Comm


# --- Fisher norms (Fig. 3a) -------------------------------------------------------------------------------
def per_sample_gradients(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """(n, d) matrix of the gradients of the individual cross-entropy losses (torch.func vmap of grad).

    Columns follow model.parameters(). The model's current mode applies; use eval mode, where samples are
    independent.
    """
    from torch.func import functional_call, grad, vmap

    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = dict(model.named_buffers())

    def loss(p: dict[str, Tensor], xi: Tensor, yi: Tensor) -> Tensor:
        out = functional_call(model, (p, buffers), (xi.unsqueeze(0),))
        return F.cross_entropy(out, yi.unsqueeze(0))

    g = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    return torch.cat([t.reshape(x.shape[0], -1) for t in g.values()], 1)


def fisher_norms(
    model: nn.Module, x: Tensor, y: Tensor, comm: Comm | None = None, *, chunk: int = 128
) -> dict[str, float]:
    """Frobenius norms of the empirical Fisher F = (1/N) sum_i g_i g_i^T of (x, y) and of its diagonal.

    ||F||_F = ||G G^T||_F / N with G the (N, d) per-sample gradients: the Gram matrix is built from pairs
    of chunks of ``chunk`` samples (at most two (chunk, d) blocks held), so neither F nor G is formed.
    ||diag F||_F = ||sum_i g_i^2|| / N. Eval mode (restored afterwards). With ``comm``, every rank passes
    the same (x, y) and the chunk pairs are shared out; one sum-allreduce combines them.
    """
    rank, size = (comm.rank, comm.size) if comm is not None else (0, 1)
    n = x.shape[0]
    starts = list(range(0, n, chunk))
    pairs = [(a, b) for a in range(len(starts)) for b in range(a, len(starts))][rank::size]
    d = sum(p.numel() for p in model.parameters())
    acc = torch.zeros(d + 1, dtype=torch.float64, device=x.device)  # [sum_i g_i^2 (d) | ||G G^T||_F^2]

    def rows(c: int) -> Tensor:  # the per-sample gradients of chunk c, (chunk, d)
        return per_sample_gradients(model, x[starts[c] : starts[c] + chunk], y[starts[c] : starts[c] + chunk])

    was_training = model.training
    model.eval()
    try:
        cached: tuple[int, Tensor] | None = None
        for a, b in pairs:
            if cached is None or cached[0] != a:
                cached = (a, rows(a))
            ga = cached[1]
            gb = ga if a == b else rows(b)
            block = (ga @ gb.T).double()  # K[a, b]; K[b, a] is its transpose
            acc[-1] += (1 if a == b else 2) * block.square().sum()
            if a == b:
                acc[:d] += ga.double().square().sum(0)
    finally:
        model.train(was_training)
    if comm is not None:
        comm.allreduce_sum_(acc)
    return {
        "fisher_frobenius": acc[-1].sqrt().item() / n,
        "diag_fisher_frobenius": acc[:d].norm().item() / n,
        "fisher_trace": acc[:d].sum().item() / n,
        "samples": n,
    }
