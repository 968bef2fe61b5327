"""Independent, reproducible random streams.

Every random stream of a run (model init, data order, noise, Rademacher signs, augmentation) has its
own generator, derived from (seed, stream name, counters) through numpy's SeedSequence. A stream that
must be identical on all ranks (noise, data order) is keyed by the step or epoch only; a stream that
must differ per rank or per sample includes those in its counters. No communication is needed.
"""

from __future__ import annotations

import zlib

import numpy as np
import torch


def stream_seed(seed: int, stream: str, *counters: int) -> int:
    """A 63-bit seed for the named stream at the given counters (e.g. step, rank)."""
    entropy = [seed, zlib.crc32(stream.encode()), *counters]
    return int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0] >> np.uint64(1))


def generator(seed: int, stream: str, *counters: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A torch.Generator seeded for the named stream at the given counters."""
    g = torch.Generator(device=device)
    g.manual_seed(stream_seed(seed, stream, *counters))
    return g
