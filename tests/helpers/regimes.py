"""A regime that only the tests register: diagonal-Fisher noise on every other step.

It shows what adding a regime takes: one registry entry (``hpcnoise.regimes.register``), nothing in the
hooks, the step, the checkpoint or the analysis. The 2-rank workers (tests/helpers/dist_worker.py) import
this module, so the regime runs through the world-size invariance test under the real launcher.
"""

from __future__ import annotations

import dataclasses

import torch

from hpcnoise.regimes import REGIMES, NoiseInput, Regime, diag_fisher_noise, register

ALTERNATE = "diagf-alternate"


def alternate_noise(x: NoiseInput) -> list[torch.Tensor]:
    """Algorithm 1's noise on even steps, none (zeros) on odd ones; the draw is made either way, so the
    noise stream is that of ``diagf`` on the steps where it is on."""
    noise = diag_fisher_noise(x)
    if x.step % 2:
        torch._foreach_zero_(noise)
    return noise


def _register() -> Regime:
    if ALTERNATE in REGIMES:  # imported again, e.g. as a script's module and as tests.helpers.regimes
        return REGIMES[ALTERNATE]
    diagf = REGIMES["diagf"]
    return register(
        ALTERNATE,
        dataclasses.replace(
            diagf,
            name="DiagF/2",
            description="diagonal-Fisher noise on every other step (tests)",
            noise=alternate_noise,
        ),
    )


REGIME = _register()
