"""`init_distributed()`: one process group from the launcher's environment."""
from __future__ import annotations

import os
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist


def init_distributed(backend: Optional[str] = None, timeout_s: float = 300.0) -> Optional[dist.ProcessGroup]:
    """Start torch.distributed from torchrun's variables, or run as a single process.

    Reads RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT (as torchrun sets
    them). Picks NCCL when CUDA is available and Gloo otherwise (`backend` overrides) and,
    with NCCL, binds the process to GPU LOCAL_RANK. With none of these variables set it
    starts nothing and returns None: the layer then runs as a one-process world.

    Returns:
        The default process group, or None for a single process.
    """
    if dist.is_initialized():
        return dist.group.WORLD
    env = os.environ
    if "WORLD_SIZE" not in env and "RANK" not in env:
        return None
    missing = [v for v in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if v not in env]
    if missing:
        raise RuntimeError(f"init_distributed: environment is inconsistent, missing {missing}")
    rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
    if not 0 <= rank < world:
        raise RuntimeError(f"init_distributed: RANK={rank} is not in [0, WORLD_SIZE={world})")
    local_rank = int(env.get("LOCAL_RANK", "0"))
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    kwargs = {}
    if backend == "nccl":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        kwargs["device_id"] = device
    dist.init_process_group(
        backend, rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s), **kwargs
    )
    return dist.group.WORLD
