"""Curvature quantities as a registry: what the hooks can compute in one backward pass.

A *quantity* is raw local sums over one worker's samples (the ``statistics`` registry turns them into
what a noise function reads). Each entry of ``QUANTITIES`` says how its accumulators are laid out for
one recording, which layer-handler method fills them (``hpcnoise.curvature.handlers``) and how the
recording's results are finished. Two layouts cover every quantity so far:

- ``PerParameter``: one accumulator shaped like each parameter (S = sum_i g_i^2, r = sum_i sigma_i g_i),
  views of one flat buffer, or tensors the caller gives (gradient-bucket views, left unscaled);
- ``LayerFactors``: per factored layer, a list of square factors (K-FAC's A and G).

Adding a quantity is one handler method and one entry here; the hooks, the step and the checkpoint
need no change.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from hpcnoise.curvature.handlers import HookOptions, LayerHandler, Sums


@dataclass(frozen=True)
class KFactors:
    """One layer's K-FAC factors and where its parameters sit in ``params``.

    The hooks return sums over a batch; the ``kfac`` statistic divides them by the global batch size.
    """

    A: Tensor  # (K, K): sum_i (1/T) sum_t a a^T, a with a trailing 1 when the layer has a bias
    G: Tensor  # (O, O): sum_{i,t} g g^T of the per-sample output gradients g (mean-loss 1/m undone)
    weight: int  # index of the weight in params
    bias: int | None  # index of the bias in params, or None


@dataclass
class Accumulators:
    """One quantity's accumulators for one recording: what each layer adds into, and what finishes them."""

    per_layer: dict[nn.Module, Any]  # module -> what its handler method adds into
    results: Any  # the quantity's results, aligned with ``params`` (or the factored layers) once finished
    flat: Tensor | None = None  # the one buffer the accumulators are views of, when the quantity owns it


@dataclass(frozen=True)
class PerParameter:
    """Sums shaped like each parameter, filled by ``LayerHandler.<method>``.

    ``mean_loss_power``: the step backpropagates the MEAN loss, so the output gradient autograd delivers is
    (1/m) dl_i/dy_i; g_i = m * (what autograd delivers), and the sums are multiplied by m ** power once, when
    the recording ends (squares: 2, signed sums: 1).
    """

    method: str
    mean_loss_power: int
    needs_signs: bool = False  # the method takes one Rademacher sign per sample
    per_parameter: bool = True  # may be given tensors to sum into (``into``) and ride in gradient buckets

    def allocate(
        self, params: Sequence[nn.Parameter], handlers: dict[nn.Module, LayerHandler], into: list[Tensor] | None
    ) -> Accumulators:
        if into is not None:
            at = {id(p): t for p, t in zip(params, into, strict=True)}
            flat = None
        else:
            # one zeroed buffer per quantity, each parameter's sums a view of it: one allocation and one
            # scaling when the recording ends, instead of one per parameter
            flat = params[0].new_zeros(sum(p.numel() for p in params))
            views = iter(torch.split(flat, [p.numel() for p in params]))
            at = {id(p): next(views).view_as(p) for p in params}
        per_layer = {
            module: {name: at[id(p)] for name, p in module.named_parameters(recurse=False)} for module in handlers
        }
        return Accumulators(per_layer, [at[id(p)] for p in params], flat)

    def accumulate(
        self,
        handler: LayerHandler,
        module: nn.Module,
        saved: Tensor,
        delta: Tensor,
        sums: Sums,
        opts: HookOptions,
        signs: Tensor | None,
    ) -> None:
        extra = (signs,) if self.needs_signs else ()
        getattr(handler, self.method)(module, saved, delta, sums, opts, *extra)

    def finish(self, acc: Accumulators, batch_size: int) -> list[Tensor]:
        """The sums, one per parameter; the mean's 1/m undone unless the caller gave them (``into``:
        the caller scales them after summing over workers)."""
        if acc.flat is not None:
            acc.flat.mul_(float(batch_size) ** self.mean_loss_power)
        return list(acc.results)


@dataclass(frozen=True)
class LayerFactors:
    """Per factored layer (``LayerHandler.kfac_shapes``), the square factors [A, G] filled by
    ``LayerHandler.<method>``; G is a sum of products of two output gradients, so it scales by m^2."""

    method: str
    mean_loss_power: int = 2  # of G only: A holds no output gradient
    needs_signs: bool = False
    per_parameter: bool = False

    def allocate(
        self, params: Sequence[nn.Parameter], handlers: dict[nn.Module, LayerHandler], into: list[Tensor] | None
    ) -> Accumulators:
        index = {id(p): i for i, p in enumerate(params)}
        per_layer: dict[nn.Module, Any] = {}
        layers = []  # (module, weight index, bias index), in module order
        for module, handler in handlers.items():
            shapes = handler.kfac_shapes(module)
            if shapes is None:
                continue
            k, o = shapes
            p = params[index[id(module.weight)]]
            per_layer[module] = [p.new_zeros(k, k), p.new_zeros(o, o)]
            bias = getattr(module, "bias", None)
            layers.append((module, index[id(module.weight)], None if bias is None else index[id(bias)]))
        return Accumulators(per_layer, layers)

    def accumulate(
        self,
        handler: LayerHandler,
        module: nn.Module,
        saved: Tensor,
        delta: Tensor,
        factors: list[Tensor],
        opts: HookOptions,
        signs: Tensor | None,
    ) -> None:
        getattr(handler, self.method)(module, saved, delta, factors, opts)

    def finish(self, acc: Accumulators, batch_size: int) -> list[KFactors]:
        out = []
        for module, weight, bias in acc.results:
            a_factor, g_factor = acc.per_layer[module]
            out.append(KFactors(a_factor, g_factor.mul_(float(batch_size) ** self.mean_loss_power), weight, bias))
        return out


Quantity = PerParameter | LayerFactors

QUANTITIES: dict[str, Quantity] = {
    # S = sum_i g_i^2 per parameter: the diagonal Fisher times the batch size
    "sum_grad_squared": PerParameter("sum_grad_squared", mean_loss_power=2),
    # r = sum_i sigma_i g_i per parameter for given signs (full-Fisher noise: Cov_sigma(r) = sum_i g_i g_i^T)
    "signed_sum": PerParameter("signed_sum", mean_loss_power=1, needs_signs=True),
    # per Linear/Conv layer, K-FAC's A and G as sums over the batch (KFactors)
    "kfac": LayerFactors("kfac"),
}
