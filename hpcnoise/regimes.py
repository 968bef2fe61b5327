"""Training regimes: which batch each epoch uses, which curvature statistics a step needs, and the noise.

The statistics are named by their keys in ``hpcnoise.statistics.STATISTICS``; the step computes,
reduces and normalises them and hands them to ``noise`` in ``NoiseInput.stats``. A regime that keeps
state between steps (K-FAC's square roots) keeps it in ``NoiseInput.state``, apart from the statistics.

A regime is a small record of functions over the shared machinery (curvature hooks, the one fused
allreduce), registered in ``REGIMES`` under its CLI name, which is also the ``regime`` column of every
result. The entry is everything the suite knows of the regime: its printed name and whether it is
noise-free (which the analysis reads), the batch it trains with, the statistics it needs, its noise
draw, and its injected variance and learning-rate ratio (the temperature). There is no class
hierarchy: adding a regime is adding one entry, in this module or in any module imported before the
config is checked (``register``).

Noise placement (``Config.noise_placement``):
- ``gradient`` (default): the noise is added to the averaged gradient before the optimiser, so it goes
  through weight decay and momentum exactly as small-batch gradient noise does. This is Algorithm 1 of
  the paper, which perturbs the gradient estimate g_LB so that it imitates g_SB; a small-batch run's
  noise, too, enters through the momentum buffer.
- ``parameter``: theta <- theta - lr * noise after the optimiser step: the noise perturbs the iterate
  once and is not accumulated by momentum (a Langevin-style injection).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from hpcnoise.config import Config, scaled_rate
from hpcnoise.temperature import applied_multiplier, lr_ratio


@dataclass(frozen=True)
class NoiseInput:
    """What a noise function sees at one step (identical on every rank after the allreduce)."""

    cfg: Config
    grads: list[torch.Tensor]  # the global mean gradient g_LB, one tensor per parameter
    stats: dict[str, list[Any]]  # the regime's curvature statistics (keys of hpcnoise.statistics.STATISTICS)
    generator: torch.Generator  # the (seed, step) noise stream: identical on all ranks
    state: dict[str, Any]  # per-run state a regime keeps between steps (e.g. K-FAC square roots)
    refreshed: frozenset[str]  # statistics recomputed at this step
    # the step's N(0, I) draw shaped like the parameters, when the step drew it ahead (see
    # ``Regime.draws_normals``); None: ``standard_normal`` draws it from ``generator``
    normals: list[torch.Tensor] | None = None
    step: int = 0  # steps taken before this one (the key of ``generator``)

    def standard_normal(self) -> list[torch.Tensor]:
        """The step's N(0, I) draw xi, the first thing drawn from ``generator`` (so drawing it ahead, while
        the reduction is in flight, gives the same numbers as drawing it here)."""
        return self.normals if self.normals is not None else standard_normal_like(self.grads, self.generator)


NoiseFn = Callable[[NoiseInput], list[torch.Tensor]]


def _no_variance(x: NoiseInput) -> float:
    return 0.0


def _unit_factor(cfg: Config, epoch: int) -> float:
    return 1.0


@dataclass(frozen=True)
class Regime:
    """One training regime. Only ``name``, ``description``, ``batch_keys`` and ``batch`` are required: a
    regime without ``noise`` is noise-free."""

    name: str  # printed name in tables and figures, e.g. "DiagF" (hpcnoise's analysis reads it from here)
    description: str
    batch_keys: tuple[str, ...]  # the config batch sizes this regime trains with (validated against W)
    batch: Callable[[Config, int], int]  # global batch size used in a given epoch
    noise: NoiseFn | None = None  # None: no noise
    statistics: frozenset[str] = field(default_factory=frozenset)  # keys of hpcnoise.statistics.STATISTICS
    lr_factor: Callable[[Config, int], float] = _unit_factor  # multiplies cfg.lr in an epoch
    # the noise's total variance given NoiseInput with ``variance_statistics``, for the temperature
    injected_variance: Callable[[NoiseInput], float] = _no_variance
    variance_statistics: frozenset[str] | None = None  # what injected_variance reads; None: ``statistics``
    # the noise starts with one N(0, I) draw xi shaped like the parameters (NoiseInput.standard_normal);
    # it needs no data, so the step draws it while the gradients' sum is in flight
    draws_normals: bool = False
    # the small-batch reference itself: trains at lr_S (temperature ratio k = 1) and no learning-rate rule
    # applies to it, so results do not group it by ``lr_scaling``
    reference: bool = False

    @property
    def noise_free(self) -> bool:
        return self.noise is None

    def statistics_for_variance(self) -> frozenset[str]:
        return self.statistics if self.variance_statistics is None else self.variance_statistics

    def lr_ratio(self, cfg: Config, epoch: int) -> float:
        """k = lr / lr_S in an 0-based epoch: the temperature's learning-rate ratio (hpcnoise.temperature)."""
        return 1.0 if self.reference else lr_ratio(cfg) * self.lr_factor(cfg, epoch)


def standard_normal_like(tensors: Sequence[torch.Tensor], generator: torch.Generator) -> list[torch.Tensor]:
    """One N(0, I) draw shaped like ``tensors``, from a single flat draw (so the stream is layout-stable)."""
    total = sum(t.numel() for t in tensors)
    flat = torch.randn(total, generator=generator, device=generator.device, dtype=tensors[0].dtype)
    flat = flat.to(tensors[0].device)
    out, offset = [], 0
    for t in tensors:
        out.append(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()
    return out


def noise_std(cfg: Config) -> float:
    """lambda * s: the paper's s = sqrt((M_L - M_S)/(M_L M_S)) times the multiplier the run applies."""
    return cfg.noise_scale * applied_multiplier(cfg)


def diag_fisher_noise(x: NoiseInput) -> list[torch.Tensor]:
    """Algorithm 1: lambda s sqrt(diag F) xi with s = sqrt((M_L - M_S)/(M_L M_S)), xi ~ N(0, I)."""
    xi = x.standard_normal()
    # multi-tensor (foreach) kernels: a pass over all parameters per operation, not one call per tensor
    torch._foreach_mul_(xi, torch._foreach_sqrt(x.stats["diag_fisher"]))
    torch._foreach_mul_(xi, noise_std(x.cfg))
    return xi


def trace_fisher_noise(x: NoiseInput) -> list[torch.Tensor]:
    """Isotropic noise s * sqrt(Tr(F) / d) * xi.

    The paper writes the noise's scale as sqrt(Tr F). Taken literally (per-coordinate standard
    deviation s sqrt(Tr F)) the total variance would be d times that of diag-F noise; we read it as
    the isotropic noise with the SAME total variance as diag-F noise, s^2 Tr F, spread evenly over the
    d coordinates: per-coordinate variance s^2 Tr(F) / d. Only the covariance's shape differs.
    """
    diag = x.stats["diag_fisher"]
    d = sum(f.numel() for f in diag)
    scale = noise_std(x.cfg) * torch.sqrt(sum(f.sum() for f in diag) / d)
    return [z.mul_(scale) for z in x.standard_normal()]


def multiplicative_noise(x: NoiseInput) -> list[torch.Tensor]:
    """g * (1 + sigma * xi) with constant sigma (Hoffer et al. 2017): the noise term is sigma * g * xi.

    The noise multiplier lambda scales sigma (the noise term's standard deviation relative to |g|).
    """
    xi = x.standard_normal()
    sigma = x.cfg.multiplicative_sigma * applied_multiplier(x.cfg)
    return [z.mul_(g).mul_(sigma) for z, g in zip(xi, x.grads)]


def full_fisher_noise(x: NoiseInput) -> list[torch.Tensor]:
    """s / sqrt(M_L) * r, r = sum_i sigma_i g_i with Rademacher sigma (Section 3.3 of the paper).

    Cov(r) = sum_i g_i g_i^T = M_L F, so the noise has covariance s^2 F without forming F; it costs
    one extra weight-gradient-sized product per layer in the same backward pass.
    """
    c = noise_std(x.cfg) / x.cfg.batch_size**0.5
    return [r * c for r in x.stats["signed_sum"]]


def _psd_sqrt(m: torch.Tensor) -> torch.Tensor:
    """Symmetric square root of a PSD matrix (eigenvalues clamped at 0 against rounding)."""
    vals, vecs = torch.linalg.eigh(m)
    root: torch.Tensor = (vecs * vals.clamp_min(0).sqrt()) @ vecs.T
    return root


def kfac_noise(x: NoiseInput) -> list[torch.Tensor]:
    """K-FAC noise: for each Linear/Conv layer s * G^1/2 Z A^1/2 (covariance s^2 A (x) G), bias as
    the last input column; parameters outside the factored layers (batch norm) get diag-F noise.

    The square roots are recomputed only when the factors were refreshed (``kfac_every``); the regime's
    state keeps them as (A^1/2, G^1/2, weight index, bias index), tensors and plain values only, so that a
    checkpoint holds them as they are. (A state of another shape, from a checkpoint of an earlier version,
    is recomputed from the cached factors: eigh of the same factors gives the same roots.)
    """
    s = noise_std(x.cfg)
    roots = x.state.get("kfac_sqrt")
    if "kfac" in x.refreshed or roots is None or any(len(r) != 4 for r in roots):
        roots = [(_psd_sqrt(f.A), _psd_sqrt(f.G), f.weight, f.bias) for f in x.stats["kfac"]]
        x.state["kfac_sqrt"] = roots
    xi = x.standard_normal()
    noise = [z.mul_(f.sqrt()).mul_(s) for z, f in zip(xi, x.stats["diag_fisher"])]
    z_gen = x.generator
    for a_half, g_half, weight, bias in roots:
        z = torch.randn(g_half.shape[0], a_half.shape[0], generator=z_gen, device=z_gen.device, dtype=a_half.dtype)
        n = s * (g_half @ z.to(a_half.device) @ a_half)  # (out, in [+ 1])
        w = noise[weight]
        w.copy_(n[:, : w[0].numel()].reshape_as(w))
        if bias is not None:
            noise[bias].copy_(n[:, -1])
    return noise


# --- injected variance: the noise's total variance (summed over coordinates), for the temperature -------
def _diag_variance(x: NoiseInput) -> float:
    """diagf, trace and fullf: (lambda s)^2 tr(diag F) (tr F = tr diag F; trace spreads the same total)."""
    return noise_std(x.cfg) ** 2 * float(sum(f.sum() for f in x.stats["diag_fisher"]))


def _multiplicative_variance(x: NoiseInput) -> float:
    sigma = x.cfg.multiplicative_sigma * applied_multiplier(x.cfg)
    return sigma**2 * float(sum(g.square().sum() for g in x.grads))


def _kfac_variance(x: NoiseInput) -> float:
    """(lambda s)^2 (sum over factored layers tr(A) tr(G) + tr(diag F) of the other parameters)."""
    layers = x.stats["kfac"]
    factored = {i for layer in layers for i in (layer.weight, layer.bias) if i is not None}
    rest = sum(float(f.sum()) for i, f in enumerate(x.stats["diag_fisher"]) if i not in factored)
    kron = sum(float(torch.trace(layer.A) * torch.trace(layer.G)) for layer in layers)
    return noise_std(x.cfg) ** 2 * (kron + rest)


def _large(cfg: Config, epoch: int) -> int:
    return cfg.batch_size


def _small(cfg: Config, epoch: int) -> int:
    return cfg.small_batch


def _batch_change(cfg: Config, epoch: int) -> int:
    return cfg.small_batch if epoch < cfg.batchchange_epochs else cfg.batch_size


def _batch_change_lr(cfg: Config, epoch: int) -> float:
    """cfg.lr is the large-batch rate; the small-batch epochs scale it back by the preset's rule."""
    return scaled_rate(cfg.lr_scaling, _batch_change(cfg, epoch) / cfg.batch_size)


_DIAG = frozenset({"diag_fisher"})
REGIMES: dict[str, Regime] = {
    "sb": Regime("SB", "small batch M_S, no noise", ("small_batch",), _small, reference=True),
    "lb": Regime("LB", "large batch M_L, no noise", ("batch_size",), _large),
    "diagf": Regime(
        "DiagF",
        "large batch + diagonal-Fisher noise (Algorithm 1)",
        ("batch_size",),
        _large,
        diag_fisher_noise,
        _DIAG,
        injected_variance=_diag_variance,
        draws_normals=True,
    ),
    "trace": Regime(
        "Trace",
        "large batch + isotropic noise scaled by Tr(F)",
        ("batch_size",),
        _large,
        trace_fisher_noise,
        _DIAG,
        injected_variance=_diag_variance,
        draws_normals=True,
    ),
    "multiplicative": Regime(
        "Multiplicative",
        "large batch, gradient times (1 + sigma xi) (Hoffer et al.)",
        ("batch_size",),
        _large,
        multiplicative_noise,
        injected_variance=_multiplicative_variance,
        draws_normals=True,
    ),
    "fullf": Regime(
        "FullF",
        "large batch + full-Fisher noise from Rademacher signed sums",
        ("batch_size",),
        _large,
        full_fisher_noise,
        frozenset({"signed_sum"}),
        injected_variance=_diag_variance,
        variance_statistics=_DIAG,  # tr F = tr diag F: the variance needs no signs
    ),
    "kfac": Regime(
        "K-FAC",
        "large batch + K-FAC-covariance noise (diag F for batch norm)",
        ("batch_size",),
        _large,
        kfac_noise,
        frozenset({"kfac", "diag_fisher"}),
        injected_variance=_kfac_variance,
        draws_normals=True,
    ),
    "batchchange": Regime(
        "BatchChange",
        "small batch for batchchange_epochs, then large batch",
        ("small_batch", "batch_size"),
        _batch_change,
        lr_factor=_batch_change_lr,
    ),
}


def register(key: str, regime: Regime) -> Regime:
    """Add a regime under its CLI name ``key`` (one that is not taken); returns it."""
    if key in REGIMES:
        raise ValueError(f"regime {key!r} is already registered")
    REGIMES[key] = regime
    return regime
