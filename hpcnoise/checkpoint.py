"""The checkpoint file format: a header line with a checksum, and a payload of tensors and plain values.

A file is one header line ``HPCNOISE-CHECKPOINT <format> <length> <sha256>`` followed by a
``torch.save`` payload {"format", "config", "model", "optimizer", "position"} holding only tensors,
plain values and containers (K-FAC factors are written as tagged lists, not pickled classes), read with
``torch.load(weights_only=True)``. A file from a shared filesystem therefore cannot run code, and a
truncated, corrupt, foreign or other-config file is recognised before anything in it is used: ``decode``
raises CheckpointError saying why. What a checkpoint means for a run (when it is written, which one is
resumed) is hpcnoise.lifecycle.
"""

from __future__ import annotations

import hashlib
import io
import pickle
import re
from typing import Any

import torch
from torch import Tensor

from hpcnoise.config import Config
from hpcnoise.errors import CheckpointError
from hpcnoise.rundir import RunDir

FORMAT = "hpcnoise-checkpoint-v1"
MAGIC = b"HPCNOISE-CHECKPOINT"


def _check_plain(obj: Any, where: str = "position") -> None:
    """Raise unless ``obj`` is tensors, plain values and containers only (what weights_only loading accepts);
    the statistics registry turns its own values into such (``Statistic.to_plain``)."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            _check_plain(v, f"{where}.{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _check_plain(v, f"{where}[{i}]")
    elif not (obj is None or isinstance(obj, (Tensor, str, int, float, bool))):
        raise TypeError(f"a checkpoint holds tensors and plain values only, not {type(obj).__name__} ({where})")


def encode(config: dict[str, Any], model: dict[str, Any], optimizer: dict[str, Any], position: dict[str, Any]) -> bytes:
    """The checkpoint file's bytes: a header line (magic, format, length, SHA-256) and the payload.

    ``config`` is the run's ``Config.to_dict()``, ``model`` and ``optimizer`` their state dicts,
    ``position`` the training position as a dict (hpcnoise.lifecycle.Position's fields).
    """
    _check_plain(position)
    payload = {
        "format": FORMAT,
        "config": config,
        "model": model,
        "optimizer": optimizer,
        "position": position,
    }
    buf = io.BytesIO()
    torch.save(payload, buf)
    body = buf.getvalue()
    header = b"%s %s %d %s\n" % (MAGIC, FORMAT.encode(), len(body), hashlib.sha256(body).hexdigest().encode())
    return header + body


def _load(body: bytes, device: torch.device) -> Any:
    """The payload through the weights-only loader; a pickled object in it is a CheckpointError.

    A file with a valid header and checksum may still hold pickled classes (it was not written by
    ``encode``); the loader refuses them without running any code, and so does this, in one line.
    """
    try:
        return torch.load(io.BytesIO(body), map_location=device, weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL (\S+)", str(e))
        what = f"a pickled {found.group(1)}" if found else "pickled objects"
        raise CheckpointError(f"foreign payload: it holds {what}, not only tensors and plain values") from None


def same_config(stored: dict[str, Any], current: dict[str, Any]) -> bool:
    """Whether a stored config (a checkpoint's, config.json's) is the run's ``current`` one (both
    ``Config.to_dict()`` forms), compared as they read back from JSON.

    A field added to Config after the file was written is absent from it: it counts as equal when the
    run holds that field's default (what the older version trained with), so older runs still resume.
    """
    stored, current = RunDir.jsonable(stored), RunDir.jsonable(current)
    defaults = RunDir.jsonable(Config().to_dict())
    added = [key for key in current if key not in stored and key in defaults]
    return stored == {k: v for k, v in current.items() if k not in added} and all(
        current[key] == defaults[key] for key in added
    )


def decode(data: bytes, config: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """The payload of a checkpoint of ``config`` (a ``Config.to_dict()``), its position as a dict;
    or CheckpointError saying why it cannot be used."""
    header, sep, body = data.partition(b"\n")
    parts = header.split(b" ")
    if not sep or len(parts) != 4 or parts[0] != MAGIC:
        raise CheckpointError("not an hpcnoise checkpoint (no header line)")
    if parts[1].decode(errors="replace") != FORMAT:
        raise CheckpointError(f"unknown format {parts[1].decode(errors='replace')!r}; this version reads {FORMAT}")
    if not parts[2].isdigit() or int(parts[2]) != len(body):
        raise CheckpointError(f"truncated: {len(body)} of {parts[2].decode(errors='replace')} bytes")
    if hashlib.sha256(body).hexdigest().encode() != parts[3]:
        raise CheckpointError("corrupt: its SHA-256 does not match")
    payload: dict[str, Any] = _load(body, device)
    if not same_config(payload["config"], config):
        raise CheckpointError("it belongs to a different configuration")
    return payload
