"""The ``hpcnoise`` command line.

    hpcnoise study [--full]                               the main job: MNIST-1D study on 2 processes + report
    hpcnoise train [PRESET] [--smoke] [--key=value ...]   train one configuration (any launcher)
    hpcnoise presets                                      list presets and registries
    hpcnoise data prepare NAME --root DIR                 download and pack MNIST/Fashion/CIFAR (login node)
    hpcnoise sweep write|run|submit ...                   a table's cells as a job array
    hpcnoise sweep status FILE|RUNS_DIR [--list]          a sweep's cells by state: finished, running, diverged, ...
    hpcnoise sharpness RUN_DIR                            max Hessian eigenvalue of a finished run
    hpcnoise report RUNS_DIR                              tables, figures and report.md from run directories
    hpcnoise toy [--out DIR]                              the 2-D quadratic of the paper's Section 3
    hpcnoise bench fisher|data|train                      diag-F cost per step; data feed; throughput
    hpcnoise bench scaling [--times FILE]                 MODEL of step time and efficiency at 8-1024 GPUs
    hpcnoise bench step                                   the step side by side with hvd.DistributedOptimizer

Bad input gets one line on stderr (from rank 0 only), exit status 2, and nothing written. `train` exits
65 when the loss diverged, 73 when another job holds the run directory, 74 when a write failed or no
checkpoint is usable, 75 when preempted after a checkpoint (hpcnoise.errors).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import fields
from typing import Any

from hpcnoise.config import Config, apply_overrides, check_values
from hpcnoise.errors import EXIT_USAGE, ConfigError, Parser, RunStopped
from hpcnoise.presets import DEFAULT_PRESET, PRESETS, get_preset

# Commands import torch, Horovod and the training code only once they run (inside the functions below,
# and through ``_delegate``), so that `hpcnoise --help` and bad input answer at once.


def _error(msg: str, rank0: bool = True) -> int:
    if rank0:
        print(f"hpcnoise: error: {msg}", file=sys.stderr, flush=True)
    return EXIT_USAGE


def is_rank0() -> bool:
    """Whether this process is its launcher's rank 0 (the one that prints errors).

    A plain process (no rank variable in the environment) is, without loading torch; under a launcher
    ``hpcnoise.comm.launcher_rank`` decides.
    """
    if not any("RANK" in key or key == "SLURM_PROCID" for key in os.environ):
        return True
    from hpcnoise.comm import launcher_rank  # lazy: torch

    return launcher_rank() == 0


def cmd_train(argv: list[str]) -> int:
    parser = Parser(
        prog="hpcnoise train",
        description="Train one configuration. Overrides are --key=value with any field of "
        "hpcnoise.config.Config (see `hpcnoise presets --fields`).",
    )
    parser.add_argument("preset", nargs="?", default=DEFAULT_PRESET, help=f"preset name (default {DEFAULT_PRESET})")
    parser.add_argument("--smoke", action="store_true", help="the preset's seconds-long smoke variant")
    try:  # the checks that need no torch first, so that most bad input answers at once
        args, overrides = parser.parse_known_args(argv)
        cfg = apply_overrides(get_preset(args.preset, args.smoke), overrides)
        check_values(cfg)
    except ConfigError as e:
        return _error(str(e), rank0=is_rank0())
    from hpcnoise.comm import detect_launcher, init, launcher_rank
    from hpcnoise.train import train
    from hpcnoise.workload import validate

    try:
        validate(cfg, detect_launcher()[1])  # before init(), which would fail on e.g. a missing GPU
        train(cfg, init(cfg.device, timeline=cfg.horovod_timeline))
    except ConfigError as e:
        return _error(str(e), rank0=launcher_rank() == 0)
    except RunStopped as e:  # preempted, diverged, locked by another job, a failed write, no checkpoint
        if launcher_rank() == 0:
            print(e.line(), file=sys.stderr, flush=True)
        return e.exit_code
    return 0


def cmd_presets(argv: list[str]) -> int:
    parser = Parser(prog="hpcnoise presets", description="List presets and registries.")
    parser.add_argument("--fields", action="store_true", help="also list every config field and its default")
    try:
        args = parser.parse_args(argv)
    except ConfigError as e:
        return _error(str(e))
    from hpcnoise.data import DATASETS  # lazy: torch
    from hpcnoise.models import MODELS
    from hpcnoise.regimes import REGIMES

    print("presets (hpcnoise train PRESET [--smoke]):")
    for name in sorted(PRESETS):
        c = get_preset(name)
        print(
            f"  {name:24s} {c.dataset}/{c.model} {c.regime}{'+gbn' if c.ghost_bn else ''} "
            f"batch {c.batch_size if c.regime != 'sb' else c.small_batch} lr {c.lr:g} epochs {c.epochs}"
        )
    registries: list[tuple[str, dict[str, Any]]] = [("regimes", REGIMES), ("models", MODELS), ("datasets", DATASETS)]
    for title, registry in registries:
        print(f"{title}:")
        for name, spec in sorted(registry.items()):
            print(f"  {name:24s} {spec.description}")
    if args.fields:
        print("config fields (--key=value):")
        for f in fields(Config):
            print(f"  {f.name:24s} {f.default!r}")
    return 0


def _delegate(module: str, skip: int = 0) -> Callable[[list[str]], int]:
    """A command that hands its arguments to ``module.main`` (imported only when used)."""

    def run(argv: list[str]) -> int:
        import importlib

        try:
            return int(importlib.import_module(module).main(argv[skip:]))
        except ConfigError as e:  # a safety net: commands print their own bad input, this catches the rest
            return _error(str(e), rank0=is_rank0())

    return run


def _choose(name: str, subcommands: dict[str, Callable[[list[str]], int]]) -> Callable[[list[str]], int]:
    def run(argv: list[str]) -> int:
        if not argv or argv[0] not in subcommands:
            return _error(f"hpcnoise {name} needs one of: {', '.join(subcommands)}")
        return subcommands[argv[0]](argv[1:])

    return run


COMMANDS: dict[str, Callable[[list[str]], int]] = {
    "study": _delegate("hpcnoise.study"),
    "train": cmd_train,
    "presets": cmd_presets,
    "data": _choose("data", {"prepare": _delegate("hpcnoise.prepare")}),
    "sweep": _delegate("hpcnoise.sweep"),
    "sharpness": _delegate("hpcnoise.cli.sharpness"),
    "report": _delegate("analysis.report"),
    "toy": _delegate("hpcnoise.cli.toy"),
    "bench": _choose(
        "bench",
        {
            "fisher": _delegate("hpcnoise.benchmarks.fisher_cost"),
            "data": _delegate("hpcnoise.benchmarks.data_feed"),
            "train": _delegate("hpcnoise.benchmarks.throughput"),
            "scaling": _delegate("hpcnoise.benchmarks.scaling"),
            "step": _delegate("hpcnoise.benchmarks.step_compare"),
        },
    ),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else EXIT_USAGE
    if argv[0] not in COMMANDS:
        return _error(f"unknown command {argv[0]!r}; valid: {', '.join(COMMANDS)}")
    return COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
