"""The network the scaling model predicts for: an alpha-beta ring allreduce inside a node and across
nodes (the command-line options that describe it: hpcnoise.cli.bench). Plain Python, so a command can
check its options before it loads torch."""

from __future__ import annotations

from dataclasses import dataclass

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
