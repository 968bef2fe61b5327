"""``hpcnoise sharpness RUN_DIR``: the largest Hessian eigenvalue of a finished run's final model."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from hpcnoise.cli.common import is_rank0
from hpcnoise.config import Config
from hpcnoise.errors import EXIT_USAGE, ConfigError, Parser
from hpcnoise.files import write_json_atomic
from hpcnoise.rundir import load_config

# torch and the measurement code load only once the run directory and the options are known good (the
# argument checks below need neither), so that bad input answers at once.
METHODS = ("lanczos", "power")  # hpcnoise.measure.sharpness.METHODS, which needs torch to import


def _parser() -> Parser:
    parser = Parser(
        prog="hpcnoise sharpness",
        description="Largest Hessian eigenvalue of a finished run's final model (BN folded, temperature "
        "fitted on the test split); writes RUN_DIR/sharpness.json. Runs under any launcher.",
    )
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--samples", type=int, default=4096, help="training samples in the fixed set (default 4096)")
    parser.add_argument("--method", choices=METHODS, default="lanczos")
    parser.add_argument("--no-temperature", action="store_true", help="T = 1 instead of fitting it")
    parser.add_argument("--no-fold", action="store_true", help="keep batch norm (eval mode) instead of folding it")
    return parser


def _check(args: Any) -> tuple[Config, str, dict[str, Any]]:
    """The run's config, the device to measure on and the model's state; ConfigError on bad input (every
    rank checks, before any collective)."""
    if args.run_dir.exists() and not args.run_dir.is_dir():
        raise ConfigError(f"run directory {str(args.run_dir)!r} is not a directory")
    cfg = load_config(args.run_dir)
    if args.samples < 1:
        raise ConfigError(f"--samples must be positive, got {args.samples}")
    if args.samples > cfg.train_samples:
        raise ConfigError(f"--samples {args.samples} exceeds the run's {cfg.train_samples} training samples")
    import torch  # the run directory looks right: now the checks that need torch

    from hpcnoise.comm import detect_launcher
    from hpcnoise.workload import check_workload, read_model_state

    world = detect_launcher()[1]
    if args.samples < world:
        raise ConfigError(f"--samples {args.samples} cannot be shared by {world} processes; use at least {world}")
    # A run trained on a GPU is measured on this machine's device; the rest of its config must be valid.
    device = cfg.device if cfg.device != "cuda" or torch.cuda.is_available() else "auto"
    check_workload(replace(cfg, device=device))
    return cfg, device, read_model_state(args.run_dir)


def main(argv: list[str] | None = None) -> int:
    """``hpcnoise sharpness RUN_DIR [--samples N] [--method lanczos|power] [--no-temperature] [--no-fold]``"""
    try:  # every rank checks, before any collective
        args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
        cfg, device, state = _check(args)
    except ConfigError as e:
        if is_rank0():
            print(f"hpcnoise: error: {e}", file=sys.stderr, flush=True)
        return EXIT_USAGE
    import torch

    from hpcnoise.comm import init
    from hpcnoise.measure.sharpness import sharpness_of
    from hpcnoise.workload import data_and_model, load_model_state

    comm = init(device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        data, model = data_and_model(cfg, comm)  # e.g. a prepared dataset file gone missing since training
        load_model_state(model, state, cfg, args.run_dir)
        if args.samples > data.x_train.shape[0]:  # image datasets: their own size, not cfg.train_samples
            raise ConfigError(f"--samples {args.samples} exceeds the run's {data.x_train.shape[0]} training samples")
    except ConfigError as e:
        if comm.is_main:
            print(f"hpcnoise: error: {e}", file=sys.stderr, flush=True)
        return EXIT_USAGE
    result = sharpness_of(
        model,
        data.x_train,
        data.y_train,
        comm,
        samples=args.samples,
        heldout=None if args.no_temperature else (data.x_test, data.y_test),
        fold=not args.no_fold,
        method=args.method,
        seed=0,  # the same sample set and start vector for every run, so runs are compared on one operator
    )
    if comm.is_main:
        write_json_atomic(args.run_dir / "sharpness.json", result)
        print(
            f"hpcnoise: sharpness {result['max_eigenvalue']:.6g} (T = {result['temperature']:.4g}, "
            f"{result['iterations']} Hessian-vector products, {result['wall_time_s']:.1f} s) -> "
            f"{args.run_dir / 'sharpness.json'}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
