"""The methods that ``hpcnoise bench fisher`` times, the interleaved timing and the table helpers.

A method does forward and backward on (x, y), leaves the mean gradient in p.grad and returns the sums
sum_i g_i^2 per parameter (None for the plain step): the plain step, the ``SumGradSquared`` hooks,
torch.func (vmap over grad with functional_call) and a per-sample autograd loop. The convolutional
section's methods (BackPACK) are in :mod:`hpcnoise.benchmarks.fisher_conv`; the command line is in
:mod:`hpcnoise.benchmarks.fisher_cost`.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pandas as pd  # type: ignore[import-untyped]
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from hpcnoise.curvature import SumGradSquared

NUM_CLASSES = 10
WARMUP = 3  # untimed steps per method before the timed rounds
VMAP_CHUNK = 256  # samples per vmap call: bounds the (chunk, n_params) per-sample gradients (mlp: ~300 MB)
LR, MOMENTUM = 0.01, 0.9

# A method does forward and backward on (x, y), leaves the mean gradient in p.grad and returns the sums
# sum_i g_i^2 per parameter (None for the plain step).
Compute = Callable[[nn.Module, Tensor, Tensor], "list[Tensor] | None"]


def plain(model: nn.Module, x: Tensor, y: Tensor) -> list[Tensor] | None:
    F.cross_entropy(model(x), y).backward()
    return None


def hooks(conv_mode: str, record_eval: bool) -> Compute:
    """Squared per-sample gradients from SumGradSquared in the step's own backward."""
    attached: dict[nn.Module, SumGradSquared] = {}  # keeps each model alive with its hooks

    def compute(model: nn.Module, x: Tensor, y: Tensor) -> list[Tensor] | None:
        if model not in attached:
            attached[model] = SumGradSquared(model, conv_mode=conv_mode, record_eval=record_eval)
        sgs = attached[model]
        with sgs.recording(x.shape[0]):
            F.cross_entropy(model(x), y).backward()
        return sgs.result()

    return compute


def func_vmap(model: nn.Module, x: Tensor, y: Tensor) -> list[Tensor] | None:
    """Per-sample gradients with torch.func, VMAP_CHUNK samples per call; mean gradient from their sum."""
    names = [n for n, _ in model.named_parameters()]
    params = {n: p.detach() for n, p in model.named_parameters()}
    buffers = dict(model.named_buffers())

    def loss_one(p: dict[str, Tensor], b: dict[str, Tensor], xi: Tensor, yi: Tensor) -> Tensor:
        return F.cross_entropy(functional_call(model, (p, b), (xi.unsqueeze(0),)), yi.unsqueeze(0))

    per_sample = vmap(grad(loss_one), in_dims=(None, None, 0, 0))
    total = {n: torch.zeros_like(p) for n, p in params.items()}
    sums = {n: torch.zeros_like(p) for n, p in params.items()}
    for start in range(0, x.shape[0], VMAP_CHUNK):
        g = per_sample(params, buffers, x[start : start + VMAP_CHUNK], y[start : start + VMAP_CHUNK])
        for n in names:
            total[n] += g[n].sum(0)
            sums[n] += g[n].square_().sum(0)
    for n, p in model.named_parameters():
        p.grad = total[n] / x.shape[0]
    return [sums[n] for n in names]


def loop(model: nn.Module, x: Tensor, y: Tensor) -> list[Tensor] | None:
    """One autograd call per sample; the mean gradient is the average of the per-sample ones."""
    params = list(model.parameters())
    total = [torch.zeros_like(p) for p in params]
    sums = [torch.zeros_like(p) for p in params]
    for i in range(x.shape[0]):
        grads = torch.autograd.grad(F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]), params)
        for t, s, g in zip(total, sums, grads, strict=True):
            t += g
            s.addcmul_(g, g)
    for p, t in zip(params, total, strict=True):
        p.grad = t / x.shape[0]
    return sums


@dataclass
class Method:
    name: str
    compute: Compute
    samples: int | None = None  # run on this many samples and scale the time to the batch; None: all
    prepare: Callable[[nn.Module], nn.Module] | None = None  # turns a copy of the network into its own


def copy_for(m: Method, model: nn.Module) -> nn.Module:
    """A copy of ``model`` made into the method's own network (``m.prepare``, where it has one)."""
    net = copy.deepcopy(model)
    return m.prepare(net) if m.prepare is not None else net


def time_methods(methods: list[Method], model: nn.Module, x: Tensor, y: Tensor, steps: int) -> dict[str, float]:
    """Median ms per training step of each method, timed in interleaved rounds after WARMUP steps."""
    runs = []
    for m in methods:
        net = copy_for(m, model)
        opt = torch.optim.SGD(net.parameters(), lr=LR, momentum=MOMENTUM)
        n = m.samples or x.shape[0]
        xs, ys = x[:n], y[:n]

        def step(
            net: nn.Module = net,
            opt: torch.optim.Optimizer = opt,
            m: Method = m,
            xs: Tensor = xs,
            ys: Tensor = ys,
        ) -> None:
            opt.zero_grad(set_to_none=True)
            m.compute(net, xs, ys)
            opt.step()

        runs.append((m, step, x.shape[0] / n))
    for _ in range(WARMUP):
        for _, step, _ in runs:
            step()
    times: dict[str, list[float]] = {m.name: [] for m in methods}
    for _ in range(steps):
        for m, step, scale in runs:
            t0 = time.perf_counter()
            step()
            times[m.name].append((time.perf_counter() - t0) * 1e3 * scale)  # ms per full batch
    return {name: statistics.median(t) for name, t in times.items()}


def exact_sums(model: nn.Module, x: Tensor, y: Tensor) -> list[Tensor]:
    """The reference: sums of squared per-sample gradients from the exact hooks, on a copy of ``model``."""
    reference = hooks("exact", record_eval=not model.training)(copy.deepcopy(model), x, y)
    assert reference is not None
    return reference


def max_rel_diff(sums: list[Tensor], reference: list[Tensor]) -> float:
    """Max over parameters of max|S - S_ref| / max|S_ref|."""
    return max(
        ((s - r).abs().max() / r.abs().max().clamp_min(1e-30)).item() for s, r in zip(sums, reference, strict=True)
    )


def inputs(shape: tuple[int, ...], batch: int) -> tuple[Tensor, Tensor]:
    """A fixed synthetic batch: standard normal inputs of ``shape``, uniform labels of NUM_CLASSES."""
    gen = torch.Generator().manual_seed(0)
    return torch.randn(batch, *shape, generator=gen), torch.randint(0, NUM_CLASSES, (batch,), generator=gen)


def table_row(
    name: str, bn: str, method: str, ms: dict[str, float], diffs: dict[str, float], note: str
) -> dict[str, object]:
    """One table row: the method's time per step, its ratio to the plain step, its diffs and a note."""
    t = ms.get(method, float("nan"))
    return {"model": name, "bn": bn, "method": method, "ms/step": t, "x plain": t / ms["plain"], **diffs, "note": note}


def print_table(rows: list[dict[str, Any]]) -> None:
    """The rows as one table: times and ratios to two decimals, diffs in exponent notation, NaN blank."""
    diff = {"max rel diff", "conv frob diff"}
    formatters: dict[str, Callable[[Any], str]] = {
        c: (lambda v: "" if pd.isna(v) else f"{v:.1e}") if c in diff else (lambda v: "" if pd.isna(v) else f"{v:.2f}")
        for c in ("ms/step", "x plain", *diff)
    }
    table = pd.DataFrame(rows)
    with pd.option_context("display.width", 250, "display.max_columns", None, "display.max_colwidth", 120):
        print(table.to_string(index=False, na_rep="", formatters={c: f for c, f in formatters.items() if c in table}))


def header(batch: int, steps: int) -> None:
    """The line above a table: torch version, threads, batch, warm-up and timed rounds."""
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {batch}, "
        f"{WARMUP} warm-up steps, median of {steps} interleaved rounds"
    )
