"""``hpcnoise bench fisher|data|train|scaling|step``: the benchmarks' command lines (what they measure:
hpcnoise.benchmarks), and the options they share: the network of the scaling model and the checks of
comma-separated model and regime lists."""

from __future__ import annotations

import argparse
import math
from typing import Any

from hpcnoise.benchmarks.network import GB, US, Network
from hpcnoise.errors import ConfigError


def add_network_options(p: argparse.ArgumentParser, gpus_per_node: bool) -> None:
    """--intra-latency, --intra-bandwidth, --inter-latency, --inter-bandwidth (and --gpus-per-node when
    the command does not know it from its launcher), defaulting to ``Network()``."""
    d = Network()
    if gpus_per_node:
        p.add_argument("--gpus-per-node", type=int, default=d.gpus_per_node, help="G (default 8)")
    p.add_argument("--intra-latency", type=float, default=d.intra_latency_s / US, help="alpha in a node, us (2)")
    p.add_argument("--intra-bandwidth", type=float, default=d.intra_bandwidth / GB, help="beta in a node, GB/s (150)")
    p.add_argument("--inter-latency", type=float, default=d.inter_latency_s / US, help="alpha across nodes, us (5)")
    p.add_argument(
        "--inter-bandwidth", type=float, default=d.inter_bandwidth / GB, help="a node's network beta, GB/s (25)"
    )


def check_finite(value: float, option: str, zero_ok: bool = False) -> None:
    """A finite amount (a latency, a bandwidth, a size): > 0, or >= 0 with ``zero_ok``."""
    if not math.isfinite(value) or value < 0 or (value == 0 and not zero_ok):
        raise ConfigError(f"{option} must be a finite number {'>= 0' if zero_ok else '> 0'}, got {value:g}")


def network_from_args(args: Any, gpus_per_node: int | None = None) -> Network:
    """The options' network; ``gpus_per_node`` when the launcher tells it, else --gpus-per-node.
    ConfigError naming the first bad option."""
    per_node = args.gpus_per_node if gpus_per_node is None else gpus_per_node
    if per_node < 1:
        raise ConfigError(f"--gpus-per-node must be a positive integer, got {per_node}")
    for option in ("intra_latency", "inter_latency"):
        check_finite(getattr(args, option), f"--{option.replace('_', '-')}", zero_ok=True)
    for option in ("intra_bandwidth", "inter_bandwidth"):
        check_finite(getattr(args, option), f"--{option.replace('_', '-')}")
    return Network(
        per_node, args.intra_latency * US, args.intra_bandwidth * GB, args.inter_latency * US, args.inter_bandwidth * GB
    )


def names(text: str, registry: dict[str, Any], what: str, option: str) -> list[str]:
    """A comma-separated list of registry names, or 'all'; ConfigError naming the unknown ones."""
    names = list(registry) if text == "all" else [n for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in registry]
    if bad or not names:
        given = ", ".join(map(repr, bad)) or "(none given)"
        raise ConfigError(f"{option}: unknown {what} {given}; valid: all, {', '.join(registry)}")
    return names
