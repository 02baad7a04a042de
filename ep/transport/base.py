"""The one small async interface through which bytes move between ranks.

Only transports talk to other ranks. Every operation may start after the work already
queued on the caller's current stream and returns a `Pending`; `Pending.wait()` makes the
caller's current stream (on CUDA) or the calling thread (on CPU) wait for the result.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import List, Optional, Sequence

import torch


class CommunicationError(RuntimeError):
    """A transfer between ranks failed (a peer died or raised, or the group timed out).

    The message names the operation (stage, wave, direction) this rank was waiting for.
    """


class Pending(ABC):
    """An operation in flight.

    `arrived_rows`: for an all-to-all whose transport sent only the caller's `sent_rows`, an
    `[n]` int64 device tensor: the rows of each peer's split that carried data (written by
    the time `wait()` returns, in stream order; the rest of the split holds all-ones bytes);
    None when every row of every split arrived as it was sent.
    """

    arrived_rows: Optional[torch.Tensor] = None

    @abstractmethod
    def wait(self) -> None:
        """Block the current stream (CUDA) or thread (CPU) until the operation landed.

        Raises:
            CommunicationError: naming the operation, when it cannot complete.
        """


class Done(Pending):
    """An operation that finished when it was issued."""

    def wait(self) -> None:
        return None


class EventPending(Pending):
    """Work queued on a CUDA stream up to `event`: waiting makes the caller's current stream wait for it."""

    def __init__(self, event: torch.cuda.Event) -> None:
        self._event = event

    def wait(self) -> None:
        torch.cuda.current_stream().wait_event(self._event)


def copy_pending(out: torch.Tensor, inp: torch.Tensor) -> Pending:
    """A world of one's all-to-all: the copy, queued on the current stream. On CUDA the
    caller may have issued it from a side stream (`ep.pipeline.issue_after`), so waiting
    joins that stream into the waiter's; elsewhere it is done."""
    out.copy_(inp)
    if not out.is_cuda:
        return Done()
    event = torch.cuda.Event()
    event.record()
    return EventPending(event)


class Transport(ABC):
    """Moves rows between the ranks of one group.

    `rank` and `world_size` are this process's place in the group.
    """

    rank: int
    world_size: int
    device: torch.device
    """Where host-made tensors for this transport's collectives must be placed."""

    @abstractmethod
    def all_to_all(
        self,
        out: torch.Tensor,
        inp: torch.Tensor,
        out_splits: Sequence[int],
        in_splits: Sequence[int],
        label: str = "all-to-all",
        rows_bound: Optional[int] = None,
        sent_rows: Optional[torch.Tensor] = None,
    ) -> Pending:
        """Start an all-to-all of rows.

        Args:
            out: `[sum(out_splits), ...]`, written when the returned `Pending` is waited on.
            inp: `[sum(in_splits), ...]`, rows for rank 0 first, then rank 1, ...; must stay
                unchanged until the operation landed.
            out_splits: rows received from each rank, host ints, length `world_size`.
            in_splits: rows sent to each rank, host ints, length `world_size`.
            label: what this transfer is (e.g. "dispatch, wave 2, forward"), for errors.
            rows_bound: optional, the same on every rank: no rank sends or receives more
                rows than this for one peer in this call (transports that place a call's
                rows in fixed buffers size the call from it; others ignore it).
            sent_rows: optional `[world_size]` int64 device tensor: only the first
                `sent_rows[p]` rows of the split for rank p carry data, the rest is padding.
                A transport may leave the padding out (then the receiver finds all-ones bytes
                there, and `Pending.arrived_rows` says how many rows arrived); one that sends
                everything ignores it. Either way the rows that carry data arrive as sent.
        """

    def exchange(self, inp: torch.Tensor, label: str = "exchange") -> torch.Tensor:
        """Blocking all-to-all of equal blocks: `inp[r]` goes to rank r, `out[s]` came from s.

        Args:
            inp: `[world_size, ...]`.
        Returns:
            `[world_size, ...]`, same dtype and device.
        """
        inp = inp.to(self.device) if inp.device.type != self.device.type else inp
        out = torch.empty_like(inp)
        ones = [1] * self.world_size
        self.all_to_all(out, inp.contiguous(), ones, ones, label).wait()
        return out

    @abstractmethod
    def host_exchange(self, values: Sequence[int], label: str = "host exchange") -> List[List[int]]:
        """Blocking all-gather of a few host ints between the ranks' hosts, never through the
        device: the caller's host does not wait for its GPU.

        Returns:
            `[world_size][len(values)]`: every rank's values, in rank order.
        """

    def reserve(self, rows_per_peer: int) -> None:
        """Collective hint: no all-to-all from now on sends or receives more than
        `rows_per_peer` rows for one peer (every rank passes the same value). Transports
        with preallocated buffers size them from it; others ignore it."""

    def raise_errors(self) -> None:
        """Raise `CommunicationError` for a failure the device recorded during earlier calls
        (transports whose waits run on the device); the others fail in the call itself."""

    @abstractmethod
    def broadcast_(self, tensor: torch.Tensor, src: int = 0, label: str = "broadcast") -> None:
        """Blocking, in place: every rank ends with `src`'s values (`label`: what it is, for errors)."""
