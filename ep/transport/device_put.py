"""`DevicePutTransport`: all-to-all by Triton kernels that store rows into peers' memory.

Every rank owns one *arena*, a torch symmetric-memory buffer that every rank of the host
maps (`ArenaLayout` says where its parts lie): counters, then a data region used as a ring
of equal chunks, each with its own counters. Each call takes the next whole chunks of the
ring (the same on every rank: its size is the group-wide bound of rows per peer times the
row's bytes, plus a 16-byte header, times n). On the sender, one kernel with `programs`
programs (a few SMs) copies each peer's rows into place (`call place + me x per_src`, after
the header that says how many bytes follow) in that peer's arena and raises the peer's ready
counter; `Pending.wait()` launches, on the caller's stream, the receiving kernel, which waits
for every peer's count, copies the rows out into `out` and raises the peer's freed counters.
Given `sent_rows` (device counts: the token waves' rows in use per region), only those rows
travel; the receiver fills the rest of each split with all-ones bytes (the rows' padding) and
writes the rows that arrived into `Pending.arrived_rows`, which the layer passes back as the
combine's `sent_rows`: the fixed regions cost memory, not bandwidth. A sender waits until the peer has read out every earlier
use of the chunks it is about to overwrite, whichever calls (eager or replayed) those were
(the ring holds `ring_calls` of the largest call, a whole token-wave forward at the default
2, so in a layer's own calls it rarely waits).
`ep.kernels.triton_p2p` has the kernels and the protocol.

Why: NCCL's and the copy engines' transfers are ordered and paced by the host (a stream
per peer, a barrier per call); these are two kernel launches per call, no host-side sizes
beyond the call's splits, every wait on the device, and graph-capturable: counters only
grow and each program counts its own uses, so replays expect the right values.

Timeouts: every device-side wait ends after `timeout_s` (the layer's `MoEConfig.timeout_s`)
with an error record in host-mapped memory: `raise_errors()` (called by the layer at its
next call, and by `check_errors()`) raises a `CommunicationError` naming the call (stage,
wave), the peer and what it waited for. After one, the counters disagree between the
ranks: treat the group as broken.

Intranode only (all ranks on one host, CUDA peer access). Small blocking exchanges and
broadcasts go through the host transport (NCCL), and so do all-to-alls made with no
group-wide bound of rows per peer (`rows_bound`; the layer's calls all pass one). Every
`Pending` it returns must be waited on (the wait is the receiving half). `ProcessMesh` puts every rank in one
process (the tests on the CPU, in Triton's interpreter, and the one-GPU check).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from .base import CommunicationError, Pending, Transport, copy_pending

PROGRAMS = int(os.environ.get("EP_PUT_PROGRAMS", "16"))
"""Programs (SMs) of each sending and each receiving kernel: leave them free with `MoEConfig.sm_carveout`."""
BLOCK_BYTES = int(os.environ.get("EP_PUT_BLOCK_BYTES", "32768"))
"""Bytes one program moves per step (32 KB: 8 16-byte accesses in flight per thread of 8 warps)."""


@dataclass(frozen=True)
class ArenaLayout:
    """Where each part of a rank's arena lies, in order (int64 words, then bytes):

        [ ready: chunks x n | freed: chunks x n | groups: n | uses of put: chunks x programs |
          uses of take: chunks x programs | pad to 128 B | data: chunks x chunk_bytes ]

    The data region is a ring of `chunks` equal chunks; a call covers whole chunks.
    ready[c, s]: put programs of rank s that finished their stores into chunk c of this
    arena; freed[c, r]: take programs of rank r that finished reading what this rank put
    into chunk c of r's arena (both summed over every call that covered c). Only these two
    are written by peers. groups: every rank's arena address in 16-byte groups; uses: each
    program's uses of each chunk (`ep.kernels.triton_p2p`). Everything the transport keeps
    on the device lies here, in memory the mesh allocates: nothing of it is made inside a
    caller's allocation pool (cudagraph trees' warm-up, say), where it would not outlive
    the graph.
    """

    world_size: int
    chunks: int
    chunk_bytes: int
    programs: int

    @property
    def ready_at(self) -> int:
        """int64 words from the arena's start."""
        return 0

    @property
    def freed_at(self) -> int:
        return self.chunks * self.world_size

    @property
    def groups_at(self) -> int:
        return 2 * self.chunks * self.world_size

    @property
    def uses_put_at(self) -> int:
        return self.groups_at + self.world_size

    @property
    def uses_take_at(self) -> int:
        return self.uses_put_at + self.chunks * self.programs

    @property
    def data_at(self) -> int:
        """Bytes from the arena's start (128-byte aligned)."""
        return -(-(self.uses_take_at + self.chunks * self.programs) * 8 // 128) * 128

    @property
    def data_bytes(self) -> int:
        return self.chunks * self.chunk_bytes

    @property
    def total_bytes(self) -> int:
        return self.data_at + self.data_bytes


class Ring:
    """The calls' places in the data region, chosen on the host, the same on every rank:
    each call takes the next whole chunks after the last call's, from the start again when
    they do not fit. `place(nbytes)` returns (byte offset, first chunk, chunks)."""

    def __init__(self, chunks: int, chunk_bytes: int) -> None:
        self.chunks, self.chunk_bytes = chunks, chunk_bytes
        self._next = 0

    def place(self, nbytes: int) -> Tuple[int, int, int]:
        count = max(1, -(-nbytes // self.chunk_bytes))
        if count > self.chunks:
            raise ValueError(f"a call of {nbytes} bytes does not fit a ring of {self.chunks} x {self.chunk_bytes}")
        first = 0 if self._next + count > self.chunks else self._next
        self._next = first + count
        return first * self.chunk_bytes, first, count


class ProcessMesh:
    """Every rank's arena in this process (tests, and the one-GPU check), the ranks driven by
    one thread, each on its own stream: rank r's arena is a plain tensor; all are made at the
    first rank's request (every rank grows at the same call).

    Not for ranks that are threads: in one CUDA context an allocation waits for every kernel
    in flight, so one rank's first allocation would wait for another's receiving kernel,
    which waits for the first (`benchmarks/p2p_check.py`, r22-r23)."""

    def __init__(self, world_size: int, device) -> None:
        self.world_size, self.device = world_size, torch.device(device)
        self._arenas: List[torch.Tensor] = []

    def allocate(self, rank: int, nbytes: int) -> Tuple[torch.Tensor, List[int]]:
        if not self._arenas or self._arenas[0].numel() < nbytes:
            if self._arenas and self.device.type == "cuda":
                torch.cuda.synchronize(self.device)  # nothing may still use the old arenas
            self._arenas = [torch.zeros(nbytes, dtype=torch.uint8, device=self.device) for _ in range(self.world_size)]
            if self.device.type == "cuda":  # zeroed before another rank's stream writes into them
                torch.cuda.synchronize(self.device)
        return self._arenas[rank], [a.data_ptr() for a in self._arenas]


class SymmetricMesh:
    """The ranks' arenas in torch symmetric memory (CUDA ranks of one host, CUDA backend)."""

    def __init__(self, group: dist.ProcessGroup, device: torch.device) -> None:
        import torch.distributed._symmetric_memory as symm_mem

        self._symm, self._group_name, self.device = symm_mem, group.group_name, device
        self._keep = None  # the arena and its handle (alive while peers may write)

    def allocate(self, rank: int, nbytes: int) -> Tuple[torch.Tensor, List[int]]:
        """Collective: a zeroed arena on every rank, mapped by every rank. First waits for this
        rank's device: nothing may still use the old arena (every rank's earlier calls were
        issued before any rank reached this call, so their kernels finish)."""
        torch.cuda.synchronize(self.device)
        try:
            buf = self._symm.empty(nbytes, dtype=torch.uint8, device=self.device)
            hdl = self._symm.rendezvous(buf, self._group_name)
            buf.zero_()
            hdl.barrier(channel=0)  # every rank's arena is zeroed before anyone writes into it
            torch.cuda.synchronize(self.device)
        except Exception as e:  # noqa: BLE001 - say what failed and what to use instead
            raise CommunicationError(
                f"ep: rank {rank}: symmetric memory for the device-put transport failed ({type(e).__name__}: {e}); "
                "it needs all ranks on one host with peer access; use MoEConfig(transport='nccl')"
            ) from e
        self._keep = (buf, hdl)
        return buf, [int(p) for p in hdl.buffer_ptrs]


class _TakePending(Pending):
    """Waiting launches the receiving kernel on the caller's stream (once)."""

    def __init__(self, take, put_done: Optional[torch.cuda.Event], arrived_rows: Optional[torch.Tensor]) -> None:
        self._take, self._put_done, self.arrived_rows = take, put_done, arrived_rows

    def wait(self) -> None:
        if self._take is None:
            return
        if self._put_done is not None:  # this rank's own rows (and its reads of inp) are done too
            torch.cuda.current_stream().wait_event(self._put_done)
        take, self._take = self._take, None
        take()


class DevicePutTransport(Transport):
    """All-to-all by device-initiated stores into peers' arenas (see the module docstring).

    Args:
        rank, world_size: this process's place among the ranks of `mesh`.
        mesh: makes the arenas (`SymmetricMesh`, or `ProcessMesh` for ranks of one process).
        host: the transport for blocking exchanges and broadcasts (None: they raise).
        timeout_s: the longest any device-side wait lasts (then an error record, see above).
        programs: programs of each sending and receiving kernel (the same on every rank).
        chunks, ring_calls: the ring's chunks, and its size in largest calls.
        block_bytes: bytes a program moves per step (a power of two, at least 16).
    """

    def __init__(self, rank: int, world_size: int, mesh, host: Optional[Transport] = None,
                 timeout_s: Optional[float] = None, programs: int = PROGRAMS, chunks: int = 32,
                 ring_calls: int = 2, block_bytes: int = BLOCK_BYTES) -> None:
        self.rank, self.world_size, self._mesh, self._host = rank, world_size, mesh, host
        self.device = mesh.device
        self.timeout_s = 60.0 if timeout_s is None else float(timeout_s)
        self.programs, self.chunks, self.ring_calls, self.block_bytes = programs, chunks, ring_calls, block_bytes
        self._layout: Optional[ArenaLayout] = None
        self._arena: Optional[torch.Tensor] = None
        self._ring: Optional[Ring] = None
        self._groups = self._uses_put = self._uses_take = None
        self._sizes: Dict[tuple, Tuple[torch.Tensor, torch.Tensor]] = {}
        """A named cache: the size tables of calls whose splits differ, per (splits, row), on the
        host (pinned) and on the device, made at their first call (so in the caller's allocation
        pool if it has one: not for cudagraph trees). Calls with one split for every rank both
        ways (all the layer's) need no table."""
        self._labels: Dict[str, int] = {}
        self._label_names: List[str] = []
        self._err = torch.zeros(4, dtype=torch.int64, pin_memory=self.device.type == "cuda")
        """The kernels' error record (`ep.kernels.triton_p2p`), host memory the device writes."""

    @classmethod
    def for_group(cls, group: Optional[dist.ProcessGroup] = None, timeout_s: Optional[float] = None):
        """The transport over `group` (CUDA ranks of one host), its host side through NCCL."""
        from .torch_dist import TorchDistTransport

        host = TorchDistTransport(group, timeout_s)
        if host.backend != "nccl":
            raise ValueError(f"DevicePutTransport needs CUDA ranks (an NCCL group), got backend {host.backend!r}")
        return cls(host.rank, host.world_size, SymmetricMesh(host.group, host.device), host, timeout_s)

    # -- the arena --------------------------------------------------------------------
    def _grow(self, call_bytes: int) -> None:
        """Collective (every rank reaches it at the same call: call sizes are group-wide): a
        ring of `ring_calls` such calls (the mesh waits until nothing uses the old arenas)."""
        chunk_bytes = -(-self.ring_calls * call_bytes // self.chunks // 128) * 128
        layout = ArenaLayout(self.world_size, self.chunks, chunk_bytes, self.programs)
        self._arena, addresses = self._mesh.allocate(self.rank, layout.total_bytes)
        self._layout, self._ring = layout, Ring(self.chunks, chunk_bytes)
        if any(a % 16 for a in addresses):
            raise CommunicationError(f"ep: rank {self.rank}: an arena is not 16-byte aligned ({addresses})")
        words, n, uses = self._arena.view(torch.int64), self.world_size, self.chunks * self.programs
        self._groups = words[layout.groups_at:layout.groups_at + n]
        self._groups.copy_(torch.tensor([a // 16 for a in addresses], dtype=torch.int64))
        self._uses_put = words[layout.uses_put_at:layout.uses_put_at + uses].view(self.chunks, self.programs)
        self._uses_take = words[layout.uses_take_at:layout.uses_take_at + uses].view(self.chunks, self.programs)
        self._sizes.clear()

    def _size_table(self, in_splits, out_splits, row_pieces: int) -> torch.Tensor:
        """`[4, n]` int64 pieces (`ep.kernels.triton_p2p`): send offset, send count, receive
        offset, receive count per rank."""
        key = (tuple(in_splits), tuple(out_splits), row_pieces)
        if key not in self._sizes:
            if len(self._sizes) > 256:
                self._sizes.clear()
            table = []
            for splits in (in_splits, out_splits):
                counts = [s * row_pieces for s in splits]
                table += [[sum(counts[:i]) for i in range(len(counts))], counts]
            host = torch.tensor(table, dtype=torch.int64, pin_memory=self.device.type == "cuda")
            self._sizes[key] = (host, host.to(self.device, non_blocking=True))
        return self._sizes[key][1]

    def _label(self, label: str) -> int:
        if label not in self._labels:
            self._labels[label] = len(self._label_names)
            self._label_names.append(label)
        return self._labels[label]

    # -- the all-to-all ----------------------------------------------------------------
    def all_to_all(self, out, inp, out_splits: Sequence[int], in_splits: Sequence[int], label: str = "all-to-all",
                   rows_bound: Optional[int] = None,
                   sent_rows: Optional[torch.Tensor] = None) -> Pending:
        n, me = self.world_size, self.rank
        if n == 1:
            return copy_pending(out, inp)
        if rows_bound is None:  # no group-wide bound (a checkpoint's redistribution, say): the host path
            return self._need_host().all_to_all(out, inp, out_splits, in_splits, label)
        inp, bound = inp.contiguous(), int(rows_bound)
        most = max(max(in_splits), max(out_splits))
        if most > bound:
            raise CommunicationError(
                f"ep: rank {me}: {label} sends or receives {most} rows for one peer, more than the bound of {bound} "
                "(an internal error: the caller passes the group-wide bound)")
        row_bytes = math.prod(inp.shape[1:]) * inp.element_size()
        wide = row_bytes % 16 == 0 and inp.data_ptr() % 16 == 0 and out.data_ptr() % 16 == 0
        unit, piece = (torch.int32, 16) if wide else (torch.uint8, 1)  # piece: bytes of the kernels' size unit
        per_src = 16 + -(-bound * row_bytes // 16) * 16  # one source's place in a call (its header, its rows)
        if self._layout is None or n * per_src * self.ring_calls > self._layout.data_bytes:
            self._grow(n * per_src)
        at, first, chunks = self._ring.place(n * per_src)
        uniform = len(set(in_splits)) == 1 and list(out_splits) == list(in_splits)
        sizes = None if uniform else self._size_table(in_splits, out_splits, row_bytes // piece)
        layout, cuda = self._layout, self.device.type == "cuda"
        common = dict(me=me, n=n, call_at=(layout.data_at + at) // piece, per_src=per_src // piece,
                      first=first, chunks=chunks, ready_at=layout.ready_at, freed_at=layout.freed_at,
                      deadline=int(self.timeout_s * 1e9) if cuda else max(1, int(self.timeout_s * 1000)),
                      label=self._label(label), row_pieces=row_bytes // piece,
                      split=in_splits[0] * (row_bytes // piece) if uniform else 0,
                      block=self.block_bytes // unit.itemsize, align=piece // unit.itemsize, use_clock=cuda)
        from ..kernels import triton_p2p

        src, dst, arena = inp.view(-1).view(unit), out.view(-1).view(unit), self._arena.view(unit)
        err = self._err.data_ptr()
        arrived = None
        if sent_rows is not None:
            if sent_rows.shape != (n,) or sent_rows.dtype != torch.int64 or sent_rows.device != self.device:
                raise ValueError(f"ep: {label}: sent_rows must be [{n}] int64 on {self.device}, got "
                                 f"{tuple(sent_rows.shape)} {sent_rows.dtype} on {sent_rows.device}")
            sent_rows, arrived = sent_rows.contiguous(), torch.empty(n, dtype=torch.int64, device=self.device)
        try:
            triton_p2p.put(src, dst, arena, self._groups, sizes, sent_rows, arrived, self._uses_put, err,
                           programs=self.programs, wait_programs=self.programs, **common)
        except Exception as e:  # noqa: BLE001
            raise CommunicationError(f"ep: rank {me} failed starting {label}: {type(e).__name__}: {e}") from e
        done = None
        if cuda:
            done = torch.cuda.Event()
            done.record()
            stream = torch.cuda.current_stream()
            for t in (inp, out, sent_rows):  # the caller may free them while the kernel runs
                if t is not None:
                    t.record_stream(stream)

        def take() -> None:
            triton_p2p.take(dst, arena, self._groups, sizes, arrived, self._uses_take, err, programs=self.programs,
                            put_programs=self.programs, **common)
            if cuda and arrived is not None:  # made on the issuing stream, written on this one
                arrived.record_stream(torch.cuda.current_stream())

        return _TakePending(take, done, arrived)

    def raise_errors(self) -> None:
        """Raise `CommunicationError` for what a device-side wait recorded (no sync: reads
        host-mapped words; a wait still running is seen at a later look)."""
        what, chunk, peer, label = self._err.tolist()
        if what:
            name = self._label_names[label] if 0 <= label < len(self._label_names) else f"call {label}"
            waited = "its rows" if what == 1 else "it to read out an earlier call (its buffer)"
            raise CommunicationError(
                f"ep: rank {self.rank} timed out after {self.timeout_s:g} s in {name}, waiting on the device for "
                f"rank {peer} ({waited}; ring chunk {chunk}); the group's device counters now disagree: treat it as broken")

    # -- through the host transport ----------------------------------------------------
    def _need_host(self) -> Transport:
        if self._host is None:
            raise RuntimeError("ep: this DevicePutTransport has no host transport for exchanges and broadcasts")
        return self._host

    def exchange(self, inp: torch.Tensor, label: str = "exchange") -> torch.Tensor:
        return self._need_host().exchange(inp, label)

    def host_exchange(self, values, label: str = "host exchange"):
        return self._need_host().host_exchange(values, label)

    def broadcast_(self, tensor: torch.Tensor, src: int = 0, label: str = "broadcast") -> None:
        self._need_host().broadcast_(tensor, src, label)
