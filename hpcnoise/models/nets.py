"""The small networks of the default workload (MNIST-1D): an MLP and a 1-D CNN, and the dense layers
(linear without bias -> batch norm -> ReLU) that they and the paper's MLPs share."""

from __future__ import annotations

import math

from torch import nn

from hpcnoise.models.registry import NormFactory, register


def dense_layers(fan_in: int, widths: tuple[int, ...], num_classes: int, norm: NormFactory) -> list[nn.Module]:
    """Hidden layers linear (no bias) -> batch norm -> ReLU of the given widths, then the linear classifier."""
    layers: list[nn.Module] = []
    for width in widths:
        layers += [nn.Linear(fan_in, width, bias=False), norm(width), nn.ReLU()]
        fan_in = width
    return [*layers, nn.Linear(fan_in, num_classes)]


@register("mlp", "MLP: 2 hidden layers of 512 units, batch norm, ReLU")
def mlp(in_shape: tuple[int, ...], num_classes: int, norm: NormFactory, width: int = 512) -> nn.Module:
    return nn.Sequential(nn.Flatten(), *dense_layers(math.prod(in_shape), (width, width), num_classes, norm))


@register("cnn1d", "1-D CNN: 3 conv layers of 32 channels (kernel 5), batch norm, ReLU, linear head")
def cnn1d(in_shape: tuple[int, ...], num_classes: int, norm: NormFactory, width: int = 32) -> nn.Module:
    channels, length = (1, in_shape[0]) if len(in_shape) == 1 else in_shape
    layers: list[nn.Module] = [nn.Unflatten(1, (channels, length))]
    for stride in (1, 2, 2):
        layers += [nn.Conv1d(channels, width, 5, stride=stride, padding=2, bias=False), norm(width), nn.ReLU()]
        channels, length = width, (length - 1) // stride + 1
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(width * length, num_classes))
