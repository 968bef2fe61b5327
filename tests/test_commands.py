"""The command table (hpcnoise.cli): the help generated from it, every entry's module, argument parsing only
under hpcnoise/cli, and the study stopped by a signal: one line, no traceback, EXIT_PREEMPTED."""

from __future__ import annotations

import importlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hpcnoise import cli
from hpcnoise.errors import EXIT_PREEMPTED, EXIT_USAGE
from tests.helpers.launch import BIN, needs_launcher

ROOT = Path(__file__).resolve().parent.parent


def hpcnoise(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "hpcnoise.cli", *argv], capture_output=True, text=True, timeout=120, cwd=ROOT
    )


def test_help_lists_every_command_of_the_table() -> None:
    proc = hpcnoise("--help")
    assert proc.returncode == 0 and proc.stderr == ""
    lines = [line for line in proc.stdout.splitlines() if line.startswith("    hpcnoise ")]
    assert len(lines) == len(cli.COMMANDS)
    for line, command in zip(lines, cli.COMMANDS):
        assert line.startswith(f"    hpcnoise {command.name}") and line.endswith(command.purpose), line
    bare = hpcnoise()
    assert (bare.returncode, bare.stdout, bare.stderr) == (EXIT_USAGE, proc.stdout, "")


def test_unknown_command_is_one_line() -> None:
    proc = hpcnoise("frobnicate")
    valid = ", ".join(dict.fromkeys(c.name.split()[0] for c in cli.COMMANDS))
    assert proc.returncode == EXIT_USAGE and proc.stdout == ""
    assert proc.stderr == f"hpcnoise: error: unknown command 'frobnicate'; valid: {valid}\n"


def test_help_and_dispatch_load_neither_torch_nor_horovod() -> None:
    code = (
        "import sys, contextlib, io\n"
        "import hpcnoise.cli as cli\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    cli.main(['--help']); cli.main(['bench', 'nope']); cli.main(['nope'])\n"
        "print(sorted(m for m in ('torch', 'horovod', 'pandas') if m in sys.modules))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.stdout.strip() == "[]", proc.stdout + proc.stderr


@pytest.mark.parametrize("command", cli.COMMANDS, ids=lambda c: c.name)
def test_every_command_has_a_module_with_main(command: cli.Command) -> None:
    assert command.module.startswith("hpcnoise.cli.")
    assert callable(importlib.import_module(command.module).main)


def test_argument_parsing_lives_only_under_cli() -> None:
    """Library modules parse no arguments: argparse and the Parser are for hpcnoise/cli (and errors.py,
    which defines the Parser)."""
    offenders = []
    for path in sorted([*(ROOT / "hpcnoise").rglob("*.py"), *(ROOT / "analysis").rglob("*.py")]):
        rel = path.relative_to(ROOT).as_posix()
        if rel.startswith("hpcnoise/cli/") or rel == "hpcnoise/errors.py":
            continue
        text = path.read_text()
        if re.search(r"\bargparse\b|\bParser\(|__name__ == .__main__.", text):
            offenders.append(rel)
    assert offenders == []


# --- the study stopped by a signal ------------------------------------------------------------------------
# A study of two small MNIST-1D cells (tests.helpers.configs.small_config, long enough to be stopped in its
# first cell) run by the study's own launch code under horovodrun with 2 ranks, as `hpcnoise study` does.
DRIVER = """
import sys
from dataclasses import replace
from pathlib import Path

from hpcnoise.cli.study import train_and_report
from hpcnoise.sweepfile import cell_lines, run_name, write_file
from tests.helpers.configs import small_config

out = Path(sys.argv[1])
cells = [small_config(out_dir=str(out), seed=seed, epochs=60, train_samples=4096) for seed in (0, 1)]
cells = [replace(c, run_name=run_name(c)) for c in cells]
write_file(out / "study.sweep.jsonl", cell_lines("mini", cells))
print("runs:", " ".join(c.run_name for c in cells), flush=True)
sys.exit(train_and_report("horovodrun", 2, out / "study.sweep.jsonl", out))
"""


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "ctrl-c"])
def test_study_stopped_by_a_signal_is_one_line(tmp_path: Path, sig: signal.Signals) -> None:
    needs_launcher("horovodrun")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = subprocess.Popen(
        [sys.executable, "-c", DRIVER, str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=ROOT,
        start_new_session=True,
    )
    first = tmp_path / "first-cell"
    try:
        end = time.time() + 240
        while not any(tmp_path.glob("*/checkpoint.pt")):  # the first cell trains: the ranks catch signals
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.time() < end, "no checkpoint appeared"
            time.sleep(0.1)
        first = next(tmp_path.glob("*/checkpoint.pt")).parent
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == EXIT_PREEMPTED, err[-3000:]
    assert "Traceback" not in err and "RuntimeError" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines[-1] == "hpcnoise study: stopped after a checkpoint; rerun the same command to continue", err[-3000:]
    assert sum("hpcnoise study" in line for line in lines) == 1
    assert (first / "checkpoint.pt").exists() and not (first / "summary.json").exists()
    rows = [json.loads(line) for line in (first / "metrics.jsonl").read_text().splitlines()]
    assert 1 <= len(rows) < 60
    assert "runs:" in out
