"""Networks, and the (ghost) batch norm they all use.

Every network is built by a function registered in ``MODELS`` under its CLI name. Builders receive the
input shape (without the batch dimension), the number of classes and a ``norm`` factory; every batch
norm in every network comes from that factory, so ghost batch norm is a config switch, not a variant.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

NormFactory = Callable[[int], nn.Module]


class GhostBatchNorm(nn.Module):
    """Batch norm whose statistics come from ghost batches of ``ghost_size`` samples (Hoffer et al. 2017).

    Works on (N, C), (N, C, L) and (N, C, H, W). ``ghost_size=0`` means one ghost batch per forward
    (the whole local batch): plain batch norm. The batch is reshaped to (ghosts, ghost_size, C, ...)
    and normalised in one vectorised pass, not a loop over chunks.

    Running statistics are NOT updated in ``forward``. Instead, each training forward leaves
    ``stat_sums``: the sum over its ghost batches of the ghost means and of the unbiased ghost
    variances. The training step adds these sums to its one fused allreduce and calls
    ``update_running_stats`` with the averages over all ghost batches of the global batch, once per
    step, with momentum ``momentum``: running <- (1 - momentum) * running + momentum * average.
    This differs from Hoffer et al., who update sequentially per ghost batch (an effective per-step
    momentum of 1 - (1 - momentum)^K for K ghost batches, weighted towards the last one); averaging is
    order-independent, so buffers are identical across ranks and world sizes.
    """

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

    def extra_repr(self) -> str:
        return f"{self.num_features}, ghost_size={self.ghost_size}, eps={self.eps}, momentum={self.momentum}"

    def _shape(self, x: torch.Tensor) -> list[int]:
        return [1, -1] + [1] * (x.dim() - 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            xhat = (x - self.running_mean.view(self._shape(x))) * torch.rsqrt(
                self.running_var.view(self._shape(x)) + self.eps
            )
        else:
            n = x.shape[0]
            g = self.ghost_size or n
            if n % g:
                raise ValueError(f"ghost_size {g} does not divide the local batch of {n} samples")
            xg = x.reshape(n // g, g, *x.shape[1:])
            dims = [1] + list(range(3, xg.dim()))  # the samples of a ghost batch and spatial positions
            var, mean = torch.var_mean(xg, dim=dims, correction=0, keepdim=True)
            xhat = ((xg - mean) * torch.rsqrt(var + self.eps)).reshape(x.shape)
            count = xg.numel() // (xg.shape[0] * xg.shape[2])  # values per channel per ghost batch
            with torch.no_grad():
                unbiased = var * (count / max(count - 1, 1))
                self.stat_sums = torch.stack([mean.sum(0).flatten(), unbiased.sum(0).flatten()])
                self.ghost_count = n // g
        if self.save_xhat and self.training:
            self.saved_xhat = xhat.detach()
        return xhat * self.weight.view(self._shape(x)) + self.bias.view(self._shape(x))

    @torch.no_grad()
    def update_running_stats(self, mean: torch.Tensor, var: torch.Tensor) -> None:
        """Move the running statistics towards the global ghost-batch averages (once per step)."""
        self.running_mean.mul_(1 - self.momentum).add_(mean, alpha=self.momentum)
        self.running_var.mul_(1 - self.momentum).add_(var, alpha=self.momentum)


def ghost_norms(model: nn.Module) -> list[GhostBatchNorm]:
    """All batch norms of a model, in module order (the order their statistics are packed in)."""
    return [m for m in model.modules() if isinstance(m, GhostBatchNorm)]


@dataclass(frozen=True)
class ModelSpec:
    build: Callable[[tuple[int, ...], int, NormFactory], nn.Module]
    description: str


MODELS: dict[str, ModelSpec] = {}


def register(name: str, description: str) -> Callable:
    def wrap(fn: Callable[[tuple[int, ...], int, NormFactory], nn.Module]) -> Callable:
        MODELS[name] = ModelSpec(fn, description)
        return fn

    return wrap


def build_model(
    name: str,
    in_shape: tuple[int, ...],
    num_classes: int,
    ghost_size: int = 0,
    bn_momentum: float = 0.1,
    seed: int = 0,
) -> nn.Module:
    """Build a registered network with initial weights drawn from its own generator (``seed``)."""
    if name not in MODELS:
        raise KeyError(f"unknown model {name!r}; valid: {', '.join(sorted(MODELS))}")

    def norm(c: int) -> nn.Module:
        return GhostBatchNorm(c, ghost_size=ghost_size, momentum=bn_momentum)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return MODELS[name].build(in_shape, num_classes, norm)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


@register("mlp", "MLP: 2 hidden layers of 512 units, batch norm, ReLU")
def mlp(in_shape: tuple[int, ...], num_classes: int, norm: NormFactory, width: int = 512) -> nn.Module:
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(_numel(in_shape), width),
        norm(width),
        nn.ReLU(),
        nn.Linear(width, width),
        norm(width),
        nn.ReLU(),
        nn.Linear(width, num_classes),
    )


@register("cnn1d", "1-D CNN: 3 conv layers of 32 channels (kernel 5), batch norm, ReLU, linear head")
def cnn1d(in_shape: tuple[int, ...], num_classes: int, norm: NormFactory, width: int = 32) -> nn.Module:
    channels, length = (1, in_shape[0]) if len(in_shape) == 1 else in_shape
    out_len = length
    for stride in (1, 2, 2):
        out_len = (out_len - 1) // stride + 1
    return nn.Sequential(
        nn.Unflatten(1, (channels, length)),
        nn.Conv1d(channels, width, 5, padding=2),
        norm(width),
        nn.ReLU(),
        nn.Conv1d(width, width, 5, stride=2, padding=2),
        norm(width),
        nn.ReLU(),
        nn.Conv1d(width, width, 5, stride=2, padding=2),
        norm(width),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(width * out_len, num_classes),
    )
