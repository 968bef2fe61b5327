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
written, a non-positive bandwidth) give one line on stderr and exit status 2 before anything runs (the
command line: hpcnoise.cli.bench.train).
"""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from hpcnoise.benchmarks.common import bench_config
from hpcnoise.benchmarks.network import GB, US, Network
from hpcnoise.comm import Comm
from hpcnoise.config import Config
from hpcnoise.files import write_json_atomic

PREDICTION_FILE = "scaling.json"  # in a kept run directory of W > 1 workers
PREDICTION_FORMAT = "hpcnoise-scaling-prediction-v1"
PREDICTION_REPEATS = 5  # timed steps of each compute measurement (median), after scaling.WARMUP


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


def measure_rows(
    comm: Comm,
    cells: list[tuple[str, str]],
    batch: int,
    steps: int,
    threads: int,
    out: Path,
    stamp: str | None,
    network: Network | None,
) -> list[dict[str, Any]]:
    """Train each (model, regime) of ``cells`` for 2 epochs of ``steps`` steps into ``out`` and return rank 0's
    table rows (the other ranks': none). ``stamp``: keep the run directories under unique names (``--out``);
    ``network``: also predict each run's efficiency there and write RUN_DIR/scaling.json."""
    from hpcnoise.train import train

    rows = []
    for model, regime in cells:
        cfg = replace(bench_config(model, regime, batch, steps, threads), out_dir=str(out))
        name = f"{model}-{regime}" if stamp is None else f"bench-{model}-{regime}-b{batch}-w{comm.size}"
        cfg = replace(cfg, run_name=name if stamp is None else f"{name}-{stamp}")
        train(cfg, comm)
        if comm.is_main:
            last = json.loads((out / cfg.run_name / "metrics.jsonl").read_text().splitlines()[-1])
            rows.append(_row(model, regime, comm.size, last))
            if network is not None:
                prediction = predict_run(cfg, int(last["batch_size"]), comm, network)
                write_json_atomic(out / cfg.run_name / PREDICTION_FILE, prediction)
                rows[-1]["model eff"] = prediction["efficiency"]
        if network is not None:
            comm.broadcast_object(None)  # the other ranks wait here while rank 0 measures
    return rows


def _row(model: str, regime: str, world: int, last: dict[str, Any]) -> dict[str, Any]:
    """A table row from the run's last metrics line: samples/s and each phase's ms per step."""
    steps = max(last["step"] // 2, 1)
    row = {
        "model": model,
        "regime": regime,
        "world": world,
        "batch": last["batch_size"],
        "samples/s": last["samples_per_s"],
        "samples/s/worker": last["samples_per_s_per_worker"],
    }
    for phase in ("forward_backward", "allreduce", "noise", "optimizer"):
        row[f"{phase} ms"] = 1e3 * last.get(f"time_{phase}_s", 0.0) / steps
    return row
