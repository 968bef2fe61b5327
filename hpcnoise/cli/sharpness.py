"""``hpcnoise sharpness RUN_DIR``: the largest Hessian eigenvalue of a finished run's final model."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from hpcnoise.comm import init, launcher_rank
from hpcnoise.errors import EXIT_USAGE, ConfigError
from hpcnoise.files import write_json_atomic
from hpcnoise.measure.sharpness import METHODS, sharpness_of
from hpcnoise.rundir import load_config
from hpcnoise.workload import load_run


def main(argv: list[str] | None = None) -> int:
    """``hpcnoise sharpness RUN_DIR [--samples N] [--method lanczos|power] [--no-temperature] [--no-fold]``"""
    parser = argparse.ArgumentParser(
        prog="hpcnoise sharpness",
        description="Largest Hessian eigenvalue of a finished run's final model (BN folded, temperature "
        "fitted on the test split); writes RUN_DIR/sharpness.json. Runs under any launcher.",
    )
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--samples", type=int, default=4096, help="training samples in the fixed set (default 4096)")
    parser.add_argument("--method", choices=METHODS, default="lanczos")
    parser.add_argument("--no-temperature", action="store_true", help="T = 1 instead of fitting it")
    parser.add_argument("--no-fold", action="store_true", help="keep batch norm (eval mode) instead of folding it")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    rank0 = launcher_rank() == 0
    try:
        cfg = load_config(args.run_dir)  # every rank checks, before any collective
        if args.samples > cfg.train_samples:
            raise ConfigError(f"--samples {args.samples} exceeds the run's {cfg.train_samples} training samples")
        if args.samples < 1:
            raise ConfigError(f"--samples must be positive, got {args.samples}")
    except ConfigError as e:
        if rank0:
            print(f"hpcnoise: error: {e}", file=sys.stderr, flush=True)
        return EXIT_USAGE
    comm = init(cfg.device if cfg.device != "cuda" or torch.cuda.is_available() else "auto")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        cfg, data, model = load_run(args.run_dir, comm)
    except ConfigError as e:  # e.g. a prepared dataset file gone missing since training
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
