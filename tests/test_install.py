"""jobs/build-horovod.sh (what jobs/install.sh runs for Horovod) decides without compiling anything.

The script runs as shipped, but under a stand-in interpreter: the real one with ``-S`` (no
site-packages) and stub ``torch`` and ``horovod`` packages on PYTHONPATH, whose ``-m pip`` is a fake
that logs its arguments, "builds" an empty wheel and "installs" it as a stub Horovod with or without
NCCL. So the wheel key, its reuse, and the rule that NCCL asked means NCCL built are checked in
seconds, on CPU, without touching this venv or pip's cache.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "jobs" / "build-horovod.sh"
CUDA_TORCH = ("2.14.1+cu130", "13.0")
CPU_TORCH = ("2.14.1+cpu", None)
NCCL = {"HOROVOD_GPU_OPERATIONS": "NCCL"}
Proc = subprocess.CompletedProcess[str]

FAKE_PIP = """
import json, os, sys
from pathlib import Path

args = [a for a in sys.argv[1:] if a != "--disable-pip-version-check"]
with open(os.environ["FAKE_PIP_LOG"], "a") as f:
    f.write(json.dumps(args) + "\\n")
stubs = Path(os.environ["FAKE_STUBS"])
if args[0] == "wheel":  # pip wheel ... -w DIR horovod==0.28.1
    out = Path(args[args.index("-w") + 1])
    out.mkdir(parents=True, exist_ok=True)
    (out / "horovod-0.28.1-cp311-cp311-linux_x86_64.whl").write_text("fake")
elif args[0] == "install" and any(a.endswith(".whl") for a in args):
    hvd = stubs / "horovod"
    (hvd / "torch").mkdir(parents=True, exist_ok=True)
    (hvd / "__init__.py").write_text("__version__ = '0.28.1'\\n")
    nccl = os.environ["FAKE_NCCL"] == "1"
    (hvd / "torch" / "__init__.py").write_text(
        "import torch\\n"
        "def mpi_built(): return True\\n"
        "def gloo_built(): return True\\n"
        f"def nccl_built(): return {nccl}\\n"
    )
elif args[0] == "show":
    sys.exit(0 if (stubs / "horovod").is_dir() else 1)
elif args[0] == "uninstall":
    import shutil
    shutil.rmtree(stubs / "horovod")
else:  # e.g. cmake: nothing is downloaded here
    sys.exit(1)
"""


@dataclass
class Sandbox:
    """A stand-in interpreter with stub torch/horovod, a fake pip and a fake CUDA toolkit."""

    stubs: Path
    python: Path
    log: Path
    wheels: Path
    cuda: Path

    def torch(self, version: str, cuda: str | None) -> None:
        pkg = self.stubs / "torch"
        pkg.mkdir(parents=True, exist_ok=True)
        (pkg / "__init__.py").write_text(f"__version__ = {version!r}\nfrom torch import version\n")
        (pkg / "version.py").write_text(f"cuda = {cuda!r}\n")

    def horovod(self, nccl: bool) -> None:
        """A Horovod already in the environment, as the fake pip installs it."""
        self.run(pip=["install", "x.whl"], env={"FAKE_NCCL": "1" if nccl else "0"})

    def run(self, *args: str, env: dict[str, str] | None = None, pip: list[str] | None = None) -> Proc:
        """build-horovod.sh with ``args`` (or the fake pip with ``pip``) in the sandbox, plus ``env``."""
        full = {k: v for k, v in os.environ.items() if not k.startswith(("HOROVOD_", "PIP_", "CUDA", "HPCNOISE_"))}
        full.update(
            PYTHON=str(self.python),
            PYTHONPATH=str(self.stubs),
            FAKE_PIP_LOG=str(self.log),
            FAKE_STUBS=str(self.stubs),
            FAKE_NCCL="0",
            HPCNOISE_WHEELS=str(self.wheels),
            CUDA_HOME=str(self.cuda),
            MAKEFLAGS="-j1",
        )
        full.update(env or {})
        cmd = [str(self.python), "-m", "pip", *pip] if pip else ["bash", str(SCRIPT), *args]
        return subprocess.run(cmd, env=full, capture_output=True, text=True, timeout=60, check=False)

    def key_dir(self, env: dict[str, str] | None = None) -> Path:
        proc = self.run("--key", env=env)
        assert proc.returncode == 0, proc.stderr
        return Path(proc.stdout.strip())

    def pip_calls(self) -> list[list[str]]:
        if not self.log.exists():
            return []
        calls = [json.loads(line) for line in self.log.read_text().splitlines()]
        self.log.unlink()
        return calls


@pytest.fixture
def box(tmp_path: Path) -> Sandbox:
    stubs = tmp_path / "stubs"
    stubs.mkdir()
    (tmp_path / "fake_pip.py").write_text(FAKE_PIP)
    python = tmp_path / "python"
    python.write_text(
        "#!/usr/bin/env bash\n"
        'if [ "${1:-}" = -m ] && [ "${2:-}" = pip ]; then shift 2; '
        f'exec {shlex.quote(sys.executable)} -S {shlex.quote(str(tmp_path / "fake_pip.py"))} "$@"; fi\n'
        f'exec {shlex.quote(sys.executable)} -S "$@"\n'
    )
    python.chmod(0o755)
    cuda = tmp_path / "cuda"  # what build-horovod.sh looks for in a toolkit: header, cudart, nvcc
    for rel in ("include/cuda_runtime.h", "lib64/libcudart.so.13", "bin/nvcc"):
        (cuda / rel).parent.mkdir(parents=True, exist_ok=True)
        (cuda / rel).write_text("")
    (cuda / "bin/nvcc").chmod(0o755)
    sandbox = Sandbox(stubs, python, tmp_path / "pip.log", tmp_path / "wheels", cuda)
    sandbox.torch(*CUDA_TORCH)
    return sandbox


def error_lines(proc: Proc) -> list[str]:
    return [line for line in proc.stderr.splitlines() if "error" in line]


def test_key_is_torch_cuda_and_options(box: Sandbox) -> None:
    keys = {}
    for torch in ("2.14.1+cu130", "2.14.1+cu126", "2.14.1+cpu", "2.13.0+cpu"):
        for cuda in ("13.0", "12.6", None):
            box.torch(torch, cuda)
            for nccl in ("", "NCCL"):
                keys[torch, cuda, nccl] = box.key_dir({"HOROVOD_GPU_OPERATIONS": nccl})
    assert len(set(keys.values())) == len(keys)  # every torch, CUDA and option gives its own directory
    for k in keys.values():
        assert k.parent == box.wheels / "horovod-0.28.1"
    assert keys["2.14.1+cu130", "13.0", "NCCL"].name.endswith("_torch2.14.1+cu130_cuda13.0_gpuops-NCCL")
    assert keys["2.14.1+cpu", None, ""].name.endswith("_torch2.14.1+cpu_cudanone_gpuops-none")
    # Stable: the same inputs give the same directory; a runtime-only variable changes nothing.
    box.torch(*CUDA_TORCH)
    base = box.key_dir(NCCL)
    assert base == keys["2.14.1+cu130", "13.0", "NCCL"]
    assert box.key_dir(NCCL | {"HOROVOD_FUSION_THRESHOLD": "1"}) == base
    # Another Horovod build variable is another build: its hash joins the key.
    other = box.key_dir(NCCL | {"HOROVOD_GPU_ALLGATHER": "MPI", "HOROVOD_ALLOW_MIXED_GPU_IMPL": "1"})
    assert other != base and other.name.startswith(base.name + "_opts-")
    assert box.pip_calls() == []


def test_nccl_with_a_cpu_torch_fails_before_anything_is_built(box: Sandbox) -> None:
    box.torch(*CPU_TORCH)
    box.horovod(nccl=False)
    box.pip_calls()
    proc = box.run(env=NCCL)
    assert proc.returncode != 0
    (line,) = error_lines(proc)
    assert line.startswith("[build-horovod] error: asked for NCCL") and "CPU-only" in line and "HPCNOISE_GPU=0" in line
    assert box.pip_calls() == []  # nothing installed, nothing compiled


def test_cpu_horovod_with_nccl_asked_is_rebuilt_and_fails_unless_nccl_built(box: Sandbox) -> None:
    """The issue's case: a CPU Horovod (or a CPU wheel) must never pass for an NCCL one."""
    box.horovod(nccl=False)
    cpu_dir = box.key_dir()  # a CPU wheel kept under its own key is not the NCCL one
    cpu_dir.mkdir(parents=True)
    (cpu_dir / "horovod-0.28.1-cp311-cp311-linux_x86_64.whl").write_text("cpu")
    box.pip_calls()
    proc = box.run(env=NCCL | {"FAKE_NCCL": "0"})  # the build "succeeds" without NCCL
    assert proc.returncode != 0
    assert "keeping" not in proc.stdout
    (line,) = error_lines(proc)
    assert "asked for NCCL" in line and "has no NCCL (it has: mpi, gloo)" in line
    calls = box.pip_calls()
    (wheel,) = [c for c in calls if c[0] == "wheel"]
    assert "--no-cache-dir" in wheel and wheel[-1] == "horovod==0.28.1"  # never pip's wheel cache
    assert not any(str(cpu_dir) in a for c in calls for a in c)
    assert not box.key_dir(NCCL).exists()  # a failed wheel is not kept


def test_nccl_wheel_is_kept_under_its_key_and_reused(box: Sandbox) -> None:
    proc = box.run(env=NCCL | {"FAKE_NCCL": "1"})
    assert proc.returncode == 0, proc.stderr
    assert "horovod 0.28.1: mpi, gloo, nccl" in proc.stdout
    nccl_dir = box.key_dir(NCCL)
    (kept,) = nccl_dir.glob("horovod-0.28.1-*.whl")
    assert [c[0] for c in box.pip_calls() if "cmake" not in str(c)] == ["wheel", "show", "install"]
    # A new environment for the same torch and options installs the kept wheel: nothing is compiled.
    box.run(pip=["uninstall", "-y", "horovod"])
    box.pip_calls()
    proc = box.run(env=NCCL | {"FAKE_NCCL": "1"})
    assert proc.returncode == 0, proc.stderr
    assert [c for c in box.pip_calls() if c[0] in ("wheel", "install")] == [["install", "-q", str(kept)]]
    # The same environment again: the Horovod installed is what is asked, pip is not called.
    proc = box.run(env=NCCL)
    assert proc.returncode == 0 and "keeping the Horovod installed" in proc.stdout
    assert box.pip_calls() == []


def test_installed_horovod_is_kept_when_nccl_is_not_asked(box: Sandbox) -> None:
    """An existing venv (CI, this one) is never rebuilt when it has what is asked."""
    box.horovod(nccl=False)
    box.pip_calls()
    proc = box.run()
    assert proc.returncode == 0, proc.stderr
    assert "keeping the Horovod installed, it is what is asked (horovod 0.28.1: mpi, gloo)" in proc.stdout
    assert box.pip_calls() == []
