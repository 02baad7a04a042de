"""A model of the wave pipeline: one layer's schedule played out on one rank's resources.

The layer's forward (and backward) is a list of operations in the order the host issues
them, each on one of three resources of a rank:
- `host`: the Python thread issuing calls (each call costs `Rates.host_ms`);
- `compute`: the compute stream (gathers, grouped GEMMs, row sums), in order;
- `comm`: the communication stream (the all-to-alls), in order.
An operation starts when the host has issued it, its resource has finished the ones
before it, and the operations it waits for are done. While a GEMM and an all-to-all run
at once, each goes slower (`Rates.comm_share`, `Rates.compute_share`: the fraction of its
own speed it keeps; the GPUs here measured the all-to-all losing most of its SMs to the
GEMM's persistent grid, `../shared/MEASURED.md`).

Durations come from the layer's shape and the rates: all-to-all time is a per-call latency
plus the bytes to other GPUs of the node over the NVLink bandwidth and the bytes to other
nodes over the network bandwidth (both at once); GEMM time is the FLOPs over a grouped-GEMM
rate that depends on the tokens per expert (a measured table), never below the time to
read the wave's weights; gathers and row sums move their bytes at `permute_GBps`; every
kernel adds `stage_ms`.

Traffic is the expectation under uniform top-k routing (a token's k experts are a random
k-subset of E): a token reaches a rank in wave w if one of its experts there is in that
wave, and with the per-rank deduplication it travels in its first such wave and comes
back after its last one (`ep.plan`). `Layer.skew` (the hottest rank's load over the mean)
scales what that rank receives and computes; the ranks are otherwise alike, so one rank's
schedule is the layer's.

The command (`python -m ep.sim --help`) prints a prediction and draws its timeline.
"""
from __future__ import annotations

import argparse
import bisect
import math
from dataclasses import dataclass, field, replace
from typing import Dict, List, Optional, Sequence, Tuple

from .plan import wave_bounds

RESOURCES = ("host", "compute", "comm")


# ---- inputs ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Layer:
    """One MoE layer's shape on one rank."""

    hidden: int
    ffn_hidden: int
    num_experts: int
    top_k: int
    tokens: int
    """T, tokens per rank."""
    elem_bytes: int = 2
    """bytes per element on the wire and in the GEMMs (bf16: 2)."""
    skew: float = 1.0
    """the hottest rank's received rows and items over the mean (1: uniform)."""


@dataclass(frozen=True)
class Topology:
    """Ranks and links: `gpus_per_node` GPUs share a node's NVLink; nodes talk over the network."""

    ranks: int
    gpus_per_node: int = 8
    intra_GBps: float = 330.0
    """bytes per second (1e9) one GPU sends to the other GPUs of its node, all at once."""
    inter_GBps: float = 45.0
    """bytes per second one GPU sends to other nodes (400 Gb/s NICs: 50 GB/s nominal)."""
    latency_ms: float = 0.09
    """fixed cost of one all-to-all call."""
    local_GBps: float = 1500.0
    """the rank's copy to itself inside the all-to-all."""


@dataclass(frozen=True)
class Rates:
    """Measured rates of one kind of GPU (or CPU) and its software, and the fitted costs."""

    gemm_tflops: Tuple[Tuple[float, float], ...]
    """`(tokens per expert, TFLOP/s)` of the forward expert math (linear1 + linear2, their
    gathers and SwiGLU included), interpolated in log(tokens), flat beyond the ends."""
    hbm_GBps: float = 4000.0
    """weights are read at most this fast: a wave's GEMMs take at least its weights' bytes over it."""
    permute_GBps: float = 3000.0
    """bytes moved per second by gathers and row sums (read + write)."""
    stage_ms: float = 0.01
    """GPU time added by each kernel (launch gap, tail)."""
    host_ms: float = 0.03
    """host time to issue one call (a kernel or an all-to-all)."""
    comm_share: float = 1.0
    """fraction of its own speed an all-to-all keeps while a GEMM runs."""
    compute_share: float = 1.0
    """fraction of its own speed the compute stream keeps while an all-to-all runs."""
    backward_factor: float = 2.0
    """backward expert math (data + weight gradients) over the forward's, same tokens."""
    backward_host_ms: float = 0.0
    """host time the backward adds once (autograd, the routing-weight gradient exchange)."""
    a2a_host_ms: Optional[float] = None
    """host time to issue one all-to-all (None: `host_ms`, as any call)."""
    name: str = ""

    def gemm_rate(self, tokens_per_expert: float) -> float:
        """TFLOP/s at this many tokens per expert (log-linear interpolation in the table)."""
        pts = sorted(self.gemm_tflops)
        xs = [math.log(max(x, 1e-9)) for x, _ in pts]
        x = math.log(max(tokens_per_expert, 1e-9))
        i = bisect.bisect_left(xs, x)
        if i == 0:
            return pts[0][1]
        if i == len(pts):
            return pts[-1][1]
        f = (x - xs[i - 1]) / (xs[i] - xs[i - 1])
        return pts[i - 1][1] + f * (pts[i][1] - pts[i - 1][1])


# ---- traffic: expected rows per wave under uniform routing -----------------------------
def p_avoids(num_experts: int, top_k: int, m: int) -> float:
    """Probability that a uniformly random k-subset of E experts misses m given experts."""
    if m <= 0:
        return 1.0
    if m > num_experts - top_k:
        return 0.0
    p = 1.0
    for i in range(top_k):
        p *= (num_experts - m - i) / (num_experts - i)
    return p


@dataclass(frozen=True)
class Traffic:
    """Expected rows of one rank, per wave: `dispatch[w]` rows it sends to each rank (and,
    alike, receives from each), `combine[w]` rows coming back from each rank, `items[w]`
    rows of expert math it runs (received rows times their experts in the wave)."""

    dispatch: Tuple[float, ...]
    combine: Tuple[float, ...]
    items: Tuple[float, ...]
    experts: Tuple[int, ...]
    """local experts of each wave."""

    def rows_per_token(self, tokens: int, ranks: int) -> float:
        """Rows each token puts on the wire (all ranks, its own included), W's total."""
        return ranks * sum(self.dispatch) / tokens


def traffic(layer: Layer, ranks: int, num_waves: int, dedup: str = "rank") -> Traffic:
    """Expected per-wave rows of one rank (see `Traffic`), uniform routing.

    dedup "rank": a route travels in its first wave and returns after its last (W=1's
    bytes); "wave": once per (rank, wave) each way.
    """
    E, k, T = layer.num_experts, layer.top_k, layer.tokens
    if E % ranks:
        raise ValueError(f"num_experts ({E}) must divide by ranks ({ranks})")
    E_local = E // ranks
    b = wave_bounds(E_local, num_waves)
    avoid = lambda m: p_avoids(E, k, m)  # noqa: E731
    W = num_waves
    if dedup == "rank":
        disp = [T * (avoid(b[w]) - avoid(b[w + 1])) for w in range(W)]
        comb = [T * (avoid(E_local - b[w + 1]) - avoid(E_local - b[w])) for w in range(W)]
    elif dedup == "wave":
        disp = [T * (1 - avoid(b[w + 1] - b[w])) for w in range(W)]
        comb = list(disp)
    else:
        raise ValueError(f"dedup must be 'rank' or 'wave', got {dedup!r}")
    items = [ranks * T * k * (b[w + 1] - b[w]) / E for w in range(W)]
    return Traffic(tuple(disp), tuple(comb), tuple(items), tuple(b[w + 1] - b[w] for w in range(W)))


# ---- the schedule ----------------------------------------------------------------------
@dataclass
class Op:
    """One operation: `work` ms at full speed on `resource`, after the ops in `after`."""

    name: str
    resource: str
    work: float
    after: Tuple[int, ...] = ()
    heavy: bool = False
    """a GEMM: slows an all-to-all running beside it."""
    stage: str = ""
    wave: int = -1
    start: float = field(default=math.nan, compare=False)
    end: float = field(default=math.nan, compare=False)


def play(ops: List[Op], comm_share: float = 1.0, compute_share: float = 1.0) -> float:
    """Run the ops (each resource in list order) and fill in their start and end; returns the end.

    Exact event simulation: between two events (an op ends), each resource's running op
    advances at its speed, which depends on what runs on the others: an all-to-all at
    `comm_share` while a heavy compute op runs, a compute op at `compute_share` while an
    all-to-all runs; the host never slows.
    """
    for r in {op.resource for op in ops}:
        if r not in RESOURCES:
            raise ValueError(f"unknown resource {r!r}")
    queues: Dict[str, List[int]] = {r: [i for i, op in enumerate(ops) if op.resource == r] for r in RESOURCES}
    head = {r: 0 for r in RESOURCES}
    left = [op.work for op in ops]
    done = [False] * len(ops)
    t = 0.0
    while not all(done):
        running: Dict[str, int] = {}
        for r in RESOURCES:
            if head[r] < len(queues[r]):
                i = queues[r][head[r]]
                if all(done[j] for j in ops[i].after):
                    running[r] = i
                    if math.isnan(ops[i].start):
                        ops[i].start = t
        if not running:
            waiting = [ops[queues[r][head[r]]].name for r in RESOURCES if head[r] < len(queues[r])]
            raise ValueError(f"the schedule deadlocks: {waiting} wait for ops that cannot run")
        speed = {r: 1.0 for r in running}
        if "comm" in running and "compute" in running:
            speed["compute"] = compute_share
            if ops[running["compute"]].heavy:
                speed["comm"] = comm_share
        dt = min(left[i] / speed[r] for r, i in running.items())
        t += dt
        for r, i in running.items():
            left[i] -= dt * speed[r]
            if left[i] <= 1e-12:
                done[i], ops[i].end = True, t
                head[r] += 1
    return t


def _a2a_ms(rows_per_rank: float, layer: Layer, topo: Topology, skew: float) -> float:
    """One all-to-all moving `rows_per_rank` rows to (and from) each rank."""
    n, g = topo.ranks, min(topo.gpus_per_node, topo.ranks)
    row = layer.hidden * layer.elem_bytes * skew
    intra = rows_per_rank * (g - 1) * row
    inter = rows_per_rank * (n - g) * row
    return (
        (topo.latency_ms if n > 1 else 0.0)
        + max(intra / topo.intra_GBps, inter / topo.inter_GBps) * 1e-6
        + rows_per_rank * row / topo.local_GBps * 1e-6
    )


def _bytes_ms(nbytes: float, rates: Rates) -> float:
    return nbytes / rates.permute_GBps * 1e-6 + rates.stage_ms


def _experts_ms(items: float, experts: int, layer: Layer, rates: Rates) -> Tuple[float, float]:
    """linear1 and linear2 of one wave (their gathers and SwiGLU included)."""
    H, F, e = layer.hidden, layer.ffn_hidden, layer.elem_bytes
    tokens_per_expert = items / max(experts, 1)
    rate = rates.gemm_rate(tokens_per_expert) * 1e9  # FLOP per ms
    flops1, flops2 = 2 * items * H * 2 * F, 2 * items * F * H
    floor1 = experts * H * 2 * F * e / rates.hbm_GBps * 1e-6
    floor2 = experts * F * H * e / rates.hbm_GBps * 1e-6
    return (max(flops1 / rate, floor1) + 2 * rates.stage_ms, max(flops2 / rate, floor2) + 2 * rates.stage_ms)


def build_ops(layer: Layer, topo: Topology, rates: Rates, num_waves: int, dedup: str = "rank",
              backward: bool = False, gather_once: bool = True, math_first: bool = True) -> List[Op]:
    """The layer's ops in issue order, as `ep.pipeline.run_waves` issues them on CUDA:
    inbound(0), wave 0's math, the other inbound transfers, then per wave the outbound
    transfer (row sums, then the all-to-all) and the next wave's math; then the
    un-permute. `math_first=False` is the order before r13 (and on CPU): every inbound
    transfer first. With W > 1 and `gather_once` one gather of every wave's rows comes
    first (since r10); else a gather per wave.
    With `backward`, the forward is followed by its mirror (the output gradients go out
    as the tokens did, the expert backward runs `backward_factor` times the forward's
    math, input gradients come back as the results did) and the routing-weight gradient
    exchange."""
    tr = traffic(layer, topo.ranks, num_waves, dedup)
    s, n, H, e = layer.skew, topo.ranks, layer.hidden, layer.elem_bytes
    comm = "comm" if n > 1 else "compute"  # one rank: NCCL copies on the compute stream
    row = H * e
    ops: List[Op] = []

    a2a_host = rates.host_ms if rates.a2a_host_ms is None else rates.a2a_host_ms

    def add(name, resource, work, after=(), heavy=False, stage="", wave=-1, calls=1) -> int:
        """A GPU op and, before it, the host's `calls` calls that issue it."""
        host = a2a_host if stage in ("dispatch", "combine") else calls * rates.host_ms
        ops.append(Op(f"issue {name}", "host", host, (), stage="host", wave=wave))
        ops.append(Op(name, resource, work, (len(ops) - 1, *after), heavy, stage, wave))
        return len(ops) - 1

    def one_pass(tag: str, math_factor: float) -> None:
        W = num_waves
        inbound: List[int] = [-1] * W
        outbound: List[int] = []
        once = gather_once and W > 1
        gathered = add(f"{tag}gather", "compute", _bytes_ms(2 * n * sum(tr.dispatch) * row, rates),
                       stage="permute") if once else -1

        def start_in(w: int) -> None:
            g = gathered if once else add(f"{tag}gather[{w}]", "compute", _bytes_ms(2 * n * tr.dispatch[w] * row, rates),
                                          stage="permute", wave=w)
            inbound[w] = add(f"{tag}dispatch[{w}]", comm, _a2a_ms(tr.dispatch[w], layer, topo, s), [g],
                             stage="dispatch", wave=w)

        def math(w: int) -> int:
            l1, l2 = _experts_ms(tr.items[w] * s, tr.experts[w], layer, rates)
            a = add(f"{tag}linear1[{w}]", "compute", l1 * math_factor, [inbound[w]], True, "linear1", w, calls=2)
            return add(f"{tag}linear2[{w}]", "compute", l2 * math_factor, [a], True, "linear2", w, calls=2)

        def send(w: int, after: int) -> None:
            red = (tr.items[w] * s + n * tr.combine[w] * s) * row
            c = add(f"{tag}sum[{w}]", "compute", _bytes_ms(red, rates), [after], stage="permute", wave=w)
            outbound.append(add(f"{tag}combine[{w}]", comm, _a2a_ms(tr.combine[w], layer, topo, s), [c],
                                stage="combine", wave=w))

        early = 1 if math_first else W
        for w in range(early):
            start_in(w)
        first = math(0)
        for w in range(early, W):
            start_in(w)
        send(0, first)
        for w in range(1, W):
            send(w, math(w))
        back_rows = n * sum(tr.combine)
        add(f"{tag}unpermute", "compute", _bytes_ms((back_rows + layer.tokens) * row, rates), outbound, stage="permute")

    one_pass("", 1.0)
    if backward:
        ops.append(Op("autograd", "host", rates.backward_host_ms, (), stage="host"))
        one_pass("bwd ", rates.backward_factor)
        add("weight-grad exchange", comm, topo.latency_ms, [len(ops) - 1], stage="combine", calls=2)
    return ops


@dataclass
class Prediction:
    layer_ms: float
    stages_ms: Dict[str, float]
    """each stage alone (its ops' work summed, at full speed)."""
    compute_ms: float
    comm_ms: float
    exposed_comm_ms: float
    """layer time beyond the compute stream's own work: communication (and host time) not hidden."""
    ops: List[Op]


def simulate(layer: Layer, topo: Topology, rates: Rates, num_waves: int, dedup: str = "rank",
             backward: bool = False, gather_once: bool = True, math_first: bool = True) -> Prediction:
    """Play one layer (forward, or forward + backward) and return its times in ms."""
    ops = build_ops(layer, topo, rates, num_waves, dedup, backward, gather_once, math_first)
    total = play(ops, rates.comm_share, rates.compute_share)
    stages: Dict[str, float] = {}
    for op in ops:
        if op.resource != "host":
            stages[op.stage] = stages.get(op.stage, 0.0) + op.work
    compute = sum(op.work for op in ops if op.stage in ("linear1", "linear2", "permute"))
    comm = sum(op.work for op in ops if op.stage in ("dispatch", "combine"))
    return Prediction(total, stages, compute, comm, max(total - compute, 0.0), ops)


def best_waves(layer: Layer, topo: Topology, rates: Rates, candidates: Optional[Sequence[int]] = None,
               dedup: str = "rank", backward: bool = False) -> Tuple[int, Dict[int, float]]:
    """The W with the shortest predicted layer (ties: the smaller W), and every W's time."""
    E_local = layer.num_experts // topo.ranks
    cands = [w for w in (candidates or (1, 2, 4, 8)) if 1 <= w <= E_local] or [1]
    times = {w: simulate(layer, topo, rates, w, dedup, backward).layer_ms for w in cands}
    best = min(cands, key=lambda w: (times[w], w))
    return best, times


# ---- the picture -----------------------------------------------------------------------
_COLORS = {"dispatch": "tab:blue", "combine": "tab:cyan", "linear1": "tab:orange", "linear2": "tab:red",
           "permute": "tab:green", "host": "tab:gray"}


def draw(pred: Prediction, path: str, title: str = "") -> None:
    """A timeline picture: one row per resource, one bar per op, coloured by stage, labelled by wave."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(12, 2.6))
    rows = {r: i for i, r in enumerate(reversed(RESOURCES))}
    for op in pred.ops:
        if op.end - op.start <= 0:
            continue
        ax.barh(rows[op.resource], op.end - op.start, left=op.start, height=0.6,
                color=_COLORS.get(op.stage, "black"), edgecolor="white", linewidth=0.3)
        if op.wave >= 0 and op.end - op.start > pred.layer_ms / 60:
            ax.text((op.start + op.end) / 2, rows[op.resource], str(op.wave), ha="center", va="center", fontsize=6)
    ax.set_yticks(list(rows.values()), list(rows.keys()))
    ax.set_xlabel("ms")
    ax.set_title(title or f"predicted layer {pred.layer_ms:.2f} ms")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in _COLORS.values()]
    ax.legend(handles, list(_COLORS), ncol=6, fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---- the command -----------------------------------------------------------------------
SHAPES = {
    # H, F, E, k, T per rank
    "dsv3": dict(hidden=7168, ffn_hidden=2048, num_experts=256, top_k=8, tokens=4096),
    "v4flash": dict(hidden=4096, ffn_hidden=2048, num_experts=256, top_k=6, tokens=4096),
}


def main(argv=None) -> int:
    from .sim_profiles import PROFILES

    p = argparse.ArgumentParser(prog="python -m ep.sim", description="Predict one MoE layer's time with the wave-pipeline model.")
    p.add_argument("--shape", default="dsv3", help=f"one of {sorted(SHAPES)}, or H,F,E,k,T")
    p.add_argument("--ranks", type=int, default=8)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--inter-GBps", type=float, default=45.0, help="per GPU between nodes")
    p.add_argument("--profile", default="h200-nccl", help=f"measured rates, one of {sorted(PROFILES)}")
    p.add_argument("--waves", default="1,2,4,8")
    p.add_argument("--dedup", default="rank", choices=("rank", "wave"))
    p.add_argument("--skew", type=float, default=1.0)
    p.add_argument("--backward", action="store_true", help="forward + backward")
    p.add_argument("--png", default=None, help="draw the best W's timeline here")
    a = p.parse_args(argv)
    if a.shape in SHAPES:
        layer = Layer(**SHAPES[a.shape], skew=a.skew)
    else:
        H, F, E, k, T = (int(v) for v in a.shape.split(","))
        layer = Layer(H, F, E, k, T, skew=a.skew)
    rates, topo = PROFILES[a.profile]
    topo = replace(topo, ranks=a.ranks, gpus_per_node=a.gpus_per_node, inter_GBps=a.inter_GBps)
    best, times = best_waves(layer, topo, rates, [int(w) for w in a.waves.split(",")], a.dedup, a.backward)
    print(f"{a.shape} on {a.ranks} ranks ({a.gpus_per_node}/node), profile {a.profile}, "
          f"{'forward+backward' if a.backward else 'forward'}, dedup {a.dedup}")
    base = times[min(times)]
    for w, ms in times.items():
        pred = simulate(layer, topo, rates, w, a.dedup, a.backward)
        print(f"  W={w}: {ms:7.3f} ms  ({base / ms:4.2f}x W=1)  compute {pred.compute_ms:6.3f}  "
              f"comm {pred.comm_ms:6.3f}  exposed comm {pred.exposed_comm_ms:6.3f}"
              + ("   <- best" if w == best else ""))
    if a.png:
        draw(simulate(layer, topo, rates, best, a.dedup, a.backward), a.png, f"{a.shape}, {a.ranks} ranks, W={best}")
        print(f"wrote {a.png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
