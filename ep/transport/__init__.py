"""How bytes move between ranks: an async all-to-all interface and its implementations."""
from __future__ import annotations

from typing import Optional

import torch.distributed as dist

from ..config import TRANSPORTS
from ..dist import as_process_group
from .base import CommunicationError, Done, Pending, Transport
from .torch_dist import LocalTransport, TorchDistTransport


_SHARED: dict = {}  # (kind, group name) -> its transport with buffers, shared by every layer on the group


def make_transport(
    group: Optional[dist.ProcessGroup] = None, kind: str = "nccl", timeout_s: Optional[float] = None
) -> Transport:
    """The transport for `group` (the default group when None; a 1-D `DeviceMesh` stands for
    its group, e.g. `mesh["ep"]`).

    kind "nccl": `torch.distributed`'s all-to-all (NCCL on GPUs, Gloo on CPUs); "copy_engine":
    peer copies into symmetric memory (CUDA ranks of one host; `CopyEngineTransport`);
    "device_put": Triton kernels storing into the peers' symmetric memory (CUDA ranks of one
    host; `ep.transport.device_put`). The last two are one per process group, kind and
    process, shared by every layer on the group: its buffers are
    sized for the largest layer once, not once per layer (a model's layers run one after
    another on the transport's stream, and every rank makes the same calls in the same order).
    With torch.distributed not initialised and no group given: a one-process world.
    `timeout_s` bounds every host wait on a Gloo group (`TorchDistTransport`).
    """
    if kind not in TRANSPORTS:
        raise ValueError(f"transport must be one of {TRANSPORTS}, got {kind!r}")
    group = as_process_group(group, "make_transport(group=...)")
    if group is None and not dist.is_initialized():
        return LocalTransport()
    if kind in ("copy_engine", "device_put"):
        key = (kind, (group if group is not None else dist.group.WORLD).group_name)
        if key not in _SHARED:
            if kind == "copy_engine":
                from .copy_engine import CopyEngineTransport

                _SHARED[key] = CopyEngineTransport(group, timeout_s)
            else:
                from .device_put import DevicePutTransport

                _SHARED[key] = DevicePutTransport.for_group(group, timeout_s)
        return _SHARED[key]
    return TorchDistTransport(group, timeout_s)


__all__ = ["CommunicationError", "Done", "Pending", "Transport", "TorchDistTransport", "LocalTransport", "make_transport"]
