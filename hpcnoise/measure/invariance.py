"""Reparametrisation invariance for sharpness: batch-norm folding and a fitted softmax temperature.

Every batch norm is folded into the layer before it (eval mode, running statistics), and a softmax
temperature fitted on held-out data rescales the logits, so the Hessian measured is that of the
cross-entropy of logits / T, comparable across runs.
"""

from __future__ import annotations

import copy
import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from hpcnoise.models import GhostBatchNorm


# --- reparametrisation invariance: batch-norm folding and temperature -----------------------------------
def hookless_copy(model: nn.Module) -> nn.Module:
    """A deep copy without forward hooks: curvature hooks of a training loop stay with the original."""
    stash = {m: (m._forward_hooks, m._forward_pre_hooks) for m in model.modules()}
    try:
        for m in model.modules():
            m._forward_hooks, m._forward_pre_hooks = OrderedDict(), OrderedDict()
        return copy.deepcopy(model)
    finally:
        for m, (hooks, pre_hooks) in stash.items():
            m._forward_hooks, m._forward_pre_hooks = hooks, pre_hooks


class ChannelSign(nn.Module):
    """Multiplies each channel by a fixed sign (a buffer, no parameters).

    What remains of a batch norm with a negative scale gamma / sqrt(var + eps) after it is folded through a
    max pool: max pooling commutes with positive scales only, so the magnitude goes into the layer and the
    sign stays here.
    """

    def __init__(self, sign: Tensor):
        super().__init__()
        self.register_buffer("sign", sign)

    def forward(self, x: Tensor) -> Tensor:
        return x * self.sign.view(1, -1, *[1] * (x.dim() - 2))  # type: ignore[operator]


_FOLDABLE = (nn.Linear, nn.Conv1d, nn.Conv2d)
# Between a layer and its batch norm: max pooling commutes with per-channel x -> a x + b for a >= 0
# (its padding is -inf), so a norm can be folded through it.
_POOLS = (nn.MaxPool1d, nn.MaxPool2d)


class _Tracer(fx.Tracer):
    """torch.fx tracer that keeps batch norms as opaque calls (their forward branches on the mode)."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, GhostBatchNorm) or super().is_leaf_module(m, module_qualified_name)


def _fold_plan(model: nn.Module) -> dict[str, tuple[str, bool]]:
    """Per batch norm (qualified name): the layer whose output it normalises; max pools between or not.

    Read from the traced data flow, not from module order: the layer must feed the norm directly or
    through max pools only, nothing else may use its output, and each module must be called once.
    """
    graph = _Tracer().trace(model)
    modules = dict(model.named_modules())
    calls = [n.target for n in graph.nodes if n.op == "call_module"]
    plan: dict[str, tuple[str, bool]] = {}
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules[str(node.target)], GhostBatchNorm):
            continue
        src, pooled = node.args[0], False
        while (
            isinstance(src, fx.Node) and src.op == "call_module"
            and isinstance(modules[str(src.target)], _POOLS) and len(src.users) == 1
        ):  # fmt: skip
            src, pooled = src.args[0], True
        ok = (
            isinstance(src, fx.Node) and src.op == "call_module"
            and isinstance(modules[str(src.target)], _FOLDABLE) and len(src.users) == 1
        )  # fmt: skip
        if not ok or calls.count(node.target) > 1 or calls.count(src.target) > 1:
            raise ValueError(
                f"batch norm {node.target!r} does not normalise the output of a Linear or Conv layer used "
                "once (directly or through max pooling); it cannot be folded"
            )
        plan[str(node.target)] = (str(src.target), pooled)
    return plan


@torch.no_grad()
def _fold_into(layer: nn.Module, bn: GhostBatchNorm, pooled: bool) -> nn.Module:
    """Fold the eval-mode norm y = k x + c (k = gamma / sqrt(var + eps), c = beta - k mu, per channel) into
    ``layer``'s weight and bias (in float64); return the module that replaces the norm.

    Directly after the layer: W <- k W, b <- k b + c, and nothing remains. Through max pooling (which
    commutes with non-negative scales only): W <- |k| W, b <- |k| b + sign(k) c, then the signs remain.
    """
    assert isinstance(layer, _FOLDABLE)
    w = layer.weight
    k = bn.weight.double() * torch.rsqrt(bn.running_var.double() + bn.eps)
    c = bn.bias.double() - k * bn.running_mean.double()
    b = layer.bias.double() if layer.bias is not None else torch.zeros_like(k)
    sign = torch.where(k < 0, -1.0, 1.0).to(k) if pooled else torch.ones_like(k)
    scale = k * sign  # |k| through pooling, else k
    layer.weight = nn.Parameter((w.double() * scale.view(-1, *[1] * (w.dim() - 1))).to(w.dtype))
    layer.bias = nn.Parameter((scale * b + sign * c).to(w.dtype))
    return ChannelSign(sign.to(w.dtype)) if bool((sign < 0).any()) else nn.Identity()


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A new model without batch norm whose outputs equal ``model``'s in eval mode (running statistics).

    Each GhostBatchNorm is folded into the Linear or Conv layer whose output it normalises (found by
    tracing the forward with torch.fx; max pools may lie between) and replaced by nn.Identity (or by a
    parameter-free ``ChannelSign`` where a negative scale meets a max pool). Layers keep their names;
    a layer without a bias gets one. The original is untouched.
    """
    folded = hookless_copy(model).eval()
    for bn_name, (layer_name, pooled) in _fold_plan(folded).items():
        bn = folded.get_submodule(bn_name)
        assert isinstance(bn, GhostBatchNorm)
        replacement = _fold_into(folded.get_submodule(layer_name), bn, pooled)
        parent, _, child = bn_name.rpartition(".")
        setattr(folded.get_submodule(parent), child, replacement)
    return folded


@torch.no_grad()
def logits_of(model: nn.Module, x: Tensor, chunk: int = 4096) -> Tensor:
    """Eval-mode outputs on ``x``, in chunks of ``chunk`` samples (restores the model's mode)."""
    was_training = model.training
    model.eval()
    try:
        return torch.cat([model(x[s : s + chunk]) for s in range(0, x.shape[0], chunk)])
    finally:
        model.train(was_training)


def fit_softmax_temperature(logits: Tensor, y: Tensor, bounds: tuple[float, float] = (1e-3, 1e3)) -> float:
    """The T > 0 minimising the mean NLL of softmax(logits / T) on ``y`` (Brent's method over log T).

    The NLL is convex in 1/T, hence unimodal in log T, so a bounded scalar search finds the optimum.
    """
    from scipy.optimize import minimize_scalar

    z = logits.detach().double().cpu()
    labels = y.detach().cpu()

    def nll(log_t: float) -> float:
        return F.cross_entropy(z * math.exp(-log_t), labels).item()

    res = minimize_scalar(nll, bounds=(math.log(bounds[0]), math.log(bounds[1])), method="bounded",
                          options={"xatol": 1e-10})  # fmt: skip
    return math.exp(float(res.x))
