"""The only code that knows about launchers, Horovod and MPI.

``init()`` returns a ``Comm``: rank, world size, local rank, the launcher that started us and the
device to use, plus the collectives the suite needs (an in-place sum-allreduce of a flat tensor, at
once or started in the background and waited for, and a broadcast of a small Python object from
rank 0), and Horovod's timeline. A plain ``hpcnoise train`` is one process with
no MPI at all; under horovodrun, mpirun or srun the process joins Horovod.
"""

from __future__ import annotations

import os
import platform
import socket
from dataclasses import dataclass
from typing import Any

import torch

from hpcnoise.heap import keep_freed_memory

# Environment variables through which launchers announce the world size. horovodrun starts its
# ranks through mpirun when Horovod was built with MPI, so such runs are recorded as "mpirun".
_SIZE_VARS = {
    "horovodrun": "HOROVOD_SIZE",
    "mpirun": "OMPI_COMM_WORLD_SIZE",
    "mpiexec (MPICH/Hydra)": "PMI_SIZE",
    "srun (PMIx)": "PMIX_SIZE",
}


def detect_launcher() -> tuple[str, int]:
    """(launcher name, world size announced by it); ("none", 1) for a plain process."""
    for name, var in _SIZE_VARS.items():
        if var in os.environ:
            return name, int(os.environ[var])
    if "SLURM_STEP_ID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        return "srun", int(os.environ["SLURM_NTASKS"])
    return "none", 1


_RANK_VARS = ("HOROVOD_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "SLURM_PROCID")


def launcher_rank() -> int:
    """This process's rank as announced by the launcher (0 for a plain process); needs no collective."""
    for var in _RANK_VARS:
        if var in os.environ:
            return int(os.environ[var])
    return 0


@dataclass
class Comm:
    rank: int
    size: int
    local_rank: int
    launcher: str
    device: torch.device
    hvd: Any = None  # horovod.torch when running distributed

    @property
    def is_main(self) -> bool:
        """Rank 0 alone prints, draws progress bars and writes files."""
        return self.rank == 0

    def allreduce_sum_(self, flat: torch.Tensor, name: str = "hpcnoise.fused") -> torch.Tensor:
        """Sum ``flat`` over all workers, in place, in one collective named ``name`` (every rank passes
        the same names in the same order). A no-op on one worker."""
        if self.hvd is not None and self.size > 1:
            self.hvd.allreduce_(flat, op=self.hvd.Sum, name=name)
        return flat

    def allreduce_sum_async_(self, flat: torch.Tensor, name: str) -> Any:
        """Start summing ``flat`` over all workers in place (Horovod's background thread); returns the
        handle that ``wait`` completes. On one worker nothing is started (``None``)."""
        if self.hvd is not None and self.size > 1:
            return self.hvd.allreduce_async_(flat, op=self.hvd.Sum, name=name)
        return None

    def wait(self, handle: Any) -> None:
        """Block until the collective behind ``handle`` (from ``allreduce_sum_async_``) is done."""
        if handle is not None:
            self.hvd.synchronize(handle)

    def start_timeline(self, path: str) -> bool:
        """Record Horovod's timeline (every collective's negotiation, queueing and reduction, as a
        chrome://tracing JSON file) into ``path``; False when not running under Horovod."""
        if self.hvd is None:
            return False
        try:
            self.hvd.start_timeline(path, mark_cycles=True)
        except ValueError:  # Horovod was initialised without HOROVOD_TIMELINE=DYNAMIC (see ``init``)
            return False
        return True

    def stop_timeline(self) -> None:
        if self.hvd is not None:
            self.hvd.stop_timeline()

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (for small things: run directory names, error messages)."""
        if self.hvd is not None and self.size > 1:
            # a fixed name: Horovod otherwise names the broadcast after the object's type, and ranks
            # passing different types (a value on rank 0, None elsewhere) would wait on each other forever
            return self.hvd.broadcast_object(obj, root_rank=0, name="hpcnoise.object")
        return obj

    def versions(self) -> dict[str, str]:
        """Software and host facts recorded in every run's config.json."""
        out = {"torch": torch.__version__, "python": platform.python_version(), "host": socket.gethostname()}
        if self.hvd is not None:
            import horovod

            out["horovod"] = horovod.__version__
            out["horovod_controller"] = "mpi" if self.hvd.mpi_enabled() else "gloo"
        try:
            import mpi4py

            mpi4py.rc.initialize = False  # ask for the library version without initialising MPI
            from mpi4py import MPI

            out["mpi"] = MPI.Get_library_version().splitlines()[0].strip().rstrip("\x00")
        except Exception:  # MPI is optional for a single process
            out["mpi"] = "unavailable"
        if torch.cuda.is_available():
            out["cuda"] = str(torch.version.cuda)
            out["gpu"] = torch.cuda.get_device_name(self.device)
        return out


def init(device: str = "auto", timeline: bool = False) -> Comm:
    """Join the launcher's world (Horovod) when there is one, and pick this worker's device.
    ``timeline``: let the run start Horovod's timeline later (HOROVOD_TIMELINE=DYNAMIC, which Horovod
    reads at initialisation)."""
    keep_freed_memory()  # before the first large tensor (hpcnoise.heap)
    launcher, size = detect_launcher()
    hvd = None
    rank, local_rank = 0, 0
    if size > 1 or launcher == "horovodrun":
        try:
            import horovod.torch as hvd_mod
        except ImportError as e:
            raise RuntimeError(
                f"started by {launcher} with {size} processes, but Horovod is not importable ({e}); "
                "run jobs/install.sh or use a single process"
            ) from e
        if timeline:
            os.environ.setdefault("HOROVOD_TIMELINE", "DYNAMIC")
        hvd_mod.init()
        hvd = hvd_mod
        rank, size, local_rank = hvd.rank(), hvd.size(), hvd.local_rank()
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        torch.cuda.set_device(local_rank)  # one rank per GPU
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    return Comm(rank=rank, size=size, local_rank=local_rank, launcher=launcher, device=dev, hvd=hvd)
