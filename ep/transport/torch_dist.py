"""`TorchDistTransport`: all-to-all through `torch.distributed` (NCCL on GPUs, Gloo on CPUs)."""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch
import torch.distributed as dist

from .base import CommunicationError, Done, Pending, Transport


class _WorkPending(Pending):
    def __init__(self, work: Optional[dist.Work], label: str, rank: int) -> None:
        self._work, self._label, self._rank = work, label, rank

    def wait(self) -> None:
        # NCCL: the current stream waits for the collective's stream; Gloo: the thread waits.
        if self._work is not None:
            work, self._work = self._work, None
            try:
                work.wait()
            except Exception as e:  # noqa: BLE001 - re-raised with what this rank was doing
                raise CommunicationError(
                    f"ep: rank {self._rank} failed waiting for {self._label}: {type(e).__name__}: {e}"
                ) from e


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
        # where this group's tensors must live (NCCL: the current GPU)
        self.device = torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else torch.device("cpu")

    def all_to_all(self, out, inp, out_splits: Sequence[int], in_splits: Sequence[int], label: str = "all-to-all") -> Pending:
        if self.world_size == 1:
            out.copy_(inp)
            return Done()
        try:
            work = dist.all_to_all_single(
                out, inp, list(out_splits), list(in_splits), group=self.group, async_op=True
            )
        except Exception as e:  # noqa: BLE001 - a peer may already be gone
            raise CommunicationError(f"ep: rank {self.rank} failed starting {label}: {type(e).__name__}: {e}") from e
        return _WorkPending(work, label, self.rank)

    def host_exchange(self, values: Sequence[int], label: str = "host exchange") -> List[List[int]]:
        mine = torch.tensor(list(values), dtype=torch.int64)
        if self.world_size == 1:
            return [mine.tolist()]
        group = self.group if self.backend == "gloo" else host_group(self.group)
        out = [torch.empty_like(mine) for _ in range(self.world_size)]
        try:
            work = dist.all_gather(out, mine, group=group, async_op=True)
        except Exception as e:  # noqa: BLE001 - a peer may already be gone
            raise CommunicationError(f"ep: rank {self.rank} failed starting {label}: {type(e).__name__}: {e}") from e
        _WorkPending(work, label, self.rank).wait()
        return [t.tolist() for t in out]

    def broadcast_(self, tensor: torch.Tensor, src: int = 0) -> None:
        if self.world_size > 1:
            buf = tensor.to(self.device)
            dist.broadcast(buf, src=dist.get_global_rank(self.group, src), group=self.group)
            tensor.copy_(buf)


_HOST_GROUPS: Dict[str, dist.ProcessGroup] = {}  # group name -> a Gloo group of the same ranks


def host_group(group: dist.ProcessGroup) -> dist.ProcessGroup:
    """A Gloo group over `group`'s ranks, for exchanges between the hosts that must not go
    through the GPUs. Made at the first use (every rank of `group` reaches it at the same
    call; only they take part) and kept for the process: a named cache."""
    name = group.group_name
    if name not in _HOST_GROUPS:
        ranks = dist.get_process_group_ranks(group)
        _HOST_GROUPS[name] = dist.new_group(ranks=ranks, backend="gloo", use_local_synchronization=True)
    return _HOST_GROUPS[name]


class LocalTransport(Transport):
    """A world of one process, with no process group: every all-to-all is a copy, made where
    its tensors are (CPU, CUDA, any device): there is no peer whose device could differ."""

    rank = 0
    world_size = 1
    device = torch.device("cpu")
    """Where host-made tensors may go; exchanges keep their input's device."""

    def all_to_all(self, out, inp, out_splits, in_splits, label: str = "all-to-all") -> Pending:
        out.copy_(inp)
        return Done()

    def exchange(self, inp: torch.Tensor, label: str = "exchange") -> torch.Tensor:
        return inp.clone()

    def host_exchange(self, values, label: str = "host exchange"):
        return [list(values)]

    def broadcast_(self, tensor: torch.Tensor, src: int = 0) -> None:
        return None
