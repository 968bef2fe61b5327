"""``hpcnoise bench train``: synthetic-data training throughput of every model and regime, under whatever
launcher started it (what it measures and predicts: hpcnoise.benchmarks.throughput)."""

from __future__ import annotations

import argparse
import secrets
import shutil
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from hpcnoise.benchmarks import throughput
from hpcnoise.benchmarks.common import bench_config
from hpcnoise.benchmarks.throughput import measure_rows, network_text
from hpcnoise.cli.bench import add_network_options, names, network_from_args
from hpcnoise.cli.common import check_large_batch, check_output_file, check_positive, check_threads, check_workloads
from hpcnoise.comm import Comm, detect_launcher, init, launcher_rank
from hpcnoise.errors import EXIT_USAGE, ConfigError, Parser
from hpcnoise.files import unwritable
from hpcnoise.models import MODELS
from hpcnoise.regimes import REGIMES


def _parser() -> Parser:
    p = Parser(prog="hpcnoise bench train", description=(throughput.__doc__ or "").split("\n\n")[0])
    p.add_argument("--models", default="mlp,cnn1d", help=f"comma-separated, or 'all' ({', '.join(MODELS)})")
    p.add_argument("--regimes", default="all", help=f"comma-separated, or 'all' ({', '.join(REGIMES)})")
    p.add_argument("--batch", type=int, default=512, help="global large batch (default 512)")
    p.add_argument("--steps", type=int, default=10, help="steps per epoch (default 10)")
    p.add_argument("--threads", type=int, default=0, help="torch threads per process (0: torch's default)")
    p.add_argument("--csv", type=Path, help="also write the table as CSV")
    p.add_argument(
        "--out", type=Path, help="keep the run directories here (for `hpcnoise report`), with the model's prediction"
    )
    add_network_options(p, gpus_per_node=False)
    return p


def _check(args: argparse.Namespace) -> list[tuple[str, str]]:
    """The (model, regime) pairs to measure; ConfigError on bad arguments, before anything runs or is written."""
    models = names(args.models, MODELS, "model", "--models")
    regimes = names(args.regimes, REGIMES, "regime", "--regimes")
    check_large_batch(args.batch)
    check_positive(args.steps, "--steps")
    check_threads(args.threads)
    network_from_args(args, gpus_per_node=1)  # checks the options; the run knows its ranks per node
    check_output_file(args.csv, "--csv")
    if args.out is not None:
        problem = unwritable(args.out)
        if problem is not None:
            raise ConfigError(f"cannot keep the runs in --out {args.out}: {problem[1]}")
    cells = [(model, regime) for model in models for regime in regimes]
    configs = [(f"{m}/{r}", bench_config(m, r, args.batch, args.steps, args.threads)) for m, r in cells]
    check_workloads(configs, detect_launcher()[1], args.batch)
    return cells


def _run_dirs(args: argparse.Namespace, comm: Comm) -> tuple[Path, str]:
    """Where the runs go (--out, or a temporary directory) and the stamp that makes their names unique."""
    if comm.is_main:
        out = str(args.out) if args.out is not None else tempfile.mkdtemp(prefix="hpcnoise-bench-")
        stamp = f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
    else:
        out, stamp = "", ""
    out, stamp = comm.broadcast_object((out, stamp))
    return Path(out), stamp


def main(argv: list[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
        cells = _check(args)
    except ConfigError as e:
        if launcher_rank() == 0:
            print(f"hpcnoise bench train: error: {e}", file=sys.stderr, flush=True)
        return EXIT_USAGE
    import pandas as pd  # lazy: only once the arguments are good

    comm = init("auto")
    out, stamp = _run_dirs(args, comm)
    predicting = args.out is not None and comm.size > 1
    # the network the run ran on: Horovod's local size as ranks per node, the options' links
    network = network_from_args(args, comm.hvd.local_size() if comm.hvd is not None else 1)
    kept = stamp if args.out is not None else None
    rows = measure_rows(comm, cells, args.batch, args.steps, args.threads, out, kept, network if predicting else None)
    if comm.is_main:
        if args.out is None:
            shutil.rmtree(out, ignore_errors=True)
        table = pd.DataFrame(rows)
        print(f"synthetic throughput, {comm.size} worker(s), device {comm.device}, global batch {args.batch}")
        formats = {"model eff": "{:.2f}".format} if predicting else None
        print(table.to_string(index=False, float_format=lambda v: f"{v:.1f}", formatters=formats))
        if predicting:
            where = network_text(asdict(network), comm.size)
            print(f"model eff: MODEL PREDICTION (hpcnoise.benchmarks.scaling), not a measurement; network {where}")
        if args.out is not None:
            print(f"runs kept in {out}; `hpcnoise report {out}` puts them in its throughput table")
        if args.csv:
            table.to_csv(args.csv, index=False)
    return 0
