"""Cost of squared per-sample gradients in a training step: hooks vs torch.func, a per-sample loop, BackPACK.

For ``mlp`` and ``cnn1d`` on MNIST-1D-shaped input (40 features, 10 classes; synthetic values, which do not
change the cost) it times one full step, forward, mean cross-entropy, backward and SGD-momentum update:

- train-mode batch norm (what training runs): plain, and with ``SumGradSquared`` hooks (exact; spatial for
  convolutions too). This is where the hooks' target of at most 1.3x a plain step applies.
- eval-mode batch norm, where samples are independent and every method computes the same true per-sample
  gradients: plain, hooks, torch.func (vmap over grad with functional_call) and a per-sample autograd
  loop. torch.func cannot vmap a train-mode batch norm (its statistics couple the batch), hence this
  separate comparison. Each method's sums are also compared with the exact hooks on the same samples.

For the convolutional networks ``lenet5`` (MNIST shape (1, 28, 28)) and ``resnet44`` (CIFAR shape
(3, 32, 32)), both with 10 classes, at a local batch of 128 by default (``--conv``, or ``--models``):

- train-mode batch norm: plain, and the step with ``SumGradSquared`` in conv_mode "spatial" and "exact".
  The suite's target: spatial costs at most 1.5x a plain step.
- eval-mode batch norm, running statistics set from one train-mode forward of the batch (so the eval
  network computes what the train-mode one does on that batch): plain, hooks exact and spatial, and
  BackPACK's SumGradSquared extension. BackPACK knows nn.BatchNorm1d/2d, not GhostBatchNorm, and refuses
  per-sample quantities under batch norm in training mode, so it runs on a copy of the same network
  whose GhostBatchNorms are replaced by nn.BatchNorm1d/2d in eval mode with the same affine parameters
  and running statistics; its plain step is timed too ("plain, nn.BatchNorm").
- agreement on the whole batch: spatial and BackPACK against the exact hooks, as the max relative
  difference and as the relative Frobenius difference over all convolution weights.

Methods are timed in interleaved rounds (one step of each per round), so drifting background load hits
all of them alike; the table gives the median over rounds after warm-up.

    hpcnoise bench fisher [--batch 1024] [--steps 20] [--threads 1]
    hpcnoise bench fisher --conv [--batch 128]   # lenet5 and resnet44

This module holds the flat networks' benchmark; the methods, their timing and the table are in
:mod:`hpcnoise.benchmarks.fisher_methods`, the convolutional section in :mod:`hpcnoise.benchmarks.fisher_conv`,
the command line in :mod:`hpcnoise.cli.bench.fisher`.
"""

from __future__ import annotations

import copy

from torch import Tensor, nn

from hpcnoise.benchmarks.fisher_conv import CONV_SHAPES, run_conv
from hpcnoise.benchmarks.fisher_methods import (
    NUM_CLASSES,
    Method,
    exact_sums,
    func_vmap,
    header,
    hooks,
    inputs,
    loop,
    max_rel_diff,
    plain,
    print_table,
    table_row,
    time_methods,
)
from hpcnoise.models import build_model

IN_SHAPE = (40,)  # MNIST-1D: 40 features per sample
MODELS = ("mlp", "cnn1d")
DEFAULT_BATCH = {"mlp": 1024, "cnn1d": 1024, "lenet5": 128, "resnet44": 128}
LOOP_SAMPLES = 64  # the per-sample loop runs on this many samples; its time is scaled to the batch
AGREE_SAMPLES = 64  # samples on which each method's sums are compared with the exact hooks


def agreement(methods: list[Method], model: nn.Module, x: Tensor, y: Tensor) -> dict[str, float]:
    """Per method, its max rel diff to the exact hooks on the same AGREE_SAMPLES samples."""
    x, y = x[:AGREE_SAMPLES], y[:AGREE_SAMPLES]
    reference = exact_sums(model, x, y)
    out = {}
    for m in methods:
        sums = m.compute(copy.deepcopy(model), x, y)
        if sums is not None and m.name != "hooks exact":
            out[m.name] = max_rel_diff(sums, reference)
    return out


def benchmark(name: str, bn: str, batch: int, steps: int) -> list[dict[str, object]]:
    """Rows of the table for one network and one batch-norm mode ("train" or "eval")."""
    x, y = inputs(IN_SHAPE, batch)
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
        rows.append(table_row(name, bn, m.name, ms, {"max rel diff": diff.get(m.name, float("nan"))}, note))
    return rows


def run_flat(models: list[str], batch: int, steps: int) -> None:
    """The table of ``mlp`` and ``cnn1d``: train- and eval-mode batch norm, hooks vs torch.func and a loop."""
    header(batch, steps)
    print_table([r for name in models for bn in ("train", "eval") for r in benchmark(name, bn, batch, steps)])
    print(
        "x plain: ratio to the plain step of the same network and batch-norm mode. max rel diff: "
        f"max|S - S_hooks exact| / max|S_hooks exact| on the first {AGREE_SAMPLES} samples (spatial: the "
        "Appendix-C approximation error; train-mode BN has no per-sample reference). Eval-mode BN makes "
        "samples independent so torch.func and the loop compute the same sums as the hooks."
    )


def run(models: list[str], batch: int | None, steps: int) -> None:
    """The tables of ``models`` (flat ones, then convolutional ones) at ``batch`` (default: DEFAULT_BATCH)."""
    flat = [name for name in models if name in MODELS]
    conv = [name for name in models if name in CONV_SHAPES]
    if flat:
        run_flat(flat, batch or DEFAULT_BATCH[flat[0]], steps)
    if conv:
        if flat:
            print()
        run_conv(conv, batch or DEFAULT_BATCH[conv[0]], steps)
