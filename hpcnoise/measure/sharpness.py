"""Sharpness (Fig. 3d): the largest eigenvalue of the Hessian of the mean training loss over a FIXED set of
samples.

Hessian-vector products come from double backward, chunked over samples; the eigenvalue from Lanczos
(scipy's ``eigsh``, float64 on the flattened parameters) or power iteration. Distributed: each rank holds a
contiguous share of the samples; one sum-allreduce per product adds the ranks' Hessian-vector sums and
sample counts, so every rank applies the same operator and runs the same Lanczos iteration from the same
seeded start vector, in lockstep.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hpcnoise.comm import Comm
from hpcnoise.measure.invariance import fit_softmax_temperature, fold_batchnorm, hookless_copy, logits_of
from hpcnoise.models import ghost_norms
from hpcnoise.seeding import generator, stream_seed

METHODS = ("lanczos", "power")


# --- Hessian-vector products and the top eigenvalue ------------------------------------------------------
class HessianOperator:
    """v -> H v for H the Hessian of the mean of CE(model(x) / T, y) over all ranks' samples (float64 numpy).

    Each product is a double backward over this rank's samples in chunks of ``chunk`` (bounding memory),
    summed, then ONE sum-allreduce of [H v sum (d) | sample count | 1] gives every rank the same product
    of the mean loss over all samples, weighted by the ranks' sample counts. The trailing 1 counts the
    ranks taking part: iterations that fall out of lockstep raise instead of deadlocking.
    """

    def __init__(
        self, model: nn.Module, x: Tensor, y: Tensor, comm: Comm, softmax_temperature: float = 1.0, chunk: int = 1024
    ):
        if chunk < 1:
            raise ValueError(f"chunk must be positive, got {chunk}")
        self.model, self.x, self.y, self.comm = model, x, y, comm
        self.softmax_temperature, self.chunk = softmax_temperature, chunk
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
            loss = F.cross_entropy(self.model(xb) / self.softmax_temperature, yb, reduction="sum")
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
    softmax_temperature: float = 1.0,
    method: str = "lanczos",
    chunk: int = 1024,
    tol: float = 1e-6,
    max_products: int = 2000,
    seed: int = 0,
) -> tuple[float, int]:
    """(largest Hessian eigenvalue, products) of the mean CE(model(x) / T) over all ranks' (x, y) shares.

    ``model`` is used as is (its mode decides batch norm's behaviour; use eval mode). Call on every rank.
    """
    op = HessianOperator(model, x, y, comm, softmax_temperature, chunk)
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
    seed: int = 0,
    **solver: Any,
) -> dict[str, Any]:
    """The paper's sharpness protocol on the training set (x, y), on every rank; returns the result record.

    Folds batch norm into the weights (``fold``), fits the softmax temperature T on ``heldout`` (skipped
    when None: T = 1; not the noise temperature of hpcnoise.temperature), and takes the largest Hessian
    eigenvalue over a fixed seeded subset of ``samples`` training samples, of which each rank handles a
    contiguous share. ``model`` is not modified. ``seed`` picks the subset and the start vector;
    ``solver`` (method, chunk, tol, max_products) goes to ``max_eigenvalue``.
    """
    t0 = time.perf_counter()
    if comm.size > samples:
        raise ValueError(f"{samples} samples cannot be shared by {comm.size} ranks")
    net = fold_batchnorm(model) if fold else hookless_copy(model)
    net.eval()
    for p in net.parameters():
        p.requires_grad_(True)
    softmax_temperature = 1.0
    if heldout is not None:
        # Rank 0 fits, everyone takes its value. Every rank passes a float: Horovod names the broadcast
        # after the object's type, and differing names never match.
        fitted = fit_softmax_temperature(logits_of(net, heldout[0]), heldout[1]) if comm.is_main else 0.0
        softmax_temperature = float(comm.broadcast_object(fitted))
    idx = fixed_subset(x.shape[0], samples, seed)
    lo, hi = samples * comm.rank // comm.size, samples * (comm.rank + 1) // comm.size
    mine = idx[lo:hi].to(x.device)
    value, count = max_eigenvalue(
        net, x[mine], y[mine], comm, softmax_temperature=softmax_temperature, seed=seed, **solver
    )
    return {
        "max_eigenvalue": value,
        "temperature": softmax_temperature,  # sharpness.json's key (the softmax temperature T)
        "samples": samples,
        "method": solver.get("method", "lanczos"),
        "folded_bn": fold and bool(ghost_norms(model)),
        "iterations": count,  # Hessian-vector products
        "wall_time_s": time.perf_counter() - t0,
        "world_size": comm.size,
    }
