"""Where an autocast call's device time goes (one GPU, dsv3, token W=1, routing given): the
kernels of one call of the bf16 layer and of the fp32 layer under bf16 autocast (training
mode: cast per call; eval mode: casts kept), by total CUDA time (torch.profiler), in a fresh
process (r38b's autocast rows ran after compile_bench's compiled graphs, whose memory pools
may have left the allocator short: its cudaMallocs and retries per call are printed too).

    python3 benchmarks/autocast_probe.py
"""
from __future__ import annotations

import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.host_launches import build  # noqa: E402
from benchmarks.overlap import PRESETS  # noqa: E402


def top(name, fn, n=8):
    """The call's device time (events, median of 10), its kernels' summed time, the caching
    allocator's device allocations and retries per call (a cudaMalloc can stall the stream),
    and its heaviest kernels."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    before = torch.cuda.memory_stats()
    times = []
    for _ in range(10):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e))
    after = torch.cuda.memory_stats()
    mallocs = (after.get("num_device_alloc", 0) - before.get("num_device_alloc", 0)) / 10
    retries = (after.get("num_alloc_retries", 0) - before.get("num_alloc_retries", 0)) / 10
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    events = sorted(prof.key_averages(), key=lambda e: -e.device_time_total)
    total = sum(e.self_device_time_total for e in events) / 1e3
    print(f"== {name}: {sorted(times)[5]:.3f} ms a call (events), {total:.3f} ms of kernels, per call "
          f"{mallocs:.1f} cudaMalloc and {retries:.1f} allocator retries, "
          f"{torch.cuda.memory_reserved() / 2**30:.1f} GiB reserved", flush=True)
    for e in events[:n]:
        print(f"   {e.self_device_time_total / 1e3:8.3f} ms  x{e.count:<4} {e.key[:90]}", flush=True)


def main() -> int:
    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    layer, x, idx, tw = build(PRESETS["dsv3"], 1, device)
    fp32 = build(PRESETS["dsv3"], 1, device)[0].float()
    with torch.no_grad():
        top("bf16 layer", lambda: layer(x, topk_idx=idx, topk_weights=tw))

        def autocast_call():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                return fp32(x.float(), topk_idx=idx, topk_weights=tw)

        top("fp32 layer under autocast, training mode (cast per call)", autocast_call)
        fp32.eval()
        top("fp32 layer under autocast, eval mode (casts kept)", autocast_call)
    return 0


if __name__ == "__main__":
    sys.exit(main())
