"""Reading a run directory's files, checked: every problem is a ``RunError`` whose message the report lists.

The readers name the file (and line) that is wrong; the value checks are shared by every loader
(``analysis.load`` for finished runs, ``analysis.optional`` for sharpness.json and diagnostics.jsonl,
``analysis.diverged`` for diverged.json).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, TypeGuard

_CONFIG_REQUIRED = ("dataset", "model", "regime", "seed")


class RunError(ValueError):
    """A run directory that cannot be used; the message is the reason listed in the report."""


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise RunError(f"{path.name}: invalid JSON ({e.msg} at line {e.lineno})") from e
    except (OSError, UnicodeDecodeError) as e:
        raise RunError(f"{path.name}: unreadable ({e})") from e


def read_object(path: Path, required: tuple[str, ...]) -> dict[str, Any]:
    """A JSON file holding one object with (at least) the ``required`` keys."""
    data = read_json(path)
    if not isinstance(data, dict):
        raise RunError(f"{path.name}: not a JSON object")
    require(data, required, path.name)
    return data


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise RunError(f"{path.name}: unreadable ({e})") from e
    rows = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise RunError(f"{path.name} line {i}: truncated or invalid JSON ({e.msg})") from e
        if not isinstance(row, dict):
            raise RunError(f"{path.name} line {i}: not a JSON object")
        rows.append(row)
    return rows


def is_number(value: Any) -> TypeGuard[int | float]:
    """A finite int or float (not a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def is_integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def require(obj: dict[str, Any], keys: tuple[str, ...], where: str) -> None:
    missing = [k for k in keys if k not in obj]
    if missing:
        raise RunError(f"{where}: missing key{'s' if len(missing) > 1 else ''} {', '.join(missing)}")


def read_config_record(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(config.json record, its config) of a run directory, checked."""
    record = read_json(path / "config.json")
    if not isinstance(record, dict) or not isinstance(record.get("config"), dict):
        raise RunError("config.json: missing key config")
    cfg = record["config"]
    require(cfg, _CONFIG_REQUIRED, "config.json")
    if not isinstance(cfg["seed"], int) or isinstance(cfg["seed"], bool):
        raise RunError(f"config.json: seed is {cfg['seed']!r}, not an integer")
    return record, cfg
