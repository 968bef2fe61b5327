"""Errors and exit codes: the one leaf module every command shares (imports nothing of hpcnoise).

Bad input is a ``ConfigError`` (or a subclass naming where it came from): the message is the one line
the user sees; commands print it from rank 0 and exit with ``EXIT_USAGE``. A run stopped by SIGTERM or
SIGUSR1 after writing its checkpoint raises ``Preempted`` and exits with ``EXIT_PREEMPTED``, which
Slurm scripts treat as "requeue me".
"""

from __future__ import annotations

import argparse
from typing import NoReturn

EXIT_USAGE = 2  # bad input: one line on stderr, nothing written
EXIT_DIVERGED = 65  # EX_DATAERR: the loss became non-finite; RUN_DIR/diverged.json says where (not retried)
EXIT_LOCKED = 73  # EX_CANTCREAT: another job holds the run directory's lock; nothing written
EXIT_IO = 74  # EX_IOERR: a write failed (disk full, ...); the previous checkpoint and metrics are intact
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped by SIGTERM/SIGUSR1 after a checkpoint; rerun to resume


class ConfigError(ValueError):
    """Bad input: the message names the field, what is wrong and what is valid."""


class DataFileError(ConfigError):
    """A prepared dataset file is missing, unreadable or fails its checks; the message says how to fix it."""


class RunStopped(Exception):
    """A run that stopped and said why: commands print ``line()`` (rank 0) and exit with ``exit_code``."""

    exit_code = 1
    hint = ""

    def line(self) -> str:
        return f"hpcnoise: {self}{self.hint}"


class Preempted(RunStopped):
    """Training stopped on SIGTERM/SIGUSR1 after writing a checkpoint; rerun the same command to resume."""

    exit_code = EXIT_PREEMPTED
    hint = "; rerun the same command to resume"


class Diverged(RunStopped):
    """The loss became non-finite; the run directory is marked diverged (diverged.json) and not retried."""

    exit_code = EXIT_DIVERGED


class RunLocked(RunStopped):
    """Another process holds the run directory's lock (RUN_DIR/.lock); this one wrote nothing."""

    exit_code = EXIT_LOCKED


class WriteFailed(RunStopped):
    """Rank 0 could not write a result (disk full, ...); what was written before is intact."""

    exit_code = EXIT_IO


class CheckpointError(RunStopped):
    """No usable checkpoint to resume from: the message names the file and what to do."""

    exit_code = EXIT_IO


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (``error_type``), not usage text and SystemExit.

    ``prefix_prog`` puts the program name in front of the message (``hpcnoise sweep run: ...``).
    """

    def __init__(
        self, *args: object, error_type: type[Exception] = ConfigError, prefix_prog: bool = False, **kwargs: object
    ):
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.error_type = error_type
        self.prefix_prog = prefix_prog

    def error(self, message: str) -> NoReturn:
        raise self.error_type(f"{self.prog}: {message}" if self.prefix_prog else message)
