"""The overlap benchmark: the whole layer call, and how much of the all-to-all the waves hide.

With no arguments on a CPU host it starts a 4-rank Gloo simulation (`ep.launch`) at the
small `cpu-small` preset. Under torchrun (or `ep.launch`) it runs in place; on GPUs it
uses NCCL (presets `dsv3`, `wide`, `decode`, `v4flash`; several at once: `--preset dsv3,wide`).

It measures, per rank, with device events (CUDA) or a barrier-aligned wall clock (CPU),
after warm-up, the median of `--iters` runs, and reports the max over ranks:
- each stage alone on the W=1 plan: dispatch (with the pack), linear1 (with the items'
  sort), linear2, combine (with the un-permute), and route+plan; comm = dispatch +
  combine (the fastest transport's), compute = linear1 + linear2, ideal = max(comm, compute);
- per variant (wave split x transport x W x SM carveout; `auto` too): the whole call as a
  user makes it, `layer(x, topk_idx=..., topk_weights=...)` (routing given, plan included),
  forward ("fwd") and forward+backward ("fwd+bwd", grads set to None before each, as
  `zero_grad(set_to_none=True)` does); the host time to issue the forward ("host"); the
  forward of ten calls issued back to back, per call ("b2b": what a model of many layers
  sees when the host runs ahead); the expert part alone with the plan made beforehand
  ("plan given"), from which overlap efficiency = (W=1 - waved) / (W=1 - ideal);
- with `--graphs` (CUDA, both splits): the same call captured in a CUDA graph, forward and
  forward+backward, and the host time of a replay;
- bytes on the wire per rank: rows sent to other ranks x row bytes (the fixed regions,
  padding included, as NCCL sends them).
`--no-p2p` runs NCCL with peer access off (`NCCL_P2P_DISABLE=1`: rows go through host
memory, ~22 GB/s on the H200 hosts), a stand-in for a link between hosts where the
all-to-all is as long as the expert math; `--nccl-ctas N` limits NCCL to N CTAs
(`NCCL_MIN_CTAS`/`NCCL_MAX_CTAS`), the communication side of an SM partition whose other
side is `--carveouts`. It prints a table per preset on rank 0 and writes all of it as JSON
(`--json`), with `records` in the schema of `benchmarks/results/summary.json`
(`benchmarks/summary.py` appends them); with `--trace-dir` it also saves profiler timelines
(Chrome trace JSON and a PNG) of the best waved forward and forward+backward per preset and
transport, and of the best row of each W in `--trace-waves`.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional

import torch
import torch.distributed as dist

import ep
from ep.experts import linear1, linear2
from ep.kernels import reduce_rows
from ep.layout import RowLayout
from ep.pipeline import wave_experts
from ep.plan import WaveMap, pack_rows, sender_plan, wave_items
from ep.transport import TorchDistTransport, make_transport

PRESETS: Dict[str, Dict] = {
    # small enough for 4 ranks on 2 CPU cores
    "cpu-small": dict(T=512, H=256, F=64, local_experts=8, k=4, dtype="float32"),
    "cpu-fp8": dict(T=256, H=256, F=128, local_experts=4, k=4, dtype="float32"),  # FP8 rows on CPU: H, F of 128s
    "dsv3": dict(T=4096, H=7168, F=2048, local_experts=32, k=8, dtype="bfloat16"),
    "wide": dict(T=4096, H=4096, F=1408, local_experts=16, k=6, dtype="bfloat16"),
    "decode": dict(T=128, H=7168, F=2048, local_experts=32, k=8, dtype="bfloat16"),
    # DeepSeek-V4-Flash-like: 256 experts over all ranks, one shared expert
    "v4flash": dict(T=4096, H=4096, F=2048, experts=256, k=6, shared=1, dtype="bfloat16"),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default=None, help=f"comma-separated, from {sorted(PRESETS)} (default: cpu-small on CPU, dsv3 on GPU)")
    p.add_argument("--splits", default="tokens,experts", help="comma-separated wave splits: tokens, experts")
    p.add_argument("--precisions", default="dtype",
                   help="comma-separated: dtype (the preset's dtype), or FP8 experts (H and F multiples of 128): "
                        + ", ".join(f"{name} ({desc})" for name, (_, desc) in FP8_PRECISIONS.items()))
    p.add_argument("--eval", action="store_true",
                   help="time the layers as inference does: eval mode (derived weights kept between eager calls, "
                        "MoEConfig.weight_cache='eval') and FP8 experts held (hold_fp8_experts)")
    p.add_argument("--waves", default="1,2,4,auto",
                   help="comma-separated W values, or auto (the layer's own choice); 1 is always measured")
    p.add_argument("--expert-waves", default=None, help="W values for the expert-wave split (default: --waves)")
    p.add_argument("--carveouts", default="0", help="comma-separated SM carveouts for the waved runs (CUDA)")
    p.add_argument("--transports", default="nccl",
                   help="comma-separated: nccl (torch.distributed), copy_engine (CUDA symmetric memory, one host), "
                        "device_put (Triton stores into symmetric memory, one host)")
    p.add_argument("--dedup", default="rank", help="expert waves: comma-separated rank (once per rank), wave (once per rank and wave)")
    p.add_argument("--graphs", action="store_true", help="also time token-wave calls captured in CUDA graphs")
    p.add_argument("--no-p2p", action="store_true", help="NCCL without peer access (NCCL_P2P_DISABLE=1): the comm-bound regime")
    p.add_argument("--nccl-ctas", type=int, default=None, help="NCCL_MIN_CTAS = NCCL_MAX_CTAS = N")
    p.add_argument("--run-name", default=None, help="the run's name in the records (e.g. r16_h200x2)")
    p.add_argument("--iters", type=int, default=None, help="timed runs per measurement (default 10 CPU, 20 GPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed runs first (default 2 CPU, 5 GPU)")
    p.add_argument("--no-backward", action="store_true", help="skip the forward+backward rows")
    p.add_argument("--naive", action="store_true", help="also time the naive hand-written layer (forward)")
    p.add_argument("--trace-dir", default=None, help="save profiler timelines per preset here (rank 0): per transport, "
                                                        "the fastest waved token-wave row")
    p.add_argument("--trace-waves", default="", help="comma-separated W: also trace the fastest row of each")
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
        self.last_host_ms = float("nan")

    def _max_over_ranks(self, *values: float) -> List[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.tolist()

    def __call__(self, fn: Callable[[], object], calls: int = 1) -> float:
        """Per call of `fn`; with `calls` > 1, that many calls are issued back to back per
        timed run (no sync between them) and the time is divided by them (a quarter of the
        timed runs, one warm-up run: each holds `calls` calls)."""
        for _ in range(self.warmup if calls == 1 else 1):
            fn()
        times: List[float] = []
        host: List[float] = []
        cuda = self.device.type == "cuda"
        for _ in range(self.iters if calls == 1 else max(3, self.iters // 4)):
            if cuda:
                torch.cuda.synchronize()
            dist.barrier()
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                h0 = time.perf_counter()
                for _ in range(calls):
                    fn()
                host.append((time.perf_counter() - h0) * 1e3 / calls)  # issuing it (the device may still run)
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / calls)
            else:
                t0 = time.perf_counter()
                for _ in range(calls):
                    fn()
                times.append((time.perf_counter() - t0) * 1e3 / calls)
        ms, self.last_host_ms = self._max_over_ranks(statistics.median(times), statistics.median(host or times))
        return ms


def regime(device: torch.device) -> str:
    """"nvlink" (NCCL with peer access), "no_p2p" (NCCL_P2P_DISABLE=1), or "cpu" (Gloo)."""
    if device.type != "cuda":
        return "cpu"
    return "no_p2p" if os.environ.get("NCCL_P2P_DISABLE") == "1" else "nvlink"


def environment(device: torch.device) -> dict:
    from benchmarks import provenance  # (main puts the checkout on the path)

    return {
        "world_size": dist.get_world_size(), "backend": dist.get_backend(),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else (platform.processor() or "cpu"),
        "torch": torch.__version__,
        "nccl": ".".join(map(str, torch.cuda.nccl.version())) if device.type == "cuda" else None,
        "commit": provenance.commit(), "command": " ".join(sys.argv), "regime": regime(device),
        "env": {k: v for k, v in os.environ.items() if k.startswith(("NCCL_", "TORCH_SYMM", "NVSHMEM_"))},
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "timing": "cuda events, median, max over ranks" if device.type == "cuda" else "wall clock after a barrier, median, max over ranks",
    }


def local_experts(P: Dict, n: int) -> int:
    return P["experts"] // n if "experts" in P else P["local_experts"]


FP8 = torch.float8_e4m3fn
FP8_PRECISIONS = {  # name -> (MoEConfig knobs, what they are)
    "fp8": (dict(expert_dtype=FP8), "FP8 expert products in 1x128/128x128 blocks, MoEConfig.expert_dtype"),
    "fp8_rows": (dict(expert_dtype=FP8, fp8_scaling="rows"),
                 "FP8 products with one scale per row and column, torch._scaled_grouped_mm, fp8_scaling='rows'"),
    "fp8_dispatch": (dict(expert_dtype=FP8, dispatch_dtype=FP8), "fp8 and FP8 rows on the wire, dispatch_dtype"),
    "fp8_rows_dispatch": (dict(expert_dtype=FP8, fp8_scaling="rows", dispatch_dtype=FP8),
                          "fp8_rows and FP8 rows on the wire"),
    "fp8_rows_auto": (dict(expert_dtype=FP8, fp8_scaling="rows", fp8_products="auto"),
                      "fp8_rows where it times faster, per product (fp8_products='auto'; the choice is recorded)"),
    "fp8_rows_dispatch_auto": (dict(expert_dtype=FP8, fp8_scaling="rows", dispatch_dtype=FP8, fp8_products="auto"),
                               "fp8_rows_dispatch with fp8_products='auto'"),
    "fp8_rows_kept": (dict(expert_dtype=FP8, fp8_scaling="rows", weight_cache="always"),
                      "fp8_rows with the FP8 weights kept between calls while unchanged (weight_cache='always': "
                      "the microbatches of a step share one quantization; a CUDA graph capture quantizes inside)"),
    "fp8_rows_bwd": (dict(expert_dtype=FP8, fp8_scaling="rows", fp8_backward="data"),
                     "fp8_rows with the backward's data gradients in FP8 too (fp8_backward='data')"),
    "fp8_rows_bwd_kept": (dict(expert_dtype=FP8, fp8_scaling="rows", fp8_backward="data", weight_cache="always"),
                          "fp8_rows_bwd with every FP8 weight kept between calls (weight_cache='always')"),
    "fp8_rows_fast": (dict(expert_dtype=FP8, fp8_scaling="rows", fp8_fast_accum=True),
                      "fp8_rows with the forward's products in fast accumulation (fp8_fast_accum: no promotion)"),
    "fp8_rows_dispatch_fast": (dict(expert_dtype=FP8, fp8_scaling="rows", dispatch_dtype=FP8, fp8_fast_accum=True),
                               "fp8_rows_dispatch with fp8_fast_accum"),
    "fp8_rows_bwd_kept_fast": (dict(expert_dtype=FP8, fp8_scaling="rows", fp8_backward="data", weight_cache="always",
                                    fp8_fast_accum=True), "fp8_rows_bwd_kept with fp8_fast_accum"),
    "fp8_rows_bwd_kept_fast_all": (dict(expert_dtype=FP8, fp8_scaling="rows", fp8_backward="data",
                                        weight_cache="always", fp8_fast_accum="all"),
                                   "fp8_rows_bwd_kept with fast accumulation in the backward's data products too "
                                   "(fp8_fast_accum='all')"),
    "fp8_rows_bwd_graphs": (dict(expert_dtype=FP8, fp8_scaling="rows", fp8_backward="data", weight_cache="graphs"),
                            "fp8_rows_bwd_kept whose CUDA graph captures read the kept FP8 weights too "
                            "(weight_cache='graphs': quantized once per optimizer step, refresh_weight_cache)"),
    "fp8_rows_bwd_graphs_fast_all": (dict(expert_dtype=FP8, fp8_scaling="rows", fp8_backward="data",
                                          weight_cache="graphs", fp8_fast_accum="all"),
                                     "fp8_rows_bwd_graphs with fp8_fast_accum='all'"),
}


def variant_layer(base: "ep.ExpertParallelMoE", **knobs) -> "ep.ExpertParallelMoE":
    """A layer with other knobs that shares `base`'s parameters (built on the meta device:
    no second copy of the experts)."""
    c = base.config
    cfg = ep.MoEConfig(hidden=c.hidden, ffn_hidden=c.ffn_hidden, num_experts=c.num_experts, top_k=c.top_k,
                       num_shared_experts=c.num_shared_experts, **knobs)
    with torch.device("meta"):
        layer = ep.ExpertParallelMoE(cfg)
    layer.router, layer.experts, layer.shared_experts = base.router, base.experts, base.shared_experts
    return layer


def run_preset(preset_name: str, args, device: torch.device, log) -> dict:
    rank, n = dist.get_rank(), dist.get_world_size()
    P = PRESETS[preset_name]
    E_local = local_experts(P, n)
    E = E_local * n
    dtype = getattr(torch, P["dtype"])
    cuda = device.type == "cuda"
    wave_args = [w.strip() for w in args.waves.split(",")]
    carveouts = sorted({int(c) for c in args.carveouts.split(",")}) if cuda else [0]
    dedups = [d.strip() for d in args.dedup.split(",")]
    splits = [t.strip() for t in args.splits.split(",")]
    kinds = [t.strip() for t in args.transports.split(",")]
    precisions = [P["dtype"] if t.strip() == "dtype" else t.strip() for t in args.precisions.split(",")]
    if any(t != P["dtype"] and t not in FP8_PRECISIONS for t in precisions):
        raise SystemExit(f"--precisions takes dtype and/or {', '.join(FP8_PRECISIONS)}, got {args.precisions!r}")
    if any(d not in ("rank", "wave") for d in dedups):
        raise SystemExit(f"--dedup takes rank and/or wave, got {args.dedup!r}")
    if any(t not in ep.config.WAVE_SPLITS for t in splits):
        raise SystemExit(f"--splits takes {ep.config.WAVE_SPLITS}, got {args.splits!r}")
    if any(t not in ep.config.TRANSPORTS for t in kinds) or (set(kinds) - {"nccl"} and not cuda):
        raise SystemExit(f"--transports takes nccl and (on CUDA) copy_engine, device_put; got {args.transports!r}")
    if args.routing not in ("router", "powerlaw4", "hot"):
        raise SystemExit(f"--routing takes router, powerlaw4 or hot, got {args.routing!r}")
    iters = args.iters or (20 if cuda else 10)
    warmup = args.warmup if args.warmup is not None else (5 if cuda else 2)
    timer = Timer(device, warmup, iters)

    torch.manual_seed(args.seed + 17)  # replicated weights: the same init everywhere
    cfg = ep.MoEConfig(hidden=P["H"], ffn_hidden=P["F"], num_experts=E, top_k=P["k"],
                       num_shared_experts=P.get("shared", 0))
    layer = ep.ExpertParallelMoE(cfg).to(device=device, dtype=dtype)
    torch.manual_seed(args.seed * 1000 + rank)
    x = torch.randn(P["T"], P["H"], device=device, dtype=dtype)
    dy = torch.randn_like(x)
    w1, w2 = layer.experts.w1.detach(), layer.experts.w2.detach()
    tr = TorchDistTransport()
    transports = {t: (tr if t == "nccl" else make_transport(None, t)) for t in kinds}
    with torch.no_grad():
        layer.sync_replicas()
        idx, tw = layer.router(x)
    if args.routing != "router":  # skewed routing: the same hot experts seen from every rank
        from tests.cases import skewed_routing

        g = torch.Generator().manual_seed(args.seed)
        idx = skewed_routing(P["T"], E, P["k"], args.routing, g).to(device)
    loads = torch.zeros(E, dtype=torch.float64, device=device).index_add_(
        0, idx.flatten(), torch.ones(idx.numel(), dtype=torch.float64, device=device))
    dist.all_reduce(loads)
    load_max_over_mean = (loads.max() / loads.mean()).item()
    elem = x.element_size()

    expert_args = [w.strip() for w in (args.expert_waves or args.waves).split(",")]
    wave_lists = {"tokens": wave_args, "experts": expert_args}
    variants = []
    for kind in kinds:
        for split in splits:
            listed = wave_lists[split]
            for dedup in (dedups if split == "experts" else ["rank"]):
                for W in sorted({1, *(int(w) for w in listed if w != "auto")}) + (["auto"] if "auto" in listed else []):
                    if split == "experts" and W != "auto" and W > E_local:
                        continue
                    for carve in (carveouts if W != 1 else [0]):
                        for prec in precisions:
                            variants.append(dict(split=split, transport=kind, W=W, carveout=carve, dedup=dedup,
                                                 precision=prec))
    steps = 5 + 2 * (len(kinds) - 1) + len(variants) * (3 + (0 if args.no_backward else 1)) + int(args.naive)
    step = [0]

    def measure(name: str, fn, calls: int = 1) -> float:
        step[0] += 1
        ms = timer(fn, calls)
        log(f"  [{step[0]}/{steps}] {preset_name}: {name}: {ms:.3f} ms")
        return ms

    # ---- each stage alone, W=1, full machine ------------------------------------------
    max_tokens = max(row[0] for row in tr.host_exchange([P["T"]]))
    layout = RowLayout(P["H"], P["k"], dtype)

    def route_and_plan():
        idx_, tw_ = layer.router(x)
        T_max = max(row[0] for row in tr.host_exchange([P["T"]]))
        sender_plan(idx_, tw_, E, n, WaveMap(1), WaveMap(1).capacity(T_max), T_max)

    def stages_alone(tr=tr, only_comm: bool = False, tag: str = "") -> Dict[str, float]:
        """Each stage on the W=1 plan (only dispatch and combine with `only_comm`); buffers freed on return."""
        plan1 = sender_plan(idx, tw, E, n, WaveMap(1), WaveMap(1).capacity(max_tokens), max_tokens)
        cap, N = plan1.capacity, plan1.rows_per_wave
        splits = [cap] * n
        tr.reserve(cap)
        send, recv = layout.empty(N, device), layout.empty(N + 1, device)
        recv[N].zero_()
        sums, back = x.new_empty(N, P["H"]), x.new_empty(N, P["H"])
        arrived = []

        def dispatch_alone():
            pack_rows(x, tw, plan1, layout, send)
            flight = tr.all_to_all(recv[:N], send, splits, splits, "dispatch alone", cap, plan1.region_rows[0])
            flight.wait()
            arrived[:] = [flight.arrived_rows]

        dispatch_alone()
        few = plan1.expected_items_per_expert

        def items():
            return wave_items(layout.ids(recv[:N]), layout.weights(recv[:N]), E_local, plan1.item_capacity(0))

        it = items()

        def linear1_alone():
            got = items()
            return linear1(layout.data(recv), w1, None, got.offs, few, index=got.item_row, rows=got.count)

        h = linear1_alone()
        o = linear2(h, w2, None, it.offs, None, few)

        def combine_alone():
            reduce_rows(o, it.slot_item, sums, layout.weights(recv[:N]))
            tr.all_to_all(back, sums, splits, splits, "combine alone", cap, arrived[0]).wait()
            reduce_rows(back, plan1.back_row, torch.empty_like(x))

        if only_comm:
            return {
                "dispatch": measure(f"dispatch alone{tag}", dispatch_alone),
                "combine": measure(f"combine alone{tag}", combine_alone),
            }
        return {
            "route+plan": measure("route + plan (W=1)", route_and_plan),
            "dispatch": measure("dispatch alone", dispatch_alone),
            "linear1": measure("linear1 alone", linear1_alone),
            "linear2": measure("linear2 alone", lambda: linear2(h, w2, None, it.offs, None, few)),
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
        if layer.shared_experts is not None:
            st["shared expert"] = measure("shared expert alone", lambda: layer.shared_experts(x))
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

    # ---- the whole call per variant ------------------------------------------------------
    rows = []
    for v in variants:
        lv = variant_layer(layer, num_waves=v["W"], wave_split=v["split"], transport=v["transport"],
                           sm_carveout=v["carveout"], dedup_across_waves=v["dedup"] == "rank",
                           **FP8_PRECISIONS.get(v["precision"], ({}, ""))[0])
        lv.train(not args.eval)
        if args.eval and lv.config.expert_dtype is not None:
            lv.hold_fp8_experts()  # inference: CUDA graph captures read them too (a kept copy they would not)
        row = dict(v, auto=v["W"] == "auto", eval=args.eval)
        if row["auto"]:
            with torch.no_grad():
                t0 = time.perf_counter()
                lv(x, topk_idx=idx, topk_weights=tw)  # the first call decides (and is not timed below)
                row["auto_decide_ms"] = (time.perf_counter() - t0) * 1e3
            row["W"] = lv.num_waves
        W = row["W"]
        label = (f"{v['split']} W={'auto->' if row['auto'] else ''}{W} carveout={v['carveout']} "
                 f"{v['transport']}{' dedup=' + v['dedup'] if v['split'] == 'experts' else ''} {v['precision']}")
        call = lambda: lv(x, topk_idx=idx, topk_weights=tw)  # noqa: E731
        with torch.no_grad():
            row["fwd_ms"] = measure(f"{label} forward", call)  # with fp8_products="auto" its warm-up chooses
            row["host_ms"] = timer.last_host_ms
            if lv.config.expert_dtype is not None:
                row["fp8_products"] = list(lv.fp8_products)  # (linear1, linear2) in FP8, in this forward
            row["b2b_fwd_ms"] = measure(f"{label} forward, 10 back to back", call, calls=10)
            kt = transports[v["transport"]]
            wm = WaveMap.of(v["split"], max(1, min(W, max_tokens)) if v["split"] == "tokens" else W, v["dedup"] == "rank")
            plan = sender_plan(idx, tw, E, n, wm, wm.capacity(max_tokens), max_tokens)
            given = lambda: wave_experts(x, tw, w1, w2, plan, kt, v["carveout"], None,  # noqa: E731
                                         lv._fp8_experts(w1, w2), lv.config.dispatch_dtype)
            remote = (n - 1) * wm.num_waves * plan.capacity  # the fixed regions for other ranks, padding included
            row_bytes = layout.width * elem
            routes = int((plan.route_row >= 0).sum().item())
            row["plan_given_fwd_ms"] = measure(f"{label} forward, plan given", given)
            del plan, given
        if not args.no_backward:
            xg, twg = x.clone().requires_grad_(True), tw.clone().requires_grad_(True)

            def fwd_bwd():
                lv.zero_grad(set_to_none=True)
                lv(xg, topk_idx=idx, topk_weights=twg).backward(dy)

            row["fwd_bwd_ms"] = measure(f"{label} forward+backward", fwd_bwd)
            # issued back to back the host runs ahead: the device's time, where an eager call's
            # host time would hide it (what kept FP8 weights save, CUDA graphs quantizing inside)
            row["b2b_fwd_bwd_ms"] = measure(f"{label} forward+backward, 10 back to back", fwd_bwd, calls=10)
            if lv.config.expert_dtype is not None:
                row["fp8_products_fwd_bwd"] = list(lv.fp8_products)
            lv.zero_grad(set_to_none=True)
            del xg, twg
        wire = torch.tensor([remote * row_bytes, routes], dtype=torch.float64, device=device)
        dist.all_reduce(wire, op=dist.ReduceOp.MAX)
        row["dispatch_wire_bytes_max_rank"] = int(wire[0].item())
        row["rows_per_token_max_rank"] = wire[1].item() / max(P["T"], 1)
        rows.append(row)
        if args.graphs and cuda:
            rows.append(graph_row(row, lv, x, idx, tw, dy, timer, measure, label, args.no_backward))
        del lv

    base = {}
    for r in rows:
        if r["W"] == 1 and not r["auto"] and not r.get("graph"):
            base.setdefault((r["split"], r["transport"], r["dedup"], r["precision"]), r)
    for r in rows:
        seq = base.get((r["split"], r["transport"], r["dedup"], r["precision"]))
        if seq is None:
            continue
        r["speedup_vs_w1"] = seq["fwd_ms"] / r["fwd_ms"]
        if "plan_given_fwd_ms" in r:
            t1, tw_ = seq["plan_given_fwd_ms"], r["plan_given_fwd_ms"]
            r["overlap_efficiency"] = (t1 - tw_) / (t1 - ideal) if t1 > ideal else None
        r["over_ideal"] = r["fwd_ms"] / ideal
        if naive_ms is not None:
            r["speedup_vs_naive"] = naive_ms / r["fwd_ms"]
        if "fwd_bwd_ms" in r and "fwd_bwd_ms" in seq:
            r["fwd_bwd_speedup_vs_w1"] = seq["fwd_bwd_ms"] / r["fwd_bwd_ms"]
    plain = {(r["split"], r["transport"], r["dedup"], r["W"], bool(r.get("graph"))): r for r in rows
             if r["precision"] == P["dtype"] and not r["auto"]}
    for r in rows:  # an FP8 row against the same call in the preset's dtype
        same = plain.get((r["split"], r["transport"], r["dedup"], r["W"], bool(r.get("graph"))))
        if r["precision"] != P["dtype"] and same is not None:
            r["fwd_vs_dtype"] = r["fwd_ms"] / same["fwd_ms"]
            if r.get("fwd_bwd_ms") and same.get("fwd_bwd_ms"):
                r["fwd_bwd_vs_dtype"] = r["fwd_bwd_ms"] / same["fwd_bwd_ms"]
            if r.get("b2b_fwd_bwd_ms") and same.get("b2b_fwd_bwd_ms"):
                r["b2b_fwd_bwd_vs_dtype"] = r["b2b_fwd_bwd_ms"] / same["b2b_fwd_bwd_ms"]
    if args.trace_dir and cuda:
        for pick in traced_rows(rows, args.trace_waves):
            lv = variant_layer(layer, num_waves=pick["W"], wave_split=pick["split"], transport=pick["transport"],
                               sm_carveout=pick["carveout"], dedup_across_waves=pick["dedup"] == "rank")

            def fwd_bwd_traced():
                lv(x.clone().requires_grad_(True), topk_idx=idx, topk_weights=tw).backward(dy)
                lv.zero_grad(set_to_none=True)

            name = (f"{preset_name}_n{n}_{regime(device)}_{pick['split']}_W{pick['W']}_c{pick['carveout']}_"
                    f"{pick['transport']}")
            try:  # a failed timeline is reported; the rows measured above are kept
                save_trace(args.trace_dir, name, device, lambda: lv(x, topk_idx=idx, topk_weights=tw),
                           None if args.no_backward else fwd_bwd_traced)
            except Exception as e:  # noqa: BLE001
                log(f"  timeline {name} failed: {type(e).__name__}: {str(e)[:300]}")
    return {
        "preset": preset_name, **P, "local_experts": E_local, "num_experts": E, "iters": iters, "warmup": warmup,
        "routing": args.routing, "expert_load_max_over_mean": load_max_over_mean,
        "stages_ms": st, "comm_ms": comm, "comm_ms_by_transport": comm_by_transport, "compute_ms": compute,
        "ideal_ms": ideal, "naive_fwd_ms": naive_ms, "layers": rows,
    }


def traced_rows(rows: List[dict], trace_waves: str) -> List[dict]:
    """The rows whose timelines are saved: per wave split and transport, the fastest waved row,
    and the fastest row of each W named in `trace_waves` (e.g. "4": where a model misses)."""
    eager = [r for r in rows if r["W"] > 1 and not r.get("graph") and not str(r.get("precision")).startswith("fp8")]
    extra = {int(w) for w in trace_waves.split(",") if w.strip()} if trace_waves else set()
    picks = {}
    for r in sorted(eager, key=lambda r: r["fwd_ms"]):  # the first seen of each key is the fastest
        picks.setdefault((r["split"], r["transport"], "best"), r)
        if r["W"] in extra:
            picks.setdefault((r["split"], r["transport"], r["W"]), r)
    unique = {(r["split"], r["transport"], r["W"], r["carveout"], r["dedup"]): r for r in picks.values()}
    return list(unique.values())


def graph_row(row: dict, lv, x, idx, tw, dy, timer: Timer, measure, label: str, no_backward: bool) -> dict:
    """The same call captured in CUDA graphs (forward; forward+backward), timed by replays."""
    out = dict(row, graph=True)
    for key in ("b2b_fwd_ms", "plan_given_fwd_ms", "fwd_bwd_ms", "b2b_fwd_bwd_ms", "auto_decide_ms"):
        out.pop(key, None)
    xg, twg = x.clone().requires_grad_(True), tw.clone().requires_grad_(True)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the default stream, as torch.cuda.graph wants
        for _ in range(2):
            lv(xg, topk_idx=idx, topk_weights=twg).backward(dy)
    torch.cuda.current_stream().wait_stream(side)
    lv.zero_grad(set_to_none=True)
    xg.grad = twg.grad = None
    g_fwd = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(g_fwd):
        lv(x, topk_idx=idx, topk_weights=tw)
    out["fwd_ms"] = measure(f"{label} forward, CUDA graph", g_fwd.replay)
    out["host_ms"] = timer.last_host_ms
    if not no_backward:
        g_step = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g_step):
            lv(xg, topk_idx=idx, topk_weights=twg).backward(dy)
        out["fwd_bwd_ms"] = measure(f"{label} forward+backward, CUDA graph", g_step.replay)
        del g_step
    del g_fwd
    lv.zero_grad(set_to_none=True)
    return out


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
        f"E={r['num_experts']} ({r['local_experts']}/rank), k={r['k']}"
        + (f", {r['shared']} shared expert" if r.get("shared") else "") + f", {r['dtype']}), "
        f"{meta['world_size']} ranks, {meta['backend']} ({meta['regime']}), {meta['device']}",
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
    nan = float("nan")
    lines += ["", "whole call layer(x, topk_idx, topk_weights)   fwd ms  host ms  b2b ms  vs W=1  plan given  "
                  "overlap eff  fwd+bwd ms  vs W=1  rows/token  dispatch MB"]
    for row in r["layers"]:
        eff = row.get("overlap_efficiency")
        label = (f"{row['split'][:6]} W={'auto->' if row.get('auto') else ''}{row['W']} c={row['carveout']}"
                 + {"copy_engine": " CE", "device_put": " DP"}.get(row["transport"], "")
                 + (f" {row['dedup']}" if row["split"] == "experts" else "") + (" graph" if row.get("graph") else "")
                 + (" " + row["precision"] if str(row.get("precision")).startswith("fp8") else ""))
        lines.append(
            f"  {label:<43} {row['fwd_ms']:8.3f}  {row.get('host_ms', nan):7.3f}  {row.get('b2b_fwd_ms', nan):6.3f}  "
            f"{row.get('speedup_vs_w1', nan):5.2f}x  {row.get('plan_given_fwd_ms', nan):10.3f}  "
            f"{'n/a' if eff is None else f'{eff:.2f}':>11}  "
            f"{row.get('fwd_bwd_ms', nan):10.3f}  {row.get('fwd_bwd_speedup_vs_w1', nan):5.2f}x  "
            f"{row['rows_per_token_max_rank']:10.2f}  {row['dispatch_wire_bytes_max_rank'] / 1e6:11.2f}"
        )
    against = [row for row in r["layers"] if "fwd_vs_dtype" in row]
    if against:
        lines += ["", f"against the same call in {r['dtype']}" + (" (eval mode, FP8 experts held)"
                                                               if against[0].get("eval") else "")
                  + ":   fwd  fwd+bwd  b2b fwd+bwd"]
        for row in against:
            label = f"{row['split'][:6]} W={row['W']}{' graph' if row.get('graph') else ''} {row['precision']}"
            chose = "".join(f"  {what} in FP8: {_fp8_products_named(row[key])}"
                            for what, key in (("fwd", "fp8_products"), ("fwd+bwd", "fp8_products_fwd_bwd"))
                            if row["precision"].endswith("_auto") and key in row)
            lines.append(f"  {label:<43} {row['fwd_vs_dtype']:5.2f}x  {row.get('fwd_bwd_vs_dtype', nan):5.2f}x  "
                         f"{row.get('b2b_fwd_bwd_vs_dtype', nan):9.2f}x{chose}")
    return "\n".join(lines)


def _fp8_products_named(products) -> str:
    """(linear1, linear2) in FP8 as words: "linear1, linear2", "linear2", "neither"."""
    return ", ".join(name for name, on in zip(("linear1", "linear2"), products) if on) or "neither"


def records(result: dict, run_name: Optional[str]) -> List[dict]:
    """One record per measured row, in the schema of `benchmarks/results/summary.json`."""
    meta = result["meta"]
    out = []
    for r in result["runs"]:
        for row in r["layers"]:
            out.append(dict(
                run=run_name, commit=meta["commit"], gpus=meta["world_size"], device=meta["device"],
                torch=meta["torch"], nccl=meta["nccl"], date=meta["date"], preset=r["preset"], regime=meta["regime"],
                nccl_ctas=meta["env"].get("NCCL_MAX_CTAS"), transport=row["transport"], wave_split=row["split"],
                dedup=row["dedup"] if row["split"] == "experts" else None, num_waves=row["W"],
                auto_from="auto" if row.get("auto") else None, sm_carveout=row["carveout"], graph=bool(row.get("graph")),
                shared_experts=r.get("shared", 0), precision=row.get("precision", r["dtype"]),
                mode="eval" if row.get("eval") else "train", fwd_vs_dtype=row.get("fwd_vs_dtype"),
                fp8_products=row.get("fp8_products"), fp8_products_fwd_bwd=row.get("fp8_products_fwd_bwd"),
                fwd_ms=row["fwd_ms"], fwd_bwd_ms=row.get("fwd_bwd_ms"), b2b_fwd_bwd_ms=row.get("b2b_fwd_bwd_ms"),
                fwd_bwd_vs_dtype=row.get("fwd_bwd_vs_dtype"), plan_given_fwd_ms=row.get("plan_given_fwd_ms"),
                host_ms=row.get("host_ms"), b2b_fwd_ms=row.get("b2b_fwd_ms"), comm_ms=r["comm_ms"],
                compute_ms=r["compute_ms"], ideal_ms=r["ideal_ms"], overlap_efficiency=row.get("overlap_efficiency"),
                rows_per_token=row["rows_per_token_max_rank"], dispatch_wire_bytes=row["dispatch_wire_bytes_max_rank"],
            ))
    return out


def run(args) -> dict:
    if args.no_p2p:  # read by NCCL when its communicators are made, after this
        os.environ["NCCL_P2P_DISABLE"] = "1"
    if args.nccl_ctas:
        os.environ["NCCL_MIN_CTAS"] = os.environ["NCCL_MAX_CTAS"] = str(args.nccl_ctas)
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
    result["records"] = records(result, args.run_name)
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
