"""``hpcnoise sweep status`` and ``sweep run``'s check for diverged cells, on hand-made run directories.

Each state is made by hand in the files hpcnoise.rundir writes (config.json, metrics.jsonl, checkpoint.pt,
checkpoint.prev.pt, diverged.json, summary.json, .lock). "Running" is a lock held by this test process
(a separate open file description, so the probe sees it as another job's) while ``status`` runs in-process
or in a subprocess.
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from hpcnoise import runstate, sweepfile
from hpcnoise.cli import sweep
from hpcnoise.config import Config
from tests.helpers.launch import BIN

# Cell index -> the state its run directory is made in, and the state status must report.
CELLS = [
    ("finished", "finished"),
    ("running", "running"),
    ("preempted", "preempted"),
    ("preempted-prev", "preempted"),  # checkpoint.pt being replaced: only checkpoint.prev.pt
    ("diverged", "diverged"),
    ("failed", "failed"),
    ("not-started", "not started"),  # no directory
    ("lock-only", "not started"),  # a directory with a free .lock and nothing else
]
COUNTS = "1 finished, 1 running, 2 preempted, 1 diverged, 1 failed, 2 not started"
DIVERGED = {"epoch": 2, "step": 16, "message": "training diverged in epoch 2: loss is nan\ntry a lower lr"}
DIVERGED_LINE = "training diverged in epoch 2: loss is nan try a lower lr"  # the message on one line


def metrics(n: int) -> str:
    """metrics.jsonl with ``n`` epochs logged."""
    rows = [{"epoch": e, "step": 8 * e, "train_error": 0.5, "test_error": 0.5} for e in range(1, n + 1)]
    return "".join(json.dumps(r) + "\n" for r in rows)


def make_run(run_dir: Path, kind: str) -> None:
    """A run directory as a job in state ``kind`` leaves it (for "running": as it is while the job runs)."""
    if kind == "not-started":
        return
    run_dir.mkdir(parents=True)
    (run_dir / ".lock").touch()  # the job's lock file; it stays after the job (only a held lock means running)
    if kind == "lock-only":
        return
    (run_dir / "config.json").write_text(json.dumps({"config": {"run_name": run_dir.name}, "world_size": 1}))
    if kind == "failed":
        return
    (run_dir / "metrics.jsonl").write_text(metrics(2 if kind == "finished" else 1))
    if kind == "finished":
        (run_dir / "model.pt").write_bytes(b"model")
        (run_dir / "summary.json").write_text(json.dumps({"final_test_error": 0.125}))
        return
    if kind != "preempted-prev":
        (run_dir / "checkpoint.pt").write_bytes(b"checkpoint")
    if kind in ("preempted", "preempted-prev"):
        (run_dir / "checkpoint.prev.pt").write_bytes(b"previous checkpoint")
    if kind == "diverged":
        (run_dir / "diverged.json").write_text(json.dumps({**DIVERGED, "last_good": {"epoch": 1}}))


@contextmanager
def held(lock: Path) -> Iterator[None]:
    """Hold the exclusive flock a running job's rank 0 holds on RUN_DIR/.lock."""
    fd = os.open(lock, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        yield
    finally:
        os.close(fd)


def make_sweep(root: Path) -> tuple[Path, list[Path]]:
    """A sweep file of table "mini" (one cell per CELLS entry, runs under root/runs), and the run dirs."""
    runs = root / "runs"
    cells = [Config(out_dir=str(runs), run_name=f"c{i}-{kind}", seed=i) for i, (kind, _) in enumerate(CELLS)]
    path = root / "mini.sweep.jsonl"
    sweepfile.write_file(path, sweepfile.cell_lines("mini", cells))
    dirs = [runs / c.run_name for c in cells]
    for run_dir, (kind, _) in zip(dirs, CELLS):
        make_run(run_dir, kind)
    return path, dirs


def listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_run_state_of_each_state(tmp_path: Path) -> None:
    _, dirs = make_sweep(tmp_path)
    running = dirs[1]
    before = listing(tmp_path)
    with held(running / ".lock"):
        assert runstate.lock_held(running)
        assert [runstate.run_state(d) for d in dirs] == [state for _, state in CELLS]
        assert not any(runstate.lock_held(d) for d in dirs if d != running)
        assert runstate.run_state(running) == "running"  # probing twice: the probe released its own lock
    # The job ended (killed after its checkpoint): the lock file stays, free, so the run is preempted.
    assert not runstate.lock_held(running) and runstate.run_state(running) == "preempted"
    assert listing(tmp_path) == before  # probing wrote nothing (no .lock created where there was none)
    # summary.json wins over everything; diverged.json over a held lock and the last good checkpoint.
    with held(dirs[4] / ".lock"):
        assert runstate.run_state(dirs[4]) == "diverged"
    assert runstate.state_detail(dirs[0], "finished") == "final test error 12.50%"
    assert (
        runstate.state_detail(dirs[4], "diverged")
        == "in epoch 2: training diverged in epoch 2: loss is nan try a lower lr"
    )
    assert runstate.state_detail(dirs[2], "preempted") == "1 epoch logged"
    assert runstate.state_detail(dirs[5], "failed") == "0 epochs logged"


def test_status_counts_and_lists_cells(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path, dirs = make_sweep(tmp_path)
    with held(dirs[1] / ".lock"):
        assert sweep.main(["status", str(path)]) == 0
        out = capsys.readouterr().out
        assert out == f"table mini ({path}): 8 cells: {COUNTS}\n"
        assert sweep.main(["status", str(path), "--list"]) == 0
        lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"table mini ({path}): 8 cells: {COUNTS}"
    width = max(len(d.name) for d in dirs)
    assert lines[1:] == [
        f"  0  finished     {'c0-finished':<{width}}  final test error 12.50%",
        f"  1  running      {'c1-running':<{width}}  1 epoch logged",
        f"  2  preempted    {'c2-preempted':<{width}}  1 epoch logged",
        f"  3  preempted    {'c3-preempted-prev':<{width}}  1 epoch logged",
        f"  4  diverged     {'c4-diverged':<{width}}  in epoch 2: {DIVERGED_LINE}",
        f"  5  failed       {'c5-failed':<{width}}  0 epochs logged",
        "  6  not started  c6-not-started",
        "  7  not started  c7-lock-only",
    ]
    # A directory: its sweep files, then the run directories no cell names (a cell changed since), then a total.
    make_run(tmp_path / "runs" / "old-cell", "finished")
    assert sweep.main(["status", str(tmp_path), "--list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"table mini ({path}): 8 cells: {COUNTS}".replace("1 running", "0 running").replace(
        "2 preempted", "3 preempted"
    )
    assert lines[9:] == [
        f"other run directories under {tmp_path}: 1 run: 1 finished, 0 running, 0 preempted, 0 diverged, "
        "0 failed, 0 not started",
        "  runs/old-cell  finished     final test error 12.50%",
        "total: 9: 2 finished, 0 running, 3 preempted, 1 diverged, 1 failed, 2 not started",
    ]
    # A runs directory without sweep files: its run directories alone (c7's holds only a free .lock).
    assert sweep.main(["status", str(tmp_path / "runs")]) == 0
    assert capsys.readouterr().out == (
        f"run directories under {tmp_path / 'runs'} (no *.sweep.jsonl there: cells never started are not known): "
        "8 runs: 2 finished, 0 running, 3 preempted, 1 diverged, 1 failed, 1 not started\n"
    )


def test_status_command_sees_a_lock_held_by_another_process(tmp_path: Path) -> None:
    path, dirs = make_sweep(tmp_path)
    with held(dirs[1] / ".lock"):
        proc = subprocess.run(
            [str(BIN / "hpcnoise"), "sweep", "status", str(path), "--list"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == f"table mini ({path}): 8 cells: {COUNTS}"
    assert lines[2].split()[:3] == ["1", "running", "c1-running"]


@pytest.mark.parametrize(
    "args,message",
    [
        (["status", "missing.jsonl"], "'missing.jsonl' does not exist (give a sweep file or a directory of runs)"),
        (["status", "empty.jsonl"], "'empty.jsonl' holds no cells"),
        (["status", "binary.pt"], "'binary.pt' is not a sweep file (not text"),
        (["status", "notjson.jsonl"], "'notjson.jsonl' line 1 is not JSON"),
        (["status", "config.json"], "'config.json' line 1 is not cell 0 of a sweep file"),
        (["status", "noname.jsonl"], "'noname.jsonl' line 2: cell 1 has no run_name and out_dir"),
        (["status", "nothing"], "'nothing' holds no sweep files (*.sweep.jsonl) and no run directories"),
        (["status", "bad"], "'bad/x.sweep.jsonl' line 1 is not JSON"),
        (["status"], "hpcnoise sweep status: the following arguments are required: target"),
        (["status", ".", "--frobnicate"], "hpcnoise sweep status: unrecognized arguments: --frobnicate"),
    ],
)
def test_status_bad_input_one_line_exit_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    monkeypatch.chdir(tmp_path)
    Path("empty.jsonl").touch()
    Path("binary.pt").write_bytes(b"\x80\x02\xff\xfe")
    Path("notjson.jsonl").write_text("{not json\n")
    Path("config.json").write_text(json.dumps({"config": {"seed": 0}}) + "\n")
    good = {"index": 0, "table": "t", "config": {"out_dir": "runs", "run_name": "a"}}
    Path("noname.jsonl").write_text(json.dumps(good) + "\n" + json.dumps({"index": 1, "config": {}}) + "\n")
    Path("nothing").mkdir()
    Path("bad").mkdir()
    Path("bad/x.sweep.jsonl").write_text("garbage\n")
    before = listing(tmp_path)
    assert sweep.main(args) == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert captured.out == "" and len(lines) == 1 and lines[0].startswith("hpcnoise: error: "), captured.err
    assert message in lines[0]
    assert listing(tmp_path) == before


def test_sweep_run_counts_a_diverged_cell_as_done(tmp_path: Path) -> None:
    """`sweep run` on a diverged cell: one line, exit 0, nothing trained or written (so no requeue loop)."""
    path, dirs = make_sweep(tmp_path)
    before = {p: p.read_bytes() for p in dirs[4].iterdir()}
    proc = subprocess.run(
        [str(BIN / "hpcnoise"), "sweep", "run", str(path), "--index", "4", "--threads=1", "--progress=false"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stderr == ""
    assert (
        proc.stdout
        == f"hpcnoise: cell 4 ({dirs[4]}) diverged in epoch 2: {DIVERGED_LINE}; not rerun, counted as done\n"
    )
    assert {p: p.read_bytes() for p in dirs[4].iterdir()} == before


@pytest.mark.parametrize(
    "error,status",
    [("Diverged", 65), ("RunLocked", 73), ("WriteFailed", 74), ("Preempted", 75)],
)
def test_sweep_run_exit_status_of_each_stop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], error: str, status: int
) -> None:
    """A run that stops in ``train`` (diverged now, locked by another job, a failed write, preempted): its exit
    status from hpcnoise.errors and one line on stderr."""
    import hpcnoise.comm
    import hpcnoise.errors
    import hpcnoise.train

    path, _ = make_sweep(tmp_path)

    def stop(*args: object) -> None:
        raise getattr(hpcnoise.errors, error)(f"stopped by {error}")

    monkeypatch.setattr(hpcnoise.train, "train", stop)
    monkeypatch.setattr(hpcnoise.comm, "init", lambda device: None)
    assert sweep.main(["run", str(path), "--index", "6"]) == status  # a cell not started
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"hpcnoise: stopped by {error}")


def test_config_digest_keeps_earlier_run_names() -> None:
    """A field added later, at its default, computes what earlier runs computed: their run names (and so
    finished study directories, e.g. a tuned study's trials and reruns) stay valid. The digests below were
    computed before ``channels_last`` existed; adding a field without listing it in ADDED_LATER fails here."""
    from dataclasses import replace

    from hpcnoise.config import Config
    from hpcnoise.presets import tuning_preset
    from hpcnoise.sweepfile import config_digest

    assert config_digest(Config()) == "b48aa430"
    cfg = Config(regime="lb", epochs=3, seed=2)
    assert config_digest(cfg) == "b637ffc0"
    assert config_digest(tuning_preset("mlp", "diagf", False)) == "e078530e"
    assert config_digest(replace(cfg, channels_last=True)) != config_digest(cfg)
    assert config_digest(replace(cfg, out_dir="elsewhere", progress=False)) == config_digest(cfg)  # placement
