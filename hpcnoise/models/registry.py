"""The model registry: ``MODELS`` maps a CLI name to its builder, ``build_model`` builds one.

Builders receive the input shape (without the batch dimension), the number of classes and a ``norm``
factory; every batch norm in every network comes from that factory, so ghost batch norm is a config
switch, not a variant. The networks register themselves (hpcnoise.models.nets, hpcnoise.models.paper)
when hpcnoise.models is imported.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import nn

from hpcnoise.models.batchnorm import GhostBatchNorm

NormFactory = Callable[[int], nn.Module]
# A network's builder: (input shape without the batch dimension, number of classes, norm factory) -> model.
Builder = Callable[[tuple[int, ...], int, NormFactory], nn.Module]
_B = TypeVar("_B", bound=Builder)


@dataclass(frozen=True)
class ModelSpec:
    build: Builder
    description: str


MODELS: dict[str, ModelSpec] = {}


def register(name: str, description: str) -> Callable[[_B], _B]:
    def wrap(fn: _B) -> _B:
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
