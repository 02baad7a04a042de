"""`init_distributed()`: one process group, however the job was launched.

Launchers, in the order they are recognised:
- torchrun (and `ep.launch`): RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT;
- mpirun (Open MPI's OMPI_COMM_WORLD_*, MPICH/PMI's PMI_*): mpi4py gives the rank, the
  size and the local rank; rank 0 picks a free port and broadcasts it;
- Slurm's srun: SLURM_PROCID, SLURM_LOCALID, SLURM_NTASKS, the first host of
  SLURM_JOB_NODELIST (port: MASTER_PORT, else derived from SLURM_JOB_ID);
- none of these: a single process (no group).

Where the runtime makes the rendezvous itself (every case but torchrun's own agent store),
rank 0 listens on one socket that it binds to the rendezvous address: 127.0.0.1 when all
ranks share one host, else the address the launch names (MASTER_ADDR / EP_MASTER_ADDR,
or rank 0's host). On one host, Gloo and NCCL are pointed at the loopback interface too
(unless GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME are set).
"""
from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Mapping, Optional

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class LaunchInfo:
    """Where this process stands in the job, as the launcher said."""

    launcher: str  # "torchrun", "mpi", "slurm" or "single"
    rank: int
    world_size: int
    local_rank: int
    single_host: bool
    master_addr: Optional[str]
    master_port: Optional[int]


def _int(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise RuntimeError(f"init_distributed: {name}={env[name]!r} is not an integer") from None


def first_host(nodelist: str) -> str:
    """The first host of a Slurm node list: `gpu[03-05,9],login1` -> `gpu03`."""
    m = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist.strip())
    if not m:
        raise RuntimeError(f"init_distributed: cannot read the Slurm node list {nodelist!r}")
    prefix, _, ranges = m.groups()
    if ranges is None:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


def detect_launch(env: Mapping[str, str] = os.environ) -> LaunchInfo:
    """Read the launcher's variables (no side effects; MPI is asked through mpi4py)."""
    if "RANK" in env or "WORLD_SIZE" in env:
        missing = [v for v in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if v not in env]
        if missing:
            raise RuntimeError(
                f"init_distributed: torchrun-style environment is inconsistent: {missing} not set "
                f"(set by torchrun; set all of RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT by hand)"
            )
        rank, world = _int(env, "RANK"), _int(env, "WORLD_SIZE")
        local = _int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else 0
        local_world = _int(env, "LOCAL_WORLD_SIZE") if "LOCAL_WORLD_SIZE" in env else None
        info = LaunchInfo("torchrun", rank, world, local, local_world == world,
                          env["MASTER_ADDR"], _int(env, "MASTER_PORT"))
    elif any(v in env for v in ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK")):
        try:
            from mpi4py import MPI
        except ImportError:
            raise RuntimeError("init_distributed: launched by mpirun, but mpi4py is not installed") from None
        comm = MPI.COMM_WORLD
        local = comm.Split_type(MPI.COMM_TYPE_SHARED).Get_rank()
        hosts = comm.allgather(socket.gethostname())
        addr = env.get("EP_MASTER_ADDR") or env.get("MASTER_ADDR")
        single = len(set(hosts)) == 1
        if addr is None:
            addr = "127.0.0.1" if single else comm.bcast(socket.gethostbyname(hosts[0]) if comm.Get_rank() == 0 else None)
        port = _int(env, "MASTER_PORT") if "MASTER_PORT" in env else None
        info = LaunchInfo("mpi", comm.Get_rank(), comm.Get_size(), local, single, addr, port)
    elif "SLURM_PROCID" in env:
        missing = [v for v in ("SLURM_NTASKS", "SLURM_LOCALID") if v not in env]
        nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        if missing or not nodelist:
            raise RuntimeError(f"init_distributed: Slurm environment is inconsistent: {missing or ['SLURM_JOB_NODELIST']} not set")
        single = _int(env, "SLURM_NNODES") == 1 if "SLURM_NNODES" in env else "," not in nodelist and "[" not in nodelist
        addr = env.get("EP_MASTER_ADDR") or env.get("MASTER_ADDR") or ("127.0.0.1" if single else first_host(nodelist))
        if "MASTER_PORT" in env:
            port = _int(env, "MASTER_PORT")
        else:
            port = 20000 + _int(env, "SLURM_JOB_ID") % 20000 if "SLURM_JOB_ID" in env else 29500
        info = LaunchInfo("slurm", _int(env, "SLURM_PROCID"), _int(env, "SLURM_NTASKS"),
                          _int(env, "SLURM_LOCALID"), single, addr, port)
    else:
        return LaunchInfo("single", 0, 1, 0, True, None, None)
    if not 0 <= info.rank < info.world_size:
        raise RuntimeError(f"init_distributed: rank {info.rank} is not in [0, world size {info.world_size})")
    return info


def _bound_listener(addr: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    host = addr if addr.replace(".", "").isdigit() or ":" in addr else socket.gethostbyname(addr)
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(1024)
    return sock


def _rendezvous(info: LaunchInfo, timeout: timedelta) -> dist.Store:
    """A TCPStore whose server (rank 0) listens only on the rendezvous address."""
    port = info.master_port
    listener = None
    if info.rank == 0:
        listener = _bound_listener(info.master_addr, port or 0)
        port = listener.getsockname()[1]
    if info.launcher == "mpi" and info.master_port is None:
        from mpi4py import MPI

        port = MPI.COMM_WORLD.bcast(port)
    if listener is not None:
        # detach: the store owns the descriptor from now on (Python must not close it)
        return dist.TCPStore(info.master_addr, port, info.world_size, True, timeout,
                             master_listen_fd=listener.detach(), wait_for_workers=False)
    return dist.TCPStore(info.master_addr, port, info.world_size, False, timeout)


def init_distributed(
    backend: Optional[str] = None, timeout_s: float = 300.0
) -> Optional[dist.ProcessGroup]:
    """Start torch.distributed from the launcher's environment, or run as a single process.

    Args:
        backend: "nccl" or "gloo"; default EP_BACKEND, else NCCL when CUDA is available
            and Gloo otherwise. With NCCL the process binds to GPU LOCAL_RANK.
        timeout_s: the group's timeout: a collective that waits longer fails (and the
            layer's error names what it was waiting for).
    Returns:
        The default process group, or None for a single process (the layer then runs as
        a one-rank world).
    Raises:
        RuntimeError: when the launcher's variables are inconsistent.
    """
    if dist.is_initialized():
        return dist.group.WORLD
    info = detect_launch()
    if info.launcher == "single":
        return None
    backend = backend or os.environ.get("EP_BACKEND") or ("nccl" if torch.cuda.is_available() else "gloo")
    if info.single_host:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        os.environ.setdefault("NCCL_SOCKET_IFNAME", "lo")
    kwargs = {}
    if backend == "nccl":
        device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
        kwargs["device_id"] = device
    timeout = timedelta(seconds=timeout_s)
    if info.launcher == "torchrun" and "TORCHELASTIC_RUN_ID" in os.environ:
        # torchrun's agent hosts the store: connect to it, open no port of our own
        dist.init_process_group(backend, init_method="env://", rank=info.rank, world_size=info.world_size,
                                timeout=timeout, **kwargs)
    else:
        store = _rendezvous(info, timeout)
        dist.init_process_group(backend, store=store, rank=info.rank, world_size=info.world_size,
                                timeout=timeout, **kwargs)
    return dist.group.WORLD


def as_process_group(group, arg: str = "group") -> Optional[dist.ProcessGroup]:
    """`group` as a process group: a 1-D `DeviceMesh` (e.g. `mesh["ep"]` of a 2-D mesh) gives
    its group; None and process groups are returned as they are.

    Args:
        group: None, a `ProcessGroup`, or a one-dimensional `DeviceMesh`.
        arg: how the caller's argument is called, for the error.
    Raises:
        ValueError: for a `DeviceMesh` of more than one dimension (naming `arg`).
    """
    if group is None or isinstance(group, dist.ProcessGroup):
        return group
    from torch.distributed.device_mesh import DeviceMesh

    if isinstance(group, DeviceMesh):
        if group.ndim != 1:
            names = f" {group.mesh_dim_names}" if group.mesh_dim_names else ""
            raise ValueError(
                f"{arg}: a DeviceMesh given as the expert-parallel group must have one dimension, got one of "
                f"{group.ndim} dimensions{names} (shape {tuple(group.shape)}): pass the expert-parallel "
                f"dimension, e.g. mesh['ep']")
        return group.get_group()
    return group
