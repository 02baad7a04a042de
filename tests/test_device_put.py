"""The device-put transport (`ep.transport.device_put`) on the CPU: its ring and arena layout
by hand, and its Triton kernels in Triton's interpreter with every rank in this process
(`ProcessMesh`): every call's rows land where `all_to_all_single` would put them (given
device counts of the rows in use, only those travel: the rest reads as padding), the ring's
bytes are reused only after the receiver read them out, and a peer that never sends or never
reads becomes a `CommunicationError` naming the call, never a hang.

The GPU check (`benchmarks/p2p_check.py`) runs the same kernels compiled, on one GPU.
"""
import os
import sys

import pytest
import torch

from ep.transport.base import CommunicationError
from ep.transport.device_put import ArenaLayout, DevicePutTransport, ProcessMesh, Ring


def test_ring_places_calls_on_whole_chunks_in_order():
    ring = Ring(chunks=8, chunk_bytes=16)
    assert ring.place(40) == (0, 0, 3)  # (byte offset, first chunk, chunks): 40 bytes need 3
    assert ring.place(16) == (48, 3, 1)
    assert ring.place(1) == (64, 4, 1)  # a call takes at least one chunk
    assert ring.place(48) == (80, 5, 3)  # chunks 5..7: the last three
    assert ring.place(16) == (0, 0, 1)  # none left after chunk 7: from the start
    assert ring.place(128) == (0, 0, 8)  # 8 chunks do not fit after chunk 0: from the start, all of them
    with pytest.raises(ValueError, match="does not fit"):
        ring.place(129)


def test_arena_layout_parts_do_not_overlap():
    layout = ArenaLayout(world_size=3, chunks=5, chunk_bytes=256, programs=2)
    assert layout.ready_at == 0 and layout.freed_at == 15  # int64 words
    assert (layout.groups_at, layout.uses_put_at, layout.uses_take_at) == (30, 33, 43)
    assert layout.data_at >= (43 + 10) * 8 and layout.data_at % 128 == 0
    assert layout.data_bytes == 5 * 256 and layout.total_bytes == layout.data_at + 5 * 256


@pytest.fixture(scope="module")
def interpreted():
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("triton was imported before its interpreter could be switched on")
    os.environ["TRITON_INTERPRET"] = "1"  # read when triton is imported
    pytest.importorskip("triton")
    yield


def _world(n, **kw):
    mesh = ProcessMesh(n, "cpu")
    return [DevicePutTransport(r, n, mesh, programs=3, **kw) for r in range(n)]


def _call(trs, splits, shape, dtype, g, label="test", bound=None, take=True):
    """One all-to-all on every rank (`splits[r][p]`: rows r sends p); returns (outs, wants)."""
    n = len(trs)
    ins = [torch.randn(sum(splits[r]), *shape, generator=g).to(dtype) for r in range(n)]
    outs = [torch.full((sum(splits[p][r] for p in range(n)), *shape), float("nan")).to(dtype) for r in range(n)]
    bound = bound or max(max(row) for row in splits)
    pending = [trs[r].all_to_all(outs[r], ins[r], [splits[p][r] for p in range(n)], splits[r], label, bound)
               for r in range(n)]
    if take:
        for p in pending:
            p.wait()
    wants = [torch.cat([ins[p][sum(splits[p][:r]):sum(splits[p][:r + 1])] for p in range(n)]) for r in range(n)]
    return outs, wants, pending


@pytest.mark.parametrize("n, shape, dtype", [(2, (8,), torch.float32), (3, (3,), torch.float32),
                                             (4, (2, 8), torch.bfloat16)])
def test_rows_land_as_all_to_all_single_puts_them(interpreted, n, shape, dtype):
    # shape (3,) float32: 12-byte rows, so the kernels move bytes; the others 16-byte pieces
    g = torch.Generator().manual_seed(n)
    trs = _world(n, timeout_s=1.0, ring_calls=2, chunks=4)  # a ring of 2 calls in 4 chunks
    for call in range(5):  # enough calls to wrap the ring: later calls wait for the reads of earlier ones
        splits = torch.randint(0, 5, (n, n), generator=g).tolist()
        outs, wants, _ = _call(trs, splits, shape, dtype, g, f"call {call}", bound=4)
        for r in range(n):
            assert torch.equal(outs[r], wants[r]), (call, r)
    for tr in trs:
        tr.raise_errors()  # nothing timed out


@pytest.mark.parametrize("n, shape, dtype, uniform", [(2, (8,), torch.float32, False), (3, (3,), torch.float32, False),
                                                      (4, (2, 8), torch.bfloat16, False),
                                                      (3, (8,), torch.float32, True), (4, (3,), torch.float32, True)])
def test_only_the_rows_in_use_travel_and_the_rest_reads_as_padding(interpreted, n, shape, dtype, uniform):
    """With `sent_rows`, each split's first rows arrive as sent, the rest of it holds all-ones
    bytes (the rows' padding), and `arrived_rows` says how many arrived from each peer. Uniform:
    one split for every rank both ways (the layer's calls: no size table)."""
    g = torch.Generator().manual_seed(10 + n)
    trs = _world(n, timeout_s=1.0, ring_calls=2, chunks=4)
    for call in range(4):  # wraps the ring: headers and rows of later calls land on earlier ones'
        splits = [[1 + call] * n] * n if uniform else torch.randint(0, 5, (n, n), generator=g).tolist()
        used = [[int(torch.randint(0, 6, (), generator=g)) for _ in range(n)] for _ in range(n)]  # may pass the split
        ins = [torch.randn(sum(splits[r]), *shape, generator=g).to(dtype) for r in range(n)]
        outs = [torch.zeros(sum(splits[p][r] for p in range(n)), *shape).to(dtype) for r in range(n)]
        pending = [trs[r].all_to_all(outs[r], ins[r], [splits[p][r] for p in range(n)], splits[r], f"call {call}", 4,
                                     sent_rows=torch.tensor(used[r])) for r in range(n)]
        for p in pending:
            p.wait()
        for r in range(n):
            at = 0
            for p in range(n):
                rows, kept = splits[p][r], min(used[p][r], splits[p][r])
                sent_from = sum(splits[p][:r])
                got = outs[r][at:at + rows]
                assert torch.equal(got[:kept], ins[p][sent_from:sent_from + kept]), (call, r, p)
                assert bool((got[kept:].reshape(-1).view(torch.uint8) == 255).all()), (call, r, p)
                assert pending[r].arrived_rows[p].item() == kept, (call, r, p)
                at += rows
    for tr in trs:
        tr.raise_errors()


def test_every_tensor_it_keeps_for_uniform_calls_lies_in_its_arena(interpreted):
    """What the transport keeps on the device lives in the arena the mesh made: nothing is
    allocated at a call (under cudagraph trees a call's allocations come from their pool,
    and one that outlived the graph there is an error). The error record is host memory."""
    g = torch.Generator().manual_seed(4)
    trs = _world(3, timeout_s=1.0)
    for rows in (2, 3, 1):
        outs, wants, _ = _call(trs, [[rows] * 3] * 3, (4,), torch.float32, g)
        assert all(torch.equal(o, w) for o, w in zip(outs, wants))
    for tr in trs:
        arena = tr._arena.untyped_storage().data_ptr()
        kept = [(k, v) for k, v in vars(tr).items() if isinstance(v, torch.Tensor) and v is not tr._err]
        kept += [(k, t) for k, v in vars(tr).items() if isinstance(v, dict) for t in v.values()
                 if isinstance(t, torch.Tensor)]
        assert {k for k, _ in kept} == {"_arena", "_groups", "_uses_put", "_uses_take"}
        assert all(t.untyped_storage().data_ptr() == arena for _, t in kept)
        assert tr._groups.tolist() == [a.data_ptr() // 16 for a in tr._mesh._arenas]


def test_without_sent_rows_nothing_is_counted(interpreted):
    trs = _world(2, timeout_s=1.0)
    outs, wants, pending = _call(trs, [[2, 1], [3, 2]], (4,), torch.float32, torch.Generator().manual_seed(3))
    assert all(torch.equal(o, w) for o, w in zip(outs, wants))
    assert all(p.arrived_rows is None for p in pending)


def test_sent_rows_of_the_wrong_shape_are_refused(interpreted):
    trs = _world(2)
    with pytest.raises(ValueError, match=r"sent_rows must be \[2\] int64"):
        trs[0].all_to_all(torch.empty(4, 4), torch.empty(4, 4), [2, 2], [2, 2], "x", 2, torch.tensor([1, 1, 1]))


def test_two_calls_in_flight_before_either_is_read(interpreted):
    g = torch.Generator().manual_seed(5)
    trs = _world(2, timeout_s=1.0, ring_calls=2, chunks=4)
    first = _call(trs, [[2, 3], [1, 2]], (4,), torch.float32, g, take=False)
    second = _call(trs, [[3, 3], [3, 1]], (4,), torch.float32, g, take=False)
    for outs, wants, pending in (first, second):
        for p in pending:
            p.wait()
        assert all(torch.equal(o, w) for o, w in zip(outs, wants))


def test_a_peer_that_never_sends_is_an_error_naming_the_call(interpreted):
    trs = _world(2, timeout_s=0.05)
    out, inp = torch.empty(4, 4), torch.randn(4, 4)
    pending = trs[0].all_to_all(out, inp, [2, 2], [2, 2], "dispatch (forward) of wave 3", 2,
                                sent_rows=torch.tensor([2, 2]))
    pending.wait()  # rank 1 never sends
    assert torch.equal(out[:2], inp[:2])  # this rank's own rows
    assert bool((out[2:].view(torch.int32) == -1).all())  # rank 1's: all-ones bytes, the rows' padding
    assert pending.arrived_rows.tolist() == [2, 0]
    with pytest.raises(CommunicationError, match=r"rank 0 timed out .* dispatch \(forward\) of wave 3.* rank 1 \(its rows"):
        trs[0].raise_errors()
    trs[1].raise_errors()  # rank 1 waited for nothing


def test_a_peer_that_never_reads_is_an_error_before_its_rows_are_overwritten(interpreted):
    g = torch.Generator().manual_seed(6)
    trs = _world(2, timeout_s=0.05, ring_calls=1, chunks=1)
    # 2 ranks x 4 rows x 16 bytes: the whole ring (one chunk of 128 bytes) in one call
    _call(trs, [[4, 4], [4, 4]], (4,), torch.float32, g, "combine (forward) of wave 0", take=False)
    # rank 1 never read the first call out; rank 0's next call needs the same bytes
    out, inp = torch.empty(8, 4), torch.randn(8, 4)
    trs[0].all_to_all(out, inp, [4, 4], [4, 4], "dispatch (forward) of wave 1", 4)
    with pytest.raises(CommunicationError, match=r"dispatch \(forward\) of wave 1.* rank 1 \(it to read out"):
        trs[0].raise_errors()


def test_a_call_without_a_bound_goes_to_the_host_transport():
    tr = _world(2)[0]  # made without one: the call says so
    with pytest.raises(RuntimeError, match="no host transport"):
        tr.all_to_all(torch.empty(4, 4), torch.empty(4, 4), [2, 2], [2, 2], "checkpoint")


def test_a_call_at_an_old_place_waits_for_whatever_used_it_last(interpreted):
    """A CUDA graph replays its calls at the places they had at capture, whatever ran since:
    the sender must wait for the last user of those bytes, not for the one at capture."""
    g = torch.Generator().manual_seed(8)
    trs = _world(2, timeout_s=0.05, ring_calls=1, chunks=1)  # one chunk: every call reuses it
    _call(trs, [[4, 4], [4, 4]], (4,), torch.float32, g, "warm-up")
    outs, wants, pending = _call(trs, [[4, 4], [4, 4]], (4,), torch.float32, g, "unread", take=False)
    for tr in trs:  # rank 0 replays a call captured at the same place before "unread" was sent
        tr._ring._next = 0
    trs[0].all_to_all(torch.empty(8, 4), torch.randn(8, 4), [4, 4], [4, 4], "replayed", 4)
    with pytest.raises(CommunicationError, match=r"replayed.* rank 1 \(it to read out"):
        trs[0].raise_errors()  # it waited for rank 1 to read "unread", and wrote nothing
    pending[1].wait()
    assert torch.equal(outs[1], wants[1])  # rank 1 still reads what "unread" sent


def test_more_rows_than_the_bound_is_refused(interpreted):
    trs = _world(2)
    with pytest.raises(CommunicationError, match="more than the bound of 2"):
        trs[0].all_to_all(torch.empty(6, 4), torch.empty(6, 4), [3, 3], [3, 3], "x", 2)


def test_needs_an_nccl_group():
    from tests.world import run_world

    assert run_world(2, _gloo_refused) == [True, True]


def _gloo_refused(rank, world_size):
    with pytest.raises(ValueError, match="needs CUDA ranks"):
        DevicePutTransport.for_group(None)
    return True
