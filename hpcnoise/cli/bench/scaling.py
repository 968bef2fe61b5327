"""``hpcnoise bench scaling``: the scaling MODEL's predicted step time and weak-scaling efficiency at W = 8
... 1024 GPUs (the model, the measurement and the times files: hpcnoise.benchmarks.scaling)."""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from hpcnoise.benchmarks import scaling
from hpcnoise.benchmarks.common import bench_config
from hpcnoise.benchmarks.network import Network
from hpcnoise.benchmarks.scaling import WARMUP, Measurement, measure_here, predict, read_times, write_times
from hpcnoise.buckets import DEFAULT_CAP_MB, MIN_BUCKETS
from hpcnoise.cli.bench import add_network_options, check_finite, names, network_from_args
from hpcnoise.cli.common import check_large_batch, check_output_file, check_positive, check_threads, check_workloads
from hpcnoise.comm import init
from hpcnoise.errors import EXIT_USAGE, ConfigError, Parser
from hpcnoise.files import git_hash, write_text_atomic
from hpcnoise.models import MODELS
from hpcnoise.regimes import REGIMES

DEFAULT_MODELS = "mlp,cnn1d,lenet5,resnet44,vgg16_bn"
DEFAULT_REGIMES = "lb,diagf"
DEFAULT_WORKERS = "8,16,32,64,128,256,512,1024"
DEFAULT_BATCH = 128  # local batch per GPU: the paper's M_L = 4096 over 32 GPUs
DEFAULT_REPEATS = 5
FLOATS = {"MB/step": "{:.2f}", "compute ms": "{:.2f}", "comm ms": "{:.2f}", "step ms": "{:.2f}"}
FLOATS |= {"step ms overlap": "{:.2f}", "eff": "{:.3f}", "eff overlap": "{:.3f}"}


def _parser() -> Parser:
    p = Parser(prog="hpcnoise bench scaling", description=(scaling.__doc__ or "").split("\n\n")[0])
    p.add_argument("--models", help=f"comma-separated, or 'all' (default {DEFAULT_MODELS}; with --times: the file's)")
    p.add_argument("--regimes", help=f"comma-separated, or 'all' (default {DEFAULT_REGIMES}; with --times: the file's)")
    p.add_argument("--workers", default=DEFAULT_WORKERS, help=f"world sizes W (default {DEFAULT_WORKERS})")
    p.add_argument("--batch", type=int, help=f"local batch per GPU, measured (default {DEFAULT_BATCH})")
    p.add_argument("--repeats", type=int, help=f"timed steps per network, median (default {DEFAULT_REPEATS})")
    p.add_argument("--threads", type=int, help="torch threads while measuring (default 0: torch's default)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), help="where to measure (default auto)")
    p.add_argument(
        "--bucket-mb", type=float, default=DEFAULT_CAP_MB, help=f"gradient bucket cap, MiB (default {DEFAULT_CAP_MB:g})"
    )
    p.add_argument(
        "--min-buckets",
        type=int,
        default=MIN_BUCKETS,
        help=f"and buckets of at most 1/N of the gradients (default {MIN_BUCKETS}; 1: --bucket-mb alone)",
    )
    add_network_options(p, gpus_per_node=True)
    p.add_argument("--times", type=Path, help="read the compute times from this --write-times file; measure nothing")
    p.add_argument("--write-times", type=Path, help="also write the measured times to this JSON file")
    p.add_argument("--csv", type=Path, help="also write the table as CSV")
    return p


def _workers(text: str, per_node: int) -> list[int]:
    try:
        workers = [int(w) for w in text.split(",")]
    except ValueError:
        raise ConfigError(f"--workers must be comma-separated positive integers, got {text!r}") from None
    for w in workers:
        if w < 1 or (w > per_node and w % per_node):
            raise ConfigError(
                f"--workers: {w} is not a world size of whole nodes; use 1 to {per_node} or a multiple of "
                f"--gpus-per-node {per_node}"
            )
    return workers


def _from_file(args: Any) -> tuple[list[Measurement], dict[str, Any]]:
    """The measurements of ``--times`` that ``--models`` and ``--regimes`` select (all by default), and
    the file's facts (device, repeats, versions)."""
    measuring = {"--batch": args.batch, "--repeats": args.repeats, "--threads": args.threads, "--device": args.device}
    given = [option for option, value in {**measuring, "--write-times": args.write_times}.items() if value is not None]
    if given:
        raise ConfigError(f"{', '.join(given)} measure; --times reads measured times: give one or the other")
    measurements, facts = read_times(args.times)
    chosen = measurements
    for option, key in (("--models", "model"), ("--regimes", "regime")):
        wanted = getattr(args, option[2:])
        if wanted:
            wanted = wanted.split(",")
            have = list(dict.fromkeys(getattr(m, key) for m in measurements))
            missing = [n for n in wanted if n not in have]
            if missing:
                raise ConfigError(
                    f"{option}: --times {str(args.times)!r} has no times for {key} {', '.join(map(repr, missing))}; "
                    f"it has {', '.join(have)}"
                )
            chosen = [m for m in chosen if getattr(m, key) in wanted]
    if not chosen:
        raise ConfigError(f"--times {str(args.times)!r} has no times for the chosen models and regimes")
    return chosen, facts


@dataclass(frozen=True)
class Plan:
    """What one invocation predicts, checked before anything runs or is written."""

    network: Network
    workers: list[int]
    measure: list[tuple[str, str]]  # (model, regime) pairs to measure here
    loaded: list[Measurement]  # or the measurements of --times
    facts: dict[str, Any]  # the --times file's facts (device, repeats, versions)


def _check(args: Any) -> Plan:
    """The plan of the command; ConfigError on bad arguments, before anything runs or is written."""
    network = network_from_args(args)
    workers = _workers(args.workers, network.gpus_per_node)
    check_finite(args.bucket_mb, "--bucket-mb")
    check_positive(args.min_buckets, "--min-buckets")
    check_output_file(args.csv, "--csv")
    check_output_file(args.write_times, "--write-times")
    if args.times is not None:
        loaded, facts = _from_file(args)
        return Plan(network, workers, [], loaded, facts)
    models = names(args.models or DEFAULT_MODELS, MODELS, "model", "--models")
    regimes = names(args.regimes or DEFAULT_REGIMES, REGIMES, "regime", "--regimes")
    args.batch = DEFAULT_BATCH if args.batch is None else args.batch
    args.repeats = DEFAULT_REPEATS if args.repeats is None else args.repeats
    args.threads = 0 if args.threads is None else args.threads
    args.device = args.device or "auto"
    check_large_batch(args.batch)
    check_positive(args.repeats, "--repeats")
    check_threads(args.threads)
    pairs = [(m, r) for m in models for r in regimes]
    configs = [(f"{m}/{r}", replace(bench_config(m, r, args.batch, 1, 0), device=args.device)) for m, r in pairs]
    check_workloads(configs, 1, args.batch)
    return Plan(network, workers, pairs, [], {})


def _header(network: Network, cap_mb: float, min_buckets: int, source: str) -> str:
    return (
        "MODEL PREDICTION, not a measurement: weak scaling (fixed local batch), ring-allreduce alpha-beta model.\n"
        f"  network: {network.describe()}\n"
        f"  buckets: gradients in reverse parameter order, up to {cap_mb:g} MiB and 1/{min_buckets} of "
        "them each, with their per-parameter curvature sums, then one collective of the step's other "
        "tensors (batch-norm sums, counts, K-FAC factors)\n"
        f"  compute: {source}\n"
        "  eff = T_step(1) / T_step(W); 'overlap': buckets reduced during backward as they become ready"
    )


def _measurements(args: Any, plan: Plan) -> tuple[list[Measurement], dict[str, Any], str]:
    """The compute times (read from --times, or measured here and written to --write-times), their facts,
    and where they come from in words."""
    if args.times is not None:
        measurements, facts = plan.loaded, plan.facts
        batches = ", ".join(sorted({str(m.batch) for m in measurements}, key=int))
        source = f"read from {args.times} (measured on {facts.get('device', '?')}, local batch {batches}, "
        return measurements, facts, source + f"median of {facts.get('repeats', '?')} steps)"
    if args.threads:
        torch.set_num_threads(args.threads)
    measurements, facts = measure_here(plan.measure, args.batch, args.repeats, init(args.device))
    source = f"measured here on {facts['device']} ({facts['host']}), local batch {args.batch}, "
    source += f"median of {args.repeats} steps after {WARMUP} warm-up steps"
    if args.write_times is not None:
        write_times(args.write_times, measurements, facts)
    return measurements, facts, source


def main(argv: list[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
        plan = _check(args)
    except ConfigError as e:
        print(f"hpcnoise bench scaling: error: {e}", file=sys.stderr, flush=True)
        return EXIT_USAGE
    measurements, facts, source = _measurements(args, plan)
    cap = int(args.bucket_mb * 2**20)
    rows = [row for m in measurements for row in predict(m, plan.network, plan.workers, cap, args.min_buckets)]
    table = pd.DataFrame(rows)
    print(_header(plan.network, args.bucket_mb, args.min_buckets, source))
    print(table.to_string(index=False, formatters={c: f.format for c, f in FLOATS.items()}))
    if args.csv is not None:  # every row carries what it was computed from
        context = {
            "batch": [m.batch for m in measurements for _ in plan.workers],
            "device": facts.get("device", ""),
            "times": str(args.times) if args.times is not None else "measured",
            "bucket_mb": args.bucket_mb,
            "min_buckets": args.min_buckets,
            **asdict(plan.network),
            "git": git_hash(),
        }
        write_text_atomic(args.csv, table.assign(**context).to_csv(index=False))
    return 0
