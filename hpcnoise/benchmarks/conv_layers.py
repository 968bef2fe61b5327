"""``hpcnoise bench fisher --layers``: every convolution of the chosen networks, its exact per-sample sums
formed tap by tap and by patches (hpcnoise.curvature.taps), timed side by side, and which one
``by_taps`` picks for it.

Each distinct layer (type, channels, kernel, stride, padding, dilation, input size) is timed once, in
interleaved rounds (one call of each way per round), on its real input shape at the given local batch
and random values (they do not change the cost); the table gives the median per call and the relative
difference of the two results.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import pandas as pd
import torch
from torch import Tensor, nn

from hpcnoise.benchmarks.common import MODEL_DATA
from hpcnoise.curvature.handlers import ConvHandler, ConvMode, ConvProducts, HookOptions
from hpcnoise.curvature.taps import by_taps
from hpcnoise.data import IMAGE_SETS
from hpcnoise.models import build_model
from hpcnoise.workload import MNIST1D_SHAPE

LAYER_MODELS = ("cnn1d", "lenet5", "resnet44", "vgg16_bn")  # the step benchmark's convolutional networks
WAYS: tuple[ConvProducts, ...] = ("taps", "patches")
Layer = tuple[nn.Conv1d | nn.Conv2d, tuple[int, ...]]  # a convolution and its input shape, batch included


def conv_layers(model: str, batch: int) -> list[Layer]:
    """The distinct convolutions of ``model`` on its dataset's input shape, each with its input shape."""
    dataset = MODEL_DATA.get(model, "cifar10")
    shape = MNIST1D_SHAPE if dataset == "mnist1d" else IMAGE_SETS[dataset].shape
    net = build_model(model, shape, 10).train()
    seen: dict[str, Layer] = {}

    def record(module: nn.Conv1d | nn.Conv2d, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        key = f"{module!r} {tuple(inputs[0].shape[1:])}"
        seen.setdefault(key, (module, (batch, *inputs[0].shape[1:])))

    hooks = [m.register_forward_hook(record) for m in net.modules() if isinstance(m, nn.Conv1d | nn.Conv2d)]
    with torch.no_grad():
        net(torch.zeros(2, *shape))
    for h in hooks:
        h.remove()
    return list(seen.values())


def _way(products: ConvProducts, module: nn.Conv1d | nn.Conv2d, x: Tensor, delta: Tensor) -> Callable[[], Tensor]:
    opts = HookOptions(ConvMode.EXACT, 256, products)

    def run() -> Tensor:
        sums = {"weight": torch.zeros_like(module.weight)}
        ConvHandler().sum_grad_squared(module, x, delta, sums, opts)
        return sums["weight"]

    return run


def layer_table(models: list[str], batch: int, rounds: int) -> pd.DataFrame:
    rows = []
    for model in models:
        for module, shape in conv_layers(model, batch):
            gen = torch.Generator().manual_seed(0)
            x = torch.randn(shape, generator=gen)
            with torch.no_grad():
                delta = torch.randn(module(x).shape, generator=gen)
            ways = {way: _way(way, module, x, delta) for way in WAYS}
            times: dict[str, list[float]] = {name: [] for name in ways}
            results = {name: run() for name, run in ways.items()}  # also the warm-up
            for _ in range(rounds):
                for name, run in ways.items():
                    start = time.perf_counter()
                    run()
                    times[name].append(time.perf_counter() - start)
            taps_ms, patches_ms = (statistics.median(times[n]) * 1e3 for n in ("taps", "patches"))
            scale = results["patches"].abs().max().clamp_min(1e-30)
            rows.append(
                {
                    "model": model,
                    "layer": f"{type(module).__name__} {module.in_channels}->{module.out_channels} "
                    f"k{module.kernel_size} s{module.stride}",
                    "input": "x".join(map(str, shape[2:])),
                    "batch": batch,
                    "taps ms": round(taps_ms, 3),
                    "patches ms": round(patches_ms, 3),
                    "picked": "taps" if by_taps(module, delta) else "patches",
                    "faster": "taps" if taps_ms < patches_ms else "patches",
                    "rel diff": f"{((results['taps'] - results['patches']).abs().max() / scale).item():.1e}",
                }
            )
    return pd.DataFrame(rows)


def run(models: list[str], batch: int, rounds: int) -> None:
    print(f"exact per-sample convolution sums: tap by tap against patches, medians of {rounds} rounds")
    print(layer_table(models, batch, rounds).to_string(index=False))
