"""How bytes move between ranks: an async all-to-all interface and its implementations."""
from __future__ import annotations

from typing import Optional

import torch.distributed as dist

from .base import CommunicationError, Done, Pending, Transport
from .torch_dist import LocalTransport, TorchDistTransport


def make_transport(group: Optional[dist.ProcessGroup] = None) -> Transport:
    """The transport for `group` (the default group when None).

    With torch.distributed not initialised and no group given: a one-process world.
    """
    if group is None and not dist.is_initialized():
        return LocalTransport()
    return TorchDistTransport(group)


__all__ = ["CommunicationError", "Done", "Pending", "Transport", "TorchDistTransport", "LocalTransport", "make_transport"]
