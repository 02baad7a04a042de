"""Triton kernels of the device-initiated transport (`ep.transport.device_put`).

Two kernels move one all-to-all between the ranks of one host, over buffers every rank
maps (torch symmetric memory; on the CPU, in Triton's interpreter, plain tensors of one
process stand in for them):

- `put`: on the sender, G programs copy the rows for this rank straight into `out`, then
  for each peer in turn its rows straight into that peer's *arena* (the rank's symmetric
  buffer; `ep.transport.device_put.ArenaLayout` says where each part lies), after a
  *header* (one int64 word in 16 bytes) that says how many pieces follow, and raise the
  peer's *ready* counter of each of the call's ring chunks by one (a release at system
  scope, after a barrier of the program's threads, so every store of the program is
  visible before the counts are). Before writing into a peer's arena, a program waits until
  the peer has read out every earlier use of those chunks: their *freed* counters, kept in
  this rank's arena, have reached their counts. With `sent_rows` (device counts) only the
  first rows of each peer's split travel: the rest is padding, and no bytes move for it.
- `take`: on the receiver, GW programs wait until each peer's ready counter of each of the
  call's chunks has reached G x (this use of the chunk), copy as many pieces as the
  peer's header says out of the arena into `out`, fill the rest of the peer's split with
  all-ones bytes, write the rows that arrived (`arrived`), then raise the peer's freed
  counters of the chunks by one.

Counters belong to places (chunks of the ring), not to calls: whatever call used a chunk
last, an eager call or one replayed from a CUDA graph, its counts are the ones waited for.
They only grow (int64), and each program keeps its own count of its uses of each chunk
(`uses`), so no counter is ever reset and a graph replays the same kernels with the same
arguments correctly: the expected values come from device memory, not from arguments
frozen at capture.

Every wait has a deadline (nanoseconds of `%globaltimer` on the GPU; a number of polls in
the interpreter, which has no clock). A wait past it writes what it waited for into the
error record (4 int64 words at a host-mapped address: the first error wins) and goes on:
a sender that timed out sends that peer nothing, a receiver fills what did not arrive with
all-ones bytes (the rows' padding, as for rows left out: expert ids -1, so nothing after it
indexes out of bounds).
So a peer that never arrives becomes an error the host reads at its next look, never a hang.

Bytes move as elements of the caller's choosing (int32 where every offset and size is a
multiple of 16 bytes: 16-byte accesses; bytes otherwise), BLOCK of them per program and
step; sizes and places count pieces of ALIGN elements, so the compiler sees their alignment.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# The error record, 4 int64 words: [what (1: a peer's rows never arrived, 2: a peer never
# read out the call whose bytes this one needed), ring chunk, peer rank, the call's label id].


@triton.jit
def _now(USE_CLOCK: tl.constexpr):
    if USE_CLOCK:
        return tl.extra.cuda.globaltimer()
    else:
        return tl.zeros([], dtype=tl.int64)


@triton.jit
def _peer(base, groups, me, peer, PER_GROUP: tl.constexpr):
    """`base` (a pointer into this rank's arena) moved to the same place in `peer`'s arena.

    Arena addresses come as 16-byte groups, so the move is a known multiple of 16 bytes and
    accesses through it stay 16 bytes wide (a pointer cast from an integer would lose that)."""
    return base + (tl.load(groups + peer) - tl.load(groups + me)) * PER_GROUP


@triton.jit
def _copy(src, dst, valid, total, pid, G, BLOCK: tl.constexpr, CACHE: tl.constexpr):
    """Program `pid` of G writes its share (blocks pid, pid + G, ...) of `total` elements of
    `dst`: the first `valid` copied from `src`, the rest all-ones bytes (the row layout's
    padding: every slot's expert id -1), so rows left out, or that never arrived after a
    timed-out wait, index nothing out of bounds."""
    cols = tl.arange(0, BLOCK)
    b = pid.to(tl.int64)
    while b * BLOCK < total:  # (while: Triton's interpreter cannot range over device scalars)
        at = b * BLOCK + cols
        if CACHE:
            tl.store(dst + at, tl.load(src + at, mask=at < valid, other=-1), mask=at < total)
        else:  # rows written by another GPU: past the L1
            tl.store(dst + at, tl.load(src + at, mask=at < valid, other=-1, cache_modifier=".cg"), mask=at < total)
        b += G


@triton.jit
def _size(sizes, which: tl.constexpr, n, peer, split, UNIFORM: tl.constexpr):
    """Pieces of the call's size table for `peer`: which 0 send offset, 1 send count,
    2 receive offset, 3 receive count. UNIFORM (every split, both ways, `split` pieces: the
    layer's calls): from `split` alone, no table; else `sizes[which, peer]` (`[4, n]` int64)."""
    if UNIFORM:
        if which % 2 == 0:
            return peer.to(tl.int64) * split
        else:
            return tl.zeros([], dtype=tl.int64) + split
    else:
        return tl.load(sizes + which * n + peer)


@triton.jit
def _sent(sizes, sent_rows, n, peer, row_pieces, split, HAS_SENT: tl.constexpr, UNIFORM: tl.constexpr):
    """Pieces this rank sends `peer`: its split, or only the first `sent_rows[peer]` rows of it.
    (Counts stay in pieces until they meet ALIGN, so the compiler sees whole pieces.)"""
    count = _size(sizes, 1, n, peer, split, UNIFORM)
    if HAS_SENT:
        count = tl.minimum(count, tl.maximum(tl.load(sent_rows + peer), 0) * row_pieces)
    return count


@triton.jit
def _header(words, call_at, per_src, src_rank, ALIGN: tl.constexpr, PER_GROUP: tl.constexpr):
    """The header word of the rows from `src_rank` in a call's place (elements -> int64 words)."""
    return words + (call_at + src_rank * per_src) * ALIGN // (PER_GROUP // 2)


@triton.jit
def _all_reached(counters, stride, first, count, uses, G, pid, ahead, per_use, deadline, err_addr, what, peer,
                 label, CHUNKS: tl.constexpr, USE_CLOCK: tl.constexpr):
    """Wait until every chunk c of the call's `count` chunks from `first` has
    `counters[c * stride] >= (uses[c, pid] + ahead) * per_use`; False if any does not within
    the deadline (the first such chunk is recorded in the error record).

    The chunks are polled at once, one lane each (CHUNKS >= the ring's chunks), so a wait
    costs one round of loads however many chunks the call covers: r24 measured ~3 us per
    chunk polled and raised one after another (a 59 MB call covers 16)."""
    c = first + tl.arange(0, CHUNKS)
    live = c < first + count
    target = (tl.load(uses + c * G + pid, mask=live, other=0) + ahead) * per_use
    at = counters + c * stride
    seen = tl.atomic_add(at, tl.zeros([CHUNKS], dtype=tl.int64), mask=live, sem="acquire", scope="sys")
    short = live & (seen < target)
    start = _now(USE_CLOCK)
    waited = tl.zeros([], dtype=tl.int64)
    while (tl.max(short.to(tl.int32), 0) > 0) & (waited < deadline):
        seen = tl.atomic_add(at, tl.zeros([CHUNKS], dtype=tl.int64), mask=short, sem="acquire", scope="sys")
        short = short & (seen < target)
        if USE_CLOCK:
            waited = _now(USE_CLOCK) - start
        else:
            waited += 1
    arrived = tl.max(short.to(tl.int32), 0) == 0
    if not arrived:
        err = err_addr.to(tl.pointer_type(tl.int64))
        zero = tl.zeros([], dtype=tl.int64)
        if tl.atomic_cas(err, zero, zero + what, sem="relaxed", scope="sys") == 0:
            tl.store(err + 1, tl.min(tl.where(short, c, first + count), 0))
            tl.store(err + 2, peer)
            tl.store(err + 3, label)
    return arrived


@triton.jit
def _raise_all(counters, stride, first, count, CHUNKS: tl.constexpr):
    """Raise each chunk's counter by one (release, system scope; one lane per chunk)."""
    c = first + tl.arange(0, CHUNKS)
    tl.atomic_add(counters + c * stride, tl.full([CHUNKS], 1, dtype=tl.int64), mask=c < first + count,
                  sem="release", scope="sys")


@triton.jit
def _count_use(uses, G, pid, first, count, CHUNKS: tl.constexpr):
    """This program used each of the call's chunks once more."""
    c = first + tl.arange(0, CHUNKS)
    live = c < first + count
    tl.store(uses + c * G + pid, tl.load(uses + c * G + pid, mask=live) + 1, mask=live)


# The per-call integers are not specialised on (Triton would compile a variant for each value
# of 1 and each multiple of 16 it meets: a rank, a label, a ring place, first seen mid-run).
_PER_CALL = ("me", "n", "call_at", "per_src", "first", "chunks", "ready_at", "freed_at", "deadline", "label",
             "row_pieces", "split")


@triton.jit(do_not_specialize=_PER_CALL + ("wait_programs",))
def _put_kernel(
    src, out, arena, words, groups, sizes, sent_rows, arrived_rows, uses, err_addr,
    me, n, call_at, per_src, first, chunks, ready_at, freed_at, wait_programs, deadline, label, row_pieces, split,
    BLOCK: tl.constexpr, ALIGN: tl.constexpr, PER_GROUP: tl.constexpr, CHUNKS: tl.constexpr,
    USE_CLOCK: tl.constexpr, HAS_SENT: tl.constexpr, UNIFORM: tl.constexpr,
):
    """Sizes and places count *pieces* of ALIGN elements (16 bytes when ALIGN x element = 16):
    sizes `[4, n]` int64: send offset, send count, receive offset, receive count per rank
    (UNIFORM: none, every split is `split` pieces both ways: `_size`);
    `call_at`: this call's place in the arena (from its start); rows from rank s land at
    `call_at + s * per_src`, after their 16-byte header; the call covers `chunks` chunks of
    the ring from `first`. `arena` / `words`: this rank's arena as elements / int64 words;
    `groups`: every rank's arena address in 16-byte groups; `uses` `[chunks of the ring, G]`:
    each program's uses. With HAS_SENT, `sent_rows` `[n]`: the rows of each peer's split that
    carry data (`row_pieces` pieces each), the only ones sent; `arrived_rows[me]` gets this
    rank's own (the receiving kernel writes the peers'). A header holds its count in pieces."""
    pid = tl.program_id(0)
    G = tl.num_programs(0)
    # this rank's own rows, straight into out (the rest of its split: padding)
    own = _sent(sizes, sent_rows, n, me, row_pieces, split, HAS_SENT, UNIFORM)
    _copy(src + _size(sizes, 0, n, me, split, UNIFORM) * ALIGN, out + _size(sizes, 2, n, me, split, UNIFORM) * ALIGN,
          own * ALIGN, _size(sizes, 3, n, me, split, UNIFORM) * ALIGN, pid, G, BLOCK, True)
    if HAS_SENT and pid == 0:
        tl.store(arrived_rows + me, own // tl.maximum(row_pieces, 1))
    j = 1
    while j < n:
        peer = (me + j) % n
        # the peer has read out every earlier use of these chunks (`freed`, kept here)
        free = _all_reached(words + freed_at + peer, n, first, chunks, uses, G, pid, 0, wait_programs, deadline,
                            err_addr, 2, peer, label, CHUNKS, USE_CLOCK)
        if free:  # else neither rows nor counts: the peer's wait times out too, and reads padding
            count = _sent(sizes, sent_rows, n, peer, row_pieces, split, HAS_SENT, UNIFORM)
            if pid == 0:
                tl.store(_header(_peer(words, groups, me, peer, 2), call_at, per_src, me, ALIGN, PER_GROUP), count)
            dst = _peer(arena, groups, me, peer, PER_GROUP) + (call_at + me * per_src) * ALIGN + PER_GROUP
            _copy(src + _size(sizes, 0, n, peer, split, UNIFORM) * ALIGN, dst, count * ALIGN, count * ALIGN, pid, G,
                  BLOCK, True)
            tl.debug_barrier()  # every thread's stores are issued before the counts go up
            _raise_all(_peer(words, groups, me, peer, 2) + ready_at + me, n, first, chunks, CHUNKS)
        j += 1
    _count_use(uses, G, pid, first, chunks, CHUNKS)


@triton.jit(do_not_specialize=_PER_CALL + ("put_programs",))
def _take_kernel(
    out, arena, words, groups, sizes, arrived_rows, uses, err_addr,
    me, n, call_at, per_src, first, chunks, ready_at, freed_at, put_programs, deadline, label, row_pieces, split,
    BLOCK: tl.constexpr, ALIGN: tl.constexpr, PER_GROUP: tl.constexpr, CHUNKS: tl.constexpr,
    USE_CLOCK: tl.constexpr, HAS_SENT: tl.constexpr, UNIFORM: tl.constexpr,
):
    """The receiving half of `_put_kernel`'s call (same sizes, place and chunks): each peer's
    pieces as its header says, the rest of its split all-ones bytes; with HAS_SENT, the rows
    that arrived from each peer into `arrived_rows`."""
    pid = tl.program_id(0)
    G = tl.num_programs(0)
    j = 1
    while j < n:
        peer = (me - j + n) % n
        arrived = _all_reached(words + ready_at + peer, n, first, chunks, uses, G, pid, 1, put_programs, deadline,
                               err_addr, 1, peer, label, CHUNKS, USE_CLOCK)
        total = _size(sizes, 3, n, peer, split, UNIFORM)
        told = tl.load(_header(words, call_at, per_src, peer, ALIGN, PER_GROUP), cache_modifier=".cg")
        valid = tl.where(arrived, tl.minimum(tl.maximum(told, 0), total), 0)  # within the split, whatever it says
        _copy(arena + (call_at + peer * per_src) * ALIGN + PER_GROUP,
              out + _size(sizes, 2, n, peer, split, UNIFORM) * ALIGN, valid * ALIGN, total * ALIGN, pid, G, BLOCK, False)
        if HAS_SENT and pid == 0:
            tl.store(arrived_rows + peer, valid // tl.maximum(row_pieces, 1))
        j += 1
    tl.debug_barrier()  # every thread's reads are done before the peers may overwrite
    j = 1
    while j < n:
        peer = (me - j + n) % n
        _raise_all(_peer(words, groups, me, peer, 2) + freed_at + me, n, first, chunks, CHUNKS)
        j += 1
    _count_use(uses, G, pid, first, chunks, CHUNKS)


def _lanes(uses: torch.Tensor) -> int:
    """Lanes of the counter waits: the ring's chunks (`uses`' rows), rounded up to a power of two."""
    return triton.next_power_of_2(uses.shape[0])


def put(src, out, arena, groups, sizes, sent_rows, arrived_rows, uses, err_addr: int, *, me: int, n: int,
        call_at: int, per_src: int, first: int, chunks: int, ready_at: int, freed_at: int, programs: int,
        wait_programs: int, deadline: int, label: int, row_pieces: int, split: int, block: int, align: int,
        use_clock: bool) -> None:
    """Launch the sending half on the current stream (see the module docstring); `arena` is
    this rank's arena viewed as `src`'s elements; `sent_rows` None: every row of each split;
    `sizes` None: every split is `split` pieces, both ways (no table)."""
    table = groups if sizes is None else sizes  # (unread when uniform: any pointer)
    _put_kernel[(programs,)](
        src, out, arena, arena.view(torch.int64), groups, table, table if sent_rows is None else sent_rows,
        table if arrived_rows is None else arrived_rows, uses, err_addr, me, n, call_at, per_src,
        first, chunks, ready_at, freed_at, wait_programs, deadline, label, row_pieces, split, BLOCK=block,
        ALIGN=align, PER_GROUP=16 // src.element_size(), CHUNKS=_lanes(uses), USE_CLOCK=use_clock,
        HAS_SENT=sent_rows is not None, UNIFORM=sizes is None, num_warps=8)


def take(out, arena, groups, sizes, arrived_rows, uses, err_addr: int, *, me: int, n: int, call_at: int,
         per_src: int, first: int, chunks: int, ready_at: int, freed_at: int, programs: int, put_programs: int,
         deadline: int, label: int, row_pieces: int, split: int, block: int, align: int, use_clock: bool) -> None:
    """Launch the receiving half on the current stream; `arrived_rows` None: not counted;
    `sizes` None: uniform splits, as for `put`."""
    table = groups if sizes is None else sizes
    _take_kernel[(programs,)](
        out, arena, arena.view(torch.int64), groups, table, table if arrived_rows is None else arrived_rows, uses,
        err_addr, me, n, call_at, per_src, first, chunks, ready_at, freed_at, put_programs, deadline, label,
        row_pieces, split, BLOCK=block, ALIGN=align, PER_GROUP=16 // out.element_size(), CHUNKS=_lanes(uses),
        USE_CLOCK=use_clock, HAS_SENT=arrived_rows is not None, UNIFORM=sizes is None, num_warps=8)
