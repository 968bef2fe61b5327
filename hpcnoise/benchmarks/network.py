"""The network the scaling model predicts for: an alpha-beta ring allreduce inside a node and across
nodes, and the command-line options that describe it (``hpcnoise bench scaling`` and ``hpcnoise bench
train``). Plain Python, so a command can check its options before it loads torch."""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from typing import Any

from hpcnoise.errors import ConfigError

US, GB = 1e-6, 1e9  # the CLI's units: latencies in microseconds, bandwidths in GB/s (10^9 bytes per second)


def ring_allreduce_s(nbytes: float, ranks: int, latency_s: float, bandwidth: float) -> float:
    """Alpha-beta time of a ring allreduce of ``nbytes`` over ``ranks``: 2 (p-1) alpha + 2 (p-1)/p n / beta."""
    if ranks <= 1:
        return 0.0
    return 2 * (ranks - 1) * latency_s + 2 * (ranks - 1) / ranks * nbytes / bandwidth


@dataclass(frozen=True)
class Network:
    """The machine the model predicts for. The defaults are a generic GPU cluster, not a measurement."""

    gpus_per_node: int = 8  # DGX/HGX-style nodes
    # NCCL's allreduce of a few bytes on one 8-GPU NVLink node takes about 10-30 us, i.e. 1-2 us per ring
    # step (2 (G - 1) = 14 steps); the upper end, to be conservative.
    intra_latency_s: float = 2 * US
    # NCCL's bus bandwidth of large allreduces on one node: about 130 GB/s on V100 (NVLink 2), 230 GB/s on
    # A100 (NVLink 3), 450 GB/s on H100 (NVLink 4). 150 GB/s: the V100/A100 class, conservative.
    intra_bandwidth: float = 150 * GB
    # InfiniBand's wire latency is 1-2 us; NCCL's network proxy adds a few us per ring step.
    inter_latency_s: float = 5 * US
    # The node's bandwidth to the network, shared by its G GPUs: one 200 Gb/s HDR InfiniBand adapter
    # (25 GB/s). A DGX A100 has one such adapter per GPU: --inter-bandwidth 200.
    inter_bandwidth: float = 25 * GB

    def nodes(self, workers: int) -> int:
        return max(1, workers // self.gpus_per_node)

    def allreduce_s(self, nbytes: float, workers: int) -> float:
        """Seconds to sum ``nbytes`` over ``workers`` GPUs: an intra-node ring plus an inter-node ring."""
        intra = ring_allreduce_s(nbytes, min(workers, self.gpus_per_node), self.intra_latency_s, self.intra_bandwidth)
        inter = ring_allreduce_s(nbytes, self.nodes(workers), self.inter_latency_s, self.inter_bandwidth)
        return intra + inter

    def describe(self) -> str:
        return (
            f"{self.gpus_per_node} GPUs per node; intra-node alpha {self.intra_latency_s / US:g} us, "
            f"beta {self.intra_bandwidth / GB:g} GB/s (NVLink); inter-node alpha {self.inter_latency_s / US:g} us, "
            f"beta {self.inter_bandwidth / GB:g} GB/s per node ({8 * self.inter_bandwidth / GB:g} Gb/s InfiniBand)"
        )


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


def check_positive(value: float, option: str, zero_ok: bool = False) -> None:
    if not math.isfinite(value) or value < 0 or (value == 0 and not zero_ok):
        raise ConfigError(f"{option} must be a finite number {'>= 0' if zero_ok else '> 0'}, got {value:g}")


def network_from_args(args: Any, gpus_per_node: int | None = None) -> Network:
    """The options' network; ``gpus_per_node`` when the launcher tells it, else --gpus-per-node.
    ConfigError naming the first bad option."""
    per_node = args.gpus_per_node if gpus_per_node is None else gpus_per_node
    if per_node < 1:
        raise ConfigError(f"--gpus-per-node must be a positive integer, got {per_node}")
    for option in ("intra_latency", "inter_latency"):
        check_positive(getattr(args, option), f"--{option.replace('_', '-')}", zero_ok=True)
    for option in ("intra_bandwidth", "inter_bandwidth"):
        check_positive(getattr(args, option), f"--{option.replace('_', '-')}")
    return Network(
        per_node, args.intra_latency * US, args.intra_bandwidth * GB, args.inter_latency * US, args.inter_bandwidth * GB
    )
