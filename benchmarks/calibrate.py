"""Calibrate `ep.sim` against the overlap benchmark's runs, and predict what we cannot run.

    python benchmarks/calibrate.py                   # fit, write CALIBRATION.md and PREDICTIONS.md
    python benchmarks/calibrate.py --write-profiles  # also rewrite ep/sim_profiles.py with the fit

What is measured elsewhere and taken as given (the model's inputs):
- the all-to-all links: latency and NVLink bandwidth from the all-to-all table of
  `../shared/MEASURED.md` (4 H200s, even splits; `A2A_4GPU` below, fitted by least squares);
- the grouped-GEMM rate per shape: from the 1-GPU stage-alone figures (linear1 + linear2 of
  run r06), used for the 1- and 2-GPU runs alike; the CPU profile from its own run's.
What is fitted, one value per profile, to every layer row (forward and forward+backward,
every W and dedup, SM carveout 0) at once: host time per call, GPU time per kernel,
permute bandwidth, the shares each stream keeps while both run, the backward's math factor.
Rows with an SM carveout are predicted with the GEMMs slowed by the carveout's share of
the SMs and are not fitted.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import dataclass, replace
from typing import Dict, List, Tuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ep.sim import SHAPES, Layer, Rates, Topology, best_waves, simulate, traffic  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
H200_SMS = 132
PERMUTE_MAX_GBPS = 4300.0  # MEASURED.md: device copies on one H200

# MEASURED.md, all-to-all_single, 4 H200s: (MiB per rank, ms); 3/4 of each rank's bytes leave the GPU
A2A_4GPU = ((1, 0.089), (16, 0.134), (64, 0.237), (256, 0.714), (512, 1.322))

# runs made before the pipeline gathered every wave's dispatch rows at once (r10)
PER_WAVE_GATHER_RUNS = ("r06_h200x1_overlap.json", "r07_h200x2_overlap.json", "r09_h200x1_overlap.json",
                        "cpu_gloo_4rank.json")
# runs made before wave 0's math was issued ahead of the later dispatches (r13), and the CPU
INBOUND_FIRST_RUNS = PER_WAVE_GATHER_RUNS + ("r10_h200x2_overlap.json", "r11_h200x2_overlap.json",
                                            "r12_h200x1_overlap.json")
GPU_RUNS = ("runs/r06_h200x1_overlap.json", "runs/r07_h200x2_overlap.json", "runs/r09_h200x1_overlap.json",
            "runs/r11_h200x2_overlap.json", "runs/r12_h200x1_overlap.json", "runs/r13_h200x1_overlap.json",
            "runs/r14_h200x1_overlap.json", "runs/r15_h200x1_overlap.json")
CPU_RUNS = ("cpu_gloo_4rank.json",)
FIT_KEYS = ("host_ms", "stage_ms", "permute_GBps", "backward_factor", "backward_host_ms")
SHARE_KEYS = ("comm_share", "compute_share")
# MEASURED.md, 4 H200s: a 256 MiB/rank NCCL all-to-all alone, a grouped GEMM alone, both at once (ms)
PAIR = (0.772, 1.105, 1.720)
# the same with the copy engines (peer copies into symmetric memory, barriers before and after)
PAIR_CE = (0.841, 1.105, 1.465)


# r11's host probe (2 H200s): host time to issue one all-to-all call, NCCL vs copy engines (us)
A2A_HOST_US = {"nccl": 57.1, "copy_engine": 173.4}


def copy_engine_rates(rates: Rates) -> Rates:
    """The NCCL profile with the copy engines' measured differences: the all-to-all's share
    beside a GEMM (MEASURED.md's pair) and its host cost per call (r11's probe)."""
    extra = (A2A_HOST_US["copy_engine"] - A2A_HOST_US["nccl"]) / 1e3
    base = rates.a2a_host_ms if rates.a2a_host_ms is not None else rates.host_ms
    return replace(rates, comm_share=pair_shares(PAIR_CE)[0], a2a_host_ms=base + extra, name="h200-copy-engine")


def pair_shares(pair=PAIR) -> Tuple[float, float]:
    """The shares that reproduce the measured pair: the GEMM keeps its speed (the all-to-all's
    kernels wait for SMs), the all-to-all does `share` of its work while the GEMM runs."""
    a2a, gemm, both = pair
    return (a2a + gemm - both) / gemm, 1.0


def fit_links() -> Tuple[float, float]:
    """Latency (ms) and NVLink bandwidth (GB/s of bytes leaving the GPU) from the 4-GPU a2a table."""
    xs = [mib * 2**20 * 3 / 4 / 1e6 for mib, _ in A2A_4GPU]  # MB leaving each GPU
    ys = [ms for _, ms in A2A_4GPU]
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return my - slope * mx, 1.0 / slope  # MB/ms = GB/s


@dataclass
class Row:
    source: str
    preset: str
    ranks: int
    W: int
    carveout: int
    dedup: str
    fwd: float
    fwdbwd: float
    layer: Layer
    math_ms: float  # measured linear1 + linear2 alone, for the GEMM rate
    fitted: bool
    transport: str = "nccl"


def load_rows(paths, gemm_from: Dict[str, float]) -> List[Row]:
    rows = []
    for rel in paths:
        with open(os.path.join(RESULTS, rel)) as f:
            d = json.load(f)
        n = d["meta"]["world_size"]
        for r in d["runs"]:
            elem = 2 if r["dtype"] == "bfloat16" else 4
            layer = Layer(r["H"], r["F"], r["local_experts"] * n, r["k"], r["T"], elem)
            math_ms = gemm_from.get(r["preset"], r["stages_ms"]["linear1"] + r["stages_ms"]["linear2"])
            for lr in r["layers"]:
                if lr.get("auto"):
                    continue  # the same W measured again
                kind = lr.get("transport", "nccl")
                rows.append(Row(rel, r["preset"], n, lr["W"], lr["carveout"], lr["dedup"], lr["fwd_ms"],
                                lr.get("fwdbwd_ms", math.nan), layer, math_ms,
                                lr["carveout"] == 0 and kind == "nccl", kind))
    return rows


def one_gpu_math() -> Dict[str, float]:
    with open(os.path.join(RESULTS, GPU_RUNS[0])) as f:
        d = json.load(f)
    return {r["preset"]: r["stages_ms"]["linear1"] + r["stages_ms"]["linear2"] for r in d["runs"]}


def rates_for(row: Row, rates: Rates) -> Rates:
    """The profile with the row's shape's GEMM rate (from the measured math time, its kernels' fixed cost taken off)."""
    L = row.layer
    items = L.tokens * L.top_k  # per rank, uniform routing
    flops = 2 * items * L.hidden * 3 * L.ffn_hidden
    tpe = items / (L.num_experts / row.ranks)
    tflops = flops / max(row.math_ms - 4 * rates.stage_ms, 1e-3) / 1e9
    if row.carveout and row.W > 1:
        tflops *= (H200_SMS - row.carveout) / H200_SMS
    return replace(rates, gemm_tflops=((tpe, tflops),))


def predict(row: Row, rates: Rates, topo: Topology) -> Tuple[float, float]:
    if row.transport == "copy_engine":
        rates = copy_engine_rates(rates)
    r = rates_for(row, rates)
    t = replace(topo, ranks=row.ranks, gpus_per_node=row.ranks)
    once = os.path.basename(row.source) not in PER_WAVE_GATHER_RUNS
    early = os.path.basename(row.source) not in INBOUND_FIRST_RUNS
    fwd = simulate(row.layer, t, r, row.W, row.dedup, gather_once=once, math_first=early).layer_ms
    fb = simulate(row.layer, t, r, row.W, row.dedup, backward=True, gather_once=once, math_first=early).layer_ms
    return fwd, fb


def loss(rows: List[Row], rates: Rates, topo: Topology) -> float:
    s = 0.0
    for row in rows:
        if not row.fitted:
            continue
        f, fb = predict(row, rates, topo)
        s += math.log(f / row.fwd) ** 2
        if not math.isnan(row.fwdbwd):
            s += math.log(fb / row.fwdbwd) ** 2
    return s


def fit(rows: List[Row], rates: Rates, topo: Topology, keys=FIT_KEYS, rounds: int = 12) -> Tuple[Rates, Topology]:
    """Coordinate search in log space over `keys` ("topo." for the Topology's; shares kept in (0.02, 1])."""
    best = loss(rows, rates, topo)
    step = 2.0
    for _ in range(rounds):
        for key in keys:
            in_topo = key.startswith("topo.")
            name = key[5:] if in_topo else key
            for f in (step, 1 / step):
                v = getattr(topo if in_topo else rates, name) * f
                if name.endswith("share"):
                    v = min(max(v, 0.02), 1.0)
                if name == "permute_GBps":
                    v = min(v, PERMUTE_MAX_GBPS)
                cand_r, cand_t = (rates, replace(topo, **{name: v})) if in_topo else (replace(rates, **{name: v}), topo)
                c = loss(rows, cand_r, cand_t)
                if c < best:
                    best, rates, topo = c, cand_r, cand_t
        step = max(step ** 0.7, 1.02)
    return rates, topo


def calibration_table(rows: List[Row], rates: Rates, topo: Topology, title: str) -> Tuple[List[str], List[float]]:
    out = [f"### {title}", "",
           "| run | preset | GPUs | W | carveout | dedup | fwd measured | fwd model | error | fwd+bwd measured | fwd+bwd model | error |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    errs = []
    for row in rows:
        f, fb = predict(row, rates, topo)
        ef = f / row.fwd - 1
        efb = fb / row.fwdbwd - 1 if not math.isnan(row.fwdbwd) else math.nan
        errs += [abs(ef)] + ([abs(efb)] if not math.isnan(efb) else [])
        flag = lambda e: f"**{e:+.0%}**" if abs(e) > 0.15 else f"{e:+.0%}"  # noqa: E731
        out.append(f"| {os.path.basename(row.source).split('_overlap')[0].replace('.json', '')} | {row.preset} | "
                   f"{row.ranks} | {row.W} | {row.carveout}{'' if row.transport == 'nccl' else ' CE'}"
                   f"{'' if row.fitted else ' (not fitted)'} | {row.dedup} | "
                   f"{row.fwd:.2f} | {f:.2f} | {flag(ef)} | {row.fwdbwd:.2f} | {fb:.2f} | "
                   f"{'n/a' if math.isnan(efb) else flag(efb)} |")
    return out, errs


def summary(rows: List[Row], rates: Rates, topo: Topology) -> List[str]:
    groups: Dict[Tuple, List[float]] = {}
    for row in rows:
        f, fb = predict(row, rates, topo)
        key = (os.path.basename(row.source).split("_overlap")[0].replace(".json", ""), row.preset, row.ranks,
               ("" if row.transport == "nccl" else "copy engines, ") + f"carveout {row.carveout}"
               + ("" if row.fitted else " (not fitted)"))
        groups.setdefault(key, []).extend(
            [abs(f / row.fwd - 1)] + ([abs(fb / row.fwdbwd - 1)] if not math.isnan(row.fwdbwd) else []))
    out = ["| run | preset | GPUs | rows | points | mean abs error | max abs error | within 15% |", "|---|---|---|---|---|---|---|---|"]
    for (src, preset, n, c), errs in groups.items():
        out.append(f"| {src} | {preset} | {n} | {c} | {len(errs)} | {sum(errs) / len(errs):.1%} | {max(errs):.1%} | "
                   f"{sum(e <= 0.15 for e in errs)}/{len(errs)} |")
    return out


def predictions(rates: Rates, topo: Topology, stats: Dict[str, List[float]]) -> List[str]:
    """Per shape and EP size: the layer per W with the fitted H200 profile (NCCL: the all-to-all
    keeps 14% of its speed beside a GEMM), the best W again if communication kept its speed
    (copy engines or SMs of its own), and the bound of perfect overlap (comm + compute) / max."""
    free = replace(rates, comm_share=1.0)
    out = []
    for shape in ("dsv3", "v4flash"):
        layer = Layer(**SHAPES[shape])
        out += [f"### {shape}: H={layer.hidden}, F={layer.ffn_hidden}, E={layer.num_experts}, k={layer.top_k}, "
                f"T={layer.tokens} per rank, bf16", "",
                "| EP | nodes | experts/rank | pass | W=1 | W=2 | W=4 | W=8 | best W | speedup | "
                "comm at full speed: best W, speedup | perfect-overlap bound | compute alone | comm alone | "
                "rows/token |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for n in (8, 16, 64, 256):
            t = replace(topo, ranks=n)
            for bwd in (False, True):
                best, times = best_waves(layer, t, rates, (1, 2, 4, 8), backward=bwd)
                fbest, ftimes = best_waves(layer, t, free, (1, 2, 4, 8), backward=bwd)
                p1 = simulate(layer, t, rates, 1, backward=bwd)
                cells = [f"{times[w]:.2f}" if w in times else "-" for w in (1, 2, 4, 8)]
                rpt = traffic(layer, n, 1).rows_per_token(layer.tokens, n)
                bound = (p1.compute_ms + p1.comm_ms) / max(p1.compute_ms, p1.comm_ms)
                stats.setdefault("nccl", []).append(times[1] / times[best])
                stats.setdefault("bound", []).append(bound)
                if n > t.gpus_per_node and n // t.gpus_per_node > 1 and layer.num_experts // n > 1:
                    stats.setdefault("free_internode", []).append(ftimes[1] / ftimes[fbest])
                out.append(f"| {n} | {max(n // t.gpus_per_node, 1)} | {layer.num_experts // n} | "
                           f"{'fwd+bwd' if bwd else 'fwd'} | " + " | ".join(cells)
                           + f" | {best} | {times[1] / times[best]:.2f}x | W={fbest}, {ftimes[1] / ftimes[fbest]:.2f}x"
                           f" | {bound:.2f}x | {p1.compute_ms:.2f} | {p1.comm_ms:.2f} | {rpt:.2f} |")
        out.append("")
    return out


MISSES = """## Where the model misses the 15% target, and why

- **dsv3 on 2 GPUs** (the shape and scale the model is for: GPU-bound, real all-to-alls) is
  within {dsv3_fit:.0%} on every fitted row and within {dsv3_carve:.0%} on the SM-carveout rows it
  was not fitted to; the copy-engine rows (not fitted: MEASURED.md's copy-engine pair for
  the share, r11's host probe for the extra host time per call) within {dsv3_ce:.0%}. The CPU
  simulation within {cpu:.0%}.
- **Host-bound rows miss** (wide and decode on 1 GPU; decode on 2 GPUs): there the layer is
  paced by the Python host issuing ~8 calls per wave, and one constant per call cannot fit
  both: per extra wave, decode costs 0.39 ms on 1 GPU but ~1 ms on 2 GPUs (W=1 -> W=4: 1.34
  -> 2.30 ms and 1.76 -> 5.00 ms), while wide on 1 GPU costs only 0.18 ms. The model puts
  the per-call cost in between (`host_ms` above), so it over-predicts wide/1-GPU at W>=4
  (up to 2x) and under-predicts decode/2-GPU (by 20-40%). The measurements themselves
  spread this much here: decode on 2 GPUs, W=4 per-(rank, wave), was 5.45 ms with carveout 0
  and 3.11 ms with carveout 16, a setting that does nothing to host time; and r04-r06 saw
  decode forward+backward move 7.2-10.0 ms with no change to that path.
- **Forward+backward at decode** is under-predicted by ~20-30%: its backward is host-bound
  (autograd plus the routing-weight gradient exchange), lumped here into one fitted
  `backward_host_ms`.
So use the model for GPU-bound shapes (thousands of tokens per rank), where it is good
enough to choose W; for decode-sized batches it says W=1, which is also what we measured.

"""


def misses_figures(rows: List[Row], rates: Rates, topo: Topology, cpu_errs: List[float]) -> Dict[str, float]:
    """The worst errors the text quotes: dsv3 on 2 GPUs, fitted / carveout / copy-engine rows."""
    worst = {"dsv3_fit": 0.0, "dsv3_carve": 0.0, "dsv3_ce": 0.0}
    for row in rows:
        if row.preset != "dsv3" or row.ranks != 2:
            continue
        f, fb = predict(row, rates, topo)
        e = max(abs(f / row.fwd - 1), abs(fb / row.fwdbwd - 1) if not math.isnan(row.fwdbwd) else 0.0)
        key = "dsv3_ce" if row.transport != "nccl" else ("dsv3_fit" if row.fitted else "dsv3_carve")
        worst[key] = max(worst[key], e)
    return {**worst, "cpu": max(cpu_errs)}


def wave_bound_table(rates: Rates, topo: Topology) -> List[str]:
    """What expert-grouped waves could buy on one node at best: the host free, no per-kernel
    cost, the all-to-all never slowed by a GEMM; only the shape and the traffic remain."""
    perfect = replace(rates, host_ms=0.0, stage_ms=0.0, comm_share=1.0, a2a_host_ms=0.0, backward_host_ms=0.0)
    out = ["## The bound of expert-grouped waves on one node", "",
           "The benchmark's dsv3 preset (32 experts per rank, T=4096, k=8) with the host free, no "
           "per-kernel cost and communication that never slows beside a GEMM: what is left is the "
           "traffic itself. The first dispatch and the last combine cannot be hidden (nothing "
           "computes before the first wave's rows land, nor after the last wave's results leave), "
           "and with the per-rank deduplication they carry a large share of the rows.", "",
           "| GPUs | dedup | W=1 | W=2 | W=4 | W=8 | best speedup | rows/token at W=8 | first dispatch's share of rows (W=8) |",
           "|---|---|---|---|---|---|---|---|---|"]
    for n in (2, 4, 8):
        layer = Layer(7168, 2048, 32 * n, 8, 4096)
        t = replace(topo, ranks=n, gpus_per_node=n)
        for dedup in ("rank", "wave"):
            times = [simulate(layer, t, perfect, W, dedup).layer_ms for W in (1, 2, 4, 8)]
            tr = traffic(layer, n, 8, dedup)
            out.append(f"| {n} | {dedup} | " + " | ".join(f"{x:.2f}" for x in times)
                       + f" | {times[0] / min(times):.2f}x | {tr.rows_per_token(4096, n):.2f} | "
                       f"{tr.dispatch[0] / sum(tr.dispatch):.2f} |")
    out += ["", "So on one node at this shape the waves can buy at most ~5% on 2 GPUs, ~15% on 4 and ~25% "
            "on 8 (communication is 15-30% of the expert math there); the per-wave host time "
            "(0.2-1.0 ms measured per wave, depending on the machine) eats most of it on these "
            "hosts. They pay where communication is as long as the math: between nodes (the "
            "tables above).", ""]
    return out


PUBLISHED = """## Beside published figures

- **Links.** DeepEP reports ~153 GB/s of NVLink bandwidth for its intranode kernels on H800
  (whose NVLink carries ~200 GB/s each way) and 43-58 GB/s over RDMA (400 Gb/s CX7, 50 GB/s
  nominal). The model uses 326 GB/s leaving each H200 (NCCL `all_to_all_single` on these GPUs,
  `../shared/MEASURED.md`; H200 NVLink carries 450 GB/s each way: 72% of it, DeepEP's 153/200
  is 77%) and 45 GB/s per GPU between nodes (inside DeepEP's RDMA range). On these H200s
  DeepEP itself reached 408 GB/s (its own count of received bytes), so a DeepEP-class
  transport would cut the intranode all-to-all by about a fifth; internode, where the
  all-to-all is 1.6-3.7x the expert math at dsv3 (EP16-256), the network bandwidth is the
  whole story.
- **Waves.** DeepSeek-V4 states a theoretical 1.92x speedup from its wave scheduling. The
  bound here (perfect overlap, (comm + compute) / max(comm, compute)) is at most 2x and
  reaches {bound_hi:.2f}x where communication and computation are nearly equal (EP16
  forward+backward), so the theory agrees. What the model predicts we reach
  is far less, for two measured reasons: (1) on NCCL the all-to-all keeps only ~14% of its
  speed while a grouped GEMM holds the SMs (`MEASURED.md`'s pair), so the waves buy
  {nccl_lo:.2f}-{nccl_hi:.2f}x, as our 2-GPU runs and `MEASURED.md`'s wave prototype found; (2) even
  with communication at full speed (copy engines or SMs of its own), the first dispatch
  and the last combine are never hidden and, with the per-rank deduplication, they carry
  most of the bytes (a token's experts on a rank span most waves), so the best is
  {free_lo:.2f}-{free_hi:.2f}x between nodes, not 1.9x. DeepSeek's fused kernel also pipelines inside a wave
  (token chunks as they land), which our expert-grouped waves do not.
- **EP256 with 256 experts** leaves one expert per rank: there are no expert groups to make
  waves of (W=1 only). Waves over token chunks would be needed there.
"""


def profile_literal(rates: Rates, topo: Topology) -> str:
    return (
        f'    "{rates.name}": (\n'
        f"        Rates(gemm_tflops={rates.gemm_tflops!r}, hbm_GBps={rates.hbm_GBps:.1f}, "
        f"permute_GBps={rates.permute_GBps:.1f},\n"
        f"              stage_ms={rates.stage_ms:.4f}, host_ms={rates.host_ms:.4f}, comm_share={rates.comm_share:.3f}, "
        f"compute_share={rates.compute_share:.3f},\n              backward_factor={rates.backward_factor:.3f}, "
        f"backward_host_ms={rates.backward_host_ms:.4f}, a2a_host_ms={rates.a2a_host_ms!r},\n"
        f'              name="{rates.name}"),\n'
        f"        Topology(ranks={topo.ranks}, gpus_per_node={topo.gpus_per_node}, intra_GBps={topo.intra_GBps:.1f}, "
        f"inter_GBps={topo.inter_GBps:.1f}, latency_ms={topo.latency_ms:.4f}, local_GBps={topo.local_GBps:.1f}),\n"
        f"    ),\n"
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--write-profiles", action="store_true", help="rewrite ep/sim_profiles.py with the fitted values")
    p.add_argument("--rounds", type=int, default=20)
    a = p.parse_args(argv)

    latency, bw = fit_links()
    print(f"links from MEASURED.md (4 H200s): latency {latency:.4f} ms, NVLink {bw:.1f} GB/s leaving each GPU")
    gpu_topo = Topology(ranks=2, gpus_per_node=2, intra_GBps=bw, inter_GBps=45.0, latency_ms=latency, local_GBps=1500.0)
    gpu_rows = load_rows(GPU_RUNS, one_gpu_math())
    comm_share, compute_share = pair_shares()
    print(f"overlap shares from MEASURED.md's pair: all-to-all {comm_share:.3f}, GEMM {compute_share:.3f}")
    gpu0 = Rates(gemm_tflops=((1.0, 1.0),), name="h200-nccl", host_ms=0.03, stage_ms=0.01, permute_GBps=3000.0,
                 comm_share=comm_share, compute_share=compute_share, backward_factor=2.5, backward_host_ms=0.5)
    gpu, gpu_topo = fit(gpu_rows, gpu0, gpu_topo, FIT_KEYS, a.rounds)
    print("h200-nccl:", {k: round(getattr(gpu, k), 4) for k in FIT_KEYS})

    cpu_rows = load_rows(CPU_RUNS, {})
    cpu_topo = cpu_links(cpu_rows[0])
    cpu0 = Rates(gemm_tflops=((1.0, 0.01),), hbm_GBps=20.0, name="cpu-gloo", host_ms=0.05, stage_ms=0.05,
                 permute_GBps=5.0, comm_share=0.5, compute_share=0.5, backward_factor=2.0, backward_host_ms=1.0)
    cpu, cpu_topo = fit(cpu_rows, cpu0, cpu_topo, FIT_KEYS + SHARE_KEYS, a.rounds)
    print("cpu-gloo:", {k: round(getattr(cpu, k), 4) for k in FIT_KEYS + SHARE_KEYS})

    gpu_table, gpu_errs = calibration_table(gpu_rows, gpu, gpu_topo, "H200, NCCL (r06: 1 GPU, r07: 2 GPUs)")
    cpu_table, cpu_errs = calibration_table(cpu_rows, cpu, cpu_topo, "CPU, Gloo, 4 ranks on 2 cores")
    fitted_errs = [e for e in gpu_errs]
    doc = [
        "# ep.sim: predicted against measured",
        "",
        f"Made by `python benchmarks/calibrate.py` from the runs named in each table (times in ms; "
        f"the model's error is model / measured - 1; bold: beyond 15%). How the model works: `ep/sim.py`.",
        "",
        "Inputs measured elsewhere: the all-to-all links from `../shared/MEASURED.md`'s 4-GPU table "
        f"(least squares: latency {latency:.3f} ms, {bw:.0f} GB/s leaving each GPU); the grouped-GEMM "
        "rate of each shape from the 1-GPU stage-alone times (r06), used for the 2-GPU run too.",
        "Fitted (one value per profile, on the carveout-0 rows, forward and forward+backward): "
        + ", ".join(f"{k} = {getattr(gpu, k):.4g}" for k in FIT_KEYS) + " (H200); "
        + ", ".join(f"{k} = {getattr(cpu, k):.4g}" for k in FIT_KEYS + SHARE_KEYS) + " (CPU, where the "
        "shares are fitted too: 4 ranks share 2 cores). On the H200 the shares are not fitted: "
        f"MEASURED.md's pair of a NCCL all-to-all and a grouped GEMM at once gives all-to-all {comm_share:.2f}, "
        f"GEMM {compute_share:.2f}.",
        "",
        "## Summary",
        "",
        *summary(gpu_rows, gpu, gpu_topo),
        *summary(cpu_rows, cpu, cpu_topo)[2:],
        "",
        f"All H200 points: mean abs error {sum(fitted_errs) / len(fitted_errs):.1%}, "
        f"max {max(fitted_errs):.1%}, {sum(e <= 0.15 for e in fitted_errs)}/{len(fitted_errs)} within 15%. "
        f"CPU: mean {sum(cpu_errs) / len(cpu_errs):.1%}, max {max(cpu_errs):.1%}.",
        "",
        MISSES.format(**misses_figures(gpu_rows, gpu, gpu_topo, cpu_errs)),
        "## Every row",
        "",
        *gpu_table, "", *cpu_table, "",
    ]
    with open(os.path.join(RESULTS, "CALIBRATION.md"), "w") as f:
        f.write("\n".join(doc))
    pred_topo = Topology(ranks=8, gpus_per_node=8, intra_GBps=bw, inter_GBps=45.0, latency_ms=latency, local_GBps=1500.0)
    pgpu = replace(gpu, gemm_tflops=_dsv3_gemm_table(gpu))
    stats: Dict[str, List[float]] = {}
    pred_lines = predictions(pgpu, pred_topo, stats)
    with open(os.path.join(RESULTS, "PREDICTIONS.md"), "w") as f:
        f.write("\n".join(["# ep.sim: predictions for EP 8 to 256", "",
                           "Made by `python benchmarks/calibrate.py` with the fitted H200 profile "
                           "(`ep/sim_profiles.py`); nodes of 8 GPUs, NVLink inside "
                           f"({bw:.0f} GB/s leaving each GPU, latency {latency:.3f} ms per all-to-all), "
                           "45 GB/s per GPU between nodes (400 Gb/s NICs at ~90%), uniform routing, dedup per rank. "
                           "Times in ms per layer (the expert part: dispatch, math, combine; the plan is not in it).",
                           "", *pred_lines, *wave_bound_table(pgpu, pred_topo), PUBLISHED.format(
                               nccl_lo=min(stats["nccl"]), nccl_hi=max(stats["nccl"]), bound_hi=max(stats["bound"]),
                               free_lo=min(stats["free_internode"]), free_hi=max(stats["free_internode"]))]))
    print(f"wrote {RESULTS}/CALIBRATION.md and PREDICTIONS.md")
    if a.write_profiles:
        path = os.path.join(os.path.dirname(HERE), "ep", "sim_profiles.py")
        with open(path) as f:
            text = f.read()
        head, rest = text.split("# fmt: off\n")
        _, tail = rest.split("# fmt: on\n")
        cpu_profile_topo = replace(cpu_topo)
        ce = copy_engine_rates(pgpu)
        body = ("PROFILES = {\n" + profile_literal(pgpu, pred_topo) + profile_literal(ce, pred_topo) + profile_literal(
            replace(cpu, gemm_tflops=cpu_rates_table(cpu_rows, cpu)), cpu_profile_topo) + "}\n")
        with open(path, "w") as f:
            f.write(head + "# fmt: off\n" + body + "# fmt: on\n" + tail)
        print(f"wrote {path}")
    return 0


def cpu_links(row: Row, latency_ms: float = 0.5) -> Topology:
    """The Gloo ranks' link from the run's own dispatch alone (a measured stage rate): its
    bytes leaving each rank over its time less a latency of `latency_ms`."""
    with open(os.path.join(RESULTS, row.source)) as f:
        run = json.load(f)["runs"][0]
    L, n = row.layer, row.ranks
    rows_out = traffic(L, n, 1).dispatch[0] * (n - 1)
    mb = rows_out * L.hidden * L.elem_bytes / 1e6
    bw = mb / max(run["stages_ms"]["dispatch"] - latency_ms, 1e-3)
    return Topology(ranks=n, gpus_per_node=n, intra_GBps=bw, inter_GBps=bw, latency_ms=latency_ms, local_GBps=5.0)


def _dsv3_gemm_table(rates: Rates) -> Tuple[Tuple[float, float], ...]:
    """The GEMM rate table of the H200 profile: the 1-GPU dsv3 (1024 tokens/expert) and decode (32) shapes."""
    math_ms = one_gpu_math()
    pts = []
    for preset, T in (("decode", 128), ("dsv3", 4096)):
        items = T * 8
        flops = 2 * items * 7168 * 3 * 2048
        pts.append((items / 32, round(flops / (math_ms[preset] - 4 * rates.stage_ms) / 1e9, 1)))
    return tuple(pts)


def cpu_rates_table(rows: List[Row], rates: Rates) -> Tuple[Tuple[float, float], ...]:
    return rates_for(rows[0], rates).gemm_tflops


if __name__ == "__main__":
    raise SystemExit(main())
