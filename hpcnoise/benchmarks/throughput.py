"""Synthetic-data training throughput for every model and regime (in the spirit of Horovod's
synthetic benchmark), under whatever launcher started it.

    hpcnoise bench train [--models a,b] [--regimes x,y] [--batch 512] [--steps 10] [--threads T] [--out DIR]
                         [--intra-latency US] [--intra-bandwidth GBPS] [--inter-latency US] [--inter-bandwidth GBPS]
    horovodrun -np 2 -H localhost:2 hpcnoise bench train ...

Each (model, regime) trains 2 epochs of ``--steps`` steps on random data of its dataset's shape
through the real ``train()``; the second epoch is reported (the first pays one-off costs): samples/s
in total and per worker, and the per-step time of each phase (forward+backward with the curvature
hooks, the fused allreduce, the noise, the optimiser).

Measured scaling efficiency. Without ``--out`` the run directories are temporary and removed. With
``--out DIR`` they are kept under DIR (``bench-MODEL-REGIME-bBATCH-wW-STAMP``), so that one invocation
with one worker and one under ``horovodrun -np 2 -H localhost:2`` into the same DIR give ``hpcnoise
report DIR`` a throughput table with the 1- and 2-worker rows of each cell and their measured scaling
efficiency (per-worker samples/s at W over that at 1 worker, the same global batch: strong scaling).
Repeating an invocation adds runs (each has its own time stamp), which the report averages.

Predicted scaling efficiency (a MODEL, ``hpcnoise.benchmarks.scaling``). With ``--out`` and W > 1, after
each run rank 0 times the training step on one worker (the other ranks wait), at the run's global batch
B and at its local batch B / W (``scaling.measure``), and predicts the step at W workers from the
ring-allreduce alpha-beta model (``scaling.predict``; with overlap, as the run's bucketed allreduce does,
or without it for ``--allreduce=fused``):

    predicted efficiency(W) = T_compute(B) / (W * T_step(W; local batch B / W))

so that it is comparable with the measured one (equal when compute scales linearly in the batch and
communication is free). The network is where the run ran: as many ranks per node as Horovod's local
size, the ``--intra-*`` latency and bandwidth inside a node and ``--inter-*`` across nodes (defaults:
``network.Network``'s, a generic GPU cluster; give this machine's to predict for it). The prediction,
its inputs and the network go to RUN_DIR/scaling.json (``PREDICTION_FORMAT``), written atomically after
the run finished; the report shows it beside the measured efficiency. The model leaves out what the
scaling module lists (contention between the workers for cores and memory, Horovod's per-collective
costs, stragglers), so on one host of CPU workers the measured efficiency is expected to be lower.

Bad arguments (an unknown model, a batch the world size does not divide, an --out that cannot be
written, a non-positive bandwidth) give one line on stderr and exit status 2 before anything runs.
"""

from __future__ import annotations

import argparse
import json
import secrets
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from hpcnoise.benchmarks.common import bench_config, names
from hpcnoise.benchmarks.network import GB, US, Network, add_network_options, network_from_args
from hpcnoise.comm import Comm, detect_launcher, init, launcher_rank
from hpcnoise.config import Config
from hpcnoise.errors import EXIT_USAGE, ConfigError, Parser
from hpcnoise.files import unwritable, write_json_atomic
from hpcnoise.models import MODELS
from hpcnoise.regimes import REGIMES
from hpcnoise.workload import validate

PREDICTION_FILE = "scaling.json"  # in a kept run directory of W > 1 workers
PREDICTION_FORMAT = "hpcnoise-scaling-prediction-v1"
PREDICTION_REPEATS = 5  # timed steps of each compute measurement (median), after scaling.WARMUP


def _check(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """The models and regimes to measure; ConfigError on bad arguments, before anything runs or is written."""
    models = names(args.models, MODELS, "model", "--models")
    regimes = names(args.regimes, REGIMES, "regime", "--regimes")
    if args.batch < 4:
        raise ConfigError(f"--batch must be an integer >= 4 (the small batch is a quarter of it), got {args.batch}")
    if args.steps < 1:
        raise ConfigError(f"--steps must be a positive integer, got {args.steps}")
    if args.threads < 0:
        raise ConfigError(f"--threads must be >= 0 (0: torch's default), got {args.threads}")
    network_from_args(args, gpus_per_node=1)  # checks the options; the run knows its ranks per node
    csv = args.csv
    if csv is not None:
        problem = unwritable(csv.parent) if not csv.is_dir() else ("", f"{str(csv)!r} is a directory")
        if problem is not None:
            raise ConfigError(f"cannot write --csv {csv}: {problem[1]}")
    if args.out is not None:
        problem = unwritable(args.out)
        if problem is not None:
            raise ConfigError(f"cannot keep the runs in --out {args.out}: {problem[1]}")
    world = detect_launcher()[1]
    for model in models:
        for regime in regimes:
            try:
                validate(bench_config(model, regime, args.batch, args.steps, args.threads), world)
            except ConfigError as e:
                raise ConfigError(f"{model}/{regime} with --batch {args.batch}: {e}") from e
    return models, regimes


def run_network(args: argparse.Namespace, comm: Comm) -> Network:
    """The network the run ran on, for the model: Horovod's local size as ranks per node, the options' links."""
    return network_from_args(args, comm.hvd.local_size() if comm.hvd is not None else 1)


def network_text(network: dict[str, Any], world: int) -> str:
    """The network parameters a prediction used, in words (the report prints this)."""
    per_node = int(network["gpus_per_node"])
    nodes = max(1, world // per_node)
    text = (
        f"{nodes} node{'s' if nodes != 1 else ''} x {min(world, per_node)} ranks; intra-node alpha "
        f"{network['intra_latency_s'] / US:g} us, beta {network['intra_bandwidth'] / GB:g} GB/s"
    )
    if nodes > 1:
        text += (
            f"; inter-node alpha {network['inter_latency_s'] / US:g} us, beta {network['inter_bandwidth'] / GB:g} GB/s"
        )
    return text


def predict_run(cfg: Config, global_batch: int, comm: Comm, network: Network) -> dict[str, Any]:
    """Rank 0's model of a W-worker run's strong-scaling efficiency (the module docstring's formula), with
    what it was computed from; the compute is timed on one worker, here, with the process's torch threads."""
    import torch

    from hpcnoise.benchmarks.scaling import measure, predict

    world = comm.size
    alone = Comm(rank=0, size=1, local_rank=comm.local_rank, launcher="none", device=comm.device)
    whole = measure(cfg.model, cfg.regime, global_batch, PREDICTION_REPEATS, alone)
    share = measure(cfg.model, cfg.regime, global_batch // world, PREDICTION_REPEATS, alone)
    overlap = cfg.allreduce == "buckets"
    row = predict(share, network, [world], int(cfg.bucket_mb * 2**20), cfg.min_buckets)[0]
    step = 1e-3 * row["step ms overlap" if overlap else "step ms"]
    return {
        "format": PREDICTION_FORMAT,
        "what": "MODEL PREDICTION, not a measurement (hpcnoise.benchmarks.scaling, ring-allreduce alpha-beta)",
        "world_size": world,
        "nodes": network.nodes(world),
        "network": asdict(network),
        "network_text": network_text(asdict(network), world),
        "global_batch": global_batch,
        "local_batch": global_batch // world,
        "bucket_mb": cfg.bucket_mb,
        "min_buckets": cfg.min_buckets,
        "overlap": overlap,
        "compute_global_batch_s": whole.compute_s,
        "compute_local_batch_s": share.compute_s,
        "comm_s": 1e-3 * row["comm ms"],
        "step_s": step,
        "efficiency": whole.compute_s / (world * step),
        "device": comm.device.type,
        "torch_threads": torch.get_num_threads(),
        "repeats": PREDICTION_REPEATS,
    }


def _parser() -> Parser:
    p = Parser(prog="hpcnoise bench train", description=__doc__.split("\n\n")[0])
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
    p = _parser()
    try:
        args = p.parse_args(argv)
        models, regimes = _check(args)
    except ConfigError as e:
        if launcher_rank() == 0:
            print(f"hpcnoise bench train: error: {e}", file=sys.stderr, flush=True)
        return EXIT_USAGE
    import pandas as pd  # lazy: only once the arguments are good

    from hpcnoise.train import train

    comm = init("auto")
    out, stamp = _run_dirs(args, comm)
    predicting = args.out is not None and comm.size > 1
    network = run_network(args, comm)
    rows = []
    for model in models:
        for regime in regimes:
            cfg = replace(bench_config(model, regime, args.batch, args.steps, args.threads), out_dir=str(out))
            name = f"{model}-{regime}" if args.out is None else f"bench-{model}-{regime}-b{args.batch}-w{comm.size}"
            cfg = replace(cfg, run_name=name if args.out is None else f"{name}-{stamp}")
            train(cfg, comm)
            if comm.is_main:
                last = json.loads((out / cfg.run_name / "metrics.jsonl").read_text().splitlines()[-1])
                steps = max(last["step"] // 2, 1)
                row = {
                    "model": model,
                    "regime": regime,
                    "world": comm.size,
                    "batch": last["batch_size"],
                    "samples/s": last["samples_per_s"],
                    "samples/s/worker": last["samples_per_s_per_worker"],
                }
                for phase in ("forward_backward", "allreduce", "noise", "optimizer"):
                    row[f"{phase} ms"] = 1e3 * last.get(f"time_{phase}_s", 0.0) / steps
                if predicting:
                    prediction = predict_run(cfg, int(last["batch_size"]), comm, network)
                    write_json_atomic(out / cfg.run_name / PREDICTION_FILE, prediction)
                    row["model eff"] = prediction["efficiency"]
                rows.append(row)
            if predicting:
                comm.broadcast_object(None)  # the other ranks wait here while rank 0 measures
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


if __name__ == "__main__":
    sys.exit(main())
