"""Noise regimes: Monte-Carlo covariance of many draws against the covariance each regime intends."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hpcnoise.config import Config
from hpcnoise.curvature import CurvatureHooks, KFactors
from hpcnoise.regimes import REGIMES, NoiseInput, _psd_sqrt

M = 16  # batch size of the tiny problem
DRAWS = 5_000


def tiny_problem() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x = torch.randn(M, 3, dtype=torch.float64)
    y = torch.randint(0, 2, (M,))
    return model, x, y


def per_sample_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(M, d) matrix of per-sample gradients by brute force."""
    rows = []
    for i in range(M):
        loss = F.cross_entropy(model(x[i : i + 1]), y[i : i + 1])
        rows.append(torch.cat([g.flatten() for g in torch.autograd.grad(loss, list(model.parameters()))]))
    return torch.stack(rows)


def draws(regime: str, cfg: Config, stats: dict, grads: list[torch.Tensor], n: int = DRAWS) -> torch.Tensor:
    """(n, d) noise draws of a regime, each from its own (seed, step) generator as in training."""
    out = []
    state: dict = {}
    for k in range(n):
        gen = torch.Generator().manual_seed(1000 + k)
        noise = REGIMES[regime].noise(NoiseInput(cfg, grads, stats, gen, state, frozenset()))  # type: ignore[misc]
        out.append(torch.cat([z.flatten() for z in noise]))
    return torch.stack(out)


def assert_covariance(samples: torch.Tensor, target: torch.Tensor, z_max: float = 5.5) -> None:
    """Every entry of the empirical second moment within z_max standard errors of the target.

    The standard error of each entry is estimated from the draws themselves (std of z_j z_k over sqrt
    n), which holds for any noise distribution (Rademacher sums are not Gaussian). The mean is zero by
    construction, so the second moment is the covariance.
    """
    n = samples.shape[0]
    prod = samples[:, :, None] * samples[:, None, :]
    emp = prod.mean(0)
    se = prod.std(0) / math.sqrt(n)
    z = (emp - target).abs() / se.clamp_min(1e-300)
    worst = z.max().item()
    assert worst < z_max, f"largest deviation {worst:.1f} standard errors"
    # and the estimate is not trivially loose: the target is well resolved where it is large
    big = target.abs() > 10 * se
    assert big.any()


@pytest.fixture(scope="module")
def problem() -> dict:
    model, x, y = tiny_problem()
    g = per_sample_grads(model, x, y)
    hooks = CurvatureHooks(model, quantities=("sum_grad_squared", "kfac"))
    with hooks.recording(M):
        F.cross_entropy(model(x), y).backward()
    grads = [p.grad.clone() for p in model.parameters()]  # type: ignore[union-attr]
    cfg = Config(batch_size=M, small_batch=4, multiplicative_sigma=0.3)
    return {
        "model": model,
        "x": x,
        "y": y,
        "g": g,
        "grads": grads,
        "cfg": cfg,
        "diag": [s / M for s in hooks.result("sum_grad_squared")],
        "kfac": [KFactors(f.A / M, f.G / M, f.weight, f.bias) for f in hooks.result("kfac")],
        "F": g.T @ g / M,  # the empirical Fisher, explicitly
    }


def test_diagf_covariance(problem: dict) -> None:
    s2 = problem["cfg"].noise_scale ** 2
    torch.testing.assert_close(torch.cat([d.flatten() for d in problem["diag"]]), problem["F"].diagonal())
    z = draws("diagf", problem["cfg"], {"diag_fisher": problem["diag"]}, problem["grads"])
    assert_covariance(z, s2 * torch.diag(problem["F"].diagonal()))


def test_trace_covariance(problem: dict) -> None:
    s2 = problem["cfg"].noise_scale ** 2
    d = problem["F"].shape[0]
    z = draws("trace", problem["cfg"], {"diag_fisher": problem["diag"]}, problem["grads"])
    target = s2 * problem["F"].trace() / d * torch.eye(d, dtype=torch.float64)
    assert_covariance(z, target)
    # same total variance as diag-F noise
    assert abs((z**2).sum(1).mean() / (s2 * problem["F"].trace()) - 1) < 0.03


def test_multiplicative_covariance(problem: dict) -> None:
    g = torch.cat([t.flatten() for t in problem["grads"]])
    z = draws("multiplicative", problem["cfg"], {}, problem["grads"])
    assert_covariance(z, 0.3**2 * torch.diag(g**2))


def test_fullf_covariance(problem: dict) -> None:
    """s / sqrt(M) * sum_i sigma_i g_i with Rademacher sigma has covariance s^2 F."""
    cfg, g = problem["cfg"], problem["g"]
    model, x, y = problem["model"], problem["x"], problem["y"]
    hooks = CurvatureHooks(model, quantities=("signed_sum",))
    sizes = [p.numel() for p in model.parameters()]
    samples = []
    for k in range(DRAWS):
        gen = torch.Generator().manual_seed(k)
        signs = (torch.randint(0, 2, (M,), generator=gen) * 2 - 1).double()
        if k < 20:  # the hooks' signed sum, from one backward, equals the brute-force one
            with hooks.recording(M, signs):
                F.cross_entropy(model(x), y).backward()
            model.zero_grad(set_to_none=True)
            r = hooks.result("signed_sum")
            torch.testing.assert_close(torch.cat([t.flatten() for t in r]), signs @ g)
        else:
            r = list(torch.split(signs @ g, sizes))
        noise = REGIMES["fullf"].noise(NoiseInput(cfg, problem["grads"], {"signed_sum": r}, gen, {}, frozenset()))  # type: ignore[misc]
        samples.append(torch.cat([t.flatten() for t in noise]))
    assert_covariance(torch.stack(samples), cfg.noise_scale**2 * problem["F"])


def test_kfac_covariance(problem: dict) -> None:
    """Per factored layer, s^2 A (x) G over [weight | bias] in column-major order."""
    cfg = problem["cfg"]
    z = draws("kfac", cfg, {"kfac": problem["kfac"], "diag_fisher": problem["diag"]}, problem["grads"])
    s2 = cfg.noise_scale**2
    sizes = [p.numel() for p in problem["model"].parameters()]
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    for layer in problem["kfac"]:
        out_f, in_f = layer.G.shape[0], layer.A.shape[0] - 1
        # noise matrix N (out, in+1) = [W noise | b noise]; vec column-major matches A (x) G
        w = z[:, starts[layer.weight] : starts[layer.weight] + out_f * in_f].reshape(-1, out_f, in_f)
        b = z[:, starts[layer.bias] : starts[layer.bias] + out_f].reshape(-1, out_f, 1)
        n = torch.cat([w, b], 2)  # (draws, out, in+1)
        vec = n.transpose(1, 2).reshape(n.shape[0], -1)  # column-major
        assert_covariance(vec, s2 * torch.kron(layer.A, layer.G))


def test_psd_sqrt() -> None:
    a = torch.randn(5, 5, dtype=torch.float64)
    m = a @ a.T
    r = _psd_sqrt(m)
    torch.testing.assert_close(r @ r, m)
    torch.testing.assert_close(r, r.T)


@pytest.mark.parametrize("regime", ["diagf", "trace", "multiplicative", "fullf", "kfac"])
def test_noise_multiplier_scales_covariance(problem: dict, regime: str) -> None:
    """At noise_multiplier lambda = 0.5 every regime's covariance is lambda^2 = 0.25 times its lambda = 1
    covariance (the targets of the tests above), within the Monte-Carlo standard errors."""
    cfg = replace(problem["cfg"], noise_multiplier=0.5)
    lam2, s2, fisher, g = 0.25, cfg.noise_scale**2, problem["F"], problem["g"]
    stats: dict = {"diag_fisher": problem["diag"], "kfac": problem["kfac"]}
    if regime == "fullf":
        sizes = [p.numel() for p in problem["model"].parameters()]
        samples = []
        for k in range(DRAWS):
            gen = torch.Generator().manual_seed(k)
            signs = (torch.randint(0, 2, (M,), generator=gen) * 2 - 1).double()
            x = NoiseInput(
                cfg, problem["grads"], {"signed_sum": list(torch.split(signs @ g, sizes))}, gen, {}, frozenset()
            )
            samples.append(torch.cat([t.flatten() for t in REGIMES["fullf"].noise(x)]))  # type: ignore[misc]
        assert_covariance(torch.stack(samples), lam2 * s2 * fisher)
        return
    z = draws(regime, cfg, stats, problem["grads"])
    d = fisher.shape[0]
    if regime == "kfac":
        sizes = [p.numel() for p in problem["model"].parameters()]
        layer = problem["kfac"][0]
        start, out_f, in_f = sum(sizes[: layer.weight]), layer.G.shape[0], layer.A.shape[0] - 1
        w = z[:, start : start + out_f * in_f].reshape(-1, out_f, in_f)
        b_start = sum(sizes[: layer.bias])
        b = z[:, b_start : b_start + out_f].reshape(-1, out_f, 1)
        vec = torch.cat([w, b], 2).transpose(1, 2).reshape(z.shape[0], -1)
        assert_covariance(vec, lam2 * s2 * torch.kron(layer.A, layer.G))
        return
    gvec = torch.cat([t.flatten() for t in problem["grads"]])
    target = {
        "diagf": s2 * torch.diag(fisher.diagonal()),
        "trace": s2 * fisher.trace() / d * torch.eye(d, dtype=torch.float64),
        "multiplicative": 0.3**2 * torch.diag(gvec**2),
    }[regime]
    assert_covariance(z, lam2 * target)
