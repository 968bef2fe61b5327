"""Curvature statistics as a registry: what a regime can ask the step for.

Two words, two levels. A *quantity* is what the curvature hooks compute on one worker in the
backward pass: raw local sums over that worker's samples (hpcnoise.curvature). A *statistic* is what
a noise function reads: those sums added over all workers in the one fused allreduce and normalised
for the global batch. Each entry of ``STATISTICS`` says, for one statistic:
- ``quantity``: the hook quantity that computes its local sums;
- ``due``: whether it is recomputed at a step (it is always computed when no value is cached yet);
  between refreshes the cached value is reused;
- ``pack``: the local sums, as the list of tensors that travels in the collective;
- ``unpack``: the reduced tensors and the global batch size M -> the normalised statistic;
- ``to_plain`` / ``from_plain``: the statistic as tensors and plain values for a checkpoint, and back
  (the identity for lists of tensors).
Whether the hooks need Rademacher signs, and whether the sums may ride in the gradient buckets, is the
quantity's to say (``hpcnoise.curvature.quantities``).

The entries:
- ``diag_fisher``: diag F = (1/M) sum_i g_i^2 over the global batch, one tensor per parameter;
  refreshed every ``fisher_every`` steps.
- ``signed_sum``: r = sum_i sigma_i g_i with Rademacher sigma_i (distinct per sample, drawn for the
  global batch from the (seed, step) stream), per parameter; fresh every step.
- ``kfac``: per Linear/Conv layer, ``KFactors`` with A = (1/M) sum_i (1/T) sum_t a a^T and
  G = (1/M) sum_{i,t} g g^T; refreshed every ``kfac_every`` steps.
Adding a statistic is one hook quantity (a handler method) and one entry here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from hpcnoise.config import Config
from hpcnoise.curvature import QUANTITIES, CurvatureHooks, KFactors


def _same(value: Any) -> Any:
    return value


@dataclass(frozen=True)
class Statistic:
    quantity: str  # the hpcnoise.curvature quantity computing the local sums
    due: Callable[[Config, int], bool]  # (cfg, step) -> recompute at this step
    pack: Callable[[CurvatureHooks], list[Tensor]]  # local sums of the last recording, to be summed
    unpack: Callable[[list[Tensor], int, CurvatureHooks], Any]  # (summed tensors, M, hooks) -> statistic
    to_plain: Callable[[Any], Any] = _same  # the statistic as tensors and plain values (checkpoints)
    from_plain: Callable[[Any], Any] = _same  # and back

    @property
    def needs_signs(self) -> bool:
        """The hooks need one Rademacher sign per sample."""
        return QUANTITIES[self.quantity].needs_signs

    @property
    def per_parameter(self) -> bool:
        """One tensor per parameter: the sums may ride in the gradient buckets (hpcnoise.buckets)."""
        return QUANTITIES[self.quantity].per_parameter

    @property
    def mean_loss_power(self) -> int:
        """For per-parameter sums: the power of the local batch size m that undoes the mean loss's 1/m."""
        return QUANTITIES[self.quantity].mean_loss_power


def _per_parameter(quantity: str) -> Callable[[CurvatureHooks], list[Tensor]]:
    return lambda hooks: hooks.result(quantity)


def _divided(summed: list[Tensor], batch: int) -> list[Tensor]:
    """The sums divided by the global batch in place, by one multi-tensor kernel (not one per parameter;
    the same bits as per-tensor division on the CPU, possibly one ulp apart on CUDA)."""
    torch._foreach_div_(summed, float(batch))
    return summed


def _pack_kfac(hooks: CurvatureHooks) -> list[Tensor]:
    factors = hooks.result("kfac")
    return [f.A for f in factors] + [f.G for f in factors]


def _unpack_kfac(summed: list[Tensor], batch: int, hooks: CurvatureHooks) -> list[KFactors]:
    n = len(summed) // 2
    return [
        KFactors(a.div_(batch), g.div_(batch), f.weight, f.bias)
        for a, g, f in zip(summed[:n], summed[n:], hooks.result("kfac"), strict=True)
    ]


def _kfac_to_plain(factors: list[KFactors]) -> list[dict[str, Any]]:
    """Tagged lists, not pickled classes: a checkpoint holds only tensors and plain values."""
    return [{"__kfactors__": [f.A, f.G, f.weight, f.bias]} for f in factors]


def _kfac_from_plain(plain: list[dict[str, Any]]) -> list[KFactors]:
    return [KFactors(*item["__kfactors__"]) for item in plain]


STATISTICS: dict[str, Statistic] = {
    "diag_fisher": Statistic(
        "sum_grad_squared",
        due=lambda cfg, step: step % cfg.fisher_every == 0,
        pack=_per_parameter("sum_grad_squared"),
        unpack=lambda summed, batch, hooks: _divided(summed, batch),
    ),
    "signed_sum": Statistic(
        "signed_sum",
        due=lambda cfg, step: True,  # the Rademacher signs are new every step
        pack=_per_parameter("signed_sum"),
        unpack=lambda summed, batch, hooks: summed,
    ),
    "kfac": Statistic(
        "kfac",
        due=lambda cfg, step: step % cfg.kfac_every == 0,
        pack=_pack_kfac,
        unpack=_unpack_kfac,
        to_plain=_kfac_to_plain,
        from_plain=_kfac_from_plain,
    ),
}


def quantities(names: frozenset[str] | set[str]) -> tuple[str, ...]:
    """The hook quantities that compute the named statistics, in a fixed order."""
    return tuple(STATISTICS[s].quantity for s in sorted(names))
