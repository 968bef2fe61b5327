"""A real Slurm on this machine for the job-script tests: a private munged, slurmctld and slurmd(s).

``start_cluster(nodes=1)`` writes slurm.conf and gres.conf into a fresh directory, starts munged with
its own key and socket, slurmctld, and one slurmd per node, and waits until every node is idle. Each
node advertises 8 CPUs (more than the machine has: ``SlurmdParameters=config_overrides``) and 4 fake
GPUs (gres files made with mknod, so ``--gpus-per-node`` scripts run unchanged). With ``nodes=2`` the
two nodes n1 and n2 are two slurmd processes on this host, on different ports. Ports are chosen free,
so several clusters can run on one machine side by side. ``Cluster.stop`` ends the daemons by PID.
Job credentials live 10 s (``cred_expire``; Slurm's default is 120 s), which is also how long a
requeued job waits before it may start again, and the schedulers run every second.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

DEBIAN_PACKAGES = "slurm-wlm munge"
DAEMONS = ("munged", "mungekey", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "srun", "scontrol", "sinfo", "squeue", "scancel")
SBIN = (Path("/usr/sbin"), Path("/usr/local/sbin"))
CPUS_PER_NODE = 8
GPUS_PER_NODE = 4
FINISHED_STATES = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
    "PREEMPTED",
}


def which(name: str) -> str | None:
    """A Slurm or munge program on PATH or in the sbin directories (which a non-login PATH may lack)."""
    found = shutil.which(name)
    if found:
        return found
    for d in SBIN:
        if (d / name).is_file():
            return str(d / name)
    return None


def missing_programs() -> list[str]:
    return [name for name in DAEMONS + CLIENTS if which(name) is None]


def prog(name: str) -> str:
    """Full path of a program that ``missing_programs`` found."""
    path = which(name)
    if path is None:
        raise FileNotFoundError(name)
    return path


def free_ports(n: int) -> list[int]:
    """n distinct TCP ports that are free on 127.0.0.1 now."""
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


@dataclass
class Job:
    """What ``scontrol show job`` says about one job (or one array task)."""

    job_id: str
    state: str
    exit_code: str
    restarts: int
    fields: dict[str, str]


@dataclass
class Cluster:
    root: Path
    nodes: list[str]
    env: dict[str, str]  # the environment for client commands and jobs (SLURM_CONF, PATH)
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def log_dir(self) -> Path:
        return self.root / "log"

    def run(
        self, *args: str, check: bool = True, timeout: float = 60, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess:
        """Run a Slurm client command against this cluster."""
        proc = subprocess.run(
            list(args), check=False, capture_output=True, text=True, timeout=timeout, env=env or self.env
        )
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc

    def sbatch(self, *args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> str:
        """Submit a batch job; return its id."""
        proc = subprocess.run(
            ["sbatch", "--parsable", *args],
            check=False,
            capture_output=True,
            text=True,
            timeout=60,
            env=env or self.env,
            cwd=cwd,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"sbatch {' '.join(args)} failed: {proc.stderr.strip()}")
        return proc.stdout.strip().split(";")[0]

    def jobs(self, job_id: str) -> list[Job]:
        """The job, or all tasks of a job array, as the controller knows them now."""
        out = self.run("scontrol", "show", "job", "-o", job_id).stdout
        jobs = []
        for line in out.splitlines():
            if not line.strip():
                continue
            f = dict(re.findall(r"(\w+)=(\S*)", line))
            jobs.append(
                Job(f.get("JobId", ""), f.get("JobState", ""), f.get("ExitCode", ""), int(f.get("Restarts", "0")), f)
            )
        return jobs

    def wait(self, job_id: str, timeout: float = 300, states: set[str] = FINISHED_STATES) -> list[Job]:
        """Wait until the job (every task of an array) is in one of ``states``; return them."""
        deadline = time.monotonic() + timeout
        jobs: list[Job] = []
        while time.monotonic() < deadline:
            jobs = self.jobs(job_id)
            pending_tasks = any(
                j.fields.get("ArrayTaskId", "").count("-") or "[" in j.fields.get("ArrayTaskId", "") for j in jobs
            )
            if jobs and not pending_tasks and all(j.state in states for j in jobs):
                return jobs
            time.sleep(0.5)
        raise TimeoutError(
            f"job {job_id} not in {sorted(states)} after {timeout:.0f} s: "
            f"{[(j.job_id, j.state) for j in jobs]}\n{self.log_tail()}"
        )

    def log_tail(self, lines: int = 20) -> str:
        out = []
        for log in sorted(self.log_dir.glob("*.log")):
            text = log.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"--- {log.name} ---\n" + "\n".join(text))
        return "\n".join(out)

    def stop(self) -> None:
        """Cancel what is left, then end slurmd, slurmctld and munged by their PIDs (TERM, then KILL)."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            left = self.run("squeue", "-h", "-o", "%A", check=False, timeout=10).stdout.split()
            if left:
                self.run("scancel", *left, check=False, timeout=10)
        order = [n for n in self.procs if n.startswith("slurmd")] + ["slurmctld", "munged"]
        for name in order:
            proc = self.procs.get(name)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        self.procs.clear()


def _write_config(root: Path, nodes: list[str], host: str) -> Path:
    ctld_port, *node_ports = free_ports(1 + len(nodes))
    (root / "dev").mkdir()
    for i in range(GPUS_PER_NODE):
        # Character devices with /dev/null's numbers: Slurm only needs files it can stat and hand out.
        os.mknod(root / "dev" / f"nvidia{i}", 0o666 | 0o020000, os.makedev(1, 3))
    for sub in ("state", "log", "spool", "tmp"):
        (root / sub).mkdir()
    for n in nodes:
        (root / "spool" / n).mkdir()
        (root / "tmp" / n).mkdir()
    conf = f"""\
ClusterName=hpcnoise{root.name.split("-")[-1].lower()[:8]}
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge/munge.socket,cred_expire=10
SlurmUser=root
SlurmdUser=root
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
TmpFS={root}/tmp/%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1,bf_interval=1
MpiDefault=pmix
ReturnToService=2
JobRequeue=1
MinJobAge=3600
KillWait=5
InactiveLimit=0
GresTypes=gpu
"""
    gres = ""
    for n, port in zip(nodes, node_ports):
        addr = "" if n == host else f" NodeHostname={host}"
        conf += (
            f"NodeName={n}{addr} NodeAddr=127.0.0.1 Port={port} CPUs={CPUS_PER_NODE} "
            f"Gres=gpu:{GPUS_PER_NODE} State=UNKNOWN\n"
        )
        gres += f"NodeName={n} Name=gpu File={root}/dev/nvidia[0-{GPUS_PER_NODE - 1}]\n"
    conf += f"PartitionName=test Nodes={','.join(nodes)} Default=YES MaxTime=INFINITE State=UP\n"
    (root / "slurm.conf").write_text(conf)
    (root / "gres.conf").write_text(gres)
    return root / "slurm.conf"


def _spawn(cluster: Cluster, name: str, args: list[str]) -> None:
    with open(cluster.log_dir / f"{name}.out.log", "w") as log:  # the daemon keeps its own copy of the fd
        cluster.procs[name] = subprocess.Popen(
            args, stdout=log, stderr=subprocess.STDOUT, env=cluster.env, start_new_session=True
        )


def start_cluster(nodes: int = 1, base_env: dict[str, str] | None = None, timeout: float = 60) -> Cluster:
    """Start munged, slurmctld and ``nodes`` slurmds; return once every node is idle.

    One node is named after this host (so `scontrol show hostnames` gives a name that resolves);
    several are n1, n2, ... on this host.
    """
    missing = missing_programs()
    if missing:
        raise FileNotFoundError(
            f"Slurm programs not installed ({', '.join(missing)}): run tests/ci_deps.sh "
            f"(Debian packages {DEBIAN_PACKAGES})"
        )
    host = socket.gethostname().split(".")[0]
    names = [host] if nodes == 1 else [f"n{i}" for i in range(1, nodes + 1)]
    # Not under pytest's 0700 tmp tree: munged insists that every directory above its socket be searchable.
    root = Path(tempfile.mkdtemp(prefix="hpcnoise-slurm-"))
    root.chmod(0o755)
    env = dict(base_env if base_env is not None else os.environ)
    conf = _write_config(root, names, host)
    env["SLURM_CONF"] = str(conf)
    for var in list(env):
        if var.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_")) and var != "SLURM_CONF":
            del env[var]  # a test run inside an allocation must not leak that allocation's settings
    cluster = Cluster(root=root, nodes=names, env=env)
    try:
        munge = root / "munge"
        munge.mkdir(mode=0o755)
        subprocess.run([prog("mungekey"), "-c", "-k", str(munge / "munge.key")], check=True, timeout=30)
        _spawn(
            cluster,
            "munged",
            [
                prog("munged"),
                "-F",
                "-S",
                str(munge / "munge.socket"),
                f"--key-file={munge / 'munge.key'}",
                f"--pid-file={munge / 'munged.pid'}",
                f"--log-file={root / 'log' / 'munged.log'}",
                f"--seed-file={munge / 'seed'}",
            ],
        )
        _wait_for(lambda: (munge / "munge.socket").exists(), timeout, "munged socket", cluster)
        _spawn(cluster, "slurmctld", [prog("slurmctld"), "-D", "-c", "-i", "-f", str(conf)])
        for n in names:
            _spawn(cluster, f"slurmd-{n}", [prog("slurmd"), "-D", "-N", n, "-f", str(conf)])

        def idle() -> bool:
            out = cluster.run("sinfo", "-h", "-N", "-o", "%N %T", check=False, timeout=10).stdout.split()
            states = dict(zip(out[::2], out[1::2]))
            return all(states.get(n, "").startswith("idle") for n in names)

        _wait_for(idle, timeout, "nodes idle", cluster)
    except BaseException:
        cluster.stop()
        raise
    return cluster


def _wait_for(cond: Callable[[], bool], timeout: float, what: str, cluster: Cluster) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for name, proc in cluster.procs.items():
            if proc.poll() is not None:
                raise RuntimeError(
                    f"{name} exited with {proc.returncode} while waiting for {what}\n{cluster.log_tail()}"
                )
        if cond():
            return
        time.sleep(0.2)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}\n{cluster.log_tail()}")


def remove(cluster: Cluster) -> None:
    """Stop the daemons and delete the cluster's directory."""
    cluster.stop()
    shutil.rmtree(cluster.root, ignore_errors=True)
