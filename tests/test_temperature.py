"""Noise calibration and the measured temperature ratio tau, against closed forms and brute force."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hpcnoise.config import Config
from hpcnoise.data import Data
from hpcnoise.measure import measured_temperature
from hpcnoise.regimes import REGIMES, NoiseInput
from hpcnoise.temperature import applied_multiplier, calibration_note

M, M_S = 24, 4  # the tiny problem's large and small batch


@pytest.mark.parametrize(
    "scaling,expected",
    [
        ("linear", 0.0),  # linear scaling alone already matches small-batch temperature
        ("sqrt", math.sqrt((1 / (math.sqrt(32) * 128) - 1 / 4096) / (1 / 128 - 1 / 4096))),
        ("none", 1.0),  # LB at lr_S: the paper's Algorithm 1 is the temperature match
    ],
)
def test_temperature_multiplier_closed_form(scaling: str, expected: float) -> None:
    cfg = Config(batch_size=4096, small_batch=128, lr_scaling=scaling, noise_calibration="temperature")
    assert applied_multiplier(cfg) == pytest.approx(expected, rel=1e-12, abs=1e-12)
    assert calibration_note(cfg) is None
    if scaling == "sqrt":
        assert applied_multiplier(cfg) == pytest.approx(0.3876, abs=1e-4)  # the figure in docs/design.md
    # the paper calibration passes the multiplier through
    assert applied_multiplier(Config(noise_multiplier=0.25, lr_scaling=scaling)) == 0.25


def tiny() -> tuple[nn.Module, Data]:
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    x = torch.randn(M, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (M,))
    return model, Data(x, y, x[:4], y[:4], 3)


def brute_force(model: nn.Module, data: Data) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(M, d) per-sample gradients by a loop, and the mean gradient per parameter."""
    params = list(model.parameters())
    rows = []
    for i in range(M):
        loss = F.cross_entropy(model(data.x_train[i : i + 1]), data.y_train[i : i + 1])
        rows.append(torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)]))
    g = torch.stack(rows)
    mean = list(torch.split(g.mean(0), [p.numel() for p in params]))
    return g, [m.view_as(p) for m, p in zip(mean, params)]


@pytest.mark.parametrize(
    "regime,scaling,multiplier",
    [("diagf", "sqrt", 1.0), ("diagf", "linear", 0.5), ("trace", "sqrt", 0.25), ("multiplicative", "linear", 1.0)],
)
def test_measured_tau_against_brute_force(regime: str, scaling: str, multiplier: float) -> None:
    """tau = k (tr C / M + V) / (tr C / M_S): tr C from per-sample gradients, V the Monte-Carlo total
    variance of the regime's own noise draws (so the closed-form injected variance is checked too)."""
    model, data = tiny()
    cfg = Config(
        regime=regime,
        batch_size=M,
        small_batch=M_S,
        lr_scaling=scaling,
        noise_multiplier=multiplier,
        noise_epochs=10,
        multiplicative_sigma=3.0,  # large enough that its injected variance shows in tau
        dtype="float64",
    )
    g, mean = brute_force(model, data)
    trace_c = (g.square().sum(1).mean() - g.mean(0).square().sum()).item()
    diag = list(torch.split(g.square().mean(0), [p.numel() for p in model.parameters()]))
    stats = {"diag_fisher": [d.view_as(p) for d, p in zip(diag, model.parameters())]}
    draws = 20_000
    total = 0.0
    for k in range(draws):
        gen = torch.Generator().manual_seed(k)
        noise = REGIMES[regime].noise(NoiseInput(cfg, mean, stats, gen, {}, frozenset()))  # type: ignore[misc]
        total += float(sum(z.square().sum() for z in noise))
    v_mc = total / draws
    k = {"linear": M / M_S, "sqrt": math.sqrt(M / M_S)}[scaling]
    expected = k * (trace_c / M + v_mc) / (trace_c / M_S)
    got = measured_temperature(model, data, cfg, draws=2)
    assert got["trace_c"] == pytest.approx(trace_c, rel=1e-10)
    assert got["lr_ratio"] == pytest.approx(k, rel=1e-12)
    assert got["injected_variance"] == pytest.approx(v_mc, rel=0.05)  # Monte-Carlo error ~1-2%
    assert got["tau"] == pytest.approx(expected, rel=0.05)
    # and the estimate is sensitive: without the injected variance tau would be k M_S / M
    assert abs(got["tau"] - k * M_S / M) > 0.1 * got["tau"]


def test_tau_of_small_batch_is_one() -> None:
    model, data = tiny()
    cfg = Config(regime="sb", batch_size=M, small_batch=M_S, dtype="float64")
    assert measured_temperature(model, data, cfg, draws=2)["tau"] == pytest.approx(1.0, rel=1e-12)


def test_tau_without_noise_after_noise_epochs() -> None:
    """After noise_epochs the injected variance is 0 and tau is LB's own: k M_S / M (linear: 1)."""
    model, data = tiny()
    cfg = Config(regime="diagf", batch_size=M, small_batch=M_S, noise_epochs=1, dtype="float64")
    got = measured_temperature(model, data, cfg, epoch=1, draws=2)
    assert got["injected_variance"] == 0.0
    assert got["tau"] == pytest.approx(1.0, rel=1e-12)


def test_tau_follows_the_noise_fraction_window() -> None:
    """With noise_fraction the noise is on for round(f x planned steps) steps, as training has it: here one
    step an epoch, 30 epochs, f = 0.1, so on at epochs 0-2 and off from epoch 3."""
    model, data = tiny()
    cfg = Config(regime="diagf", batch_size=M, small_batch=M_S, epochs=30, noise_fraction=0.1, dtype="float64")
    assert measured_temperature(model, data, cfg, epoch=2, draws=2)["injected_variance"] > 0
    assert measured_temperature(model, data, cfg, epoch=3, draws=2)["injected_variance"] == 0.0
