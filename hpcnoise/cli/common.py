"""What the commands share: the rank that prints, the one-line error, and the option checks that several
commands make (each message written once here). Plain Python: the checks run before torch loads."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from hpcnoise.errors import EXIT_USAGE, ConfigError
from hpcnoise.files import unwritable

if TYPE_CHECKING:
    from hpcnoise.config import Config


def is_rank0() -> bool:
    """Whether this process is its launcher's rank 0 (the one that prints errors).

    A plain process (no rank variable in the environment) is, without loading torch; under a launcher
    ``hpcnoise.comm.launcher_rank`` decides.
    """
    if not any("RANK" in key or key == "SLURM_PROCID" for key in os.environ):
        return True
    from hpcnoise.comm import launcher_rank  # lazy: torch

    return launcher_rank() == 0


def error(msg: str, rank0: bool = True, prog: str = "hpcnoise") -> int:
    """Print ``PROG: error: MSG`` on stderr (when ``rank0``) and return ``EXIT_USAGE``."""
    if rank0:
        print(f"{prog}: error: {msg}", file=sys.stderr, flush=True)
    return EXIT_USAGE


def check_positive(value: int, option: str) -> None:
    """An option that counts something (steps, rounds, a batch): at least 1."""
    if value < 1:
        raise ConfigError(f"{option} must be a positive integer, got {value}")


def check_threads(threads: int) -> None:
    if threads < 0:
        raise ConfigError(f"--threads must be >= 0 (0: torch's default), got {threads}")


def check_large_batch(batch: int) -> None:
    """A benchmark's large batch: its small batch (a quarter of it) must be at least one sample."""
    if batch < 4:
        raise ConfigError(f"--batch must be an integer >= 4 (the small batch is a quarter of it), got {batch}")


def check_output_file(path: Path | None, option: str) -> None:
    """A file the command will write (``--csv``, ``--write-times``): its directory must be writable."""
    if path is None:
        return
    problem = unwritable(path.parent) if not path.is_dir() else ("", f"{str(path)!r} is a directory")
    if problem is not None:
        raise ConfigError(f"cannot write {option} {path}: {problem[1]}")


def check_workloads(configs: Iterable[tuple[str, Config]], world: int, batch: int) -> None:
    """Each (label, config) must run on ``world`` ranks (``hpcnoise.workload.validate``); the error names
    the label and ``--batch``."""
    from hpcnoise.workload import validate  # lazy: torch

    for label, cfg in configs:
        try:
            validate(cfg, world)
        except ConfigError as e:
            raise ConfigError(f"{label} with --batch {batch}: {e}") from e
