"""The convolutional section of ``hpcnoise bench fisher``: ``SumGradSquared`` (spatial, exact) vs BackPACK.

For ``lenet5`` (MNIST shape (1, 28, 28)) and ``resnet44`` (CIFAR shape (3, 32, 32)), with train- and
eval-mode batch norm; see :mod:`hpcnoise.benchmarks.fisher_cost` for what is measured and how.
"""

from __future__ import annotations

import copy
import warnings

import pandas as pd  # type: ignore[import-untyped]
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hpcnoise.benchmarks.fisher_methods import (
    NUM_CLASSES,
    Method,
    copy_for,
    exact_sums,
    header,
    hooks,
    inputs,
    max_rel_diff,
    plain,
    print_table,
    table_row,
    time_methods,
)
from hpcnoise.models import GhostBatchNorm, build_model

CONV_SHAPES = {"lenet5": (1, 28, 28), "resnet44": (3, 32, 32)}  # MNIST and CIFAR images, 10 classes each
SPATIAL_TARGET = 1.5  # the suite's bound on a spatial diagf step, in plain steps (train-mode batch norm)

# BackPACK warnings that say nothing about its results here: a residual block is a container whose
# parameterised children BackPACK handles itself, and the first module's full backward hook fires on a
# network input that does not require gradients.
_BACKPACK_BENIGN = (
    r"Extension saving to sum_grad_squared does not have an extension for Module "
    r"<class 'hpcnoise\.models\.BasicBlock'>",
    r"Full backward hook is firing when gradients are computed with respect to module outputs",
)


def calibrate(model: nn.Module, x: Tensor) -> None:
    """Set every GhostBatchNorm's running statistics to the batch statistics of one train-mode forward."""
    was_training = model.training
    model.train()
    with torch.no_grad():
        model(x)
    for bn in model.modules():
        if isinstance(bn, GhostBatchNorm) and bn.stat_sums is not None:
            bn.running_mean.copy_(bn.stat_sums[0] / bn.ghost_count)
            bn.running_var.copy_(bn.stat_sums[1] / bn.ghost_count)
            bn.stat_sums = None
    model.train(was_training)


def to_torch_batchnorm(model: nn.Module, example: Tensor) -> nn.Module:
    """The network, put in eval mode, with each GhostBatchNorm replaced in place by nn.BatchNorm1d/2d.

    The replacement holds the same weight, bias, running statistics and eps; in eval mode the two compute
    the same function, and parameters keep their names and order. ``example`` (a few samples) tells
    which batch norms see (N, C) and which (N, C, H, W).
    """
    norms = [m for m in model.modules() if isinstance(m, GhostBatchNorm)]
    dtype = next(model.parameters()).dtype
    dims: dict[nn.Module, int] = {}
    handles = [bn.register_forward_hook(lambda m, i, o: dims.__setitem__(m, i[0].dim())) for bn in norms]
    model.eval()
    with torch.no_grad():
        model(example.to(dtype))
    for h in handles:
        h.remove()
    kinds: dict[int, type[nn.BatchNorm1d | nn.BatchNorm2d]] = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d}
    for name, bn in list(model.named_modules()):
        if not isinstance(bn, GhostBatchNorm):
            continue
        new = kinds[dims[bn]](bn.num_features, eps=bn.eps, momentum=bn.momentum, dtype=dtype)
        with torch.no_grad():
            for tensor in ("weight", "bias", "running_mean", "running_var"):
                getattr(new, tensor).copy_(getattr(bn, tensor))
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, new)
    return model.eval()  # the new batch norms too


def backpack_method(example: Tensor) -> Method:
    """BackPACK's SumGradSquared in the step's backward, on the nn.BatchNorm (eval) copy of the network."""
    from backpack import backpack, extend  # type: ignore[import-untyped]
    from backpack.extensions import SumGradSquared as BackpackSGS  # type: ignore[import-untyped]

    def prepare(model: nn.Module) -> nn.Module:
        return extend(to_torch_batchnorm(model, example))

    def compute(model: nn.Module, x: Tensor, y: Tensor) -> list[Tensor] | None:
        with warnings.catch_warnings():
            for message in _BACKPACK_BENIGN:
                warnings.filterwarnings("ignore", message=message)
            with backpack(BackpackSGS()):
                F.cross_entropy(model(x), y).backward()
        scale = float(x.shape[0]) ** 2  # BackPACK squares the gradients of the mean's terms, l_i / m
        return [p.sum_grad_squared.mul_(scale) for p in model.parameters()]  # type: ignore[attr-defined]

    return Method("BackPACK", compute, prepare=prepare)


def plain_torch_batchnorm(example: Tensor) -> Method:
    """The plain step on BackPACK's network (nn.BatchNorm1d/2d in eval mode), not extended."""
    return Method("plain, nn.BatchNorm", plain, prepare=lambda model: to_torch_batchnorm(model, example))


def _conv_weights(model: nn.Module) -> list[int]:
    """Indices in model.parameters() of the convolution weights."""
    conv = {id(m.weight) for m in model.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d))}
    return [i for i, p in enumerate(model.parameters()) if id(p) in conv]


def conv_agreement(
    methods: list[Method], model: nn.Module, x: Tensor, y: Tensor
) -> tuple[dict[str, tuple[float, float]], dict[str, str]]:
    """Per method, (max rel diff, relative Frobenius difference over conv weights) to the exact hooks.

    Max rel diff: max over parameters of max|S - S_ref| / max|S_ref|. Frobenius: ||S - S_ref|| / ||S_ref||
    over all convolution weights together. Computed in float64: in float32, rounding differences between
    two implementations of the same deep network (ResNet44) already change the sums by ~1e-3, which would
    hide whether the methods compute the same thing. Methods that fail are returned with their error.
    """
    model, x = copy.deepcopy(model).double(), x.double()
    reference = exact_sums(model, x, y)
    convs = _conv_weights(model)
    out: dict[str, tuple[float, float]] = {}
    errors: dict[str, str] = {}
    for m in methods:
        if m.name == "hooks exact":
            continue
        try:
            sums = m.compute(copy_for(m, model), x, y)
        except Exception as e:  # reported in the table rather than hidden
            errors[m.name] = f"{type(e).__name__}: {e}".splitlines()[0][:100]
            continue
        if sums is None:
            continue
        rel = max_rel_diff(sums, reference)
        num = sum(((sums[i] - reference[i]).square().sum() for i in convs), torch.zeros(()))
        den = sum((reference[i].square().sum() for i in convs), torch.zeros(()))
        out[m.name] = (rel, (num.sqrt() / den.sqrt().clamp_min(1e-30)).item())
    return out, errors


def conv_benchmark(name: str, bn: str, batch: int, steps: int) -> list[dict[str, object]]:
    """Rows of the conv-network table for one network and one batch-norm mode ("train" or "eval")."""
    x, y = inputs(CONV_SHAPES[name], batch)
    model = build_model(name, CONV_SHAPES[name], NUM_CLASSES)
    calibrate(model, x)
    evaluating = bn == "eval"
    model.train(not evaluating)
    methods = [
        Method("plain", plain),
        Method("hooks spatial", hooks("spatial", evaluating)),
        Method("hooks exact", hooks("exact", evaluating)),
    ]
    notes = {"hooks exact": "reference for diffs"}
    if evaluating:
        try:
            methods += [plain_torch_batchnorm(x[:2]), backpack_method(x[:2])]
        except ImportError as e:
            notes["BackPACK"] = f"not run: {e} (pip install backpack-for-pytorch)"
    diff, errors = conv_agreement(methods, model, x, y)
    for failed, error in errors.items():
        notes[failed] = f"failed, not timed: {error}"
    ms = time_methods([m for m in methods if m.name not in errors], model, x, y, steps)
    if "BackPACK" in ms:
        notes["BackPACK"] = f"{ms['BackPACK'] / ms['plain, nn.BatchNorm']:.2f}x plain, nn.BatchNorm"
    names = [m.name for m in methods] + [n for n in notes if n not in {m.name for m in methods}]
    rows: list[dict[str, object]] = []
    for method in names:
        rel, frob = diff.get(method, (float("nan"), float("nan")))
        rows.append(
            table_row(name, bn, method, ms, {"max rel diff": rel, "conv frob diff": frob}, notes.get(method, ""))
        )
    return rows


def run_conv(models: list[str], batch: int, steps: int) -> None:
    """The table of the convolutional networks (hooks vs BackPACK) and the verdict on SPATIAL_TARGET."""
    header(batch, steps)
    rows = [r for name in models for bn in ("train", "eval") for r in conv_benchmark(name, bn, batch, steps)]
    print_table(rows)
    print(
        "x plain: ratio to the plain step of the same network and batch-norm mode. Diffs: to the exact hooks "
        f"on the same {batch} samples, in float64. max rel diff = max over parameters of max|S - S_exact| / "
        "max|S_exact|; conv frob diff = ||S - S_exact||_F / ||S_exact||_F over all conv weights together "
        "(spatial: the Appendix-C approximation error; only conv weights differ). Eval rows: every method "
        "on the same weights with batch norm in eval mode, running statistics set from one train-mode "
        "forward of the batch; BackPACK and 'plain, nn.BatchNorm' on a copy with each GhostBatchNorm "
        "replaced by nn.BatchNorm1d/2d in eval mode (same weights, running statistics, eps). BackPACK does "
        "not run under train-mode batch norm. ResNet44's option-A shortcut (slice and zero-pad, no "
        "parameters) has no BackPACK extension; first-order extensions need none, as autograd carries "
        "the output gradients of every conv, batch norm and linear layer through it, so BackPACK runs "
        "on the whole network; its warning that BasicBlock (a container) has no extension is silenced."
    )
    table = pd.DataFrame(rows).set_index(["model", "bn", "method"])["x plain"]
    checks = []
    for name in models:
        ratio = table[(name, "train", "hooks spatial")]
        checks.append(f"{name} {ratio:.2f}x ({'met' if ratio <= SPATIAL_TARGET else 'NOT met'})")
    print(f"Target: hooks spatial <= {SPATIAL_TARGET}x plain with train-mode BN: {'; '.join(checks)}.")
