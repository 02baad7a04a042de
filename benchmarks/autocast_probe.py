"""Where an autocast call's device time goes (one GPU, dsv3, token W=1, routing given): the
kernels of one call of the bf16 layer and of the fp32 layer under bf16 autocast (training
mode: cast per call; eval mode: casts kept), by total CUDA time (torch.profiler), in a fresh
process (r38b's autocast rows ran after compile_bench's compiled graphs, whose memory pools
may have left the allocator short: its cudaMallocs and retries per call are printed too).

    python3 benchmarks/autocast_probe.py
    python3 benchmarks/autocast_probe.py --fp8   # the FP8 calls' kernels instead

With `--fp8` the same lists for the FP8 layer at dsv3 (issue 24): inference (eval, rowwise FP8
experts held; with FP8 dispatch too) against the bf16 layer's forward, and a training step
(forward+backward) of the bf16 layer against `fp8_backward="data"` with every FP8 weight kept
(`weight_cache="always"`, the microbatches of a step sharing one quantization).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.host_launches import build  # noqa: E402
from benchmarks.overlap import PRESETS, variant_layer  # noqa: E402


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


def fp8_calls(layer, x, idx, tw) -> None:
    """The FP8 layer's kernels at dsv3 (see the module docstring)."""
    fp8 = torch.float8_e4m3fn
    with torch.no_grad():
        top("bf16 layer, forward", lambda: layer(x, topk_idx=idx, topk_weights=tw), n=12)
        for name, knobs in (("FP8 rows held", {}), ("FP8 rows held + FP8 dispatch", dict(dispatch_dtype=fp8))):
            v = variant_layer(layer, max_tokens=layer.config.max_tokens, expert_dtype=fp8, fp8_scaling="rows",
                              **knobs).eval()
            v.hold_fp8_experts()
            top(f"{name}, eval forward", lambda: v(x, topk_idx=idx, topk_weights=tw), n=12)
            del v
    dy = torch.randn_like(x)
    xg = x.clone().requires_grad_(True)
    for name, lv in (("bf16 layer", layer),
                     ("FP8 rows, fp8_backward='data', weights kept",
                      variant_layer(layer, max_tokens=layer.config.max_tokens, expert_dtype=fp8, fp8_scaling="rows",
                                    fp8_backward="data", weight_cache="always"))):
        def step():
            lv.zero_grad(set_to_none=True)
            lv(xg, topk_idx=idx, topk_weights=tw).backward(dy)
        top(f"{name}, training step (forward+backward)", step, n=16)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fp8", action="store_true", help="the FP8 calls' kernels (issue 24) instead of autocast's")
    args = ap.parse_args()
    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    layer, x, idx, tw = build(PRESETS["dsv3"], 1, device)
    if args.fp8:
        fp8_calls(layer, x, idx, tw)
        return 0
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
