"""Measurements on trained or frozen networks: sharpness (Fig. 3d), Fisher norms (3a), gradient variance (3b).

Sharpness is the largest eigenvalue of the Hessian of the mean training loss over a FIXED set of samples.
Hessian-vector products come from double backward, chunked over samples; the eigenvalue from Lanczos
(scipy's ``eigsh``, float64 on the flattened parameters) or power iteration. The paper makes the number
comparable across runs by making it invariant to reparametrisation: every batch norm is folded into the
layer before it (eval mode, running statistics), and a softmax temperature fitted on held-out data
rescales the logits (the paper fits it on the test set, the only held-out split here), so the Hessian
measured is that of the cross-entropy of logits / T.

Distributed: each rank holds a contiguous share of the samples; one sum-allreduce per product adds the
ranks' Hessian-vector sums and sample counts, so every rank applies the same operator and runs the same
Lanczos iteration from the same seeded start vector, in lockstep.

The Fisher diagnostics use per-sample gradients (torch.func vmap of grad) in eval mode, where batch norm
uses running statistics and samples are independent: ||F||_F from the Gram matrix of per-sample gradients
(never forming the d x d F) beside ||diag F||_F. The gradient variance is measured at a frozen network over
many mini-batches drawn as a regime would draw them, per parameter tensor.
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from hpcnoise.comm import Comm, init, launcher_rank
from hpcnoise.config import Config, ConfigError
from hpcnoise.curvature import CurvatureHooks, KFactors
from hpcnoise.data import Data
from hpcnoise.models import GhostBatchNorm, ghost_norms
from hpcnoise.regimes import HOOK_QUANTITY, REGIMES, KFacLayer, NoiseInput
from hpcnoise.rundir import RunDir, write_json_atomic
from hpcnoise.seeding import generator, stream_seed

METHODS = ("lanczos", "power")


# --- reparametrisation invariance: batch-norm folding and temperature -----------------------------------
def _hookless_copy(model: nn.Module) -> nn.Module:
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
        if not ok or calls.count(node.target) > 1 or calls.count(src.target) > 1:  # type: ignore[union-attr]
            raise ValueError(
                f"batch norm {node.target!r} does not normalise the output of a Linear or Conv layer used "
                "once (directly or through max pooling); it cannot be folded"
            )
        plan[str(node.target)] = (str(src.target), pooled)  # type: ignore[union-attr]
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
    k = bn.weight.double() * torch.rsqrt(bn.running_var.double() + bn.eps)  # type: ignore[operator]
    c = bn.bias.double() - k * bn.running_mean.double()  # type: ignore[operator]
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
    folded = _hookless_copy(model).eval()
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


def fit_temperature(logits: Tensor, y: Tensor, bounds: tuple[float, float] = (1e-3, 1e3)) -> float:
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


# --- Hessian-vector products and the top eigenvalue ------------------------------------------------------
class HessianOperator:
    """v -> H v for H the Hessian of the mean of CE(model(x) / T, y) over all ranks' samples (float64 numpy).

    Each product is a double backward over this rank's samples in chunks of ``chunk`` (bounding memory),
    summed, then ONE sum-allreduce of [H v sum (d) | sample count | 1] gives every rank the same product
    of the mean loss over all samples, weighted by the ranks' sample counts. The trailing 1 counts the
    ranks taking part: iterations that fall out of lockstep raise instead of deadlocking.
    """

    def __init__(self, model: nn.Module, x: Tensor, y: Tensor, comm: Comm, temperature: float = 1.0, chunk: int = 1024):
        if chunk < 1:
            raise ValueError(f"chunk must be positive, got {chunk}")
        self.model, self.x, self.y, self.comm = model, x, y, comm
        self.temperature, self.chunk = temperature, chunk
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.dim = sum(p.numel() for p in self.params)

    def _local_sum(self, v: Tensor) -> Tensor:
        """sum over this rank's samples of the Hessian of the individual losses, times v (float64)."""
        vs = [
            t.view_as(p).to(p.dtype)
            for t, p in zip(torch.split(v, [p.numel() for p in self.params]), self.params, strict=True)
        ]
        out = torch.zeros(self.dim, dtype=torch.float64, device=v.device)
        for start in range(0, self.x.shape[0], self.chunk):
            xb, yb = self.x[start : start + self.chunk], self.y[start : start + self.chunk]
            loss = F.cross_entropy(self.model(xb) / self.temperature, yb, reduction="sum")
            grads = torch.autograd.grad(loss, self.params, create_graph=True, allow_unused=True)
            dot = sum((g * u).sum() for g, u in zip(grads, vs, strict=True) if g is not None)
            hv = torch.autograd.grad(dot, self.params, allow_unused=True)  # type: ignore[arg-type]
            out += torch.cat(
                [
                    (h if h is not None else torch.zeros_like(p)).reshape(-1)
                    for h, p in zip(hv, self.params, strict=True)
                ]
            )
        return out

    def _reduce(self, local: Tensor, count: int, active: float) -> Tensor:
        tail = torch.tensor([float(count), active], dtype=torch.float64, device=local.device)
        flat = self.comm.allreduce_sum_(torch.cat([local, tail]))
        if flat[-1].item() != active * self.comm.size:
            raise RuntimeError(
                "Hessian-vector products fell out of lockstep across ranks (Lanczos iterations diverged)"
            )
        return flat

    def __call__(self, v: np.ndarray) -> np.ndarray:
        device = self.params[0].device
        vt = torch.as_tensor(np.ascontiguousarray(v, dtype=np.float64).reshape(-1), device=device)
        flat = self._reduce(self._local_sum(vt), self.x.shape[0], 1.0)
        return (flat[: self.dim] / flat[-2]).cpu().numpy()

    def finish(self) -> None:
        """The collective ending the iteration on every rank (it mismatches a product still under way)."""
        device = self.params[0].device
        self._reduce(torch.zeros(self.dim, dtype=torch.float64, device=device), 0, 0.0)


def start_vector(dim: int, seed: int) -> np.ndarray:
    """The same unit-norm Gaussian start vector on every rank (seeded; no communication)."""
    rng = np.random.default_rng(stream_seed(seed, "lanczos-start"))
    v = rng.standard_normal(dim)
    return v / np.linalg.norm(v)


def top_eigenvalue(
    matvec: Callable[[np.ndarray], np.ndarray],
    dim: int,
    method: str = "lanczos",
    tol: float = 1e-6,
    max_products: int = 2000,
    seed: int = 0,
) -> tuple[float, int]:
    """(eigenvalue, matrix-vector products) of a symmetric operator.

    ``lanczos``: the largest algebraic eigenvalue (ARPACK implicitly restarted Lanczos, ``which="LA"``,
    residual below tol * |lambda|). ``power``: power iteration, stopping when ||A v - lambda v|| <= tol *
    |lambda|; it finds the eigenvalue of largest MAGNITUDE, which is the largest algebraic one unless the
    operator has a more negative eigenvalue (not the case near a trained minimum).
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid: {', '.join(METHODS)}")
    count = 0

    def counted(v: np.ndarray) -> np.ndarray:
        nonlocal count
        if count >= max_products:
            raise RuntimeError(f"{method} did not converge within {max_products} Hessian-vector products")
        count += 1
        return matvec(v)

    v0 = start_vector(dim, seed)
    if method == "lanczos":
        from scipy.sparse.linalg import LinearOperator, eigsh

        op = LinearOperator((dim, dim), matvec=counted, dtype=np.float64)
        vals = eigsh(op, k=1, which="LA", v0=v0, tol=tol, maxiter=max_products, return_eigenvectors=False)
        return float(vals[0]), count
    v, lam = v0, 0.0
    while True:
        w = counted(v)
        lam = float(v @ w)  # Rayleigh quotient of the unit vector v
        if np.linalg.norm(w - lam * v) <= tol * abs(lam):
            return lam, count
        v = w / np.linalg.norm(w)


def max_eigenvalue(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    comm: Comm,
    *,
    temperature: float = 1.0,
    method: str = "lanczos",
    chunk: int = 1024,
    tol: float = 1e-6,
    max_products: int = 2000,
    seed: int = 0,
) -> tuple[float, int]:
    """(largest Hessian eigenvalue, products) of the mean CE(model(x) / T) over all ranks' (x, y) shares.

    ``model`` is used as is (its mode decides batch norm's behaviour; use eval mode). Call on every rank.
    """
    op = HessianOperator(model, x, y, comm, temperature, chunk)
    value, count = top_eigenvalue(op, op.dim, method, tol, max_products, seed)
    op.finish()  # on failure every rank raised at the same product, so none waits here
    return value, count


def fixed_subset(n: int, samples: int, seed: int = 0) -> Tensor:
    """Indices of ``samples`` of ``n`` samples: a seeded draw, the same on every rank and in every run."""
    if not 0 < samples <= n:
        raise ValueError(f"asked for {samples} samples of {n}; choose 1 to {n}")
    return torch.randperm(n, generator=generator(seed, "measure-subset"))[:samples].sort().values


def sharpness_of(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    comm: Comm,
    *,
    samples: int = 4096,
    heldout: tuple[Tensor, Tensor] | None = None,
    fold: bool = True,
    method: str = "lanczos",
    chunk: int = 1024,
    tol: float = 1e-6,
    max_products: int = 2000,
    seed: int = 0,
) -> dict[str, Any]:
    """The paper's sharpness protocol on the training set (x, y), on every rank; returns the result record.

    Folds batch norm into the weights (``fold``), fits the temperature on ``heldout`` (skipped when None:
    T = 1), and takes the largest Hessian eigenvalue over a fixed seeded subset of ``samples`` training
    samples, of which each rank handles a contiguous share. ``model`` is not modified.
    """
    t0 = time.perf_counter()
    if comm.size > samples:
        raise ValueError(f"{samples} samples cannot be shared by {comm.size} ranks")
    net = fold_batchnorm(model) if fold else _hookless_copy(model)
    net.eval()
    for p in net.parameters():
        p.requires_grad_(True)
    temperature = 1.0
    if heldout is not None:
        # Rank 0 fits, everyone takes its value. Every rank passes a float: Horovod names the broadcast
        # after the object's type, and differing names never match.
        fitted = fit_temperature(logits_of(net, heldout[0]), heldout[1]) if comm.is_main else 0.0
        temperature = float(comm.broadcast_object(fitted))
    idx = fixed_subset(x.shape[0], samples, seed)
    lo, hi = samples * comm.rank // comm.size, samples * (comm.rank + 1) // comm.size
    mine = idx[lo:hi].to(x.device)
    value, count = max_eigenvalue(net, x[mine], y[mine], comm, temperature=temperature, method=method,
                                  chunk=chunk, tol=tol, max_products=max_products, seed=seed)  # fmt: skip
    return {
        "max_eigenvalue": value,
        "temperature": temperature,
        "samples": samples,
        "method": method,
        "folded_bn": fold and bool(ghost_norms(model)),
        "iterations": count,  # Hessian-vector products
        "wall_time_s": time.perf_counter() - t0,
        "world_size": comm.size,
    }


# --- Fisher norms (Fig. 3a) -------------------------------------------------------------------------------
def per_sample_gradients(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """(n, d) matrix of the gradients of the individual cross-entropy losses (torch.func vmap of grad).

    Columns follow model.parameters(). The model's current mode applies; use eval mode, where samples are
    independent.
    """
    from torch.func import functional_call, grad, vmap

    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = dict(model.named_buffers())

    def loss(p: dict[str, Tensor], xi: Tensor, yi: Tensor) -> Tensor:
        out = functional_call(model, (p, buffers), (xi.unsqueeze(0),))
        return F.cross_entropy(out, yi.unsqueeze(0))

    g = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    return torch.cat([t.reshape(x.shape[0], -1) for t in g.values()], 1)


def fisher_norms(
    model: nn.Module, x: Tensor, y: Tensor, comm: Comm | None = None, *, chunk: int = 128
) -> dict[str, float]:
    """Frobenius norms of the empirical Fisher F = (1/N) sum_i g_i g_i^T of (x, y) and of its diagonal.

    ||F||_F = ||G G^T||_F / N with G the (N, d) per-sample gradients: the Gram matrix is built from pairs
    of chunks of ``chunk`` samples (at most two (chunk, d) blocks held), so neither F nor G is formed.
    ||diag F||_F = ||sum_i g_i^2|| / N. Eval mode (restored afterwards). With ``comm``, every rank passes
    the same (x, y) and the chunk pairs are shared out; one sum-allreduce combines them.
    """
    rank, size = (comm.rank, comm.size) if comm is not None else (0, 1)
    n = x.shape[0]
    starts = list(range(0, n, chunk))
    pairs = [(a, b) for a in range(len(starts)) for b in range(a, len(starts))][rank::size]
    d = sum(p.numel() for p in model.parameters())
    acc = torch.zeros(d + 1, dtype=torch.float64, device=x.device)  # [sum_i g_i^2 (d) | ||G G^T||_F^2]

    def rows(c: int) -> Tensor:  # the per-sample gradients of chunk c, (chunk, d)
        return per_sample_gradients(model, x[starts[c] : starts[c] + chunk], y[starts[c] : starts[c] + chunk])

    was_training = model.training
    model.eval()
    try:
        cached: tuple[int, Tensor] | None = None
        for a, b in pairs:
            if cached is None or cached[0] != a:
                cached = (a, rows(a))
            ga = cached[1]
            gb = ga if a == b else rows(b)
            block = (ga @ gb.T).double()  # K[a, b]; K[b, a] is its transpose
            acc[-1] += (1 if a == b else 2) * block.square().sum()
            if a == b:
                acc[:d] += ga.double().square().sum(0)
    finally:
        model.train(was_training)
    if comm is not None:
        comm.allreduce_sum_(acc)
    return {
        "fisher_frobenius": acc[-1].sqrt().item() / n,
        "diag_fisher_frobenius": acc[:d].norm().item() / n,
        "fisher_trace": acc[:d].sum().item() / n,
        "samples": n,
    }


# --- gradient variance at a frozen network (Fig. 3b) ------------------------------------------------------
def _draw_gradient(
    model: nn.Module,
    params: list[nn.Parameter],
    x: Tensor,
    y: Tensor,
    pieces: int,
    hooks: CurvatureHooks | None,
    signs: Tensor | None,
) -> tuple[list[Tensor], dict[str, list[Tensor]], list[KFactors]]:
    """Mean gradient of one draw and the raw curvature sums its regime needs, over ``pieces`` forwards.

    Returns (mean gradient, {quantity: per-parameter sums over the draw}, K-FAC factor sums).
    """
    m = x.shape[0]
    grads = [torch.zeros_like(p) for p in params]
    sums: dict[str, list[Tensor]] = {}
    factors: list[KFactors] = []
    for piece in torch.arange(m, device=x.device).tensor_split(pieces):
        k = piece.numel()
        piece_signs = signs[piece] if signs is not None else None
        with hooks.recording(k, piece_signs) if hooks is not None else nullcontext():
            loss = F.cross_entropy(model(x[piece]), y[piece])
            part = torch.autograd.grad(loss, params)
        for g, pg in zip(grads, part, strict=True):
            g.add_(pg, alpha=k / m)  # the draw's mean = piece means weighted by piece sizes
        if hooks is None:
            continue
        for q in hooks.quantities:
            if q == "kfac":
                new = hooks.kfac_result()
                factors = (
                    [replace(f, A=f.A + n.A, G=f.G + n.G) for f, n in zip(factors, new, strict=True)]
                    if factors
                    else new
                )
            else:
                res = hooks.result(q)
                sums[q] = (
                    [t.clone() for t in res] if q not in sums else [a + b for a, b in zip(sums[q], res, strict=True)]
                )
    return grads, sums, factors


def gradient_variance(
    model: nn.Module,
    data: Data,
    regime_name: str,
    cfg: Config,
    batches: int = 8,
    *,
    comm: Comm | None = None,
    epoch: int = 0,
    train_mode: bool = True,
    seed: int | None = None,
) -> dict[str, float]:
    """Per parameter tensor: the mean over its coordinates of the variance, over ``batches`` draws, of the
    gradient a regime's step would use at this frozen network.

    A draw is a random global batch of the regime's size at (0-based) ``epoch`` (sb: M_S; lb, diagf: M_L)
    from the training set, without replacement, and the step's gradient: the batch-mean gradient plus
    the regime's noise (whatever ``noise_epochs`` says), built from the draw's own curvature statistics
    by the same hooks and noise functions as training (diagf: s * sqrt(diag F) * xi). Draws come from a
    (seed, batch size, draw) stream, so regimes of equal batch size share batches (common random
    numbers) and results do not depend on the world size. ``train_mode``: batch norm with batch
    statistics as in training (ghost batches of the model's ghost size; without ghost BN over M / W
    samples, like the workers' local batches), else running statistics, where samples are independent.
    Parameters, buffers and .grad are left as they were. With ``comm`` the draws are shared out over
    ranks and combined in one sum-allreduce.
    """

    regime = REGIMES[regime_name]
    if batches < 2:
        raise ValueError(f"a variance needs at least 2 draws, got {batches}")
    rank, size = (comm.rank, comm.size) if comm is not None else (0, 1)
    seed = cfg.seed if seed is None else seed
    m = regime.batch(cfg, epoch)
    n = data.x_train.shape[0]
    device = data.x_train.device
    named = list(model.named_parameters())
    params = [p for _, p in named]
    d = sum(p.numel() for p in params)
    sums = torch.zeros(2, d, dtype=torch.float64, device=device)  # sum over draws of g and of g^2
    pieces = size if train_mode and not cfg.ghost_bn else 1
    quantities = tuple(HOOK_QUANTITY[s] for s in sorted(regime.needs)) if regime.noise is not None else ()
    hooks = (
        CurvatureHooks(model, conv_mode=cfg.conv_mode, record_eval=not train_mode, quantities=quantities)
        if quantities
        else None
    )
    was_training = model.training
    model.train(train_mode)
    try:
        for draw in range(rank, batches, size):
            idx = torch.randperm(n, generator=generator(seed, "gradvar", m, draw))[:m].to(device)
            signs = None
            if "signed_sum" in regime.needs:  # Rademacher signs of the draw's samples
                gen = generator(seed, "gradvar-rademacher", draw)
                signs = (torch.randint(0, 2, (m,), generator=gen) * 2 - 1).to(device, data.x_train.dtype)
            grads, raw, factors = _draw_gradient(
                model, params, data.x_train[idx], data.y_train[idx], pieces, hooks, signs
            )
            if regime.noise is not None:
                stats: dict[str, list[Any]] = {}
                if "diag_fisher" in regime.needs:
                    stats["diag_fisher"] = [s / m for s in raw["sum_grad_squared"]]
                if "signed_sum" in regime.needs:
                    stats["signed_sum"] = raw["signed_sum"]
                if "kfac" in regime.needs:
                    stats["kfac"] = [KFacLayer(f.A / m, f.G / m, f.weight, f.bias) for f in factors]
                gen = generator(seed, "gradvar-noise", draw, device=device)
                noise = regime.noise(NoiseInput(cfg, grads, stats, gen, {}, frozenset(regime.needs)))
                grads = [g + z for g, z in zip(grads, noise, strict=True)]
            flat = torch.cat([g.reshape(-1) for g in grads]).double()
            sums[0] += flat
            sums[1] += flat.square()
    finally:
        model.train(was_training)
        if hooks is not None:
            hooks.remove()
    if comm is not None:
        comm.allreduce_sum_(sums)
    mean = sums[0] / batches
    var = ((sums[1] - batches * mean.square()) / (batches - 1)).clamp_min(0)  # unbiased, per coordinate
    out, offset = {}, 0
    for name, p in named:
        out[name] = var[offset : offset + p.numel()].mean().item()
        offset += p.numel()
    return out


def diagnostics_row(
    model: nn.Module,
    data: Data,
    cfg: Config,
    comm: Comm,
    epoch: int,
    *,
    fisher_samples: int = 512,
    draws: int = 8,
    regimes: Sequence[str] = ("sb", "lb", "diagf"),
    chunk: int = 128,
) -> dict[str, Any]:
    """One row of RUN_DIR/diagnostics.jsonl at a frozen network; call on every rank, write on rank 0.

    ``epoch``: epochs completed (the metrics.jsonl convention); the regimes' batch sizes are those of
    0-based epoch max(epoch - 1, 0). Fisher norms over a fixed seeded subset of ``fisher_samples``
    training samples (the same every epoch); gradient variances over ``draws`` batches per regime.
    """
    t0 = time.perf_counter()
    n = data.x_train.shape[0]
    idx = fixed_subset(n, min(fisher_samples, n), cfg.seed).to(data.x_train.device)
    norms = fisher_norms(model, data.x_train[idx], data.y_train[idx], comm, chunk=chunk)
    variances = {r: gradient_variance(model, data, r, cfg, draws, comm=comm, epoch=max(epoch - 1, 0)) for r in regimes}
    return {
        "epoch": epoch,
        "fisher_frobenius": norms["fisher_frobenius"],
        "diag_fisher_frobenius": norms["diag_fisher_frobenius"],
        "fisher_trace": norms["fisher_trace"],
        "fisher_samples": norms["samples"],
        "draws": draws,
        "grad_variance": variances,
        "wall_time_s": time.perf_counter() - t0,
    }


# --- `hpcnoise sharpness RUN_DIR` ------------------------------------------------------------------------
def load_config(run_dir: Path) -> Config:
    """The Config of a finished run directory; ConfigError (one clear line) for anything missing."""
    import json

    run = RunDir(run_dir)
    if not run_dir.is_dir():
        raise ConfigError(f"run directory {str(run_dir)!r} does not exist")
    for path in (run.config_path, run.summary_path, run.model_path):
        if not path.exists():
            what = "unfinished run" if path != run.config_path else "not a run directory"
            raise ConfigError(f"{str(run_dir)!r}: {what}, no {path.name}")
    try:
        stored = json.loads(run.config_path.read_text())["config"]
        values: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in stored.items()}
        return Config(**values)
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{str(run.config_path)!r} does not hold a valid config: {e}") from e


def load_run(run_dir: Path, comm: Comm) -> tuple[Config, Data, nn.Module]:
    """Config, data (in the run's dtype) and final model of a finished run, rebuilt as train() builds them."""
    from hpcnoise.train import data_and_model  # train imports this module lazily, and this one it

    cfg = load_config(run_dir)
    data, model = data_and_model(cfg, comm)
    model.load_state_dict(torch.load(RunDir(run_dir).model_path, map_location=comm.device))
    return cfg, data, model


def main(argv: list[str] | None = None) -> int:
    """``hpcnoise sharpness RUN_DIR [--samples N] [--method lanczos|power] [--no-temperature] [--no-fold]``"""
    parser = argparse.ArgumentParser(
        prog="hpcnoise sharpness",
        description="Largest Hessian eigenvalue of a finished run's final model (BN folded, temperature "
        "fitted on the test split); writes RUN_DIR/sharpness.json. Runs under any launcher.",
    )
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--samples", type=int, default=4096, help="training samples in the fixed set (default 4096)")
    parser.add_argument("--method", choices=METHODS, default="lanczos")
    parser.add_argument("--no-temperature", action="store_true", help="T = 1 instead of fitting it")
    parser.add_argument("--no-fold", action="store_true", help="keep batch norm (eval mode) instead of folding it")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    rank0 = launcher_rank() == 0
    try:
        cfg = load_config(args.run_dir)  # every rank checks, before any collective
        if args.samples > cfg.train_samples:
            raise ConfigError(f"--samples {args.samples} exceeds the run's {cfg.train_samples} training samples")
        if args.samples < 1:
            raise ConfigError(f"--samples must be positive, got {args.samples}")
    except ConfigError as e:
        if rank0:
            print(f"hpcnoise: error: {e}", file=sys.stderr, flush=True)
        return 2
    comm = init(cfg.device if cfg.device != "cuda" or torch.cuda.is_available() else "auto")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        cfg, data, model = load_run(args.run_dir, comm)
    except ConfigError as e:  # e.g. a prepared dataset file gone missing since training
        if comm.is_main:
            print(f"hpcnoise: error: {e}", file=sys.stderr, flush=True)
        return 2
    result = sharpness_of(
        model,
        data.x_train,
        data.y_train,
        comm,
        samples=args.samples,
        heldout=None if args.no_temperature else (data.x_test, data.y_test),
        fold=not args.no_fold,
        method=args.method,
        seed=0,  # the same sample set and start vector for every run, so runs are compared on one operator
    )
    if comm.is_main:
        write_json_atomic(args.run_dir / "sharpness.json", result)
        print(
            f"hpcnoise: sharpness {result['max_eigenvalue']:.6g} (T = {result['temperature']:.4g}, "
            f"{result['iterations']} Hessian-vector products, {result['wall_time_s']:.1f} s) -> "
            f"{args.run_dir / 'sharpness.json'}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
