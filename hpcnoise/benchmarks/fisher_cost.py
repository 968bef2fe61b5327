"""Cost of squared per-sample gradients in a training step: hooks vs torch.func vs a per-sample loop.

For ``mlp`` and ``cnn1d`` on MNIST-1D-shaped input (40 features, 10 classes; synthetic values, which do not
change the cost) it times one full step, forward, mean cross-entropy, backward and SGD-momentum update:

- train-mode batch norm (what training runs): plain, and with ``SumGradSquared`` hooks (exact; spatial for
  convolutions too). This is where the hooks' target of at most 1.3x a plain step applies.
- eval-mode batch norm, where samples are independent and every method computes the same true per-sample
  gradients: plain, hooks, torch.func (vmap over grad with functional_call) and a per-sample autograd
  loop. torch.func cannot vmap a train-mode batch norm (its statistics couple the batch), hence this
  separate comparison. Each method's sums are also compared with the exact hooks on the same samples.

Methods are timed in interleaved rounds (one step of each per round), so drifting background load hits
all of them alike; the table gives the median over rounds after warm-up.

    python -m hpcnoise.benchmarks.fisher_cost [--batch 1024] [--steps 20] [--threads T]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import pandas as pd  # type: ignore[import-untyped]
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from hpcnoise.curvature import SumGradSquared
from hpcnoise.models import build_model

IN_SHAPE = (40,)  # MNIST-1D: 40 features per sample
NUM_CLASSES = 10
MODELS = ("mlp", "cnn1d")
WARMUP = 3  # untimed steps per method before the timed rounds
LOOP_SAMPLES = 64  # the per-sample loop runs on this many samples; its time is scaled to the batch
VMAP_CHUNK = 256  # samples per vmap call: bounds the (chunk, n_params) per-sample gradients (mlp: ~300 MB)
AGREE_SAMPLES = 64  # samples on which each method's sums are compared with the exact hooks
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


def time_methods(methods: list[Method], model: nn.Module, x: Tensor, y: Tensor, steps: int) -> dict[str, float]:
    """Median ms per training step of each method, timed in interleaved rounds after WARMUP steps."""
    runs = []
    for m in methods:
        net = copy.deepcopy(model)
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


def agreement(methods: list[Method], model: nn.Module, x: Tensor, y: Tensor) -> dict[str, float]:
    """Max over parameters of max|S - S_ref| / max|S_ref| on the same samples, S_ref from exact hooks."""
    x, y = x[:AGREE_SAMPLES], y[:AGREE_SAMPLES]
    reference = hooks("exact", record_eval=not model.training)(copy.deepcopy(model), x, y)
    assert reference is not None
    out = {}
    for m in methods:
        sums = m.compute(copy.deepcopy(model), x, y)
        if sums is not None and m.name != "hooks exact":
            out[m.name] = max(
                ((s - r).abs().max() / r.abs().max().clamp_min(1e-30)).item()
                for s, r in zip(sums, reference, strict=True)
            )
    return out


def benchmark(name: str, bn: str, batch: int, steps: int) -> list[dict[str, object]]:
    """Rows of the table for one network and one batch-norm mode ("train" or "eval")."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, *IN_SHAPE, generator=gen)
    y = torch.randint(0, NUM_CLASSES, (batch,), generator=gen)
    model = build_model(name, IN_SHAPE, NUM_CLASSES)
    model.train(bn == "train")
    has_conv = any(isinstance(m, (nn.Conv1d, nn.Conv2d)) for m in model.modules())
    evaluating = bn == "eval"
    methods = [Method("plain", plain), Method("hooks exact", hooks("exact", evaluating))]
    if has_conv:
        methods.append(Method("hooks spatial", hooks("spatial", evaluating)))
    if evaluating:
        loop_n = min(LOOP_SAMPLES, batch)
        methods += [Method("torch.func vmap", func_vmap), Method("per-sample loop", loop, loop_n)]
    ms = time_methods(methods, model, x, y, steps)
    diff = agreement(methods, model, x, y)
    rows: list[dict[str, object]] = []
    for m in methods:
        note = "reference for max rel diff" if m.name == "hooks exact" else ""
        if m.samples is not None and m.samples < batch:
            note = f"timed on {m.samples} samples, scaled x{batch / m.samples:g}"
        rows.append(
            {
                "model": name,
                "bn": bn,
                "method": m.name,
                "ms/step": ms[m.name],
                "x plain": ms[m.name] / ms["plain"],
                "max rel diff": diff.get(m.name, float("nan")),
                "note": note,
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=1024, help="local batch size (samples per step)")
    parser.add_argument("--steps", type=int, default=20, help="timed rounds; the median is reported")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, "
        f"{WARMUP} warm-up steps, median of {args.steps} interleaved rounds"
    )
    rows = [row for name in MODELS for bn in ("train", "eval") for row in benchmark(name, bn, args.batch, args.steps)]
    table = pd.DataFrame(rows)
    with pd.option_context("display.width", 200, "display.max_columns", None):
        print(
            table.to_string(
                index=False,
                formatters={
                    "ms/step": "{:.2f}".format,
                    "x plain": "{:.2f}".format,
                    "max rel diff": lambda v: "" if pd.isna(v) else f"{v:.1e}",
                },
            )
        )
    print(
        "x plain: ratio to the plain step of the same network and batch-norm mode. max rel diff: "
        f"max|S - S_hooks exact| / max|S_hooks exact| on the first {AGREE_SAMPLES} samples (spatial: the "
        "Appendix-C approximation error; train-mode BN has no per-sample reference). Eval-mode BN makes "
        "samples independent so torch.func and the loop compute the same sums as the hooks."
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
