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
  The issue's target: spatial costs at most 1.5x a plain step.
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

    python -m hpcnoise.benchmarks.fisher_cost [--batch 1024] [--steps 20] [--threads 1]
    python -m hpcnoise.benchmarks.fisher_cost --conv [--batch 128]   # lenet5 and resnet44
"""

from __future__ import annotations

import copy
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pandas as pd  # type: ignore[import-untyped]
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from hpcnoise.curvature import SumGradSquared
from hpcnoise.errors import EXIT_USAGE, ConfigError, Parser
from hpcnoise.models import GhostBatchNorm, build_model

IN_SHAPE = (40,)  # MNIST-1D: 40 features per sample
NUM_CLASSES = 10
MODELS = ("mlp", "cnn1d")
CONV_SHAPES = {"lenet5": (1, 28, 28), "resnet44": (3, 32, 32)}  # MNIST and CIFAR images, 10 classes each
DEFAULT_BATCH = {"mlp": 1024, "cnn1d": 1024, "lenet5": 128, "resnet44": 128}
SPATIAL_TARGET = 1.5  # the bound on a spatial diagf step, in plain steps (train-mode batch norm)
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
    prepare: Callable[[nn.Module], nn.Module] | None = None  # turns a copy of the network into its own


def _copy_for(m: Method, model: nn.Module) -> nn.Module:
    net = copy.deepcopy(model)
    return m.prepare(net) if m.prepare is not None else net


def time_methods(methods: list[Method], model: nn.Module, x: Tensor, y: Tensor, steps: int) -> dict[str, float]:
    """Median ms per training step of each method, timed in interleaved rounds after WARMUP steps."""
    runs = []
    for m in methods:
        net = _copy_for(m, model)
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


# --- convolutional networks: hooks (spatial, exact) vs BackPACK ---------------------------------------

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
            sums = m.compute(_copy_for(m, model), x, y)
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


def _print_table(rows: list[dict[str, Any]]) -> None:
    diff = {"max rel diff", "conv frob diff"}
    formatters: dict[str, Callable[[Any], str]] = {
        c: (lambda v: "" if pd.isna(v) else f"{v:.1e}") if c in diff else (lambda v: "" if pd.isna(v) else f"{v:.2f}")
        for c in ("ms/step", "x plain", *diff)
    }
    table = pd.DataFrame(rows)
    with pd.option_context("display.width", 250, "display.max_columns", None, "display.max_colwidth", 120):
        print(table.to_string(index=False, na_rep="", formatters={c: f for c, f in formatters.items() if c in table}))


def _parser() -> Parser:
    parser = Parser(prog="hpcnoise bench fisher", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--models",
        nargs="+",
        choices=[*MODELS, *CONV_SHAPES],
        default=None,
        help=f"networks to measure (default: {' '.join(MODELS)})",
    )
    parser.add_argument("--conv", action="store_true", help=f"same as --models {' '.join(CONV_SHAPES)}")
    parser.add_argument(
        "--batch",
        type=int,
        default=None,
        help="local batch size (samples per step; default: 1024 for mlp and cnn1d, 128 for lenet5 and resnet44)",
    )
    parser.add_argument("--steps", type=int, default=20, help="timed rounds; the median is reported")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default: 1)")
    return parser


def _header(batch: int, steps: int) -> None:
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {batch}, "
        f"{WARMUP} warm-up steps, median of {steps} interleaved rounds"
    )


def run_flat(models: list[str], batch: int, steps: int) -> None:
    """The table of ``mlp`` and ``cnn1d``: train- and eval-mode batch norm, hooks vs torch.func and a loop."""
    _header(batch, steps)
    _print_table([r for name in models for bn in ("train", "eval") for r in benchmark(name, bn, batch, steps)])
    print(
        "x plain: ratio to the plain step of the same network and batch-norm mode. max rel diff: "
        f"max|S - S_hooks exact| / max|S_hooks exact| on the first {AGREE_SAMPLES} samples (spatial: the "
        "Appendix-C approximation error; train-mode BN has no per-sample reference). Eval-mode BN makes "
        "samples independent so torch.func and the loop compute the same sums as the hooks."
    )


def run_conv(models: list[str], batch: int, steps: int) -> None:
    """The table of the convolutional networks (hooks vs BackPACK) and the verdict on SPATIAL_TARGET."""
    _header(batch, steps)
    rows = [r for name in models for bn in ("train", "eval") for r in conv_benchmark(name, bn, batch, steps)]
    _print_table(rows)
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


def main(argv: list[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
        if args.conv and args.models is not None:
            raise ConfigError("--conv and --models are exclusive")
    except ConfigError as e:
        print(f"hpcnoise: error: {e}", file=sys.stderr, flush=True)
        return EXIT_USAGE
    models = list(CONV_SHAPES) if args.conv else args.models or list(MODELS)
    torch.set_num_threads(args.threads)
    flat = [name for name in models if name in MODELS]
    conv = [name for name in models if name in CONV_SHAPES]
    if flat:
        run_flat(flat, args.batch or DEFAULT_BATCH[flat[0]], args.steps)
    if conv:
        if flat:
            print()
        run_conv(conv, args.batch or DEFAULT_BATCH[conv[0]], args.steps)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
