"""Noise temperature: the noise multiplier lambda, its calibration, and the temperature ratio tau.

In the small-learning-rate SDE view (F ~ C, the per-sample gradient covariance), the temperature of
SGD is T = lr x (variance of the step's gradient):
- small batch:            T_SB = lr_S tr(C) / M_S;
- large batch + noise:    T = lr_L (tr(C) / M_L + V), V the injected variance (summed over coordinates).
With the paper's noise (Algorithm 1), V = lambda^2 s^2 tr(diag F), s^2 = 1/M_S - 1/M_L. The learning-rate
rule fixes k = lr_L / lr_S: M_L / M_S (linear), sqrt(M_L / M_S) (sqrt) or 1 (none). Matching T_SB,
taking tr(diag F) ~ tr(C), gives

    lambda^2 = (1 / (k M_S) - 1 / M_L) / s^2,

0 under linear scaling (linear scaling alone already matches T_SB), 0.150 (lambda = 0.39) under sqrt
scaling for 4096/128, and 1 only when LB trains at lr_S (k = 1). A negative lambda^2 (k > M_L / M_S)
is clamped to 0. ``tau = T / T_SB`` is what diagnostics.jsonl records, measured on the network.
"""

from __future__ import annotations

import math

from hpcnoise.config import Config, scaled_rate


def lr_ratio(cfg: Config) -> float:
    """k = lr_L / lr_S: how the preset scaled the small-batch learning rate (``lr_scaling``)."""
    return scaled_rate(cfg.lr_scaling, cfg.batch_size / cfg.small_batch)


def temperature_multiplier_squared(cfg: Config) -> float:
    """lambda^2 that matches small-batch temperature, before clamping (may be negative)."""
    s2 = 1.0 / cfg.small_batch - 1.0 / cfg.batch_size
    if s2 <= 0:
        return 0.0
    return (1.0 / (lr_ratio(cfg) * cfg.small_batch) - 1.0 / cfg.batch_size) / s2


def applied_multiplier(cfg: Config) -> float:
    """The multiplier lambda of the noise's standard deviation that a run applies: ``cfg.noise_multiplier``
    as given (``noise_calibration=paper``), or the one that matches small-batch temperature."""
    if cfg.noise_calibration == "temperature":
        return math.sqrt(max(temperature_multiplier_squared(cfg), 0.0))
    return cfg.noise_multiplier


def calibration_note(cfg: Config) -> str | None:
    """A line for the run's log when the calibration clamped a negative lambda^2 to 0."""
    if cfg.noise_calibration != "temperature":
        return None
    lam2 = temperature_multiplier_squared(cfg)
    if lam2 >= -1e-12:  # 0 up to rounding (linear scaling): nothing was clamped away
        return None
    return (
        f"noise_calibration=temperature: lambda^2 = {lam2:.4g} < 0 (lr_scaling={cfg.lr_scaling} already "
        "exceeds small-batch temperature); clamped to lambda = 0"
    )


def temperature_ratio(k: float, batch: int, small_batch: int, trace_c: float, injected: float) -> float:
    """tau = lr (tr C / M + V) / (lr_S tr C / M_S) with lr = k lr_S."""
    if trace_c <= 0:
        return math.nan
    return k * (trace_c / batch + injected) / (trace_c / small_batch)
