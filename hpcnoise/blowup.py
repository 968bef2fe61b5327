"""The blow-up rule (docs/tuning.md): training that has run away without becoming non-finite.

A run is *blown up* when its epoch training loss exceeds ``BLOWUP_FACTOR`` times the lowest epoch
training loss so far for ``BLOWUP_EPOCHS`` epochs in a row while staying finite (a non-finite loss is
divergence, hpcnoise.train's other stop). The rule is a pure function of the epoch losses, so a resumed
run reaches the same verdict from its history. The train loop applies it after each epoch: summary.json
holds ``blown_up`` (the record of the epoch it first fired) when it fired, and with ``stop_blown_up`` the
run stops after that epoch and finishes with ``stopped_early: true``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

BLOWUP_FACTOR = 2.0  # an epoch loss above this many times the lowest so far counts as blown up
BLOWUP_EPOCHS = 2  # consecutive such epochs before the rule fires


def blown_up(losses: Sequence[float]) -> dict[str, Any] | None:
    """The first epoch at which the rule fires over these epoch training losses (epoch 1 first), or None.

    Returns ``{"epoch": E, "train_loss": L, "best_train_loss": B}``: E the 1-based epoch that completed
    the streak, L its loss, B the lowest loss of epochs 1..E. A non-finite loss neither counts towards a
    streak nor lowers the best; it ends a streak.
    """
    best = math.inf
    streak = 0
    for epoch, loss in enumerate(losses, start=1):
        if not math.isfinite(loss):
            streak = 0
            continue
        best = min(best, loss)
        streak = streak + 1 if loss > BLOWUP_FACTOR * best else 0
        if streak >= BLOWUP_EPOCHS:
            return {"epoch": epoch, "train_loss": loss, "best_train_loss": best}
    return None


def history_blown_up(history: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """``blown_up`` over the ``train_loss`` of metrics rows (a run's history)."""
    return blown_up([row["train_loss"] for row in history])


def blowup_keys(history: Sequence[dict[str, Any]], planned_epochs: int) -> dict[str, Any]:
    """summary.json's keys of the rule: ``blown_up`` (its record) when it fired, ``stopped_early`` when the
    run stopped before its planned epochs (``stop_blown_up``); none otherwise, so other runs' summaries
    are as they were before the rule."""
    keys: dict[str, Any] = {}
    record = history_blown_up(history)
    if record is not None:
        keys["blown_up"] = record
    if len(history) < planned_epochs:
        keys["stopped_early"] = True
    return keys
