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

Two schedules, one per wave split of the layer (`MoEConfig.wave_split`):
- token waves (`wave_split="tokens"`, the layer's default; `ep.pipeline`): wave w is
  the w-th chunk of every rank's tokens through all local experts. One pack kernel writes
  every sent row, every dispatch is issued at once, each wave's math (items, linear1,
  linear2, row sums) starts as its rows land, combine(w) flies during wave w+1's math,
  then one un-permute. A region (the rows one rank sends another in one wave) holds
  `capacity = ceil(T_max / W)` rows and the all-to-all moves all of it, padding included
  (`TokenTraffic`): the bytes on the wire are fixed by the shape, and the expected real
  rows (a token misses a rank with probability `p_avoids(E, k, E_local)`) set the
  compute side; with `TokenCall.rows_in_use_only` (the device-put transport, which sends
  only each region's rows in use) the real rows set the wire too. Backward mirrors it, with the weight gradients once over all waves after
  the last wave's data gradients. Every step costs its kernel launches (`TOKEN_LAUNCHES`,
  counted from the code): `Rates.host_ms` each on the host in an eager call,
  `Rates.replay_host_ms` in a CUDA-graph replay (`TokenCall.graph`), and `stage_ms` of
  GPU time each. An SM carveout slows the GEMMs (`Rates.carveout_slowdown`) and lets a
  transfer beside them keep more of its speed (`Rates.comm_GBps_per_sm`).
- expert waves (`wave_split="experts"`; `ep.pipeline`): wave w is the w-th group of each
  rank's local experts. Traffic is the expectation under uniform top-k routing (a token's
  k experts are a random k-subset of E): a token reaches a rank in wave w if one of its
  experts there is in that wave, and with the per-rank deduplication it travels in its
  first such wave and comes back after its last one (`ep.plan`).
`Layer.skew` (the hottest rank's load over the mean) scales what that rank computes (and,
for expert waves, receives); the ranks are otherwise alike, so one rank's schedule is the
layer's. `simulate(..., wave_split=None)` plays the schedule the profile was calibrated
for (`Rates.wave_split`).

The command (`python -m ep.model --help`) prints a prediction and draws its timeline.
"""
from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from ..layout import RowLayout
from ..plan import wave_capacity, wave_tokens

RESOURCES = ("host", "compute", "comm")
WAVE_SPLITS = ("tokens", "experts")


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
    dispatch_fp8: bool = False
    """`MoEConfig.dispatch_dtype` FP8: dispatched rows carry e4m3 and 1x128 fp32 scales
    (`RowLayout`), the combine stays in `elem_bytes`."""
    expert_fp8: Optional[str] = None
    """`MoEConfig.expert_dtype` FP8 with this `fp8_scaling` ("blocks", "rows"): the forward
    products at `Rates.fp8_tflops`' rate, reading 1-byte weights; the backward as without."""
    fp8_held: bool = False
    """the FP8 experts are held (`hold_fp8_experts`), else quantized once per call
    (`fp8_quantize_ms`)."""


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

    @property
    def link_GBps(self) -> float:
        """The bandwidth that paces an all-to-all: the network's once the ranks span nodes."""
        return self.inter_GBps if self.ranks > self.gpus_per_node else self.intra_GBps


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
    wave_split: str = "tokens"
    """the engine these rates were calibrated on, and the schedule `simulate` plays by default."""
    call_host_ms: float = 0.0
    """token waves, eager: host time of one layer call besides its launches (Python, input
    checks, the hosts' exchange of token counts)."""
    replay_host_ms: float = 0.0
    """token waves: host time per launch inside a CUDA-graph replay."""
    backward_launch_ms: Optional[float] = None
    """token waves, eager: host time per launch in the backward (autograd issues it; None: `host_ms`)."""
    carveout_slowdown: Tuple[Tuple[float, float], ...] = ((0.0, 1.0),)
    """`(SMs left free, GEMM time over no carveout's)`, linear between the points, flat beyond."""
    comm_GBps_per_sm: float = 0.0
    """how much faster a transfer beside a GEMM runs per SM the carveout leaves free."""
    roofline_p: float = math.inf
    """how a GEMM's FLOP time a and weight-read time b combine: `(a^p + b^p)^(1/p)`; inf:
    the larger of the two."""
    gemm_tiles: bool = False
    """grouped GEMMs pad each expert's rows to their tile (`gemm_tile_rows`)."""
    fp8_tflops: Tuple[Tuple[str, float], ...] = ()
    """`(fp8_scaling, TFLOP/s)` of the FP8 forward products (linear1 and linear2 with their
    activations' quantization), at the calibration shape's rows per expert (one rate:
    measured at dsv3 only)."""

    def fp8_rate(self, scaling: str) -> float:
        rates = dict(self.fp8_tflops)
        if scaling not in rates:
            raise ValueError(f"profile {self.name!r} has no FP8 rate for fp8_scaling={scaling!r} "
                             f"(measured: {sorted(rates) or 'none'})")
        return rates[scaling]

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


@dataclass(frozen=True)
class TokenCall:
    """How a token-wave layer is called: what its time depends on besides shape, links and rates."""

    graph: bool = False
    """replayed from a CUDA graph (host cost per launch `Rates.replay_host_ms`), else an eager call."""
    sm_carveout: int = 0
    """`MoEConfig.sm_carveout` (the layer applies it only when W > 1)."""
    shared_ms: float = 0.0
    """the shared experts' forward alone (0: none); their backward takes `backward_factor` times it."""
    shared_beside: bool = True
    """the shared experts run beside the first transfer (since r19), else after the waves."""
    dispatch_first: bool = True
    """every dispatch issued before wave 0's math (since r17), else after it (r16)."""
    dispatch_after_math: bool = False
    """each later dispatch waits for the compute stream's earlier work (the first engine, r16-dev)."""
    capacity_factor: float = 1.0
    """`MoEConfig.capacity_factor`: the share of the worst case a region holds."""
    rows_in_use_only: bool = False
    """the transport moves only each region's rows in use (`transport="device_put"`), not the
    whole region; its rate is taken as the topology's (device_put's over NVLink is unmeasured)."""


def _interp(table: Sequence[Tuple[float, float]], x: float) -> float:
    """Linear interpolation in `(x, y)` points, flat beyond the ends."""
    pts = sorted(table)
    if x <= pts[0][0]:
        return pts[0][1]
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x <= x1:
            return y0 + (x - x0) / (x1 - x0) * (y1 - y0)
    return pts[-1][1]


def gemm_slowdown(rates: Rates, sm_carveout: int) -> float:
    """GEMM time with `sm_carveout` SMs left free, over the time without."""
    return _interp(rates.carveout_slowdown, sm_carveout)


def overlap_shares(rates: Rates, topo: Topology, sm_carveout: int) -> Tuple[float, float]:
    """(all-to-all's, compute stream's) share of their speed while both run. The carveout
    gives the transfer `sm_carveout * comm_GBps_per_sm` of its link's speed on SMs of its
    own; that part of it no longer competes with the GEMM."""
    link = topo.link_GBps
    free = min(1.0, sm_carveout * rates.comm_GBps_per_sm / link) if link > 0 else 0.0
    return (rates.comm_share + (1 - rates.comm_share) * free,
            rates.compute_share + (1 - rates.compute_share) * free)


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


def _local_experts(layer: Layer, ranks: int) -> int:
    if layer.num_experts % ranks:
        raise ValueError(f"num_experts ({layer.num_experts}) must divide by ranks ({ranks})")
    return layer.num_experts // ranks


def traffic(layer: Layer, ranks: int, num_waves: int, dedup: str = "rank") -> Traffic:
    """Expected per-wave rows of one rank for expert waves (see `Traffic`), uniform routing.

    dedup "rank": a route travels in its first wave and returns after its last (W=1's
    bytes); "wave": once per (rank, wave) each way.
    """
    E, k, T = layer.num_experts, layer.top_k, layer.tokens
    E_local = _local_experts(layer, ranks)
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


_ROW_DTYPES = {2: torch.bfloat16, 4: torch.float32, 8: torch.float64}


def row_width(layer: Layer) -> int:
    """Elements of one dispatched row of the token-wave engine (`ep.layout.RowLayout.width`):
    the hidden vector (with FP8 dispatch e4m3 and its scales), the slot table and the
    sender's status, padded to 16 elements."""
    return RowLayout(layer.hidden, layer.top_k, _ROW_DTYPES[layer.elem_bytes],
                     torch.float8_e4m3fn if layer.dispatch_fp8 else None).width


@dataclass(frozen=True)
class TokenTraffic:
    """One rank's rows per token wave. Each wave sends one region of `capacity` rows to
    every rank (itself included) and receives one from each: the whole region, padding
    included. `tokens[w]` of this rank's tokens are in wave w, each missing a given rank
    with probability `miss`, so a region carries `real_rows(w)` routes on average;
    `items[w]` rows of expert math run here in wave w."""

    capacity: int
    tokens: Tuple[int, ...]
    miss: float
    items: Tuple[float, ...]
    dispatch_row_bytes: int
    """a dispatched row: the hidden vector with its slot table (`row_width`)."""
    combine_row_bytes: int
    """a returned row: the hidden vector."""

    def real_rows(self, wave: int) -> float:
        return min(self.tokens[wave] * (1 - self.miss), self.capacity)

    @property
    def padding(self) -> float:
        """Share of the regions' rows that carry no route."""
        W = len(self.tokens)
        return 1 - sum(self.real_rows(w) for w in range(W)) / (W * self.capacity) if self.capacity else 0.0

    def wire_rows(self, in_use_only: bool = False) -> float:
        """Rows an all-to-all moves per peer and wave: the whole region, or (a transport that
        sends only the rows in use) a wave's expected routes to a rank, at least the first row
        (`ep.plan.WavePlan.region_rows`). The receiver writes the whole region either way
        (copies, then padding), which the model leaves out: local writes, ~1% of an all-to-all."""
        if not in_use_only or not self.capacity:
            return self.capacity
        return max(1.0, max(self.real_rows(w) for w in range(len(self.tokens))))

    def wire_bytes(self, ranks: int) -> Tuple[int, int]:
        """Bytes one rank sends to the other ranks per wave: (dispatch, combine)."""
        rows = (ranks - 1) * self.capacity
        return rows * self.dispatch_row_bytes, rows * self.combine_row_bytes


def token_traffic(layer: Layer, ranks: int, num_waves: int, capacity_factor: float = 1.0) -> TokenTraffic:
    """One rank's token-wave traffic (`TokenTraffic`), every rank with `layer.tokens` tokens."""
    E, k, T = layer.num_experts, layer.top_k, layer.tokens
    E_local = _local_experts(layer, ranks)
    starts = wave_tokens(T, num_waves)
    per_wave = tuple(starts[w + 1] - starts[w] for w in range(num_waves))
    # n senders x t tokens x k slots, E_local of E experts here: t * k items
    items = tuple(t * k * layer.skew for t in per_wave)
    e = layer.elem_bytes
    return TokenTraffic(wave_capacity(T, num_waves, capacity_factor), per_wave, p_avoids(E, k, E_local), items,
                        row_width(layer) * e, layer.hidden * e)


def fitting_capacity_factor(layer: Layer, ranks: int, num_waves: int, sigmas: float = 4.0) -> float:
    """A `capacity_factor` whose regions hold a wave's routes to a rank under uniform routing
    up to `sigmas` standard deviations above the mean (routes per region are binomial); a
    call whose routes do not fit raises, so this is a what-if, not a default."""
    tr = token_traffic(layer, ranks, num_waves)
    t, p = max(tr.tokens), 1 - tr.miss
    rows = t * p + sigmas * math.sqrt(t * p * (1 - p))
    return min(1.0, rows / max(tr.capacity, 1))


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


def _a2a_ms(rows_per_rank: float, row_bytes: float, topo: Topology) -> float:
    """One all-to-all moving `rows_per_rank` rows of `row_bytes` to (and from) each rank."""
    n, g = topo.ranks, min(topo.gpus_per_node, topo.ranks)
    intra = rows_per_rank * (g - 1) * row_bytes
    inter = rows_per_rank * (n - g) * row_bytes
    return (
        (topo.latency_ms if n > 1 else 0.0)
        + max(intra / topo.intra_GBps, inter / topo.inter_GBps) * 1e-6
        + rows_per_rank * row_bytes / topo.local_GBps * 1e-6
    )


def _bytes_ms(nbytes: float, rates: Rates) -> float:
    return nbytes / rates.permute_GBps * 1e-6 + rates.stage_ms


def gemm_tile_rows(bound_rows_per_expert: float) -> int:
    """Rows of the tile `torch._grouped_mm` uses on an H100/H200 (its CUTLASS kernel): 64 when
    the buffer's rows per expert (its size over the groups, a bound, not the rows in use)
    are at most 128, else 128 (the other dimension here is H or 2F, always larger)."""
    return 64 if bound_rows_per_expert <= 128 else 128


@lru_cache(maxsize=4096)
def padded_rows(mean_rows: float, tile: int) -> float:
    """Expected rows of one expert's group rounded up to whole tiles, its rows Poisson with
    this mean (uniform routing); `tile` 0: no rounding."""
    if tile <= 0 or mean_rows <= 0:
        return max(mean_rows, 0.0)
    spread = 10 * math.sqrt(mean_rows) + 10
    lo, hi = int(max(0.0, mean_rows - spread)), int(mean_rows + spread) + 1
    log_mean, total = math.log(mean_rows), 0.0
    for x in range(lo, hi + 1):
        p = math.exp(x * log_mean - mean_rows - math.lgamma(x + 1))
        total += p * -(-x // tile) * tile
    return total


def _roofline(flop_ms: float, read_ms: float, p: float) -> float:
    return max(flop_ms, read_ms) if math.isinf(p) else (flop_ms ** p + read_ms ** p) ** (1 / p)


def fp8_quantize_ms(layer: Layer, experts: int, rates: Rates) -> float:
    """The experts' per-call FP8 quantization at HBM speed: 128x128 blocks read the weights
    once, per-column scales twice (the amax over K, then the values); 1-byte values written."""
    reads = 2 if layer.expert_fp8 == "rows" else 1
    return experts * 3 * layer.hidden * layer.ffn_hidden * (reads * layer.elem_bytes + 1) / rates.hbm_GBps * 1e-6


def _experts_math(items: float, experts: int, layer: Layer, rates: Rates, tile: int = 0,
                  fp8: bool = False) -> Tuple[float, float]:
    """linear1 and linear2 of `items` rows over `experts` experts (their gathers and SwiGLU
    included), kernels' fixed costs not: FLOPs (of the rows rounded up to `tile`) at the
    rate of their tokens per expert, combined with the time to read the experts' weights
    (`Rates.roofline_p`). `fp8`: the forward's FP8 products (`Layer.expert_fp8`): their
    rate, 1-byte weights."""
    H, F, e = layer.hidden, layer.ffn_hidden, layer.elem_bytes
    tokens_per_expert = items / max(experts, 1)
    rate = rates.gemm_rate(tokens_per_expert) * 1e9  # FLOP per ms
    if fp8:
        rate, e = rates.fp8_rate(layer.expert_fp8) * 1e9, 1
    rows = experts * padded_rows(tokens_per_expert, tile) if tile else items
    flops1, flops2 = 2 * rows * H * 2 * F, 2 * rows * F * H
    floor1 = experts * H * 2 * F * e / rates.hbm_GBps * 1e-6
    floor2 = experts * F * H * e / rates.hbm_GBps * 1e-6
    return _roofline(flops1 / rate, floor1, rates.roofline_p), _roofline(flops2 / rate, floor2, rates.roofline_p)


class _Issue:
    """One call's ops in issue order: each GPU op after the host's calls that issue it."""

    def __init__(self, call_ms: float, a2a_ms: float) -> None:
        self.ops: List[Op] = []
        self.call_ms, self.a2a_ms = call_ms, a2a_ms

    def host(self, name: str, ms: float, wave: int = -1) -> int:
        """Host time that issues nothing (or what a later `gpu` names)."""
        self.ops.append(Op(name, "host", ms, (), stage="host", wave=wave))
        return len(self.ops) - 1

    def gpu(self, name: str, resource: str, work: float, after: Sequence[int] = (), heavy: bool = False,
            stage: str = "", wave: int = -1) -> int:
        self.ops.append(Op(name, resource, work, tuple(after), heavy, stage, wave))
        return len(self.ops) - 1

    def add(self, name: str, resource: str, work: float, after: Sequence[int] = (), heavy: bool = False,
            stage: str = "", wave: int = -1, calls: int = 1) -> int:
        """A GPU op and, before it, the host's `calls` calls that issue it (an all-to-all: one)."""
        issued = self.host(f"issue {name}", self.a2a_ms if stage in ("dispatch", "combine") else calls * self.call_ms, wave)
        return self.gpu(name, resource, work, (issued, *after), heavy, stage, wave)


def _a2a_host_ms(rates: Rates) -> float:
    return rates.host_ms if rates.a2a_host_ms is None else rates.a2a_host_ms


def build_expert_ops(layer: Layer, topo: Topology, rates: Rates, num_waves: int, dedup: str = "rank",
                     backward: bool = False, gather_once: bool = True, math_first: bool = True) -> List[Op]:
    """The expert-wave layer's ops in issue order, as `ep.pipeline.run_waves` issues them on CUDA:
    inbound(0), wave 0's math, the other inbound transfers, then per wave the outbound
    transfer (row sums, then the all-to-all) and the next wave's math; then the
    un-permute. `math_first=False` is the order before r13 (and on CPU): every inbound
    transfer first. With W > 1 and `gather_once` one gather of every wave's rows comes
    first (since r10); else a gather per wave.
    With `backward`, the forward is followed by its mirror (the output gradients go out
    as the tokens did, the expert backward runs `backward_factor` times the forward's
    math, input gradients come back as the results did) and the routing-weight gradient
    exchange."""
    if layer.dispatch_fp8 or layer.expert_fp8:
        raise ValueError("ep.model: FP8 (Layer.dispatch_fp8, expert_fp8) is modelled for token waves only")
    tr = traffic(layer, topo.ranks, num_waves, dedup)
    s, n, H, e = layer.skew, topo.ranks, layer.hidden, layer.elem_bytes
    comm = "comm" if n > 1 else "compute"  # one rank: NCCL copies on the compute stream
    row = H * e
    sched = _Issue(rates.host_ms, _a2a_host_ms(rates))
    add = sched.add

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
            inbound[w] = add(f"{tag}dispatch[{w}]", comm, _a2a_ms(tr.dispatch[w], row * s, topo), [g],
                             stage="dispatch", wave=w)

        def math(w: int) -> int:
            l1, l2 = (t + 2 * rates.stage_ms for t in _experts_math(tr.items[w] * s, tr.experts[w], layer, rates))
            a = add(f"{tag}linear1[{w}]", "compute", l1 * math_factor, [inbound[w]], True, "linear1", w, calls=2)
            return add(f"{tag}linear2[{w}]", "compute", l2 * math_factor, [a], True, "linear2", w, calls=2)

        def send(w: int, after: int) -> None:
            red = (tr.items[w] * s + n * tr.combine[w] * s) * row
            c = add(f"{tag}sum[{w}]", "compute", _bytes_ms(red, rates), [after], stage="permute", wave=w)
            outbound.append(add(f"{tag}combine[{w}]", comm, _a2a_ms(tr.combine[w], row * s, topo), [c],
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
        sched.host("autograd", rates.backward_host_ms)
        one_pass("bwd ", rates.backward_factor)
        add("weight-grad exchange", comm, topo.latency_ms, [len(sched.ops) - 1], stage="combine", calls=2)
    return sched.ops


# Kernel launches of the token-wave engine on CUDA (bf16, Triton kernels), per step,
# counted from `ep/plan.py`, `ep/pipeline.py`, `ep/kernels/` and `ep/checks.py`
# (`benchmarks/calibrate.py` sets them beside the r17 profiler traces):
# The launches of the code the calibrated runs ran (r16-r19; r17's trace: 42 at W=2). Since
# then (session 5, not yet measured on 2 GPUs) the code launches fewer: "plan" 3, "items" 3,
# "bwd sum" 2, "bwd unpermute" 2, and at decode (the few-rows products) "linear1" 1 and
# "linear2" 2. The table changes with the next calibration on 2 GPUs, not before: the fit of
# the runs' host times rests on these counts.
TOKEN_LAUNCHES = {
    # forward, once: sender_plan (ids clamped, row_token filled, status zeroed, count kernel,
    # the blocks' prefix: cumsum and minus, place kernel)
    "plan": 7,
    "pack": 2,  # the pack kernel; the receive buffers' zero rows
    # per wave: wave_items (counts zeroed, count kernel, cumsum: cast and scan, + 1, cumsum
    # over experts: two cub kernels, place kernel)
    "items": 8,
    "linear1": 3,  # gather of the items' rows; torch._grouped_mm (prepare, GEMM)
    "linear2": 3,  # SwiGLU; torch._grouped_mm
    "sum": 1,  # each row's weighted sum over its items (reduce_rows)
    "unpermute": 3,  # the returned rows summed into y; the status table posted (maximum, copy to host)
    # backward, once: the status output's zero gradient, dy gathered into the rows, zero rows
    "bwd pack": 3,
    "bwd linear2": 4,  # per wave: gather of dz, grouped GEMM dz @ w2^T, SwiGLU's backward
    "bwd linear1": 2,  # grouped GEMM dh @ w1^T
    # reduce_rows of dx; the routing weights' gradients into the rows (>=, clamp, index, where)
    "bwd sum": 7,
    "weights": 5,  # W=1: gather of x's items, the grouped GEMMs x^T @ dh and wa^T @ dz
    # W>1, once and per wave: ep.plan.expert_major (a stable sort of int64 keys, 22 launches
    # with its memsets; the index tables), the gathers and concatenations of every wave's tensors
    "weights once": 45,
    "weights per wave": 7,
    # dx from the returned rows; each slot's weight gradient (//, gather, >=, clamp, gather, where)
    "bwd unpermute": 8,
    "shared": 4,  # the shared experts: x @ w1, SiLU, product, @ w2
    "shared sum": 1,  # routed + shared
    "shared bwd": 8,  # their autograd backward: two matmuls' data and weight gradients, SiLU, product, dx sum
}


def _weight_grad_launches(num_waves: int) -> int:
    L = TOKEN_LAUNCHES
    return L["weights"] if num_waves == 1 else L["weights once"] + L["weights per wave"] * num_waves


def token_launches(num_waves: int, backward: bool = False, shared: bool = False) -> Tuple[int, int]:
    """(kernel launches, all-to-all calls) of one token-wave layer call on CUDA
    (`TOKEN_LAUNCHES`); with `backward`, the forward's and the backward's."""
    L, W = TOKEN_LAUNCHES, num_waves
    kernels = L["plan"] + L["pack"] + W * (L["items"] + L["linear1"] + L["linear2"] + L["sum"]) + L["unpermute"]
    kernels += (L["shared"] + L["shared sum"]) if shared else 0
    if backward:
        kernels += L["bwd pack"] + W * (L["bwd linear2"] + L["bwd linear1"] + L["bwd sum"])
        kernels += _weight_grad_launches(W) + L["bwd unpermute"] + (L["shared bwd"] if shared else 0)
    return kernels, 2 * W * (2 if backward else 1)


def build_token_ops(layer: Layer, topo: Topology, rates: Rates, num_waves: int, backward: bool = False,
                    call: TokenCall = TokenCall()) -> List[Op]:
    """The token-wave layer's ops in issue order, as `ep.layer` and `ep.pipeline` issue
    them on CUDA (see the module docstring); with `backward`, its mirror after it."""
    n, W, H, F, e = topo.ranks, num_waves, layer.hidden, layer.ffn_hidden, layer.elem_bytes
    tr = token_traffic(layer, n, W, call.capacity_factor)
    E_local = layer.num_experts // n
    comm = "comm" if n > 1 else "compute"  # one rank: the all-to-all is a copy on the compute stream
    launch_ms = rates.replay_host_ms if call.graph else rates.host_ms
    sched = _Issue(launch_ms, launch_ms if call.graph else _a2a_host_ms(rates))
    L, stage = TOKEN_LAUNCHES, rates.stage_ms
    slow = gemm_slowdown(rates, call.sm_carveout if W > 1 else 0)
    rows = W * n * tr.capacity  # sent (and received) rows over all waves
    # the items buffer holds n x capacity x min(k, E_local) rows and an anchor per expert (`ep.plan`)
    bound = (n * tr.capacity * min(layer.top_k, E_local) + E_local) / E_local
    tile = gemm_tile_rows(bound) if rates.gemm_tiles else 0
    math_ms = [_experts_math(items, E_local, layer, rates, tile, fp8=bool(layer.expert_fp8)) for items in tr.items]
    half = rates.backward_factor / 2  # the backward's math: data gradients per wave, weight gradients once

    def kernels(name: str, what: str, nbytes: float = 0.0, after: Sequence[int] = (), wave: int = -1,
                stage_name: str = "permute") -> int:
        """Row-moving (or tiny) kernels: their bytes at `permute_GBps`, `stage_ms` each."""
        count = L[what]
        return sched.add(name, "compute", nbytes / rates.permute_GBps * 1e-6 + count * stage, after, stage=stage_name,
                         wave=wave, calls=count)

    def gemms(name: str, what: str, ms: float, after: Sequence[int], wave: int, stage_name: str) -> int:
        return sched.add(name, "compute", ms * slow + L[what] * stage, after, True, stage_name, wave, L[what])

    def shared(tag: str, ms: float, what: str, after: Sequence[int]) -> int:
        return sched.add(f"{tag}shared experts", "compute", ms, after, True, "shared", calls=L[what])

    def shared_beside(tag: str, ms: float, what: str, start: int) -> None:
        """Issued before `start`'s transfers, run beside the first one (modelled on the compute
        stream after `start`, where it waits for the first rows anyway)."""
        issued = sched.host(f"issue {tag}shared experts", L[what] * launch_ms)
        sched.gpu(f"{tag}shared experts", "compute", ms, (issued, start), True, "shared")

    def waves(tag: str, start: int, in_ms: float, out_ms: float, wave_math: Callable[[int, int], int]) -> List[int]:
        """W inbound transfers after `start`, each wave's math as its rows land, its outbound
        transfer after it, in `ep.pipeline.run_waves`' issue order; returns the outbound ops."""
        inbound: List[int] = []
        outbound: List[int] = []
        last_math = [start]

        def send_in(w: int) -> None:
            after = [start, last_math[0]] if call.dispatch_after_math else [start]
            inbound.append(sched.add(f"{tag}dispatch[{w}]", comm, in_ms, after, stage="dispatch", wave=w))

        def compute(w: int) -> None:
            last_math[0] = wave_math(w, inbound[w])

        def send_out(w: int) -> None:
            outbound.append(sched.add(f"{tag}combine[{w}]", comm, out_ms, [last_math[0]], stage="combine", wave=w))

        early = W if call.dispatch_first else 1
        for w in range(early):
            send_in(w)
        compute(0)
        for w in range(early, W):
            send_in(w)
        send_out(0)
        for w in range(1, W):
            compute(w)
            send_out(w)
        return outbound

    def forward_wave(w: int, landed: int) -> int:
        it = kernels(f"items[{w}]", "items", after=[landed], wave=w)
        l1 = gemms(f"linear1[{w}]", "linear1", math_ms[w][0], [it], w, "linear1")
        l2 = gemms(f"linear2[{w}]", "linear2", math_ms[w][1], [l1], w, "linear2")
        return kernels(f"sum[{w}]", "sum", (tr.items[w] + n * tr.capacity) * H * e, [l2], w)

    def backward_wave(w: int, landed: int) -> int:
        d2 = gemms(f"bwd linear2[{w}]", "bwd linear2", half * math_ms[w][1], [landed], w, "linear2")
        d1 = gemms(f"bwd linear1[{w}]", "bwd linear1", half * math_ms[w][0], [d2], w, "linear1")
        return kernels(f"bwd sum[{w}]", "bwd sum", tr.items[w] * H * e + n * tr.capacity * tr.dispatch_row_bytes, [d1], w)

    # forward
    if not call.graph:
        sched.host("layer call", rates.call_host_ms)
    plan = kernels("plan", "plan", stage_name="plan")
    if layer.expert_fp8 and not layer.fp8_held:  # once per call, before the first wave's math
        sched.add("quantize experts", "compute", fp8_quantize_ms(layer, E_local, rates) + stage, stage="linear1",
                  calls=2)
    pack = kernels("pack", "pack", 2 * rows * tr.dispatch_row_bytes, [plan])
    if call.shared_ms and call.shared_beside:
        shared_beside("", call.shared_ms, "shared", pack)
    wire = tr.wire_rows(call.rows_in_use_only)
    back = waves("", pack, _a2a_ms(wire, tr.dispatch_row_bytes, topo),
                 _a2a_ms(wire, tr.combine_row_bytes, topo), forward_wave)
    y = kernels("unpermute", "unpermute", (rows + layer.tokens) * H * e, back)
    if call.shared_ms:
        done = y if call.shared_beside else shared("", call.shared_ms, "shared", [y])
        kernels("shared sum", "shared sum", 3 * layer.tokens * H * e, [done])
    if not backward:
        return sched.ops

    # backward (autograd runs the shared experts' backward first: they were called last)
    shared_bwd = rates.backward_factor * call.shared_ms
    if not call.graph:
        sched.host("autograd", rates.backward_host_ms)
        launch_ms = sched.call_ms = rates.host_ms if rates.backward_launch_ms is None else rates.backward_launch_ms
    first = shared("bwd ", shared_bwd, "shared bwd", []) if call.shared_ms and not call.shared_beside else None
    pack_dy = kernels("bwd pack", "bwd pack", 2 * rows * H * e, [] if first is None else [first])
    if call.shared_ms and call.shared_beside:
        shared_beside("bwd ", shared_bwd, "shared bwd", pack_dy)
    back = waves("bwd ", pack_dy, _a2a_ms(wire, tr.combine_row_bytes, topo),
                 _a2a_ms(wire, tr.dispatch_row_bytes, topo), backward_wave)
    # after the last wave's data gradients (the compute stream's order), beside the last
    # transfers: the weight gradients over all waves' items, ragged along the tile's K (64 rows)
    full = _experts_math(sum(tr.items), E_local, layer, rates, 64 if rates.gemm_tiles else 0)
    # W > 1: every wave's x, dh, wa and dz gathered (and dh, wa concatenated) in expert order,
    # where W=1 gathers only x's rows
    extra = 0.0 if W == 1 else 2 * e * sum(tr.items) * (H + 6 * F)
    count = _weight_grad_launches(W)
    weights = sched.add("weight grads", "compute", half * sum(full) * slow + extra / rates.permute_GBps * 1e-6
                        + count * stage, (), True, "weights", calls=count)
    kernels("bwd unpermute", "bwd unpermute", (rows + layer.tokens) * H * e, [weights, *back])
    return sched.ops


def build_ops(layer: Layer, topo: Topology, rates: Rates, num_waves: int, dedup: str = "rank",
              backward: bool = False, gather_once: bool = True, math_first: bool = True,
              wave_split: Optional[str] = None, call: TokenCall = TokenCall()) -> List[Op]:
    """The layer's ops in issue order: token waves (`build_token_ops`; `call`) or expert
    waves (`build_expert_ops`; `dedup`, `gather_once`, `math_first`). `wave_split=None`:
    the rates' own (`Rates.wave_split`)."""
    split = wave_split or rates.wave_split
    if split == "tokens":
        return build_token_ops(layer, topo, rates, num_waves, backward, call)
    if split == "experts":
        return build_expert_ops(layer, topo, rates, num_waves, dedup, backward, gather_once, math_first)
    raise ValueError(f"wave_split must be one of {WAVE_SPLITS}, got {wave_split!r}")


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


COMPUTE_STAGES = ("linear1", "linear2", "permute", "weights", "shared", "plan")


def simulate(layer: Layer, topo: Topology, rates: Rates, num_waves: int, dedup: str = "rank",
             backward: bool = False, gather_once: bool = True, math_first: bool = True,
             wave_split: Optional[str] = None, call: TokenCall = TokenCall()) -> Prediction:
    """Play one layer (forward, or forward + backward) and return its times in ms (arguments:
    `build_ops`)."""
    split = wave_split or rates.wave_split
    ops = build_ops(layer, topo, rates, num_waves, dedup, backward, gather_once, math_first, split, call)
    if split == "tokens":
        shares = overlap_shares(rates, topo, call.sm_carveout if num_waves > 1 else 0)
    else:
        shares = rates.comm_share, rates.compute_share
    total = play(ops, *shares)
    stages: Dict[str, float] = {}
    for op in ops:
        if op.resource != "host":
            stages[op.stage] = stages.get(op.stage, 0.0) + op.work
    compute = sum(op.work for op in ops if op.stage in COMPUTE_STAGES)
    comm = sum(op.work for op in ops if op.stage in ("dispatch", "combine"))
    return Prediction(total, stages, compute, comm, max(total - compute, 0.0), ops)


def wave_candidates(layer: Layer, ranks: int, candidates: Optional[Sequence[int]] = None,
                    wave_split: str = "tokens") -> List[int]:
    """The candidate W the layer accepts: at most E_local (expert waves) or T (token waves)."""
    most = layer.num_experts // ranks if wave_split == "experts" else layer.tokens
    return [w for w in (candidates or (1, 2, 4, 8)) if 1 <= w <= most] or [1]


def best_waves(layer: Layer, topo: Topology, rates: Rates, candidates: Optional[Sequence[int]] = None,
               dedup: str = "rank", backward: bool = False, wave_split: Optional[str] = None,
               call: TokenCall = TokenCall()) -> Tuple[int, Dict[int, float]]:
    """The W with the shortest predicted layer (ties: the smaller W), and every W's time."""
    split = wave_split or rates.wave_split
    cands = wave_candidates(layer, topo.ranks, candidates, split)
    times = {w: simulate(layer, topo, rates, w, dedup, backward, wave_split=split, call=call).layer_ms for w in cands}
    best = min(cands, key=lambda w: (times[w], w))
    return best, times


# ---- the picture -----------------------------------------------------------------------
_COLORS = {"dispatch": "tab:blue", "combine": "tab:cyan", "linear1": "tab:orange", "linear2": "tab:red",
           "weights": "tab:brown", "shared": "tab:purple", "permute": "tab:green", "plan": "tab:olive",
           "host": "tab:gray"}


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
    used = {op.stage for op in pred.ops}
    names = [s for s in _COLORS if s in used]
    handles = [plt.Rectangle((0, 0), 1, 1, color=_COLORS[s]) for s in names]
    ax.legend(handles, names, ncol=len(names), fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---- the command -----------------------------------------------------------------------
SHAPES = {
    # H, F, E, k, T per rank
    "dsv3": dict(hidden=7168, ffn_hidden=2048, num_experts=256, top_k=8, tokens=4096),
    "v4flash": dict(hidden=4096, ffn_hidden=2048, num_experts=256, top_k=6, tokens=4096),
}
DEFAULT_PROFILES = {"tokens": "h200-nccl-tokens", "experts": "h200-nccl"}


def wave_bounds(num_local_experts: int, num_waves: int) -> Tuple[int, ...]:
    """Local-expert boundaries of the W expert waves: wave w owns `[b[w], b[w+1])`, `b[w] = ceil(w * E_local / W)`."""
    return tuple(-(-w * num_local_experts // num_waves) for w in range(num_waves + 1))
