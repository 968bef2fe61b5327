"""hpcnoise.heap: large blocks come from the heap (and stay there) once ``keep_freed_memory`` has run,
checked with glibc's own count of mapped bytes (``mallinfo2``) in a fresh process."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

PROBE = """
import ctypes, ctypes.util, torch
from hpcnoise.heap import keep_freed_memory

class MallInfo2(ctypes.Structure):
    names = "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost"
    _fields_ = [(n, ctypes.c_size_t) for n in names.split()]

libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.mallinfo2.restype = MallInfo2
kept = keep_freed_memory()
before = libc.mallinfo2().hblkhd
x = torch.ones(5 * 2**20)  # 20 MiB
mapped = libc.mallinfo2().hblkhd - before
del x
print(kept, mapped)
"""


def probe(**env: str) -> tuple[bool, int]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "HPCNOISE_SYSTEM_MALLOC"}
    done = subprocess.run(
        [sys.executable, "-c", PROBE], env={**clean, **env}, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    kept, mapped = done.stdout.split()
    return kept == "True", int(mapped)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_large_blocks_come_from_the_heap_once_kept() -> None:
    kept, mapped = probe()
    assert kept and mapped == 0  # served by the heap, where a later step finds it again
    kept, mapped = probe(HPCNOISE_SYSTEM_MALLOC="1")
    assert not kept and mapped >= 20 * 2**20  # glibc's default: a fresh mapping, zero-filled on first touch
    kept, mapped = probe(MALLOC_MMAP_THRESHOLD_="65536")
    assert not kept and mapped >= 20 * 2**20  # the user's own setting wins
