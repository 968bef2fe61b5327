"""The sweep file: one JSON line per cell of a table, with its fixed run name (see hpcnoise.cli.sweep)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

from hpcnoise.config import Config
from hpcnoise.errors import ConfigError
from hpcnoise.files import write_text_atomic
from hpcnoise.presets import TABLES

# Fields that say where and how a cell runs, not what it computes: left out of the run-name digest, so
# that e.g. another device or thread count finds the same run.
PLACEMENT_FIELDS = frozenset({"out_dir", "run_name", "device", "threads", "progress", "data_root", "preset"})


class SweepError(ConfigError):
    """Bad input: the message is the one line the user sees."""


# Config fields added after run names were last computed from every field: left out of the digest while
# at their default (what every earlier run computed), so that the names of existing run directories, and
# so finished study directories, stay valid. Every field added from now on belongs here;
# tests/test_sweep_status.py pins digests computed before, and fails when one is missing.
ADDED_LATER = frozenset({"channels_last"})


def config_digest(cfg: Config) -> str:
    """8 hex digits of what a config computes: its fields but the PLACEMENT_FIELDS, and but the fields
    ADDED_LATER while at their default."""
    default = Config().to_dict()
    identity = {
        k: v
        for k, v in cfg.to_dict().items()
        if k not in PLACEMENT_FIELDS and not (k in ADDED_LATER and v == default[k])
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:8]


def run_name(cfg: Config) -> str:
    """Deterministic name of a cell's run: preset (or regime), seed and 8 hex digits of the config."""
    return f"{cfg.preset or cfg.dataset + '-' + cfg.regime}-s{cfg.seed}-{config_digest(cfg)}"


def table_cells(table: str, smoke: bool, out_dir: str | None) -> list[Config]:
    """The table's cells, each with an absolute out_dir and a deterministic run_name."""
    if table not in TABLES:
        raise SweepError(f"unknown table {table!r}; valid: {', '.join(sorted(TABLES))}")
    cells = []
    for cfg in TABLES[table](smoke):
        cfg = replace(cfg, out_dir=str(Path(out_dir if out_dir is not None else cfg.out_dir).absolute()))
        cells.append(replace(cfg, run_name=cfg.run_name or run_name(cfg)))
    names = [c.run_name for c in cells]
    if len(set(names)) != len(names):
        raise SweepError(f"table {table!r} has cells with the same run_name; give them distinct configs")
    return cells


def cell_lines(table: str, cells: list[Config]) -> list[str]:
    return [
        json.dumps(
            {"index": i, "table": table, "preset": c.preset, "run_name": c.run_name, "config": c.to_dict()},
            sort_keys=True,
        )
        for i, c in enumerate(cells)
    ]


def write_file(path: Path, lines: list[str]) -> None:
    """Write the sweep file atomically (temporary file in the same directory, fsync, rename)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, "".join(line + "\n" for line in lines))
    except OSError as e:
        raise SweepError(f"cannot write {str(path)!r}: {e.strerror}") from e


def _read_lines(path: Path) -> list[str]:
    try:
        return path.read_text().splitlines()
    except OSError as e:
        raise SweepError(f"cannot read sweep file {str(path)!r}: {e.strerror}") from e
    except UnicodeDecodeError as e:
        raise SweepError(f"{str(path)!r} is not a sweep file (not text: {e.reason})") from e


def _parse_cell(path: Path, lines: list[str], index: int) -> dict[str, Any]:
    try:
        cell = json.loads(lines[index])
    except ValueError as e:
        raise SweepError(f"{str(path)!r} line {index + 1} is not JSON: {e}") from e
    if not isinstance(cell, dict) or cell.get("index") != index or not isinstance(cell.get("config"), dict):
        raise SweepError(f"{str(path)!r} line {index + 1} is not cell {index} of a sweep file")
    return cell


def read_cell(path: Path, index: int) -> dict[str, Any]:
    """Line ``index`` of a sweep file, checked."""
    lines = _read_lines(path)
    if not 0 <= index < len(lines):
        raise SweepError(f"index {index} out of range: {str(path)!r} has {len(lines)} cells (0-{len(lines) - 1})")
    return _parse_cell(path, lines, index)


def read_cells(path: Path) -> list[dict[str, Any]]:
    """Every cell of a sweep file, checked, each with ``run_dir`` (a Path: config.out_dir / run_name) added."""
    lines = _read_lines(path)
    if not lines:
        raise SweepError(f"{str(path)!r} holds no cells (an empty file, not a sweep file)")
    cells = []
    for index in range(len(lines)):
        cell = _parse_cell(path, lines, index)
        cfg = cell["config"]
        name = cfg.get("run_name") or cell.get("run_name")
        if not isinstance(name, str) or not name or not isinstance(cfg.get("out_dir"), str):
            raise SweepError(f"{str(path)!r} line {index + 1}: cell {index} has no run_name and out_dir")
        cells.append({**cell, "run_dir": Path(cfg["out_dir"]) / name})
    return cells
