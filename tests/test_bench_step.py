"""``hpcnoise bench step``'s header note on busy-waiting ranks (hpcnoise.benchmarks.step_targets)."""

from __future__ import annotations

import pytest
import torch

from hpcnoise.benchmarks.step_targets import YIELD, busy_wait_note
from hpcnoise.comm import Comm


def comm(size: int, device: str = "cpu") -> Comm:
    return Comm(rank=0, size=size, local_rank=0, launcher="mpirun", device=torch.device(device))


def test_busy_wait_note_where_ranks_and_their_threads_outnumber_the_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(YIELD, raising=False)
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    note = busy_wait_note(comm(2), threads=1)  # 2 ranks x (1 + Horovod's thread) > 2 cores
    assert note.startswith("note: 2 ranks, each with 1 compute thread(s) and Horovod's, on 2 cores")
    assert f"export {YIELD}=1" in note
    monkeypatch.setattr("os.cpu_count", lambda: 4)
    assert busy_wait_note(comm(2), threads=1) == ""  # 4 threads on 4 cores: nobody waits for a core
    assert busy_wait_note(comm(2), threads=2) != ""
    assert busy_wait_note(comm(1), threads=8) == ""  # one worker: no collective to wait in
    assert busy_wait_note(comm(2, "meta"), threads=8) == ""  # not a CPU step
    monkeypatch.setenv(YIELD, "1")
    assert busy_wait_note(comm(2), threads=2) == ""  # already yielding
