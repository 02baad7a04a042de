"""The overlap benchmark: how much of the all-to-all do the waves hide?

With no arguments on a CPU host it starts a 4-rank Gloo simulation (`ep.launch`) at the
small `cpu-small` preset. Under torchrun (or `ep.launch`) it runs in place; on GPUs it
uses NCCL (presets `dsv3`, `wide`, `decode`; several at once: `--preset dsv3,wide`).

It measures, per rank, with device events (CUDA) or a barrier-aligned wall clock (CPU),
after warm-up, the median of `--iters` runs, and reports the max over ranks:
- each stage alone on the W=1 plan: dispatch, linear1, linear2, combine (permutes included
  in the stage that does them), and route+plan;
- the layer's expert part (plan given) for each W, forward and forward+backward, for each
  SM carveout in `--carveouts` (CUDA only);
- comm = dispatch + combine (the fastest transport's, with `--transports`), compute =
  linear1 + linear2, ideal = max(comm, compute),
  overlap efficiency = (W=1 - waved) / (W=1 - ideal), speedup over W=1 (and over the
  naive hand-written layer, `--naive`);
- bytes on the wire: rows sent to other ranks x H x element size, per W.
"host ms" is the time the host took to issue the forward (on CUDA the device may still be
running when it returns; on CPU it is the whole call): where it is close to "fwd ms", the
layer is paced by the host, not the device. It prints a table per preset on rank 0 and writes all of it as JSON (`--json`); with
`--trace-dir` it also saves a profiler timeline (Chrome trace JSON and a PNG) of one
waved forward and forward+backward per preset.
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
from typing import Callable, Dict, List, Optional

import torch
import torch.distributed as dist

import ep
from ep import stages
from ep.pipeline import waved_experts
from ep.plan import make_plan
from ep.transport import TorchDistTransport, make_transport

PRESETS: Dict[str, Dict] = {
    # small enough for 4 ranks on 2 CPU cores
    "cpu-small": dict(T=512, H=256, F=64, local_experts=8, k=4, dtype="float32"),
    "dsv3": dict(T=4096, H=7168, F=2048, local_experts=32, k=8, dtype="bfloat16"),
    "wide": dict(T=4096, H=4096, F=1408, local_experts=16, k=6, dtype="bfloat16"),
    "decode": dict(T=128, H=7168, F=2048, local_experts=32, k=8, dtype="bfloat16"),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default=None, help=f"comma-separated, from {sorted(PRESETS)} (default: cpu-small on CPU, dsv3 on GPU)")
    p.add_argument("--waves", default="1,2,4,auto",
                   help="comma-separated W values, or auto (the W ep.sim picks from rates measured here); 1 is always measured")
    p.add_argument("--carveouts", default="0", help="comma-separated SM carveouts for the waved runs (CUDA)")
    p.add_argument("--transports", default="nccl",
                   help="comma-separated: nccl (torch.distributed), copy_engine (CUDA symmetric memory, one host)")
    p.add_argument("--dedup", default="rank", help="comma-separated: rank (once per rank), wave (once per rank and wave)")
    p.add_argument("--iters", type=int, default=None, help="timed runs per measurement (default 10 CPU, 20 GPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed runs first (default 2 CPU, 5 GPU)")
    p.add_argument("--no-backward", action="store_true", help="skip the forward+backward rows")
    p.add_argument("--naive", action="store_true", help="also time the naive hand-written layer (forward)")
    p.add_argument("--trace-dir", default=None, help="save a profiler timeline per preset here (rank 0)")
    p.add_argument("--json", default="overlap.json", help="where rank 0 writes the results")
    p.add_argument("--nproc", type=int, default=4, help="ranks to start when not launched (CPU simulation)")
    p.add_argument("--routing", default="router",
                   help="router (the layer's router on random tokens), powerlaw4 (expert loads follow a power "
                        "law with max/mean 4), hot (every token picks expert 0 and k-1 others)")
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
        host: List[float] = []
        cuda = self.device.type == "cuda"
        for _ in range(self.iters):
            if cuda:
                torch.cuda.synchronize()
            dist.barrier()
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                h0 = time.perf_counter()
                fn()
                host.append((time.perf_counter() - h0) * 1e3)  # issuing it (the device may still run)
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        med = torch.tensor([statistics.median(times), statistics.median(host or times)], dtype=torch.float64,
                           device=self.device)
        dist.all_reduce(med, op=dist.ReduceOp.MAX)
        self.last_host_ms = med[1].item()
        return med[0].item()


def git_commit() -> str:
    """EP_COMMIT when the launcher set it (the GPU machine's copy may carry a stale .git), else git's HEAD."""
    if os.environ.get("EP_COMMIT"):
        return os.environ["EP_COMMIT"]
    top = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=top, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "ep", "benchmarks"], cwd=top,
                               capture_output=True, text=True).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def environment(device: torch.device) -> dict:
    return {
        "world_size": dist.get_world_size(), "backend": dist.get_backend(),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else (platform.processor() or "cpu"),
        "torch": torch.__version__,
        "nccl": ".".join(map(str, torch.cuda.nccl.version())) if device.type == "cuda" else None,
        "commit": git_commit(), "command": " ".join(sys.argv),
        "env": {k: v for k, v in os.environ.items() if k.startswith(("NCCL_", "TORCH_SYMM", "NVSHMEM_"))},
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "timing": "cuda events, median, max over ranks" if device.type == "cuda" else "wall clock after a barrier, median, max over ranks",
    }


def run_preset(preset_name: str, args, device: torch.device, log) -> dict:
    rank, n = dist.get_rank(), dist.get_world_size()
    P = PRESETS[preset_name]
    dtype = getattr(torch, P["dtype"])
    cuda = device.type == "cuda"
    wave_args = [w.strip() for w in args.waves.split(",")]
    want_auto = "auto" in wave_args
    waves = sorted({1, *(int(w) for w in wave_args if w != "auto")})
    waves = [W for W in waves if W <= P["local_experts"]]
    carveouts = sorted({int(c) for c in args.carveouts.split(",")}) if cuda else [0]
    dedups = [d.strip() for d in args.dedup.split(",")]
    if any(d not in ("rank", "wave") for d in dedups):
        raise SystemExit(f"--dedup takes rank and/or wave, got {args.dedup!r}")
    if args.routing not in ("router", "powerlaw4", "hot"):
        raise SystemExit(f"--routing takes router, powerlaw4 or hot, got {args.routing!r}")
    iters = args.iters or (20 if cuda else 10)
    warmup = args.warmup if args.warmup is not None else (5 if cuda else 2)
    timer = Timer(device, warmup, iters)

    E = P["local_experts"] * n
    torch.manual_seed(args.seed + 17)  # the router is replicated: same init everywhere
    cfg = ep.MoEConfig(hidden=P["H"], ffn_hidden=P["F"], num_experts=E, top_k=P["k"])
    layer = ep.ExpertParallelMoE(cfg).to(device=device, dtype=dtype)
    torch.manual_seed(args.seed * 1000 + rank)
    x = torch.randn(P["T"], P["H"], device=device, dtype=dtype)
    dy = torch.randn_like(x)
    w1, w2 = layer.experts.w1.detach(), layer.experts.w2.detach()
    tr = TorchDistTransport()
    kinds = [t.strip() for t in args.transports.split(",")]
    if any(t not in ep.config.TRANSPORTS for t in kinds) or ("copy_engine" in kinds and not cuda):
        raise SystemExit(f"--transports takes nccl and (on CUDA) copy_engine, got {args.transports!r}")
    transports = {t: (tr if t == "nccl" else make_transport(None, t)) for t in kinds}
    with torch.no_grad():
        idx, tw = layer.router(x)
    if args.routing != "router":  # skewed routing: the same hot experts seen from every rank
        from tests.cases import skewed_routing

        g = torch.Generator().manual_seed(args.seed)
        idx = skewed_routing(P["T"], E, P["k"], args.routing, g).to(device)
    loads = torch.zeros(E, dtype=torch.float64, device=device).index_add_(
        0, idx.flatten(), torch.ones(idx.numel(), dtype=torch.float64, device=device))
    dist.all_reduce(loads)
    load_max_over_mean = (loads.max() / loads.mean()).item()
    acc = torch.promote_types(dtype, torch.float32)
    elem = x.element_size()

    variants = [(W, c, d, False, t) for t in kinds for d in dedups for W in waves for c in (carveouts if W > 1 else [0])]
    if want_auto:  # the model's choice from rates measured now (as MoEConfig(num_waves="auto") does)
        from ep.auto import choose_waves

        auto_cfg = ep.MoEConfig(hidden=P["H"], ffn_hidden=P["F"], num_experts=E, top_k=P["k"], num_waves="auto",
                                dedup_across_waves=dedups[0] == "rank", transport=kinds[0])
        auto_tr = transports[kinds[0]]
        t0 = time.perf_counter()
        W_auto = choose_waves(auto_cfg, auto_tr, w1, w2, P["T"])  # first call: probes and caches
        auto_first_ms = (time.perf_counter() - t0) * 1e3
        t0 = time.perf_counter()
        choose_waves(auto_cfg, auto_tr, w1, w2, P["T"])  # cached figures: only the model and one exchange
        auto_cached_ms = (time.perf_counter() - t0) * 1e3
        log(f"  num_waves=auto picks W={W_auto} (deciding took {auto_first_ms:.1f} ms the first time, "
            f"{auto_cached_ms:.1f} ms with the figures cached)")
        variants.append((W_auto, carveouts[0], dedups[0], True, kinds[0]))
    steps = 5 + 2 * (len(kinds) - 1) + len(variants) * (1 if args.no_backward else 2) + int(args.naive)
    step = [0]

    def measure(name: str, fn) -> float:
        step[0] += 1
        ms = timer(fn)
        log(f"  [{step[0]}/{steps}] {preset_name}: {name}: {ms:.3f} ms")
        return ms

    # ---- each stage alone, W=1, full machine --------------------------------------
    def route_and_plan():
        idx_, tw_ = layer.router(x)
        make_plan(idx_, E, 1, tr, tw_)

    def stages_alone(tr=tr, only_comm: bool = False, tag: str = "") -> Dict[str, float]:
        """Each stage on the W=1 plan (only dispatch and combine with `only_comm`); buffers freed on return."""
        plan1 = make_plan(idx, E, 1, tr, tw)
        touch_w = plan1.touch_weights.to(acc)
        rows_all = stages.received_rows(plan1, x)
        stages.dispatch(x, rows_all, plan1, 0, tr).wait()
        h = stages.linear1(rows_all, w1, plan1, 0)
        o = stages.linear2(h, w2, plan1, 0)

        def combine_alone():
            acc_all, back_all = stages.return_accumulator(plan1, x), stages.returned_rows(plan1, x)
            stages.combine(o, touch_w, acc_all, back_all, plan1, 0, tr).wait()
            stages.unpermute(back_all, plan1, torch.empty_like(x))

        if only_comm:
            return {
                "dispatch": measure(f"dispatch alone{tag}", lambda: stages.dispatch(x, rows_all, plan1, 0, tr).wait()),
                "combine": measure(f"combine alone{tag}", combine_alone),
            }
        return {
            "route+plan": measure("route + plan (W=1)", route_and_plan),
            "dispatch": measure("dispatch alone", lambda: stages.dispatch(x, rows_all, plan1, 0, tr).wait()),
            "linear1": measure("linear1 alone", lambda: stages.linear1(rows_all, w1, plan1, 0)),
            "linear2": measure("linear2 alone", lambda: stages.linear2(h, w2, plan1, 0)),
            "combine": measure("combine alone", combine_alone),
        }

    with torch.no_grad():
        st = stages_alone()
        comm_by_transport = {"nccl": st["dispatch"] + st["combine"]}
        for t in kinds:
            if t != "nccl":
                ce = stages_alone(transports[t], only_comm=True, tag=f" ({t})")
                comm_by_transport[t] = ce["dispatch"] + ce["combine"]
                st.update({f"dispatch ({t})": ce["dispatch"], f"combine ({t})": ce["combine"]})
    if args.trace_dir and cuda:
        profile_table(args.trace_dir, f"plan_{preset_name}_n{n}", route_and_plan)
    comm = min(comm_by_transport.values())  # the fastest transport's
    compute = st["linear1"] + st["linear2"]
    ideal = max(comm, compute)

    naive_ms: Optional[float] = None
    if args.naive:
        from benchmarks.naive import naive_forward

        with torch.no_grad():
            naive_ms = measure("naive layer forward", lambda: naive_forward(x, idx, tw, w1, w2, E))

    # ---- the layer's expert part per variant ----------------------------------------
    rows = []
    for W, carve, dedup, auto, kind in variants:
        tr = transports[kind]
        plan = make_plan(idx, E, W, tr, tw, dedup_across_waves=(dedup == "rank"))
        label = f"W={'auto->' if auto else ''}{W} carveout={carve} dedup={dedup} {kind}"
        with torch.no_grad():
            fwd = measure(f"{label} forward", lambda: waved_experts(x, tw, w1, w2, plan, tr, carve))
        row = {"W": W, "auto": auto, "carveout": carve, "dedup": dedup, "transport": kind, "fwd_ms": fwd,
               "fwd_host_ms": timer.last_host_ms}
        if not args.no_backward:
            w1g, w2g = w1.clone().requires_grad_(True), w2.clone().requires_grad_(True)
            xg, twg = x.clone().requires_grad_(True), tw.clone().requires_grad_(True)

            def fwd_bwd():
                waved_experts(xg, twg, w1g, w2g, plan, tr, carve).backward(dy)

            row["fwdbwd_ms"] = measure(f"{label} forward+backward", fwd_bwd)
            del w1g, w2g, xg, twg
        remote = sum(sum(c[r] for c in plan.send_counts) for r in range(n) if r != rank)
        wire = torch.tensor([remote * P["H"] * elem, plan.num_routes_sent], dtype=torch.float64, device=device)
        dist.all_reduce(wire, op=dist.ReduceOp.MAX)
        row["dispatch_wire_bytes_max_rank"] = int(wire[0].item())
        row["rows_per_token_max_rank"] = wire[1].item() / max(P["T"], 1)
        rows.append(row)
        if args.trace_dir and W == max(waves) and carve == carveouts[-1] and dedup == dedups[0] and not auto:
            save_trace(args.trace_dir, f"{preset_name}_n{n}_W{W}_c{carve}_{kind}", device,
                       lambda: waved_experts(x, tw, w1, w2, plan, tr, carve),
                       None if args.no_backward else lambda: waved_experts(
                           x.clone().requires_grad_(True), tw, w1.clone().requires_grad_(True),
                           w2.clone().requires_grad_(True), plan, tr, carve).backward(dy))

    base = {(d, t): next(r for r in rows if r["W"] == 1 and r["dedup"] == d and r["transport"] == t and not r["auto"])
            for d in dedups for t in kinds}
    for r in rows:
        seq = base[(r["dedup"], r["transport"])]
        r["speedup_vs_w1"] = seq["fwd_ms"] / r["fwd_ms"]
        r["overlap_efficiency"] = (seq["fwd_ms"] - r["fwd_ms"]) / (seq["fwd_ms"] - ideal) if seq["fwd_ms"] > ideal else None
        r["over_ideal"] = r["fwd_ms"] / ideal
        if naive_ms is not None:
            r["speedup_vs_naive"] = naive_ms / r["fwd_ms"]
        if "fwdbwd_ms" in r:
            r["fwdbwd_speedup_vs_w1"] = seq["fwdbwd_ms"] / r["fwdbwd_ms"]
    return {
        "preset": preset_name, **P, "num_experts": E, "iters": iters, "warmup": warmup,
        "routing": args.routing, "expert_load_max_over_mean": load_max_over_mean,
        "stages_ms": st, "comm_ms": comm, "comm_ms_by_transport": comm_by_transport, "compute_ms": compute, "ideal_ms": ideal,
        "naive_fwd_ms": naive_ms, "layers": rows,
        "auto": {"W": W_auto, "first_call_ms": auto_first_ms, "cached_call_ms": auto_cached_ms} if want_auto else None,
    }


def profile_table(trace_dir: str, name: str, fn) -> None:
    """Where the host and the device spend a call of `fn`: the profiler's op table (rank 0)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    if dist.get_rank() == 0:
        os.makedirs(trace_dir, exist_ok=True)
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40)
        with open(os.path.join(trace_dir, f"{name}.txt"), "w") as f:
            f.write(table)


def save_trace(trace_dir: str, name: str, device: torch.device, fwd, fwd_bwd) -> None:
    """Profile one forward (and forward+backward) on every rank; rank 0 saves the trace and a PNG."""
    if device.type != "cuda":
        return
    from torch.profiler import ProfilerActivity, profile

    for tag, fn in (("fwd", fwd), ("fwdbwd", fwd_bwd)):
        if fn is None:
            continue
        with torch.no_grad() if tag == "fwd" else torch.enable_grad():
            fn()
            torch.cuda.synchronize()
            dist.barrier()
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                fn()
                torch.cuda.synchronize()
        if dist.get_rank() == 0:
            os.makedirs(trace_dir, exist_ok=True)
            path = os.path.join(trace_dir, f"trace_{name}_{tag}.json")
            prof.export_chrome_trace(path)
            try:
                from benchmarks.timeline import draw_timeline

                draw_timeline(path, path[:-5] + ".png", title=f"{name} {tag} (rank 0)")
            except Exception as e:  # noqa: BLE001 - the trace is kept; say why the picture is not
                print(f"timeline picture for {path} failed: {e!r}", flush=True)
        dist.barrier()


def format_table(r: dict, meta: dict) -> str:
    lines = [
        f"overlap benchmark: preset {r['preset']} (T={r['T']}/rank, H={r['H']}, F={r['F']}, "
        f"E={r['num_experts']} ({r['local_experts']}/rank), k={r['k']}, {r['dtype']}), "
        f"{meta['world_size']} ranks, {meta['backend']}, {meta['device']}",
        f"routing: {r['routing']} (expert load max/mean {r['expert_load_max_over_mean']:.2f})",
        f"times in ms: {meta['timing']}",
        "",
        "stage alone (W=1)   ms",
    ]
    for name, ms in r["stages_ms"].items():
        lines.append(f"  {name:<17} {ms:8.3f}")
    lines += [
        f"  {'comm':<17} {r['comm_ms']:8.3f}   (dispatch + combine)",
        f"  {'compute':<17} {r['compute_ms']:8.3f}   (linear1 + linear2)",
        f"  {'ideal':<17} {r['ideal_ms']:8.3f}   max(comm, compute)",
    ]
    if r["naive_fwd_ms"] is not None:
        lines.append(f"  {'naive layer fwd':<17} {r['naive_fwd_ms']:8.3f}   (per-slot a2a, index gathers, index_add_)")
    lines += ["", "layer (plan given)            fwd ms  host ms  vs W=1  /ideal  overlap eff  fwd+bwd ms  vs W=1  rows/token  dispatch MB"]
    for row in r["layers"]:
        eff = row["overlap_efficiency"]
        label = (f"W={'auto->' if row.get('auto') else ''}{row['W']} c={row['carveout']} {row['dedup']}"
                 + ("" if row.get("transport", "nccl") == "nccl" else " CE"))
        lines.append(
            f"  {label:<26} {row['fwd_ms']:8.3f}  {row.get('fwd_host_ms', float('nan')):7.3f}  "
            f"{row['speedup_vs_w1']:5.2f}x  {row['over_ideal']:5.2f}x  "
            f"{'n/a' if eff is None else f'{eff:.2f}':>11}  "
            f"{row.get('fwdbwd_ms', float('nan')):10.3f}  {row.get('fwdbwd_speedup_vs_w1', float('nan')):5.2f}x  "
            f"{row['rows_per_token_max_rank']:10.2f}  {row['dispatch_wire_bytes_max_rank'] / 1e6:11.2f}"
        )
    return "\n".join(lines)


def run(args) -> dict:
    ep.init_distributed()
    rank = dist.get_rank()
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    names = (args.preset or ("dsv3" if device.type == "cuda" else "cpu-small")).split(",")
    for name in names:
        if name not in PRESETS:
            raise SystemExit(f"--preset must name presets from {sorted(PRESETS)}, got {name!r}")

    def log(msg: str) -> None:
        if rank == 0:
            print(msg, flush=True)

    meta = environment(device)
    result = {"meta": meta, "runs": []}
    for i, name in enumerate(names):
        log(f"[preset {i + 1}/{len(names)}] {name}")
        r = run_preset(name, args, device, log)
        result["runs"].append(r)
        log(format_table(r, meta))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if rank == 0 and args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {args.json}", flush=True)
    dist.barrier()
    dist.destroy_process_group()
    return result


def main(argv=None) -> int:
    args = parse_args(argv)
    if not under_launcher() and not torch.cuda.is_available():
        from ep.launch import spawn_local

        print(f"starting a {args.nproc}-rank Gloo simulation on this CPU host", flush=True)
        return spawn_local(args.nproc, [os.path.abspath(__file__), *(argv if argv is not None else sys.argv[1:])])
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # benchmarks.*
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
