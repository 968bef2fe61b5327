"""Training regimes: which batch each epoch uses, which curvature statistics a step needs, and the noise.

A regime is a small record of functions over the shared machinery (curvature hooks, the one fused
allreduce), registered in ``REGIMES`` under its CLI name, which is also the ``regime`` column of every
result. There is no class hierarchy: adding a regime is adding one entry.

Noise placement (``Config.noise_placement``):
- ``gradient`` (default): the noise is added to the averaged gradient before the optimiser, so it goes
  through weight decay and momentum exactly as small-batch gradient noise does. This is Algorithm 1 of
  the paper, which perturbs the gradient estimate g_LB so that it imitates g_SB; a small-batch run's
  noise, too, enters through the momentum buffer.
- ``parameter``: theta <- theta - lr * noise after the optimiser step: the noise perturbs the iterate
  once and is not accumulated by momentum (a Langevin-style injection).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from hpcnoise.config import Config

# Curvature statistics a regime can ask the step for. The step computes each requested one on every
# worker, sums it over workers in the fused allreduce and hands the normalised result to ``noise``:
#   "diag_fisher": diag F = (1/M_L) sum_i g_i^2 over the global batch, one tensor per parameter.
STATISTICS = ("diag_fisher",)


@dataclass(frozen=True)
class NoiseInput:
    """What a noise function sees at one step (identical on every rank after the allreduce)."""

    cfg: Config
    grads: list[torch.Tensor]  # the global mean gradient g_LB, one tensor per parameter
    stats: dict[str, list[torch.Tensor]]  # the requested curvature statistics (see STATISTICS)
    generator: torch.Generator  # the (seed, step) noise stream: identical on all ranks


NoiseFn = Callable[[NoiseInput], list[torch.Tensor]]


@dataclass(frozen=True)
class Regime:
    description: str
    batch_keys: tuple[str, ...]  # the config batch sizes this regime trains with (validated against W)
    batch: Callable[[Config, int], int]  # global batch size used in a given epoch
    noise: NoiseFn | None = None  # None: no noise
    needs: frozenset[str] = field(default_factory=frozenset)  # statistics from STATISTICS


def standard_normal_like(tensors: list[torch.Tensor], generator: torch.Generator) -> list[torch.Tensor]:
    """One N(0, I) draw shaped like ``tensors``, from a single flat draw (so the stream is layout-stable)."""
    total = sum(t.numel() for t in tensors)
    flat = torch.randn(total, generator=generator, device=generator.device, dtype=tensors[0].dtype)
    flat = flat.to(tensors[0].device)
    out, offset = [], 0
    for t in tensors:
        out.append(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()
    return out


def diag_fisher_noise(x: NoiseInput) -> list[torch.Tensor]:
    """Algorithm 1: s * sqrt(diag F) * xi with s = sqrt((M_L - M_S)/(M_L M_S)), xi ~ N(0, I)."""
    s = x.cfg.noise_scale
    xi = standard_normal_like(x.grads, x.generator)
    return [z.mul_(f.sqrt()).mul_(s) for z, f in zip(xi, x.stats["diag_fisher"])]


def _large(cfg: Config, epoch: int) -> int:
    return cfg.batch_size


def _small(cfg: Config, epoch: int) -> int:
    return cfg.small_batch


REGIMES: dict[str, Regime] = {
    "sb": Regime("small batch M_S, no noise", ("small_batch",), _small),
    "lb": Regime("large batch M_L, no noise", ("batch_size",), _large),
    "diagf": Regime(
        "large batch + diagonal-Fisher noise (Algorithm 1)",
        ("batch_size",),
        _large,
        noise=diag_fisher_noise,
        needs=frozenset({"diag_fisher"}),
    ),
}
