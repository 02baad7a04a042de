"""What the host issues in one eager forward (and forward+backward) of the whole layer call (CUDA).

    python3 benchmarks/host_launches.py --preset dsv3,decode --waves 1,2,4 --json host_launches.json

One process, one GPU, a world of one (the all-to-alls are copies: the launches of a rank's
own work, without the transport's). Per preset, wave split and W, routing given (each
token k of the E experts, uniformly at random):
- host ms to issue one call (median of 10 after 3 warm-ups, the device synchronised
  between calls so its queue never fills), and the device ms of that call;
- launches per call, counted by `torch.profiler` from the CUDA runtime/driver calls
  that put work on a stream (kernels, copies, memsets, event records and waits);
- the ops of most host time (self CPU time, one profiled call), to see what to fuse;
- at W=1, the forward's device work in order with each kernel's time;
- the forward, and a training step (forward and backward), captured in CUDA graphs: their
  replays' host and device ms (the device floor of the call on this GPU, no host gaps).
The floor it shows: a call's host time is about its launches times one launch's cost on this
host; what is left of the device time after the host has issued the last launch is what an
eager caller waits for. Not a benchmark of the device time (`overlap.py` is).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ep  # noqa: E402
from benchmarks import provenance  # noqa: E402
from benchmarks.overlap import PRESETS  # noqa: E402

STREAM_WORK = ("LaunchKernel", "Memcpy", "Memset", "EventRecord", "StreamWaitEvent", "LaunchCooperative")


def build(P: dict, W: int, device, split: str = "tokens"):
    E = P.get("experts", P.get("local_experts", 1))
    cfg = ep.MoEConfig(hidden=P["H"], ffn_hidden=P["F"], num_experts=E, top_k=P["k"], num_waves=W, wave_split=split,
                       num_shared_experts=P.get("shared", 0) and P["F"], max_tokens=P["T"])
    layer = ep.ExpertParallelMoE(cfg).to(device=device, dtype=getattr(torch, P["dtype"]))
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(P["T"], P["H"], generator=g).to(device=device, dtype=layer.experts.w1.dtype)
    idx = torch.stack([torch.randperm(E, generator=g)[:P["k"]] for _ in range(P["T"])]).to(device)
    tw = torch.rand(P["T"], P["k"], generator=g).to(device)
    return layer, x, idx, tw


def timed(fn, warmup=3, iters=10):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    host, dev = [], []
    for _ in range(iters):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        t0 = time.perf_counter()
        fn()
        host.append((time.perf_counter() - t0) * 1e3)
        e.record()
        e.synchronize()
        dev.append(s.elapsed_time(e))
    return statistics.median(host), statistics.median(dev)


def launches(fn, top: int):
    """Stream work the host issued in one call of `fn`, by kind; and the ops of most self CPU time."""
    fn()
    torch.cuda.synchronize()
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    kinds: dict = {}
    for ev in prof.events():
        for k in STREAM_WORK:
            if k in ev.name and ev.device_type == torch.autograd.DeviceType.CPU:
                kinds[k] = kinds.get(k, 0) + 1
    kernels = [(ev.name, round(ev.time_range.elapsed_us(), 1))
               for ev in sorted(prof.events(), key=lambda e: e.time_range.start)
               if ev.device_type == torch.autograd.DeviceType.CUDA and not ev.name.startswith("ep.")]
    ops = sorted((a for a in prof.key_averages() if not a.key.startswith(("cuda", "cu"))),
                 key=lambda a: a.self_cpu_time_total, reverse=True)[:top]
    return kinds, [dict(op=a.key, calls=a.count, self_cpu_us=round(a.self_cpu_time_total, 1)) for a in ops], kernels


def python_profile(fn, calls: int = 20, top: int = 25) -> str:
    """cProfile of `calls` calls of `fn`: the Python functions of most own time (what the
    host spends outside the launches' C++ is here: ours, torch's wrappers, Triton's launcher)."""
    import cProfile
    import io
    import pstats

    fn()
    torch.cuda.synchronize()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        fn()
    prof.disable()
    torch.cuda.synchronize()
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(top)
    return text.getvalue()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="dsv3,decode")
    ap.add_argument("--waves", default="1,2,4")
    ap.add_argument("--expert-waves", default="", help="W values of expert waves too (e.g. 2; W=1 is token waves' map)")
    ap.add_argument("--top", type=int, default=14)
    ap.add_argument("--json", default="host_launches.json")
    ap.add_argument("--python-profile", action="store_true", help="also cProfile each forward (W=1 only)")
    args = ap.parse_args()
    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    rows = []
    for preset in args.preset.split(","):
        P = dict(PRESETS[preset])
        if "local_experts" in P:  # one rank holds what a rank of two would (the per-rank work of 2 GPUs)
            P["experts"] = P["local_experts"]
        runs = [("tokens", int(w)) for w in args.waves.split(",")]
        runs += [("experts", int(w)) for w in args.expert_waves.split(",") if w.strip()]
        for split, W in runs:
            layer, x, idx, tw = build(P, W, device, split)
            name = preset if split == "tokens" else preset + "/experts"
            xg = x.clone().requires_grad_(True)

            def fwd():
                with torch.no_grad():
                    layer(x, topk_idx=idx, topk_weights=tw)

            def step():  # gradients set to None first, as a training step's zero_grad does
                layer.zero_grad(set_to_none=True)
                xg.grad = None
                layer(xg, topk_idx=idx, topk_weights=tw).sum().backward()

            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                fwd()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                fwd()
            g_host, g_dev = timed(graph.replay)
            rows.append(dict(preset=name, W=W, call="fwd_graph", host_ms=g_host, device_ms=g_dev))
            print(f"{name:8} W={W} fwd, CUDA graph: host {g_host:7.3f} ms  device {g_dev:7.3f} ms", flush=True)
            del graph
            with torch.cuda.stream(side):  # the training step's warm-up, then its capture
                step()
            torch.cuda.current_stream().wait_stream(side)
            layer.zero_grad(set_to_none=True)
            xg.grad = None
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                layer(xg, topk_idx=idx, topk_weights=tw).sum().backward()
            g_host, g_dev = timed(graph.replay)
            rows.append(dict(preset=name, W=W, call="fwd_bwd_graph", host_ms=g_host, device_ms=g_dev))
            print(f"{name:8} W={W} fwd+bwd, CUDA graph: host {g_host:7.3f} ms  device {g_dev:7.3f} ms", flush=True)
            del graph
            layer.zero_grad(set_to_none=True)
            xg.grad = None
            for what, fn in (("fwd", fwd), ("fwd_bwd", step)):
                host_ms, dev_ms = timed(fn)
                kinds, ops, kernels = launches(fn, args.top)
                row = dict(preset=name, W=W, call=what, host_ms=host_ms, device_ms=dev_ms,
                           launches=sum(v for k, v in kinds.items()), by_kind=kinds, top_ops=ops,
                           device_work=kernels)
                rows.append(row)
                print(f"{name:8} W={W} {what:8} host {host_ms:7.3f} ms  device {dev_ms:7.3f} ms  "
                      f"stream work {row['launches']:4d} {kinds}", flush=True)
                for o in ops[:8]:
                    print(f"      {o['self_cpu_us']:9.1f} us  {o['calls']:4d} x  {o['op'][:90]}")
                if W == 1 and what == "fwd":
                    print("      on the device, in order (us): " + " | ".join(f"{k[:40]} {us}" for k, us in kernels),
                          flush=True)
                if args.python_profile and W == 1 and what == "fwd":
                    row["python_profile"] = python_profile(fn)
                    print(row["python_profile"], flush=True)
            del layer
            torch.cuda.empty_cache()
    provenance.dump(args.json, rows=rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
