"""jobs/gpu-check.sh, the check a GPU user runs first: its CPU part at tiny sizes (``--device cpu``), so
that the script cannot rot where no GPU is, and its one-line refusal of bad arguments."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "jobs" / "gpu-check.sh"


def run_check(out: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OUT=str(out), HPCNOISE_PYTHON=sys.executable)
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow  # several processes, about a minute
def test_cpu_part_runs_and_writes_every_table(tmp_path: Path) -> None:
    done = run_check(tmp_path, "--device", "cpu")
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    for name in ("env", "tests", "bench_step", "scaling"):
        assert f"== {name}:" in done.stdout
        assert (tmp_path / f"{name}.txt").stat().st_size > 0
    env = (tmp_path / "env.txt").read_text().splitlines()
    for package in ("numpy", "scipy", "pandas", "seaborn", "pytest", "horovod", "tqdm", "backpack"):
        # each package on a line of its own: its version, or what its absence skips
        line = next((x for x in env if x.startswith(package + " ") or x.startswith(package + ":")), "")
        assert line.startswith(package + " ") or "skipped:" in line, (package, env)
    table = pd.read_csv(tmp_path / "bench_step.csv")
    assert set(table["dtype"]) == {"float32", "bf16"}
    assert set(table["model"]) == {"mlp", "cnn1d", "lenet5"}
    for variant in ("horovod", "lb", "diagf exact", "diagf spatial"):
        assert variant in set(table["variant"])
    assert "step peak MiB" in table.columns
    assert "targets:" in (tmp_path / "bench_step.txt").read_text()
    assert (tmp_path / "times.json").exists()
    assert "MODEL PREDICTION" in (tmp_path / "scaling.txt").read_text()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--device", "tpu"], "gpu-check: --device must be cuda or cpu, got 'tpu'"),
        (["--fast"], "gpu-check: unknown argument '--fast'; valid: --device cuda|cpu"),
        (["--device"], "gpu-check: --device needs a value: cuda or cpu"),
    ],
)
def test_bad_arguments_are_one_line(tmp_path: Path, args: list[str], message: str) -> None:
    done = run_check(tmp_path / "out", *args)
    assert done.returncode == 2
    assert done.stderr.strip() == message
    assert not (tmp_path / "out").exists()  # nothing written
