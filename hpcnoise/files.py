"""File I/O that never leaves a half-written result: the one leaf module for writing files.

Every writer goes through ``_staged``: a temporary file in the target's directory, flushed and fsynced,
then ``os.replace`` d into place, so a reader (or a crash) sees the old file or the new one, never part
of one. ``append_jsonl`` fsyncs each line, so a crash loses at most the line being written.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from hpcnoise.errors import ConfigError


@contextmanager
def _staged(path: Path, mode: int = 0o644) -> Iterator[tuple[IO[bytes], Path]]:
    """Yield (binary file, temporary path) beside ``path``; the caller renames. Removes it on error."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)  # mkstemp creates 0600; results are for everyone to read
        with os.fdopen(fd, "wb") as f:
            yield f, Path(tmp)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_files_atomic(files: Mapping[Path, bytes]) -> None:
    """Write every file durably to a temporary name, then rename them all in the mapping's order.

    Put the file whose presence marks completion last. On error nothing is renamed and no temporary
    file is left behind.
    """
    staged: list[tuple[Path, Path]] = []
    try:
        for path, data in files.items():
            with _staged(path) as (f, tmp):
                f.write(data)
            staged.append((tmp, path))
        for tmp, path in staged:
            os.replace(tmp, path)
    except BaseException:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
        raise


def write_bytes_atomic(
    path: Path, data: bytes, previous: Path | None = None, on: Callable[[str], None] | None = None
) -> None:
    """Write ``data`` to ``path`` atomically and durably.

    With ``previous``, the file ``path`` held so far is kept under that name until the new one is
    complete: a crash at any moment leaves a complete file under one of the two names. ``on`` is
    called at "staged" (new file complete under its temporary name) and "swapped" (old file moved to
    ``previous``), the two moments a crash must survive (fault-injection tests).
    """
    if previous is None:
        write_files_atomic({path: data})
        return
    with _staged(path) as (f, tmp):
        f.write(data)
    try:
        if on is not None:
            on("staged")
        if path.exists():
            os.replace(path, previous)
        if on is not None:
            on("swapped")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode())


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON (indented, sorted keys) to ``path`` atomically and durably."""
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def save_torch_atomic(obj: object, path: Path) -> None:
    """``torch.save`` to ``path`` atomically and durably (creating its directory)."""
    import torch  # this leaf module is also used by commands that must answer before torch loads

    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save(obj, buf)
    write_bytes_atomic(path, buf.getvalue())


def append_jsonl(path: Path, row: dict[str, Any]) -> None:
    """Append one JSON line and fsync it. A failed append (a full disk) is cut off again, so the file
    holds only whole lines; a crash loses at most the line being written."""
    line = (json.dumps(row, sort_keys=True) + "\n").encode()
    with open(path, "ab") as f:
        size = f.tell()
        try:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        except OSError:
            f.truncate(size)
            raise


def rewrite_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    """Replace a JSON-lines file with ``rows`` atomically."""
    write_text_atomic(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))


def unwritable(target: Path) -> tuple[str, str] | None:
    """Why files cannot be written at ``target`` (a directory that may not exist yet), or None if they can:
    ("is not usable", "'/a' is not a directory") or ("is not writable", "Permission denied ('/a')").

    Creates nothing that stays: the nearest existing ancestor is probed with a temporary file.
    """
    probe = target.absolute()
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        return "is not usable", f"{str(probe)!r} is not a directory"
    try:
        fd, tmp = tempfile.mkstemp(dir=probe, prefix=".hpcnoise-probe-")
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        return "is not writable", f"{e.strerror} ({str(probe)!r})"
    return None


def check_writable(out_dir: Path) -> None:
    """Raise ConfigError unless ``out_dir`` exists as a writable directory or could be created."""
    problem = unwritable(out_dir)
    if problem is not None:
        raise ConfigError(f"out_dir {str(out_dir)!r} {problem[0]}: {problem[1]}")


def git_hash() -> str:
    """The source tree's commit (with '-dirty' if it has local changes), or 'unknown'."""
    src = Path(__file__).resolve().parent

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=src, capture_output=True, text=True, timeout=10, check=True)
        return done.stdout.strip()

    try:
        dirty = git("status", "--porcelain", "--untracked-files=no")
        return git("rev-parse", "HEAD") + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
