"""The overlap benchmark: how much of the all-to-all do the waves hide?

With no arguments on a CPU host it starts a 4-rank Gloo simulation (`ep.launch`) at the
small `cpu-small` preset. Under torchrun (or `ep.launch`) it runs in place; on GPUs it
uses NCCL (presets `dsv3`, `wide`, `decode`).

It measures, per rank, with device events (CUDA) or a barrier-aligned wall clock (CPU),
after warm-up, the median of `--iters` runs, and reports the max over ranks:
- each stage alone on the W=1 plan: dispatch, linear1, linear2, combine (permutes included
  in the stage that does them), and route+plan;
- the layer's expert part (plan given) for each W, forward and forward+backward;
- comm = dispatch + combine, compute = linear1 + linear2, ideal = max(comm, compute),
  overlap efficiency = (W=1 - waved) / (W=1 - ideal), speedup over W=1;
- bytes on the wire: rows sent to other ranks x H x element size, per W.
It prints a table on rank 0 and writes the same as JSON (`--json`).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, List

import torch
import torch.distributed as dist

import ep
from ep import stages
from ep.pipeline import waved_experts
from ep.plan import make_plan
from ep.transport import TorchDistTransport

PRESETS: Dict[str, Dict] = {
    # small enough for 4 ranks on 2 CPU cores; comm and compute of the same order there
    "cpu-small": dict(T=512, H=256, F=64, local_experts=8, k=4, dtype="float32"),
    "dsv3": dict(T=4096, H=7168, F=2048, local_experts=32, k=8, dtype="bfloat16"),
    "wide": dict(T=4096, H=4096, F=1408, local_experts=16, k=6, dtype="bfloat16"),
    "decode": dict(T=128, H=7168, F=2048, local_experts=32, k=8, dtype="bfloat16"),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default=None, help=f"one of {sorted(PRESETS)} (default: cpu-small on CPU, dsv3 on GPU)")
    p.add_argument("--waves", default="1,2,4", help="comma-separated W values; 1 is always measured")
    p.add_argument("--iters", type=int, default=None, help="timed runs per measurement (default 10 CPU, 20 GPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed runs first (default 2 CPU, 5 GPU)")
    p.add_argument("--no-backward", action="store_true", help="skip the forward+backward rows")
    p.add_argument("--json", default="overlap.json", help="where rank 0 writes the results")
    p.add_argument("--nproc", type=int, default=4, help="ranks to start when not launched (CPU simulation)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def under_launcher() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


class Timer:
    """Median of timed runs after warm-up, max over ranks, in ms."""

    def __init__(self, device: torch.device, warmup: int, iters: int) -> None:
        self.device, self.warmup, self.iters = device, warmup, iters

    def __call__(self, fn: Callable[[], object]) -> float:
        for _ in range(self.warmup):
            fn()
        times: List[float] = []
        cuda = self.device.type == "cuda"
        for _ in range(self.iters):
            if cuda:
                torch.cuda.synchronize()
            dist.barrier()
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        med = torch.tensor([statistics.median(times)], dtype=torch.float64, device=self.device)
        dist.all_reduce(med, op=dist.ReduceOp.MAX)
        return med.item()


def git_commit() -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "ep", "benchmarks/overlap.py"], cwd=os.path.dirname(here),
                               capture_output=True, text=True).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def run(args) -> dict:
    ep.init_distributed()
    rank, n = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    preset_name = args.preset or ("dsv3" if device.type == "cuda" else "cpu-small")
    if preset_name not in PRESETS:
        raise SystemExit(f"--preset must be one of {sorted(PRESETS)}, got {preset_name!r}")
    P = PRESETS[preset_name]
    dtype = getattr(torch, P["dtype"])
    waves = sorted({1, *(int(w) for w in args.waves.split(","))})
    iters = args.iters or (20 if device.type == "cuda" else 10)
    warmup = args.warmup if args.warmup is not None else (5 if device.type == "cuda" else 2)
    timer = Timer(device, warmup, iters)

    def log(msg: str) -> None:
        if rank == 0:
            print(msg, flush=True)

    E = P["local_experts"] * n
    torch.manual_seed(args.seed + 17)  # the router is replicated: same init everywhere
    cfg = ep.MoEConfig(hidden=P["H"], ffn_hidden=P["F"], num_experts=E, top_k=P["k"])
    layer = ep.ExpertParallelMoE(cfg).to(device=device, dtype=dtype)
    torch.manual_seed(args.seed * 1000 + rank)
    x = torch.randn(P["T"], P["H"], device=device, dtype=dtype)
    dy = torch.randn_like(x)
    w1, w2 = layer.experts.w1.detach(), layer.experts.w2.detach()
    tr = TorchDistTransport()
    with torch.no_grad():
        idx, tw = layer.router(x)
    plans = {W: make_plan(idx, E, W, tr, tw, cfg.dedup_across_waves) for W in waves}
    plan1 = plans[1]
    acc = torch.promote_types(dtype, torch.float32)
    elem = torch.tensor([], dtype=dtype).element_size()

    steps = 5 + len(waves) * (1 if args.no_backward else 2)
    step = [0]

    def measure(name: str, fn) -> float:
        step[0] += 1
        log(f"[{step[0]}/{steps}] {name} ...")
        ms = timer(fn)
        log(f"[{step[0]}/{steps}] {name}: {ms:.3f} ms")
        return ms

    # ---- each stage alone, W=1, full machine --------------------------------------
    item_w = plan1.recv_weights[plan1.item_slot_flat]
    rows_all = stages.received_rows(plan1, x)
    stages.dispatch(x, rows_all, plan1, 0, tr).wait()
    h = stages.linear1(rows_all, w1, plan1, 0)
    o = stages.linear2(h, w2, plan1, 0)

    def route_and_plan():
        idx_, tw_ = layer.router(x)
        make_plan(idx_, E, 1, tr, tw_)

    def combine_alone():
        y = torch.zeros(x.shape, dtype=acc, device=device)
        acc_all = stages.return_accumulator(plan1, x)
        stages.unpermute(y, stages.combine(o, item_w, acc_all, plan1, 0, tr).wait(), plan1, 0)

    with torch.no_grad():
        st = {
            "route+plan": measure("route + plan (W=1)", route_and_plan),
            "dispatch": measure("dispatch alone", lambda: stages.dispatch(x, rows_all, plan1, 0, tr).wait()),
            "linear1": measure("linear1 alone", lambda: stages.linear1(rows_all, w1, plan1, 0)),
            "linear2": measure("linear2 alone", lambda: stages.linear2(h, w2, plan1, 0)),
            "combine": measure("combine alone", combine_alone),
        }
    comm = st["dispatch"] + st["combine"]
    compute = st["linear1"] + st["linear2"]
    ideal = max(comm, compute)

    # ---- the layer's expert part per W -----------------------------------------------
    layers = {}
    for W in waves:
        plan = plans[W]
        with torch.no_grad():
            fwd = measure(f"layer W={W} forward", lambda: waved_experts(x, tw, w1, w2, plan, tr, cfg.sm_carveout))
        row = {"fwd_ms": fwd}
        if not args.no_backward:
            w1g, w2g = w1.clone().requires_grad_(True), w2.clone().requires_grad_(True)
            xg, twg = x.clone().requires_grad_(True), tw.clone().requires_grad_(True)

            def fwd_bwd():
                waved_experts(xg, twg, w1g, w2g, plan, tr, cfg.sm_carveout).backward(dy)

            row["fwdbwd_ms"] = measure(f"layer W={W} forward+backward", fwd_bwd)
        remote = [sum(plan.send_counts[w][r] for w in range(W)) for r in range(n) if r != rank]
        wire = torch.tensor([sum(remote) * P["H"] * elem, plan.num_routes_sent], dtype=torch.float64, device=device)
        dist.all_reduce(wire, op=dist.ReduceOp.MAX)
        row["dispatch_wire_bytes_max_rank"] = int(wire[0].item())
        row["rows_per_token"] = wire[1].item() / P["T"]
        layers[W] = row

    seq = layers[1]["fwd_ms"]
    for W, row in layers.items():
        row["speedup_vs_w1"] = seq / row["fwd_ms"]
        row["overlap_efficiency"] = (seq - row["fwd_ms"]) / (seq - ideal) if seq > ideal else None
        if "fwdbwd_ms" in row:
            row["fwdbwd_speedup_vs_w1"] = layers[1]["fwdbwd_ms"] / row["fwdbwd_ms"]

    result = {
        "meta": {
            "preset": preset_name, **P, "world_size": n, "num_experts": E,
            "backend": dist.get_backend(), "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
            "torch": torch.__version__,
            "nccl": ".".join(map(str, torch.cuda.nccl.version())) if device.type == "cuda" else None,
            "commit": git_commit(), "command": " ".join(sys.argv), "iters": iters, "warmup": warmup,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "timing": "cuda events, median, max over ranks" if device.type == "cuda" else "wall clock after a barrier, median, max over ranks",
        },
        "stages_ms": st,
        "comm_ms": comm, "compute_ms": compute, "ideal_ms": ideal,
        "layers": {str(W): row for W, row in layers.items()},
    }
    if rank == 0:
        print(format_table(result), flush=True)
        if args.json:
            os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
            with open(args.json, "w") as f:
                json.dump(result, f, indent=2)
            print(f"wrote {args.json}", flush=True)
    dist.barrier()
    dist.destroy_process_group()
    return result


def format_table(r: dict) -> str:
    m = r["meta"]
    lines = [
        f"overlap benchmark: preset {m['preset']} (T={m['T']}/rank, H={m['H']}, F={m['F']}, "
        f"E={m['num_experts']} ({m['local_experts']}/rank), k={m['k']}, {m['dtype']}), "
        f"{m['world_size']} ranks, {m['backend']}, {m['device']}",
        f"times in ms: {m['timing']}",
        "",
        "stage alone (W=1)   ms",
    ]
    for name, ms in r["stages_ms"].items():
        lines.append(f"  {name:<17} {ms:8.3f}")
    lines += [
        f"  {'comm':<17} {r['comm_ms']:8.3f}   (dispatch + combine)",
        f"  {'compute':<17} {r['compute_ms']:8.3f}   (linear1 + linear2)",
        f"  {'ideal':<17} {r['ideal_ms']:8.3f}   max(comm, compute)",
        "",
        "layer (plan given)  fwd ms   vs W=1   overlap eff   fwd+bwd ms  vs W=1   rows/token  dispatch MB (max rank)",
    ]
    for W, row in r["layers"].items():
        eff = row["overlap_efficiency"]
        label = "sequential W=1" if W == "1" else f"waved W={W}"
        lines.append(
            f"  {label:<17} {row['fwd_ms']:7.3f}   {row['speedup_vs_w1']:5.2f}x   "
            f"{'   n/a' if eff is None else f'{eff:6.2f}':>11}   "
            f"{row.get('fwdbwd_ms', float('nan')):9.3f}   {row.get('fwdbwd_speedup_vs_w1', float('nan')):5.2f}x   "
            f"{row['rows_per_token']:9.2f}   {row['dispatch_wire_bytes_max_rank'] / 1e6:10.2f}"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    if not under_launcher() and not torch.cuda.is_available():
        from ep.launch import spawn_local

        print(f"starting a {args.nproc}-rank Gloo simulation on this CPU host", flush=True)
        return spawn_local(args.nproc, [os.path.abspath(__file__), *(argv if argv is not None else sys.argv[1:])])
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
