"""`TorchDistTransport`: all-to-all through `torch.distributed` (NCCL on GPUs, Gloo on CPUs).

Timeouts. On Gloo every wait is the host's, so each is bounded by the transport's
`timeout_s` (`MoEConfig.timeout_s`) through `Work.wait(timeout)`, whatever timeout the
process group was made with (torch's default for Gloo is 30 minutes): a peer that stalls,
raises or dies becomes a `CommunicationError` naming what was waited for (stage, wave,
direction). On NCCL `Pending.wait()` only makes the caller's stream wait, and the host must
never wait for the device (it would serialise the pipeline and break CUDA graphs), so no
host-side timed wait is added: a hung collective is ended by NCCL's watchdog after the
group's own timeout (`ep.init_distributed(timeout_s=...)` passes one; a group made by hand
has torch's default).

Teardown after a failure. On Gloo each operation the transport issues carries the
transport's timeout too (`AllToAllOptions.timeout` and the like), so Gloo's own thread
gives up on it when the caller's wait does: nothing of the layer's stays pending behind a
`CommunicationError`, and `dist.destroy_process_group()` and the interpreter's exit return
(a pending Gloo operation of the group's 30-minute default would hold the exit that long).
On NCCL a `CommunicationError` aborts the group's communicators (`ProcessGroup.abort()`),
so collectives already queued on the device end and the group can be destroyed; the group
is unusable afterwards either way (make a new one, or end the job).
"""
from __future__ import annotations

import warnings
from datetime import timedelta
from typing import Dict, List, Optional, Sequence

import torch
import torch.distributed as dist

from ..dist import as_process_group
from .base import CommunicationError, Pending, Transport, copy_pending


def _options(kind, timeout: Optional[timedelta]):
    """Options of one asynchronous operation, with `timeout` (None: the group's own)."""
    opts = kind()
    opts.asyncOp = True
    if timeout is not None:
        opts.timeout = timeout
    return opts


class _WorkPending(Pending):
    def __init__(self, work: Optional[dist.Work], label: str, rank: int, timeout: Optional[timedelta],
                 on_failure=None) -> None:
        self._work, self._label, self._rank, self._timeout = work, label, rank, timeout
        self._on_failure = on_failure

    def wait(self) -> None:
        # NCCL: the current stream waits for the collective's stream; Gloo: the thread waits,
        # for at most the timeout.
        if self._work is not None:
            work, self._work = self._work, None
            try:
                if self._timeout is None:
                    work.wait()
                elif not work.wait(timeout=self._timeout):
                    raise TimeoutError(f"not done after {self._timeout.total_seconds():g} s")
            except Exception as e:  # noqa: BLE001 - re-raised with what this rank was doing
                if self._on_failure is not None:
                    self._on_failure()
                raise CommunicationError(
                    f"ep: rank {self._rank} failed waiting for {self._label}: {type(e).__name__}: {e}"
                ) from e


class TorchDistTransport(Transport):
    """`dist.all_to_all_single` over a process group, issued with `async_op=True`.

    On Gloo the collective runs on Gloo's own thread while the caller computes; on NCCL it
    runs on the process group's internal stream, ordered after the caller's current stream
    at the time of the call.
    """

    def __init__(self, group: Optional[dist.ProcessGroup] = None, timeout_s: Optional[float] = None) -> None:
        if not dist.is_initialized():
            raise RuntimeError(
                "TorchDistTransport needs torch.distributed initialised; call ep.init_distributed()"
            )
        group = as_process_group(group, "TorchDistTransport(group=...)")
        self.group = group if group is not None else dist.group.WORLD
        self.rank = dist.get_rank(self.group)
        self.world_size = dist.get_world_size(self.group)
        self.backend = dist.get_backend(self.group)
        # where this group's tensors must live (NCCL: the current GPU)
        self.device = torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else torch.device("cpu")
        # host waits are bounded on Gloo only (see the module's docstring); exchanges between
        # the hosts (`host_exchange`, over Gloo whatever the backend) always are
        self.host_timeout = timedelta(seconds=timeout_s) if timeout_s is not None else None
        self.timeout = self.host_timeout if self.backend == "gloo" else None
        self._aborted = False

    def all_to_all(self, out, inp, out_splits: Sequence[int], in_splits: Sequence[int], label: str = "all-to-all",
                   rows_bound: Optional[int] = None,
                   sent_rows: Optional[torch.Tensor] = None) -> Pending:
        if self.world_size == 1:
            return copy_pending(out, inp)
        try:
            if self.backend == "gloo":  # bounded on Gloo's own thread too (the module's docstring)
                work = self.group.alltoall_base(out, inp, list(out_splits), list(in_splits),
                                               _options(dist.AllToAllOptions, self.timeout))
            else:
                work = dist.all_to_all_single(
                    out, inp, list(out_splits), list(in_splits), group=self.group, async_op=True
                )
        except Exception as e:  # noqa: BLE001 - a peer may already be gone
            self.abort()
            raise CommunicationError(f"ep: rank {self.rank} failed starting {label}: {type(e).__name__}: {e}") from e
        return _WorkPending(work, label, self.rank, self.timeout, self.abort)

    def host_exchange(self, values: Sequence[int], label: str = "host exchange") -> List[List[int]]:
        mine = torch.tensor(list(values), dtype=torch.int64)
        if self.world_size == 1:
            return [mine.tolist()]
        group = self.group if self.backend == "gloo" else host_group(self.group)
        out = [torch.empty_like(mine) for _ in range(self.world_size)]
        try:  # a Gloo group either way: bounded on Gloo's thread too
            work = group.allgather([out], [mine], _options(dist.distributed_c10d.AllgatherOptions, self.host_timeout))
        except Exception as e:  # noqa: BLE001 - a peer may already be gone
            self.abort()
            raise CommunicationError(f"ep: rank {self.rank} failed starting {label}: {type(e).__name__}: {e}") from e
        _WorkPending(work, label, self.rank, self.host_timeout, self.abort).wait()
        return [t.tolist() for t in out]

    def broadcast_(self, tensor: torch.Tensor, src: int = 0, label: str = "broadcast") -> None:
        if self.world_size > 1:
            buf = tensor.to(self.device)
            try:
                if self.backend == "gloo":
                    opts = _options(dist.BroadcastOptions, self.timeout)
                    opts.rootRank, opts.rootTensor = src, 0  # the group's rank
                    work = self.group.broadcast([buf], opts)
                else:
                    work = dist.broadcast(buf, src=dist.get_global_rank(self.group, src), group=self.group,
                                          async_op=True)
            except Exception as e:  # noqa: BLE001 - a peer may already be gone
                self.abort()
                raise CommunicationError(f"ep: rank {self.rank} failed starting {label}: {type(e).__name__}: {e}") from e
            _WorkPending(work, label, self.rank, self.timeout, self.abort).wait()
            tensor.copy_(buf)

    def abort(self) -> None:
        """After a failure: end what the group still has in flight, so that the rank can tear
        down. On NCCL: the group's communicators are aborted (`ProcessGroup.abort()`; its
        collectives queued on the device end, the group is unusable from now on). On Gloo
        nothing is left to end: every operation of the transport is bounded by its timeout
        (the module's docstring)."""
        if self.backend != "gloo" and not self._aborted:
            self._aborted = True
            try:
                self.group.abort()
            except Exception as e:  # noqa: BLE001 - the failure being raised matters more than this one
                warnings.warn(f"ep: rank {self.rank} could not abort its process group after a failure: "
                              f"{type(e).__name__}: {e}", RuntimeWarning, stacklevel=2)


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

    def all_to_all(self, out, inp, out_splits, in_splits, label: str = "all-to-all",
                   rows_bound: Optional[int] = None,
                   sent_rows: Optional[torch.Tensor] = None) -> Pending:
        return copy_pending(out, inp)

    def exchange(self, inp: torch.Tensor, label: str = "exchange") -> torch.Tensor:
        return inp.clone()

    def host_exchange(self, values, label: str = "host exchange"):
        return [list(values)]

    def broadcast_(self, tensor: torch.Tensor, src: int = 0, label: str = "broadcast") -> None:
        return None
