"""Which launcher started this process (mpirun, mpiexec, srun, torchrun, or none), and where its ranks
meet: torch-free except the rendezvous store, so that every command line can ask for its rank cheaply.

- `mpirun -n N python -m runtime.run …` (Open MPI; MPICH's mpiexec; `srun --mpi=pmix`): rank and size
  from the MPI environment; rank 0 hosts the rendezvous store and tells the others where it is through
  mpi4py, as the seeds do (without mpi4py: MASTER_ADDR/MASTER_PORT, or on one node a port from the job id).
- `torchrun --nproc-per-node N -m runtime.run …`: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT.
"""
from __future__ import annotations

import os
import socket
import sys
import zlib
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from .errors import UserError


def seconds(name: str, default: float) -> float:
    raw = os.environ.get(name, "")
    try:
        value = float(raw) if raw else default
    except ValueError:
        value = 0
    if value <= 0:
        raise UserError(f"{name}={raw!r}: want a positive number of seconds (default {default:g})")
    return value


# ---- launchers ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Launcher:
    name: str
    rank: str  # environment variables that it sets in every rank
    size: str
    local_rank: str
    local_size: str
    line: str  # a launch line for n ranks of a module

    def command(self, n: int, module: str) -> str:
        return self.line.format(n=n, module=module)


LAUNCHERS = (  # the first whose rank and size variables are set wins
    Launcher("torchrun", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
             "torchrun --nproc-per-node {n} -m {module} …"),
    Launcher("mpirun", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK",
             "OMPI_COMM_WORLD_LOCAL_SIZE", "mpirun -n {n} python -m {module} …"),
    Launcher("mpiexec", "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS",
             "mpiexec -n {n} python -m {module} …"),
    Launcher("srun", "PMIX_RANK", "SLURM_STEP_NUM_TASKS", "SLURM_LOCALID", "SLURM_STEP_NUM_TASKS_PER_NODE",
             "srun -n {n} --mpi=pmix python -m {module} …"),
)
# Variables that make a process think a launcher started it: spawned workers do not inherit them.
LAUNCH_ENV = {v for ln in LAUNCHERS for v in (ln.rank, ln.size, ln.local_rank, ln.local_size)} | {
    "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RUN_ID"}


@dataclass(frozen=True)
class World:
    launcher: Launcher | None  # None: the driver and the workers it spawned
    rank: int
    size: int
    local_rank: int
    local_size: int


def detect_world() -> World | None:
    """The world that a launcher started this process in; None without a launcher."""
    env = os.environ
    for ln in LAUNCHERS:
        if ln.rank in env and ln.size in env:
            try:
                rank, size = int(env[ln.rank]), int(env[ln.size])
                local_rank = int(env.get(ln.local_rank, rank))
                local_size = int(env.get(ln.local_size, size))
            except ValueError:
                continue  # e.g. srun's "2(x3)" per-node counts: not a launcher we read
            return World(ln, rank, size, local_rank, local_size)
    return None


def launcher_rank() -> int:
    """This process's rank under a launcher (0 without one): the CLIs print only on rank 0."""
    world = detect_world()
    return world.rank if world else 0


def _main_module() -> str:
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return spec.name if spec is not None and spec.name else "runtime.run"


def check_world(engine_dir: Path, mapping: dict, world: World) -> None:
    n = mapping["tp"] * mapping["pp"]
    if world.size != n:
        module = _main_module()
        raise UserError(
            f"engine {engine_dir} is built for {n} ranks (tp={mapping['tp']} pp={mapping['pp']}) but "
            f"{world.launcher.name} started {world.size} processes; launch it with "
            f"`{world.launcher.command(n, module)}`, or with no launcher (`python -m {module} …` starts "
            f"its {n} ranks itself)")


# ---- rendezvous --------------------------------------------------------------------------------------
def _mpi_world():
    try:
        from mpi4py import MPI
    except Exception:  # not installed, or built for an MPI library that is not here
        return None
    return MPI.COMM_WORLD


def launcher_store(world: World, timeout: timedelta):
    """The TCPStore that every rank meets at: torchrun's, or one that rank 0 hosts for MPI launchers."""
    import torch.distributed as dist

    if world.launcher.name == "torchrun":  # (its agent's store outlives restarts: keys of this attempt only)
        store, _, _ = next(dist.rendezvous("env://", timeout=timeout))
        return dist.PrefixStore(f"attempt{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not (addr and port):
        comm = _mpi_world()
        if comm is not None:  # rank 0 binds a free port and broadcasts where it is (as the seeds do)
            store = None
            if world.rank == 0:
                store = dist.TCPStore("127.0.0.1", 0, world.size, True, timeout, wait_for_workers=False)
                here = "127.0.0.1" if world.local_size == world.size else socket.gethostname()
                where = comm.bcast((here, store.port), root=0)
            else:
                where = comm.bcast(None, root=0)
            return store or dist.TCPStore(where[0], where[1], world.size, False, timeout)
        job = next((os.environ[k] for k in ("PMIX_NAMESPACE", "OMPI_MCA_orte_hnp_uri", "PMI_KVSNAME")
                    if k in os.environ), None)
        if world.local_size != world.size or job is None:
            raise UserError(f"{world.launcher.name} started {world.size} ranks but they cannot agree on a "
                            "meeting point: install mpi4py (pip install 'engine-factory[mpi]') or set "
                            "MASTER_ADDR and MASTER_PORT")
        addr, port = "127.0.0.1", str(20000 + zlib.crc32(job.encode()) % 20000)  # one node, one port per job
    return dist.TCPStore(addr, int(port), world.size, world.rank == 0, timeout)
