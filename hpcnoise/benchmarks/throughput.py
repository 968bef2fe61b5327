"""Synthetic-data training throughput for every model and regime (in the spirit of Horovod's
synthetic benchmark), under whatever launcher started it.

    hpcnoise bench train [--models a,b] [--regimes x,y] [--batch 512] [--steps 10] [--threads T]
    horovodrun -np 2 -H localhost:2 hpcnoise bench train ...

Each (model, regime) trains 2 epochs of ``--steps`` steps on random data of its dataset's shape
through the real ``train()``; the second epoch is reported (the first pays one-off costs): samples/s
in total and per worker, and the per-step time of each phase (forward+backward with the curvature
hooks, the fused allreduce, the noise, the optimiser).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

from hpcnoise.comm import detect_launcher, init, launcher_rank
from hpcnoise.config import Config
from hpcnoise.errors import EXIT_USAGE, ConfigError, Parser
from hpcnoise.files import unwritable
from hpcnoise.models import MODELS
from hpcnoise.regimes import REGIMES
from hpcnoise.workload import validate

# The dataset whose shape each model is built for.
MODEL_DATA = {"mlp": "mnist1d", "cnn1d": "mnist1d", "mnist_mlp": "mnist", "lenet5": "mnist"}


def bench_config(model: str, regime: str, batch: int, steps: int, threads: int) -> Config:
    small = max(batch // 4, 1)
    trained_batch = small if regime == "sb" else batch
    return Config(
        dataset=MODEL_DATA.get(model, "cifar10"),
        model=model,
        regime=regime,
        batch_size=batch,
        small_batch=small,
        batchchange_epochs=1,  # batchchange: the reported second epoch is at the large batch
        ghost_bn=True,
        ghost_size=small,
        epochs=2,
        noise_epochs=2,
        lr=0.01,
        synthetic_data=True,
        train_samples=trained_batch * steps if regime != "batchchange" else batch * steps,
        test_samples=batch,
        checkpoint_every=0,
        threads=threads,
        progress=False,
        conv_mode="spatial" if MODEL_DATA.get(model, "cifar10") != "mnist1d" else "exact",
    )


def _names(text: str, registry: dict[str, Any], what: str, option: str) -> list[str]:
    """A comma-separated list of registry names, or 'all'; ConfigError naming the unknown ones."""
    names = list(registry) if text == "all" else [n for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in registry]
    if bad or not names:
        given = ", ".join(map(repr, bad)) or "(none given)"
        raise ConfigError(f"{option}: unknown {what} {given}; valid: all, {', '.join(registry)}")
    return names


def _check(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """The models and regimes to measure; ConfigError on bad arguments, before anything runs or is written."""
    models = _names(args.models, MODELS, "model", "--models")
    regimes = _names(args.regimes, REGIMES, "regime", "--regimes")
    if args.batch < 4:
        raise ConfigError(f"--batch must be an integer >= 4 (the small batch is a quarter of it), got {args.batch}")
    if args.steps < 1:
        raise ConfigError(f"--steps must be a positive integer, got {args.steps}")
    if args.threads < 0:
        raise ConfigError(f"--threads must be >= 0 (0: torch's default), got {args.threads}")
    csv = args.csv
    if csv is not None:
        problem = unwritable(csv.parent) if not csv.is_dir() else ("", f"{str(csv)!r} is a directory")
        if problem is not None:
            raise ConfigError(f"cannot write --csv {csv}: {problem[1]}")
    world = detect_launcher()[1]
    for model in models:
        for regime in regimes:
            try:
                validate(bench_config(model, regime, args.batch, args.steps, args.threads), world)
            except ConfigError as e:
                raise ConfigError(f"{model}/{regime} with --batch {args.batch}: {e}") from e
    return models, regimes


def main(argv: list[str] | None = None) -> int:
    p = Parser(prog="hpcnoise bench train", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="mlp,cnn1d", help=f"comma-separated, or 'all' ({', '.join(MODELS)})")
    p.add_argument("--regimes", default="all", help=f"comma-separated, or 'all' ({', '.join(REGIMES)})")
    p.add_argument("--batch", type=int, default=512, help="global large batch (default 512)")
    p.add_argument("--steps", type=int, default=10, help="steps per epoch (default 10)")
    p.add_argument("--threads", type=int, default=0, help="torch threads per process (0: torch's default)")
    p.add_argument("--csv", type=Path, help="also write the table as CSV")
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
    out = Path(comm.broadcast_object(tempfile.mkdtemp(prefix="hpcnoise-bench-") if comm.is_main else ""))
    rows = []
    for model in models:
        for regime in regimes:
            cfg = replace(bench_config(model, regime, args.batch, args.steps, args.threads), out_dir=str(out))
            cfg = replace(cfg, run_name=f"{model}-{regime}")
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
                rows.append(row)
    if comm.is_main:
        shutil.rmtree(out, ignore_errors=True)
        table = pd.DataFrame(rows)
        print(f"synthetic throughput, {comm.size} worker(s), device {comm.device}, global batch {args.batch}")
        print(table.to_string(index=False, float_format=lambda v: f"{v:.1f}"))
        if args.csv:
            table.to_csv(args.csv, index=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
