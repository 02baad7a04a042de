"""The device-put transport's kernels on one GPU, every rank in this process (not in CI).

    python3 benchmarks/p2p_check.py --json p2p.json

Ranks 0..n-1 of a `ProcessMesh` on one GPU, each issuing on a stream of its own, so the
kernels of different ranks run at once and wait for each other on the device as they do
between GPUs (the bytes go through this GPU's memory, not NVLink: the rates are the kernels'
own, a bound for a peer over NVLink, not a measurement of it):
1. correct: n in {2, 4}, 12 calls of random splits, rows of 16-byte pieces (bf16, the
   dispatch row of H 7168) and of odd bytes (3 x fp32), every rank's call in flight before
   any is read out: each `out` equals what `all_to_all_single` gives; and with `sent_rows`
   (random device counts of the rows in use, some past the split): those rows as sent, the
   rest of each split all-ones bytes, `arrived_rows` the counts;
2. sync-free: after a warm-up, 8 more calls under `torch.cuda.set_sync_debug_mode("error")`;
3. CUDA graphs: each rank's sequence of 4 calls captured in a graph of its own, replayed 5
   times with new inputs, the ranks' graphs at once on their streams: every replay correct;
   and with `sent_rows` given new counts before each replay (read on the device);
4. timeout: rank 1 never sends; rank 0's wait ends after `timeout_s` = 0.5 with an error
   naming the call (read from host-mapped memory): the wall time says there was no hang;
5. rate: the sending kernel with G programs moving 59 MB (4096 dsv3 dispatch rows) to the
   other rank, G in {4, 8, 16, 24, 32, 64}, 32 or 64 KB per program and step: median ms
   over 20 after 5 warm-ups, GB/s, GB/s per program; the receiving kernel's time; the host's time to issue a call and its wait
   (two kernel launches); `copy_` of the same bytes; at 16 programs also with 66% and 33%
   of the rows in use (`sent_rows`: a dsv3 region at EP 8, a top-2 model's at EP 4), where
   only those should move. Each kernel is timed alone, without the host's time to issue it
   (`benchmarks.kernel_time`; r20-r34 included it: 0.2-0.3 ms per call);
6. with `--host-profile`: cProfile of 200 small calls and waits, the functions of most own time.
Prints a table and "N passed, M failed"; exits non-zero on any failure.

Not here: the whole layer between ranks of one process. Ranks that are threads share one
CUDA context, where a memory allocation (or a pinned one) by one thread waits for every
kernel in flight, another rank's spinning receiver included, which waits for this thread's
send (r22, r23: both ranks timed out at their first dispatch). Between processes, one per
GPU, an allocation waits only for its own process's kernels, and every rank issues a call's
send before its wait, so those receivers end once the peers reach the same call. The layer
with device_put is checked on 2+ GPUs (`gpu_check.py`, every case).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ep.layout import RowLayout  # noqa: E402
from ep.transport.base import CommunicationError  # noqa: E402
from ep.transport.device_put import DevicePutTransport, ProcessMesh  # noqa: E402
from benchmarks import provenance  # noqa: E402
from benchmarks.kernel_time import hold, kernel_ms  # noqa: E402

DEV = torch.device("cuda", 0)
ROW = RowLayout(7168, 8, torch.bfloat16).width  # the dsv3 dispatch row, in bf16 elements


def world(n, **kw):
    mesh = ProcessMesh(n, DEV)
    trs = [DevicePutTransport(r, n, mesh, **kw) for r in range(n)]
    streams = [torch.cuda.Stream(DEV) for _ in range(n)]
    return trs, streams


def one_call(trs, streams, splits, ins, outs, label, bound, used=None):
    """Issue every rank's call on its stream (`used[r]`: rank r's `sent_rows`, host ints or a
    device tensor), then every rank's wait (the receiving kernel)."""
    n = len(trs)
    pend = []
    for r in range(n):
        sent = None if used is None else torch.as_tensor(used[r], dtype=torch.int64, device=DEV)
        with torch.cuda.stream(streams[r]):
            pend.append(trs[r].all_to_all(outs[r], ins[r], [splits[p][r] for p in range(n)], splits[r], label, bound,
                                          sent))
    return pend


def wait_all(pend, streams):
    for p, s in zip(pend, streams):
        with torch.cuda.stream(s):
            p.wait()


def expected(ins, splits, r):
    n = len(ins)
    return torch.cat([ins[p][sum(splits[p][:r]):sum(splits[p][:r + 1])] for p in range(n)])


def buffers(splits, shape, dtype, g):
    n = len(splits)
    ins = [(torch.randn(sum(splits[r]), *shape, generator=g) * 3).to(dtype).to(DEV) for r in range(n)]
    outs = [torch.full((sum(splits[p][r] for p in range(n)), *shape), float("nan"), dtype=dtype, device=DEV)
            for r in range(n)]
    return ins, outs


def left_out(ins, outs, splits, used, pend) -> int:
    """Ranks whose `out` or `arrived_rows` differ from a call that sent only `used[p][r]` rows:
    those as sent, the rest of each split all-ones bytes."""
    n, bad = len(ins), 0
    for r in range(n):
        at, ok = 0, True
        for p in range(n):
            rows, kept = splits[p][r], min(used[p][r], splits[p][r])
            frm = sum(splits[p][:r])
            got = outs[r][at:at + rows]
            ok &= torch.equal(got[:kept], ins[p][frm:frm + kept]) and bool((got[kept:].view(torch.uint8) == 255).all())
            ok &= pend[r].arrived_rows[p].item() == kept
            at += rows
        bad += not ok
    return bad


def check_calls(n, shape, dtype, calls=12, bound=64, seed=0, sent=False):
    g = torch.Generator().manual_seed(seed)
    trs, streams = world(n, timeout_s=10.0)
    bad = 0
    for c in range(calls):
        splits = torch.randint(0, bound + 1, (n, n), generator=g).tolist()
        used = torch.randint(0, bound + 8, (n, n), generator=g).tolist()
        ins, outs = buffers(splits, shape, dtype, g)
        torch.cuda.synchronize()
        pend = one_call(trs, streams, splits, ins, outs, f"call {c}", bound, used if sent else None)
        wait_all(pend, streams)
        torch.cuda.synchronize()
        if sent:
            bad += left_out(ins, outs, splits, used, pend)
        else:
            bad += sum(not torch.equal(outs[r], expected(ins, splits, r)) for r in range(n))
    for tr in trs:
        tr.raise_errors()
    return bad == 0, f"{calls} calls x {n} ranks, {bad} wrong"


def check_sync_free(n=2, bound=256):
    g = torch.Generator().manual_seed(7)
    trs, streams = world(n, timeout_s=10.0)
    splits = [[bound] * n for _ in range(n)]
    ins, outs = buffers(splits, (ROW,), torch.bfloat16, g)
    for c in range(3):  # warm-up: arenas, size tables, compiled kernels
        wait_all(one_call(trs, streams, splits, ins, outs, "warm-up", bound), streams)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for c in range(8):
            wait_all(one_call(trs, streams, splits, ins, outs, f"call {c}", bound), streams)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    ok = all(torch.equal(outs[r], expected(ins, splits, r)) for r in range(n))
    return ok, "8 calls under set_sync_debug_mode('error')"


def check_graphs(n=2, bound=128, calls=4, replays=5, sent=False):
    g = torch.Generator().manual_seed(11)
    trs, streams = world(n, timeout_s=10.0)
    splits = [[torch.randint(1, bound + 1, (1,), generator=g).item() for _ in range(n)] for _ in range(n)]
    bufs = [buffers(splits, (ROW,), torch.bfloat16, g) for _ in range(calls)]
    used = [torch.full((n, n), bound, dtype=torch.int64, device=DEV) if sent else None for _ in range(calls)]
    for c in range(2):  # warm-up outside capture
        for (ins, outs), u in zip(bufs, used):
            wait_all(one_call(trs, streams, splits, ins, outs, "warm-up", bound, u), streams)
    torch.cuda.synchronize()
    graphs = [torch.cuda.CUDAGraph() for _ in range(n)]
    pends = [[None] * calls for _ in range(n)]
    for r in range(n):  # each rank's sequence in a graph of its own (the kernels do not run while capturing)
        with torch.cuda.graph(graphs[r], stream=streams[r]):
            for c, (ins, outs) in enumerate(bufs):
                pends[r][c] = trs[r].all_to_all(outs[r], ins[r], [splits[p][r] for p in range(n)], splits[r],
                                                f"graph call {c}", bound, None if used[c] is None else used[c][r])
                pends[r][c].wait()
    wrong = 0
    for rep in range(replays):
        for c, (ins, outs) in enumerate(bufs):
            for r in range(n):
                ins[r].copy_((torch.randn(ins[r].shape, generator=g) * 3).to(torch.bfloat16))
                outs[r].fill_(float("nan"))
            if sent:  # new counts, read on the device at the replay
                used[c].copy_(torch.randint(0, bound + 1, (n, n), generator=g))
        torch.cuda.synchronize()
        for r in range(n):
            streams[r].wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(streams[r]):
                graphs[r].replay()
        torch.cuda.synchronize()
        for c, (ins, outs) in enumerate(bufs):
            if sent:
                wrong += left_out(ins, outs, splits, used[c].tolist(), [pends[r][c] for r in range(n)])
            else:
                wrong += sum(not torch.equal(outs[r], expected(ins, splits, r)) for r in range(n))
    for tr in trs:
        tr.raise_errors()
    return wrong == 0, f"{replays} replays of {calls} calls x {n} ranks, {wrong} wrong"


def check_timeout(timeout_s=0.5):
    trs, streams = world(2, timeout_s=timeout_s)
    inp = torch.randn(8, ROW, device=DEV).to(torch.bfloat16)
    out = torch.empty_like(inp)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.cuda.stream(streams[0]):
        trs[0].all_to_all(out, inp, [4, 4], [4, 4], "dispatch (forward) of wave 2", 4).wait()  # rank 1 never sends
    torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    try:
        trs[0].raise_errors()
        return False, f"no error after {wall:.2f} s"
    except CommunicationError as e:
        ok = "dispatch (forward) of wave 2" in str(e) and "rank 1" in str(e) and wall < timeout_s + 5
        return ok, f"raised after {wall:.2f} s: {e}"


def rate(programs, block_bytes=32768, rows=4096, in_use=None):
    """Rank 0 sends `rows` dispatch rows to rank 1 (none to itself), and back: the sending
    kernel's time on rank 0's stream, the receiving kernel's on rank 1's, each alone. With
    `in_use` (a fraction): only that share of the rows carries data (`sent_rows`)."""
    trs, streams = world(2, timeout_s=10.0, programs=programs, block_bytes=block_bytes)
    splits = [[0, rows], [rows, 0]]
    g = torch.Generator().manual_seed(3)
    ins, outs = buffers(splits, (ROW,), torch.bfloat16, g)
    ev = [torch.cuda.Event(enable_timing=True) for _ in range(4)]
    kept = rows if in_use is None else round(rows * in_use)
    sent = None if in_use is None else torch.tensor([0, kept], dtype=torch.int64, device=DEV)

    host = []

    def step():  # each timed kernel runs alone on the GPU (r24-r25 timed both ranks' puts at once),
        # its start event just before it (`hold`: r20-r34 timed the host's issue of the call too)
        with torch.cuda.stream(streams[0]):
            hold()
            ev[0].record()
            t0 = time.perf_counter()
            p0 = trs[0].all_to_all(outs[0], ins[0], [0, rows], [0, rows], "rate", rows, sent)
            host.append(time.perf_counter() - t0)
            ev[1].record()
        torch.cuda.synchronize()  # rank 0's put waits for nothing of this call: it ends alone
        with torch.cuda.stream(streams[1]):
            p1 = trs[1].all_to_all(outs[1], ins[1], [rows, 0], [rows, 0], "rate", rows)
        torch.cuda.synchronize()  # rank 1's rows are in place: its take below copies and waits for none
        with torch.cuda.stream(streams[1]):
            hold()
            ev[2].record()
            p1.wait()
            ev[3].record()
        with torch.cuda.stream(streams[0]):
            t0 = time.perf_counter()
            p0.wait()
            host[-1] += time.perf_counter() - t0
        torch.cuda.synchronize()
        return ev[0].elapsed_time(ev[1]), ev[2].elapsed_time(ev[3])

    for _ in range(5):
        step()
    puts, takes = zip(*(step() for _ in range(20)))
    ok = torch.equal(outs[1][:kept], ins[0][:kept]) and bool((outs[1][kept:].view(torch.uint8) == 255).all())
    nbytes = kept * ROW * 2  # the bytes that moved
    put_ms, take_ms = statistics.median(puts), statistics.median(takes)
    return dict(programs=programs, block_bytes=block_bytes, in_use=in_use or 1.0, MB=nbytes / 1e6, put_ms=put_ms,
                put_GBps=nbytes / put_ms / 1e6,
                put_GBps_per_program=nbytes / put_ms / 1e6 / programs, take_ms=take_ms,
                take_GBps=nbytes / take_ms / 1e6, host_us_per_call=statistics.median(host[5:]) * 1e6, correct=ok)


def host_profile(programs=16, rows=64, steps=200, top=14):
    """Where the host's time to issue a call and its wait goes: cProfile over `steps` calls
    (small ones: the host's cost, not the copy's), the functions of most own time."""
    import cProfile
    import io
    import pstats

    trs, streams = world(2, timeout_s=10.0, programs=programs)
    splits = [[0, rows], [rows, 0]]
    ins, outs = buffers(splits, (ROW,), torch.bfloat16, torch.Generator().manual_seed(4))

    def step():
        wait_all(one_call(trs, streams, splits, ins, outs, "profile", rows), streams)

    for _ in range(10):
        step()
    torch.cuda.synchronize()
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    for _ in range(steps):
        step()
    prof.disable()
    per_call_us = (time.perf_counter() - t0) / steps / 2 * 1e6
    torch.cuda.synchronize()
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(top)
    return per_call_us, text.getvalue()


def copy_rate(rows=4096):
    a = torch.randn(rows, ROW, device=DEV).to(torch.bfloat16)
    b = torch.empty_like(a)
    ms = kernel_ms(lambda: b.copy_(a))
    return dict(MB=a.numel() * 2 / 1e6, copy_ms=ms, copy_GBps=a.numel() * 2 / ms / 1e6)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default="p2p_check.json")
    ap.add_argument("--programs", default="4,8,16,24,32,64")
    ap.add_argument("--blocks", default="32768,65536", help="bytes per program and step")
    ap.add_argument("--host-profile", action="store_true", help="also profile the host's side of a call")
    args = ap.parse_args()
    cases = []

    def case(name, fn, *a, **kw):
        try:
            ok, detail = fn(*a, **kw)
        except Exception as e:  # noqa: BLE001 - a failing case is reported, the run goes on
            ok, detail = False, f"{type(e).__name__}: {str(e)[:400]}"
        cases.append(dict(check=name, ok=ok, detail=detail))
        print(f"{name:44} {'ok' if ok else 'FAIL'}  {detail}", flush=True)

    case("rows, n=2, bf16 dispatch rows", check_calls, 2, (ROW,), torch.bfloat16, seed=1)
    case("rows, n=4, bf16 dispatch rows", check_calls, 4, (ROW,), torch.bfloat16, seed=2)
    case("rows, n=3, 12-byte rows (byte copies)", check_calls, 3, (3,), torch.float32, seed=3)
    case("rows in use only, n=4, bf16 dispatch rows", check_calls, 4, (ROW,), torch.bfloat16, seed=4, sent=True)
    case("rows in use only, n=3, 12-byte rows", check_calls, 3, (3,), torch.float32, seed=5, sent=True)
    case("sync-free, n=2", check_sync_free)
    case("CUDA graphs, n=2", check_graphs)
    case("CUDA graphs, n=4", check_graphs, 4)
    case("CUDA graphs, rows in use only, n=4", check_graphs, 4, sent=True)
    case("timeout: a peer that never sends", check_timeout)
    rates = []
    for block in map(int, args.blocks.split(",")):
        for G in map(int, args.programs.split(",")):
            try:
                rates.append(rate(G, block))
            except Exception as e:  # noqa: BLE001
                rates.append(dict(programs=G, block_bytes=block, error=f"{type(e).__name__}: {str(e)[:300]}"))
    for share in (0.66, 0.33):  # the rows in use of a dsv3 region at EP 8; of a top-2 model's at EP 4
        try:
            rates.append(rate(16, in_use=share))
        except Exception as e:  # noqa: BLE001
            rates.append(dict(programs=16, block_bytes=32768, in_use=share, error=f"{type(e).__name__}: {str(e)[:300]}"))
    base = copy_rate()
    print(f"\ncopy_ of {base['MB']:.0f} MB: {base['copy_ms']:.3f} ms ({base['copy_GBps']:.0f} GB/s, read+write "
          f"{2 * base['copy_GBps']:.0f})")
    print(f"{'block':>6} {'G':>4} {'in use':>6} {'put ms':>8} {'GB/s':>7} {'GB/s/prog':>9} {'take ms':>8} {'GB/s':>7} "
          f"{'host us':>8} correct")
    for r in rates:
        if "error" in r:
            print(f"{r['block_bytes']:>6} {r['programs']:>4} {r['error']}")
            continue
        print(f"{r['block_bytes']:>6} {r['programs']:>4} {r['in_use']:6.2f} {r['put_ms']:8.3f} {r['put_GBps']:7.0f} "
              f"{r['put_GBps_per_program']:9.1f} {r['take_ms']:8.3f} {r['take_GBps']:7.0f} {r['host_us_per_call']:8.1f} "
              f"{r['correct']}")
    profile = None
    if args.host_profile:
        per_call_us, profile = host_profile()
        print(f"\nhost per call and wait, profiled (cProfile's own cost included): {per_call_us:.1f} us\n{profile}")
    failed = sum(not c["ok"] for c in cases) + sum("error" in r or not r["correct"] for r in rates)
    provenance.dump(args.json, cases=cases, rates=rates, copy=base, host_profile=profile, failed=failed)
    print(f"{len(cases) + len(rates) - failed} passed, {failed} failed", flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
