"""The shipped Slurm batch scripts (jobs/*.sbatch) under a real Slurm on this machine.

Each test submits a script exactly as a user would, with a CPU smoke workload, and checks the run
directories it produced (config.json world size and launcher, one metrics line per epoch,
summary.json), not only the job's exit code. The clusters come from tests/helpers/slurm.py: one node with 8
CPUs and 4 fake GPUs, and two such nodes emulated on this host. Missing Slurm packages fail the
tests with a pointer to tests/ci_deps.sh.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hpcnoise.presets import get_preset, get_table
from tests.helpers.launch import BIN
from tests.helpers.slurm import FINISHED_STATES, Cluster, Job, missing_programs, remove, start_cluster

REPO = Path(__file__).resolve().parent.parent
JOBS = REPO / "jobs"
PRESET = "mnist1d-diagf-gbn"
SMOKE = [PRESET, "--smoke", "--threads=1", "--progress=false"]
SMOKE_EPOCHS = get_preset(PRESET, smoke=True).epochs
TABLE = "mnist1d"
TABLE_CELLS = len(get_table(TABLE, smoke=True))
# One rank per (fake) GPU and one CPU per rank: the test machine has 2 cores.
TWO_RANKS = ["--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=2", "--cpus-per-task=1"]
ONE_RANK = ["--nodes=1", "--ntasks-per-node=1", "--gpus-per-node=1", "--cpus-per-task=1"]
JOB_TIMEOUT = 300  # s
# The hpcnoise command the jobs run (HPCNOISE_CMD of jobs/common.sh): the venv's, unless the environment
# running the tests names another.
HPCNOISE_CMD = os.environ.get("HPCNOISE_CMD", str(BIN / "hpcnoise"))


def _cluster(nodes: int) -> Iterator[Cluster]:
    missing = missing_programs()
    if missing:
        pytest.fail(f"Slurm is not installed (missing {', '.join(missing)}): run tests/ci_deps.sh as root")
    cluster = start_cluster(nodes)
    try:
        yield cluster
    finally:
        remove(cluster)


@pytest.fixture(scope="session")
def slurm() -> Iterator[Cluster]:
    """A one-node Slurm (the node is this host: 8 CPUs, 4 fake GPUs)."""
    yield from _cluster(1)


@pytest.fixture(scope="session")
def slurm2() -> Iterator[Cluster]:
    """A two-node Slurm (n1 and n2, both on this host)."""
    yield from _cluster(2)


def job_env(cluster: Cluster, **extra: str) -> dict[str, str]:
    """What a user's shell would hold at submission: the venv on PATH, plus the test's settings."""
    env = dict(cluster.env)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["HPCNOISE_CMD"] = HPCNOISE_CMD
    env.update(extra)
    return env


def submit(cluster: Cluster, tmp: Path, script: str, sbatch_args: list[str], args: list[str], **env: str) -> str:
    """sbatch a shipped script from ``tmp`` (its output files land there); return the job id."""
    return cluster.sbatch(*sbatch_args, str(JOBS / script), *args, env=job_env(cluster, **env), cwd=tmp)


def job_log(tmp: Path, pattern: str) -> str:
    logs = sorted(tmp.glob(pattern))
    return "\n".join(f"--- {p.name} ---\n{p.read_text(errors='replace')}" for p in logs) or f"(no {pattern})"


def assert_completed(jobs: list[Job], log: str) -> None:
    for j in jobs:
        assert (j.state, j.exit_code) == ("COMPLETED", "0:0"), f"job {j.job_id}: {j.state} {j.exit_code}\n{log}"


def check_run(run: Path, world_size: int, epochs: int = SMOKE_EPOCHS) -> dict:
    """A finished run directory: config.json, one metrics line per epoch, summary.json; returns config.json."""
    assert run.is_dir(), f"no run directory {run}; found {sorted(p.name for p in run.parent.iterdir())}"
    names = {p.name for p in run.iterdir()}
    assert {"config.json", "metrics.jsonl", "summary.json", "model.pt"} <= names, names
    record = json.loads((run / "config.json").read_text())
    assert record["world_size"] == world_size
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == list(range(1, epochs + 1))
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == world_size and summary["epochs"] == epochs
    assert summary["run_name"] == run.name
    return record


# --- train.sbatch ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_train_srun_pmix_two_ranks(slurm: Cluster, tmp_path: Path) -> None:
    out = tmp_path / "runs"
    job = submit(slurm, tmp_path, "train.sbatch", TWO_RANKS, [*SMOKE, f"--out_dir={out}"])
    jobs = slurm.wait(job, JOB_TIMEOUT)
    log = job_log(tmp_path, f"hpcnoise-train-{job}.out")
    assert_completed(jobs, log)
    assert "srun --mpi=pmix --ntasks=2 --cpus-per-task=1 --cpu-bind=cores" in log
    record = check_run(out / f"{PRESET}-job{job}", world_size=2)  # named after the job, for requeues
    assert record["launcher"].startswith("srun") and record["versions"]["horovod"]


@pytest.mark.slow
def test_train_mpirun_in_allocation(slurm: Cluster, tmp_path: Path) -> None:
    out = tmp_path / "runs"
    job = submit(
        slurm,
        tmp_path,
        "train.sbatch",
        TWO_RANKS,
        [*SMOKE, f"--out_dir={out}", "--run_name=m"],
        HPCNOISE_LAUNCHER="mpirun",
    )
    jobs = slurm.wait(job, JOB_TIMEOUT)
    log = job_log(tmp_path, f"hpcnoise-train-{job}.out")
    assert_completed(jobs, log)
    assert "mpirun -np 2 --hostfile" in log and "--bind-to core" in log
    assert check_run(out / "m", world_size=2)["launcher"] == "mpirun"


@pytest.mark.slow
def test_train_horovodrun_in_allocation(slurm: Cluster, tmp_path: Path) -> None:
    out = tmp_path / "runs"
    job = submit(
        slurm,
        tmp_path,
        "train.sbatch",
        TWO_RANKS,
        [*SMOKE, f"--out_dir={out}", "--run_name=h"],
        HPCNOISE_LAUNCHER="horovodrun",
        HPCNOISE_CPU_BIND="none",
    )
    jobs = slurm.wait(job, JOB_TIMEOUT)
    log = job_log(tmp_path, f"hpcnoise-train-{job}.out")
    assert_completed(jobs, log)
    assert "horovodrun -np 2 --hostfile" in log
    # horovodrun starts its ranks through mpirun when Horovod has MPI
    assert check_run(out / "h", world_size=2)["launcher"] in ("mpirun", "horovodrun")


@pytest.mark.slow
def test_train_two_node_allocation(slurm2: Cluster, tmp_path: Path) -> None:
    out = tmp_path / "runs"
    two_nodes = ["--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=1", "--cpus-per-task=1"]
    # Both emulated nodes are this host: Open MPI must not try shared memory between them.
    job = submit(slurm2, tmp_path, "train.sbatch", two_nodes, [*SMOKE, f"--out_dir={out}"], OMPI_MCA_btl="self,tcp")
    jobs = slurm2.wait(job, JOB_TIMEOUT)
    log = job_log(tmp_path, f"hpcnoise-train-{job}.out")
    assert_completed(jobs, log)
    assert "on n[1-2], 2 tasks" in log
    check_run(out / f"{PRESET}-job{job}", world_size=2)


@pytest.mark.slow
def test_train_in_container_runtime(slurm: Cluster, tmp_path: Path) -> None:
    """HPCNOISE_CONTAINER puts `apptainer exec --nv IMAGE` in front of every rank's command.

    Apptainer is not packaged for this machine, so a stand-in `apptainer` records its arguments and
    runs the command after the image on the host.
    """
    stub_dir, calls = tmp_path / "bin", tmp_path / "apptainer-calls"
    stub_dir.mkdir()
    stub = stub_dir / "apptainer"
    stub.write_text(
        "#!/usr/bin/env bash\n"
        f'echo "$*" >> {calls}\n'
        '[ "$1" = exec ] && shift || exit 64\n'
        "while [[ $1 == -* ]]; do case $1 in --bind | -B) shift 2 ;; *) shift ;; esac; done\n"
        "shift\n"  # the image
        'exec "$@"\n'
    )
    stub.chmod(0o755)
    out = tmp_path / "runs"
    job = submit(
        slurm,
        tmp_path,
        "train.sbatch",
        TWO_RANKS,
        [*SMOKE, f"--out_dir={out}", "--run_name=c"],
        HPCNOISE_CONTAINER="apptainer",
        HPCNOISE_IMAGE="/images/hpcnoise.sif",
        HPCNOISE_CONTAINER_ARGS="--bind /scratch",
        PATH=f"{stub_dir}:{BIN}:{os.environ['PATH']}",
    )
    jobs = slurm.wait(job, JOB_TIMEOUT)
    log = job_log(tmp_path, f"hpcnoise-train-{job}.out")
    assert_completed(jobs, log)
    lines = calls.read_text().splitlines()
    assert len(lines) == 2, lines  # one per rank
    assert all(
        line.startswith(f"exec --nv --bind /scratch /images/hpcnoise.sif {HPCNOISE_CMD} train ") for line in lines
    ), lines
    check_run(out / "c", world_size=2)


@pytest.mark.slow
def test_train_bad_settings_fail_with_one_line(slurm: Cluster, tmp_path: Path) -> None:
    job = submit(slurm, tmp_path, "train.sbatch", ONE_RANK, SMOKE, HPCNOISE_LAUNCHER="qsub")
    (j,) = slurm.wait(job, JOB_TIMEOUT)
    log = job_log(tmp_path, f"hpcnoise-train-{job}.out")
    assert j.state == "FAILED" and j.exit_code == "2:0", log
    assert "hpcnoise job: error: HPCNOISE_LAUNCHER must be srun, mpirun or horovodrun, got 'qsub'" in log


# --- sweep.sbatch and hpcnoise sweep -----------------------------------------------------------------


def hpcnoise(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*shlex.split(HPCNOISE_CMD), *args], capture_output=True, text=True, timeout=120, cwd=cwd, check=False
    )


def read_sweep(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_sweep_write_is_deterministic(tmp_path: Path) -> None:
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    for path in (a, b):
        proc = hpcnoise("sweep", "write", TABLE, "--smoke", "--out", str(path), f"--out_dir={tmp_path / 'runs'}")
        assert proc.returncode == 0, proc.stderr
    assert a.read_text() == b.read_text()
    cells = read_sweep(a)
    assert [c["index"] for c in cells] == list(range(TABLE_CELLS))
    names = [c["run_name"] for c in cells]
    assert len(set(names)) == TABLE_CELLS
    for c, cfg in zip(cells, get_table(TABLE, smoke=True)):  # the table's cells, in order, named after them
        assert c["run_name"].startswith(f"{cfg.preset}-s{cfg.seed}-") and c["config"]["seed"] == cfg.seed
    assert all(
        c["config"]["out_dir"] == str(tmp_path / "runs") and c["config"]["run_name"] == c["run_name"] for c in cells
    )


def test_sweep_submit_dry_run_prints_the_array(tmp_path: Path) -> None:
    proc = hpcnoise(
        "sweep",
        "submit",
        TABLE,
        "--smoke",
        f"--out_dir={tmp_path}",
        "--max-parallel=3",
        "--sbatch=--partition=gpu",
        "--dry-run",
        "--threads=1",
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == (
        f"sbatch --array=0-{TABLE_CELLS - 1}%3 --job-name=hpcnoise-{TABLE} --partition=gpu {JOBS / 'sweep.sbatch'} "
        f"{tmp_path / f'{TABLE}-smoke.sweep.jsonl'} --threads=1"
    )
    assert not any(tmp_path.iterdir())  # a dry run writes nothing


@pytest.mark.parametrize(
    "args,message",
    [
        (["write", "nosuch", "--out", "x.jsonl"], "unknown table 'nosuch'"),
        (["run", "missing.jsonl", "--index", "0"], "cannot read sweep file 'missing.jsonl'"),
        (["run", "cells.jsonl"], "SLURM_ARRAY_TASK_ID is not set"),
        (["run", "cells.jsonl", "--index", "9"], "index 9 out of range"),
        (["run", "cells.jsonl", "--index", "0", "--epochs=many"], "field 'epochs' expects int"),
        (["submit", "mnist1d", "--dry-run", "--no_such_key=1"], "unknown config key 'no_such_key'"),
        (["frobnicate"], "unknown sweep command 'frobnicate'"),
    ],
)
def test_sweep_bad_input_one_line_exit_2(tmp_path: Path, args: list[str], message: str) -> None:
    (tmp_path / "cells.jsonl").write_text(
        "".join(json.dumps({"index": i, "config": {"seed": i}}) + "\n" for i in range(9))
    )
    proc = hpcnoise("sweep", *args, cwd=tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hpcnoise: error: ") and message in lines[0], proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cells.jsonl"]


@pytest.mark.slow
def test_sweep_job_array(slurm: Cluster, tmp_path: Path) -> None:
    sweep = tmp_path / f"{TABLE}-smoke.sweep.jsonl"
    proc = hpcnoise("sweep", "write", TABLE, "--smoke", "--out", str(sweep), f"--out_dir={tmp_path / 'runs'}")
    assert proc.returncode == 0, proc.stderr
    cells = read_sweep(sweep)
    picked = [0, TABLE_CELLS // 2, TABLE_CELLS - 1]  # first, middle and last cell: different regimes and seeds
    job = submit(
        slurm,
        tmp_path,
        "sweep.sbatch",
        [f"--array={','.join(map(str, picked))}", *ONE_RANK],
        [str(sweep), "--threads=1", "--progress=false"],
    )
    tasks = slurm.wait(job, JOB_TIMEOUT)
    log = job_log(tmp_path, f"hpcnoise-sweep-{job}_*.out")
    assert sorted(int(t.fields["ArrayTaskId"]) for t in tasks) == picked
    assert_completed(tasks, log)
    for i in picked:
        assert (tmp_path / f"hpcnoise-sweep-{job}_{i}.out").exists()
        record = check_run(tmp_path / "runs" / cells[i]["run_name"], world_size=1)
        assert record["config"]["seed"] == cells[i]["config"]["seed"]
        assert record["config"]["regime"] == cells[i]["config"]["regime"]
    ran = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert ran == sorted(cells[i]["run_name"] for i in picked)


# --- requeue ----------------------------------------------------------------------------------------


def restarted(cluster: Cluster, job: str, restarts: int, timeout: float = JOB_TIMEOUT) -> Job:
    """Wait for the job's ``restarts``-th run to finish.

    A requeued job becomes eligible again once the old run's credentials expired: cred_expire=10 s
    in the test cluster (Slurm's default is 120 s).
    """
    deadline = time.monotonic() + timeout
    queued_again = False  # seen pending or running after the requeue (the old run's end state is no answer)
    while time.monotonic() < deadline:
        (j,) = cluster.jobs(job)
        if j.restarts >= restarts:
            queued_again = queued_again or j.state in ("PENDING", "CONFIGURING", "RUNNING")
            if queued_again and j.state in FINISHED_STATES:
                return j
        time.sleep(0.2)
    raise TimeoutError(f"job {job} did not finish its run after restart {restarts}: {cluster.jobs(job)}")


def wait_for_lines(path: Path, n: int, timeout: float = JOB_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and len(path.read_text().splitlines()) >= n:
            return
        time.sleep(0.2)
    raise TimeoutError(f"{path} did not reach {n} lines")


@pytest.mark.slow
def test_requeued_finished_job_exits_at_once(slurm: Cluster, tmp_path: Path) -> None:
    out = tmp_path / "runs"
    job = submit(slurm, tmp_path, "train.sbatch", ONE_RANK, [*SMOKE, f"--out_dir={out}"])
    log_path = tmp_path / f"hpcnoise-train-{job}.out"
    (first,) = slurm.wait(job, JOB_TIMEOUT)
    assert_completed([first], job_log(tmp_path, log_path.name))
    run = out / f"{PRESET}-job{job}"
    check_run(run, world_size=1)
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in run.iterdir()}

    slurm.run("scontrol", "requeue", job)
    second = restarted(slurm, job, 1)
    log = log_path.read_text()  # --open-mode=append: both runs' output
    assert (second.state, second.exit_code) == ("COMPLETED", "0:0"), log
    assert "(restart 1)" in log and "is already finished; nothing to do" in log
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in run.iterdir()} == before
    assert sorted(p.name for p in out.iterdir()) == [run.name]  # no second run directory


LONG_EPOCHS = 16  # long enough to stop mid-run: the stop comes within a second of epoch 2's line
LONG = [PRESET, "--smoke", "--threads=1", "--progress=false", f"--epochs={LONG_EPOCHS}", "--checkpoint_every=1"]


def assert_resumed(run: Path, before: list[str], epochs: int, log: str) -> None:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert lines[: len(before)] == before, log  # epochs done before the stop are kept as they were
    assert (run / "summary.json").exists(), log
    check_run(run, world_size=2, epochs=epochs)
    assert not (run / "checkpoint.pt").exists()
    assert "hpcnoise: resuming" in log, log


@pytest.mark.slow
def test_requeued_running_job_resumes_from_checkpoint(slurm: Cluster, tmp_path: Path) -> None:
    """scontrol requeue of a running job (what preemption does): the ranks get SIGTERM, checkpoint and
    stop; the job runs again with the same id and continues from the checkpoint, not from epoch 1."""
    out = tmp_path / "runs"
    job = submit(slurm, tmp_path, "train.sbatch", TWO_RANKS, [*LONG, f"--out_dir={out}"])
    run = out / f"{PRESET}-job{job}"
    wait_for_lines(run / "metrics.jsonl", 2)
    slurm.run("scontrol", "requeue", job)
    before = (run / "metrics.jsonl").read_text().splitlines()
    second = restarted(slurm, job, 1)
    log = (tmp_path / f"hpcnoise-train-{job}.out").read_text()
    assert (second.state, second.exit_code) == ("COMPLETED", "0:0"), log
    assert_resumed(run, before[:2], epochs=LONG_EPOCHS, log=log)


@pytest.mark.slow
def test_time_limit_signal_requeues_and_resumes(slurm: Cluster, tmp_path: Path) -> None:
    """The time-limit path: Slurm sends SIGUSR1 (--signal=USR1@300) to the ranks; they checkpoint and
    exit 75; the batch script requeues its own job, which resumes."""
    out = tmp_path / "runs"
    job = submit(slurm, tmp_path, "train.sbatch", TWO_RANKS, [*LONG, f"--out_dir={out}"])
    run = out / f"{PRESET}-job{job}"
    wait_for_lines(run / "metrics.jsonl", 2)
    slurm.run("scancel", "--signal=USR1", job)  # what --signal=USR1@300 does 300 s before the limit
    before = (run / "metrics.jsonl").read_text().splitlines()
    second = restarted(slurm, job, 1)
    log = (tmp_path / f"hpcnoise-train-{job}.out").read_text()
    assert (second.state, second.exit_code) == ("COMPLETED", "0:0"), log
    assert "requeueing job" in log
    assert_resumed(run, before[:2], epochs=LONG_EPOCHS, log=log)


# --- shell -----------------------------------------------------------------------------------------


def test_tasks_per_node_expansion() -> None:
    proc = subprocess.run(
        ["bash", "-c", f"source {JOBS / 'common.sh'} && hpcnoise_tasks_per_node"],
        env={**os.environ, "SLURM_TASKS_PER_NODE": "4(x3),2,1(x2)"},
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["4", "4", "4", "2", "1", "1"]


def test_shellcheck_job_scripts() -> None:
    if shutil.which("shellcheck") is None:
        pytest.fail("shellcheck is not installed: run tests/ci_deps.sh as root")
    scripts = sorted([*JOBS.glob("*.sh"), *JOBS.glob("*.sbatch"), *(REPO / "tests").glob("*.sh")])
    assert len(scripts) >= 5
    proc = subprocess.run(
        ["shellcheck", "-x", "--format=gcc", *map(str, scripts)], capture_output=True, text=True, cwd=REPO, check=False
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
