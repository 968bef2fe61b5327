"""``hpcnoise bench data``: feeding CIFAR-shaped batches, the suite's path vs a DataLoader
(hpcnoise.benchmarks.data_feed)."""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch

from hpcnoise.benchmarks import data_feed
from hpcnoise.benchmarks.data_feed import WARMUP, device_of, run
from hpcnoise.cli.common import check_positive, check_threads, error
from hpcnoise.errors import ConfigError, Parser


def int_list(low: int, what: str) -> Callable[[str], list[int]]:
    """An argparse type: a comma-separated list of integers >= ``low`` (at least one)."""

    def parse(text: str) -> list[int]:
        try:
            values = [int(v) for v in text.split(",") if v.strip()]
        except ValueError:
            values = []
        if not values or min(values) < low:
            raise argparse.ArgumentTypeError(f"expected comma-separated {what} (integers >= {low}), got {text!r}")
        return values

    return parse


def _parser() -> Parser:
    p = Parser(prog="hpcnoise bench data", description=(data_feed.__doc__ or "").split("\n\n")[0])
    p.add_argument("--samples", type=int, default=50_000, help="images in the split (CIFAR: 50,000)")
    p.add_argument("--batches", type=int_list(1, "batch sizes"), default=[128, 512], help="comma-separated batch sizes")
    p.add_argument(
        "--workers", type=int_list(0, "worker counts"), default=[0, 2], help="comma-separated DataLoader worker counts"
    )
    p.add_argument("--steps", type=int, default=20, help="timed batches per measurement")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
        check_positive(args.steps, "--steps")
        check_threads(args.threads)
        if args.device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("--device cuda is not available on this machine (no CUDA GPU); valid here: auto, cpu")
        required = max(args.batches) * (args.steps + WARMUP)
        if args.samples < required:
            raise ConfigError(f"--samples must be at least {required} (largest batch x (steps + {WARMUP}))")
    except ConfigError as e:
        return error(str(e))
    if args.threads:
        torch.set_num_threads(args.threads)
    run(args.samples, args.batches, args.workers, args.steps, device_of(args.device))
    return 0
