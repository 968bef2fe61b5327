"""The ``hpcnoise`` command line: the command table, its help, and the dispatch to each command's module.

Every command's parser and ``main(argv) -> int`` live in one module of this package (``COMMANDS`` names
it); the library functions they call stay in the library. A command module is imported only when its
command runs, so that `hpcnoise --help` and bad input answer without loading torch or Horovod.
"""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass

from hpcnoise.cli.common import error, is_rank0
from hpcnoise.errors import EXIT_USAGE, ConfigError


@dataclass(frozen=True)
class Command:
    """One command: the words that name it, its arguments and purpose for the help, and its module."""

    name: str  # after `hpcnoise`: one word, or a group and a word ("bench scaling")
    args: str  # its arguments, as the help shows them
    purpose: str  # one line
    module: str  # the module whose main(argv) runs it (argv: what follows the name)


COMMANDS = (
    Command(
        "study",
        "[--paper | --full | --grid | --tune]",
        "the main job: the tuned settings rerun on MNIST-1D + report",
        "hpcnoise.cli.study",
    ),
    Command(
        "train",
        "[PRESET] [--smoke] [--key=value ...]",
        "train one configuration (any launcher)",
        "hpcnoise.cli.train",
    ),
    Command("presets", "[--fields]", "list presets and registries", "hpcnoise.cli.presets"),
    Command(
        "data prepare",
        "NAME --root DIR",
        "download and pack MNIST/Fashion/CIFAR (login node)",
        "hpcnoise.cli.data",
    ),
    Command(
        "sweep",
        "write|run|submit|status ...",
        "a table's cells as a job array; status: its cells by state",
        "hpcnoise.cli.sweep",
    ),
    Command("sharpness", "RUN_DIR", "max Hessian eigenvalue of a finished run", "hpcnoise.cli.sharpness"),
    Command("report", "RUNS_DIR", "tables, figures and report.md from run directories", "hpcnoise.cli.report"),
    Command("toy", "[--out DIR]", "the 2-D quadratic of the paper's Section 3", "hpcnoise.cli.toy"),
    Command(
        "bench fisher",
        "[--conv]",
        "diag-F cost per step: hooks, torch.func, a loop, BackPACK",
        "hpcnoise.cli.bench.fisher",
    ),
    Command("bench data", "", "data feed: batches on the device vs a DataLoader", "hpcnoise.cli.bench.data"),
    Command(
        "bench train", "[--out DIR]", "synthetic-data throughput of every model and regime", "hpcnoise.cli.bench.train"
    ),
    Command(
        "bench scaling",
        "[--times FILE]",
        "MODEL of step time and efficiency at 8-1024 GPUs",
        "hpcnoise.cli.bench.scaling",
    ),
    Command("bench step", "", "the step side by side with hvd.DistributedOptimizer", "hpcnoise.cli.bench.step"),
)

EXIT_STATUSES = """\
Bad input gets one line on stderr (from rank 0 only), exit status 2, and nothing written. `train` exits
65 when the loss diverged, 73 when another job holds the run directory, 74 when a write failed or no
checkpoint is usable, 75 when preempted after a checkpoint (hpcnoise.errors)."""


def usage() -> str:
    """The help of `hpcnoise`: one line per command of ``COMMANDS``, then the exit statuses."""
    heads = [f"hpcnoise {c.name} {c.args}".rstrip() for c in COMMANDS]
    width = max(len(h) for h in heads) + 3
    lines = [f"    {head:<{width}}{c.purpose}" for head, c in zip(heads, COMMANDS)]
    return "The ``hpcnoise`` command line.\n\n" + "\n".join(lines) + "\n\n" + EXIT_STATUSES + "\n"


def run(command: Command, argv: list[str]) -> int:
    """Import the command's module and run its ``main``."""
    try:
        return int(importlib.import_module(command.module).main(argv))
    except ConfigError as e:  # a safety net: commands print their own bad input, this catches the rest
        return error(str(e), rank0=is_rank0())


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else EXIT_USAGE
    group = [c for c in COMMANDS if c.name.split()[0] == argv[0]]
    if not group:
        valid = dict.fromkeys(c.name.split()[0] for c in COMMANDS)
        return error(f"unknown command {argv[0]!r}; valid: {', '.join(valid)}")
    if group[0].name == argv[0]:
        return run(group[0], argv[1:])
    subcommands = {c.name.split()[1]: c for c in group}
    if len(argv) < 2 or argv[1] not in subcommands:
        return error(f"hpcnoise {argv[0]} needs one of: {', '.join(subcommands)}")
    return run(subcommands[argv[1]], argv[2:])


if __name__ == "__main__":
    sys.exit(main())
