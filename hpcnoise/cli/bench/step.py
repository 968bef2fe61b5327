"""``hpcnoise bench step``: hpcnoise's step side by side with the plain Horovod recipe
(hpcnoise.benchmarks.step_compare)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

from hpcnoise.benchmarks import step_compare
from hpcnoise.benchmarks.step_compare import compare, step_config
from hpcnoise.benchmarks.step_targets import busy_wait_note, targets
from hpcnoise.cli.bench import names
from hpcnoise.cli.common import check_output_file, check_positive, check_threads, check_workloads
from hpcnoise.comm import detect_launcher, init, launcher_rank
from hpcnoise.config import CHOICES, Config
from hpcnoise.errors import EXIT_USAGE, ConfigError, Parser
from hpcnoise.files import write_text_atomic
from hpcnoise.heap import keep_freed_memory
from hpcnoise.models import MODELS


def _parser() -> Parser:
    p = Parser(prog="hpcnoise bench step", description=(step_compare.__doc__ or "").split("\n\n")[0])
    p.add_argument(
        "--models", default="mlp,cnn1d,lenet5,resnet44", help=f"comma-separated, or 'all' ({', '.join(MODELS)})"
    )
    p.add_argument("--batch", type=int, default=512, help="global batch (default 512)")
    p.add_argument("--steps", type=int, default=5, help="steps per timed block (default 5)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds; the table gives medians (default 5)")
    p.add_argument("--threads", type=int, default=0, help="torch threads per process (0: torch's default)")
    p.add_argument(
        "--bucket-mb",
        default=f"{Config().bucket_mb:g}",
        help="gradient bucket size of lb and diagf in MiB; more sizes, comma-separated, add lb variants",
    )
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument(
        "--dtypes", default="float32", help="number formats, comma-separated: float32, bf16, float64 (default float32)"
    )
    p.add_argument(
        "--channels-last", action="store_true", help="2-D convolutional networks in channels-last memory format"
    )
    p.add_argument("--csv", type=Path, help="also write the table as CSV")
    p.add_argument(
        "--profile", type=int, default=0, metavar="N", help="then profile lb and diagf: the N slowest operators"
    )
    return p


def _check(args: Any) -> list[str]:
    models = names(args.models, MODELS, "model", "--models")
    for option in ("batch", "steps", "rounds"):
        check_positive(getattr(args, option), f"--{option}")
    if args.profile < 0:
        raise ConfigError(f"--profile must be >= 0 (0: no profile), got {args.profile}")
    check_threads(args.threads)
    text = args.bucket_mb
    try:
        args.bucket_mb = [float(v) for v in text.split(",")]
    except ValueError:
        args.bucket_mb = []
    if not args.bucket_mb or not all(mb > 0 for mb in args.bucket_mb) or len(set(args.bucket_mb)) < len(args.bucket_mb):
        raise ConfigError(f"--bucket-mb must be distinct sizes > 0 in MiB, comma-separated, got {text!r}")
    check_output_file(args.csv, "--csv")
    args.dtypes = tuple(names(args.dtypes, dict.fromkeys(CHOICES["dtype"]), "number format", "--dtypes"))
    configs = [
        (m, step_config(m, "diagf", args.batch, args.threads, device=args.device, dtype=d))
        for m in models
        for d in args.dtypes
    ]
    check_workloads(configs, detect_launcher()[1], args.batch)
    return models


def main(argv: list[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
        models = _check(args)
    except ConfigError as e:
        if launcher_rank() == 0:
            print(f"hpcnoise bench step: error: {e}", file=sys.stderr, flush=True)
        return EXIT_USAGE
    import pandas as pd  # lazy: only once the arguments are good

    comm = init(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows, profiles = compare(
        comm,
        models,
        args.batch,
        threads=args.threads,
        device=args.device,
        bucket_mb=args.bucket_mb,
        block=args.steps,
        rounds=args.rounds,
        profile=args.profile,
        dtypes=args.dtypes,
        channels_last=args.channels_last,
    )
    if comm.is_main:
        table = pd.DataFrame(rows)
        print(
            f"step side by side: {comm.size} worker(s) ({comm.launcher}), device {comm.device}, global batch "
            f"{args.batch}, buckets of {args.bucket_mb[0]:g} MiB, medians of {args.rounds} rounds of {args.steps} steps"
            + (", 2-D convolutions channels-last" if args.channels_last else "")
            + (", freed memory kept (hpcnoise.heap)" if keep_freed_memory() else ", malloc as configured")
        )
        note = busy_wait_note(comm, torch.get_num_threads())
        if note:
            print(note)
        print(table.to_string(index=False, float_format=lambda v: f"{v:.2f}", na_rep="-"))
        print("targets:")
        for line in targets(rows, comm.device.type):
            print(f"  {line}")
        if args.csv:
            write_text_atomic(args.csv, table.to_csv(index=False))
        for text in profiles:
            print(text)
    return 0
