"""`MoEConfig(num_waves="auto")`: W chosen by the schedule model (`ep.sim`) from measured rates.

The first forward of an "auto" layer measures, once per process, layer shape and power of
two of the token count (cached):
- the group's all-to-all: a tiny and a larger exchange of rows -> latency and bandwidth;
- the layer's own expert math (linear1 + linear2 with its weights) on synthetic rows at
  the tokens per expert the call will have -> the grouped-GEMM rate;
- the host's time per issued call (a burst of small kernels, no sync).
Every rank sends its figures to every rank and all take the slowest, with the largest
token count, so every rank plays the same model and picks the same W (the plan needs all
ranks to agree). What cannot be measured cheaply (per-kernel GPU gaps, how much the
all-to-all slows beside a GEMM, the backward's factor) comes from the device's fitted
profile (`ep.sim_profiles`). The probe costs a few expert-math passes (tens of ms on a
GPU at DeepSeek-V3 sizes); the W is then kept for the layer's later calls.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import replace
from typing import Callable, Dict, Tuple

import torch

from .config import MoEConfig
from .experts import linear1, linear2
from .sim import Layer, Rates, Topology, best_waves
from .sim_profiles import PROFILES
from .transport import Transport

CANDIDATES = (1, 2, 4, 8)
_RATES: Dict[Tuple, Tuple[float, ...]] = {}  # per process: probe key -> measured figures


def _timed(fn: Callable[[], object], device: torch.device, reps: int = 3) -> float:
    """Median wall time of `fn` in ms (device synchronised around each run), after one warm-up."""
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    fn()
    times = []
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _probe(cfg: MoEConfig, transport: Transport, w1: torch.Tensor, w2: torch.Tensor, tokens: int) -> Tuple[float, ...]:
    """This rank's figures: (a2a latency ms, a2a ms per MB leaving the rank, GEMM ms per GFLOP,
    host ms per call, tokens per expert the GEMM was timed at)."""
    n, device, dtype = transport.world_size, w1.device, w1.dtype
    H, F, E_local = cfg.hidden, cfg.ffn_hidden, w1.shape[0]
    # all-to-all: 1 row and `rows` rows to every rank
    rows = max(1, min(tokens, 256))
    transport.reserve(rows)  # same value on every rank
    small = torch.zeros(n, H, device=device, dtype=dtype)
    big = torch.zeros(n * rows, H, device=device, dtype=dtype)
    out_s, out_b = torch.empty_like(small), torch.empty_like(big)
    t_small = _timed(lambda: transport.all_to_all(out_s, small, [1] * n, [1] * n, "auto-waves probe", 1).wait(), device)
    t_big = _timed(lambda: transport.all_to_all(out_b, big, [rows] * n, [rows] * n, "auto-waves probe", rows).wait(),
                   device)
    mb_out = (n - 1) * rows * H * big.element_size() / 1e6
    ms_per_mb = max(t_big - t_small, 1e-6) / max(mb_out, 1e-6) if n > 1 else 0.0
    # expert math at the call's tokens per expert, on a slice of the experts (at most 4)
    e = max(1, min(E_local, 4))
    tpe = max(1, tokens * cfg.top_k // E_local)  # n ranks x T tokens x k slots over n x E_local experts
    x = torch.randn(e * tpe, H, device=device, dtype=dtype) * 0.1
    counts = [tpe] * e
    offs = torch.tensor([tpe * (i + 1) for i in range(e)], dtype=torch.int32, device=device)
    t_math = _timed(lambda: linear2(linear1(x, w1[:e].detach(), counts, offs, tpe), w2[:e].detach(), counts, offs,
                                    expected_rows=tpe), device)
    gflop = 2 * e * tpe * H * 3 * F / 1e9
    # host: time to issue 50 small kernels (our calls are a few ops each: x3)
    z = torch.zeros(16, device=device)
    t_host = _timed(lambda: [z.add_(1) for _ in range(50)], device) / 50 * 3
    return (t_small, ms_per_mb, t_math / gflop, t_host, float(tpe))


def choose_waves(cfg: MoEConfig, transport: Transport, w1: torch.Tensor, w2: torch.Tensor, tokens: int) -> int:
    """The W the model predicts fastest for this layer on this group (collective: every rank calls it)."""
    n = transport.world_size
    E_local = cfg.num_experts // n
    key = [cfg.hidden, cfg.ffn_hidden, cfg.num_experts, cfg.top_k, n, str(w1.device), w1.dtype]

    def slowest(values) -> list:
        row = torch.tensor(values, dtype=torch.float64).unsqueeze(0).expand(n, -1).contiguous()
        return transport.exchange(row, "auto-waves figures").max(dim=0).values.tolist()

    T = int(slowest([float(tokens)])[0])  # the probe's sizes must match on every rank
    key = (*key, 1 << max(T - 1, 0).bit_length())  # the GEMM rate depends on the tokens: per power of two
    figures = _RATES.get(key)
    if figures is None:
        with torch.no_grad():
            figures = tuple(slowest(_probe(cfg, transport, w1, w2, T)))
        _RATES[key] = figures
    latency, ms_per_mb, ms_per_gflop, host_ms, tpe = figures
    if w1.device.type != "cuda":
        name = "cpu-gloo"
    else:
        from .transport.copy_engine import CopyEngineTransport

        name = "h200-copy-engine" if isinstance(transport, CopyEngineTransport) else "h200-nccl"
    profile, topo = PROFILES[name]
    rates = replace(profile, gemm_tflops=((tpe, 1.0 / max(ms_per_gflop, 1e-9)),), host_ms=host_ms)
    topo = Topology(ranks=n, gpus_per_node=n, intra_GBps=1.0 / max(ms_per_mb, 1e-9) if n > 1 else 1e6,
                    latency_ms=latency, local_GBps=topo.local_GBps)
    layer = Layer(cfg.hidden, cfg.ffn_hidden, cfg.num_experts, cfg.top_k, max(T, 1), w1.element_size())
    best, _ = best_waves(layer, topo, rates, [w for w in CANDIDATES if w <= E_local],
                         "rank" if cfg.dedup_across_waves else "wave")
    return best


# ---- token waves: W chosen by measuring the layer itself ---------------------------------
TOKEN_CANDIDATES = (1, 2, 4, 8)
_TOKEN_WAVES: Dict[Tuple, int] = {}  # per process: (shape, knobs, dtype, device, ranks, T's power of two, training) -> W


def choose_token_waves(layer, x, topk_idx, topk_weights, status, max_tokens: int) -> int:
    """The fastest W for a token-wave layer (`MoEConfig(wave_split="tokens", num_waves="auto")`).

    At the first call of a key (layer shape, dtype, device, transport, SM carveout, capacity,
    ranks, power of two of the largest token count, and whether the call trains: everything
    the timing depends on), every rank times the layer's own
    call on this call's input at W = 1, 2, 4, 8 (forward, or forward and backward of the
    expert weights when autograd is on: `torch.autograd.grad`, so no `.grad` is touched),
    median of three after a warm-up; every rank takes the slowest rank's time per W (one
    exchange between the hosts), so all keep the same W. Cached for the process. Collective:
    every rank of the group calls it in the same forward.
    """
    cfg, tr = layer.config, layer.transport
    w1, w2 = layer.experts.w1, layer.experts.w2
    training = torch.is_grad_enabled() and w1.requires_grad
    key = (cfg.hidden, cfg.ffn_hidden, cfg.num_experts, cfg.top_k, cfg.transport, cfg.sm_carveout, cfg.capacity_factor,
           cfg.swiglu_limit is not None, cfg.num_shared_experts, tr.world_size, str(w1.device), w1.dtype,
           1 << max(max_tokens - 1, 0).bit_length(), training)
    if key in _TOKEN_WAVES:
        return _TOKEN_WAVES[key]
    candidates = [W for W in TOKEN_CANDIDATES if W <= max(1, max_tokens)]

    def call(W: int) -> None:
        y = layer._run_tokens(x, topk_idx, topk_weights, W, status, max_tokens)
        if training:
            torch.autograd.grad(y, [w1, w2], torch.ones_like(y))

    with torch.enable_grad() if training else torch.no_grad():
        mine = [_timed(lambda W=W: call(W), w1.device) for W in candidates]
    slowest = [max(col) for col in zip(*tr.host_exchange([round(ms * 1000) for ms in mine], "auto waves (host exchange)"))]
    best = candidates[slowest.index(min(slowest))]
    _TOKEN_WAVES[key] = best
    return best
