"""`TorchDistTransport`: all-to-all through `torch.distributed` (NCCL on GPUs, Gloo on CPUs)."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.distributed as dist

from .base import Done, Pending, Transport


class _WorkPending(Pending):
    def __init__(self, work: Optional[dist.Work]) -> None:
        self._work = work

    def wait(self) -> None:
        # NCCL: the current stream waits for the collective's stream; Gloo: the thread waits.
        if self._work is not None:
            self._work.wait()
            self._work = None


class TorchDistTransport(Transport):
    """`dist.all_to_all_single` over a process group, issued with `async_op=True`.

    On Gloo the collective runs on Gloo's own thread while the caller computes; on NCCL it
    runs on the process group's internal stream, ordered after the caller's current stream
    at the time of the call.
    """

    def __init__(self, group: Optional[dist.ProcessGroup] = None) -> None:
        if not dist.is_initialized():
            raise RuntimeError(
                "TorchDistTransport needs torch.distributed initialised; call ep.init_distributed()"
            )
        self.group = group if group is not None else dist.group.WORLD
        self.rank = dist.get_rank(self.group)
        self.world_size = dist.get_world_size(self.group)
        self.backend = dist.get_backend(self.group)

    def all_to_all(self, out, inp, out_splits: Sequence[int], in_splits: Sequence[int]) -> Pending:
        if self.world_size == 1:
            out.copy_(inp)
            return Done()
        work = dist.all_to_all_single(
            out, inp, list(out_splits), list(in_splits), group=self.group, async_op=True
        )
        return _WorkPending(work)

    def broadcast_(self, tensor: torch.Tensor, src: int = 0) -> None:
        if self.world_size > 1:
            dist.broadcast(tensor, src=dist.get_global_rank(self.group, src), group=self.group)


class LocalTransport(Transport):
    """A world of one process, with no process group: every all-to-all is a copy."""

    rank = 0
    world_size = 1

    def all_to_all(self, out, inp, out_splits, in_splits) -> Pending:
        out.copy_(inp)
        return Done()

    def broadcast_(self, tensor: torch.Tensor, src: int = 0) -> None:
        return None
