"""The tuned study's search spaces, one per regime, as data (after AlgoPerf's ``tuning_search_space.json``).

A space maps a field to its range: ``{"distribution": "log" | "uniform", "low": a, "high": b}``, with
``"relative": true`` where the value is a factor of the preset's own value (the learning rate: a factor of
the regime's rule-derived rate). A field is a Config field or ``warmup_fraction`` (the warmup as a fraction
of training, resolved to ``warmup_epochs`` = fraction x epochs). Every regime gets the same ranges for the
fields it shares with the others (docs/tuning.md, "Search spaces"): the learning rate 1/16 to 4 times the
rule-derived rate (for the LB regimes the linear rule's, so the range also holds the sqrt rule's, 1/sqrt(32)
of it at M_L/M_S = 32), the warmup 0 to 1/4 of training, and for the noise regimes the noise multiplier
lambda (log, 1e-3 to 2) and the fraction of training the noise is on (0.1 to 1).

``check_space`` validates a space as ``check_values`` validates a Config: the first problem is one
ConfigError line naming the field, what is wrong and what is valid. Plain Python (no torch).
"""

from __future__ import annotations

import math
import typing
from typing import Any

from hpcnoise.config import Config
from hpcnoise.errors import ConfigError

SearchSpace = dict[str, dict[str, Any]]  # field -> {"distribution", "low", "high"[, "relative"]}

DISTRIBUTIONS = ("log", "uniform")
DERIVED_FIELDS = ("warmup_fraction",)  # fields that are not Config fields: resolved by hpcnoise.tuning
ENTRY_KEYS = frozenset({"distribution", "low", "high", "relative"})

# The shared ranges: every regime that has a field gets the same entry.
LR = {"distribution": "log", "low": 1 / 16, "high": 4.0, "relative": True}  # x the rule-derived rate
WARMUP = {"distribution": "uniform", "low": 0.0, "high": 0.25}  # of training
NOISE_MULTIPLIER = {"distribution": "log", "low": 1e-3, "high": 2.0}  # lambda (Algorithm 1: 1)
NOISE_FRACTION = {"distribution": "uniform", "low": 0.1, "high": 1.0}  # of training, from the start

SEARCH_SPACES: dict[str, SearchSpace] = {
    "sb": {"lr": LR, "warmup_fraction": WARMUP},
    "lb": {"lr": LR, "warmup_fraction": WARMUP},  # with ghost batch norm (the tuning presets)
    "diagf": {
        "lr": LR,
        "warmup_fraction": WARMUP,
        "noise_multiplier": NOISE_MULTIPLIER,
        "noise_fraction": NOISE_FRACTION,
    },
}


def _numeric_fields() -> set[str]:
    hints = typing.get_type_hints(Config)
    return {name for name, hint in hints.items() if hint in (int, float)}


def _number(entry: dict[str, Any], key: str, where: str) -> float:
    value = entry.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{where}: {key} must be a finite number, got {value!r}")
    return float(value)


def check_entry(field: str, entry: Any, where: str) -> None:
    """One field's range: a known field, a known distribution, finite low < high, low > 0 on a log scale."""
    numeric = _numeric_fields()
    if field not in numeric and field not in DERIVED_FIELDS:
        valid = ", ".join([*DERIVED_FIELDS, *sorted(numeric)])
        raise ConfigError(f"{where}: unknown field {field!r}; valid: {valid}")
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: {field} must be an object with distribution, low and high, got {entry!r}")
    extra = sorted(set(entry) - ENTRY_KEYS)
    if extra:
        raise ConfigError(f"{where}: {field} has unknown key {extra[0]!r}; valid: {', '.join(sorted(ENTRY_KEYS))}")
    if entry.get("distribution") not in DISTRIBUTIONS:
        got = entry.get("distribution")
        raise ConfigError(f"{where}: {field} distribution must be one of {', '.join(DISTRIBUTIONS)}, got {got!r}")
    if not isinstance(entry.get("relative", False), bool):
        raise ConfigError(f"{where}: {field} relative must be true or false, got {entry['relative']!r}")
    low, high = _number(entry, "low", f"{where}: {field}"), _number(entry, "high", f"{where}: {field}")
    if low >= high:
        what = "an empty" if low == high else "an inverted"
        raise ConfigError(f"{where}: {field} is {what} range [{low:g}, {high:g}]; low must be below high")
    if entry["distribution"] == "log" and low <= 0:
        raise ConfigError(f"{where}: {field} is log-uniform from {low:g}; a log range needs low > 0")
    if entry.get("relative") and low <= 0:
        raise ConfigError(f"{where}: {field} is a factor from {low:g}; factors must be in (0, inf)")


def check_space(regime: str, space: Any) -> None:
    """Raise one ConfigError line on the first problem of ``space`` (the search space of ``regime``)."""
    where = f"search space {regime!r}"
    if not isinstance(space, dict) or not space:
        raise ConfigError(f"{where} is empty; give at least one field with distribution, low and high")
    for field, entry in space.items():
        check_entry(field, entry, where)


def get_space(regime: str) -> SearchSpace:
    if regime not in SEARCH_SPACES:
        raise ConfigError(f"no search space for regime {regime!r}; valid: {', '.join(SEARCH_SPACES)}")
    return SEARCH_SPACES[regime]


def map_point(space: SearchSpace, point: list[float]) -> dict[str, float]:
    """The values of one point of the unit cube (one coordinate per field, in the space's order):
    uniform: low + u (high - low); log: low (high / low)^u. Relative values are still factors here."""
    values = {}
    for (field, entry), u in zip(space.items(), point):
        low, high = float(entry["low"]), float(entry["high"])
        if entry["distribution"] == "log":
            values[field] = math.exp(math.log(low) + u * (math.log(high) - math.log(low)))
        else:
            values[field] = low + u * (high - low)
    return values
