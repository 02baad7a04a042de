"""`MoEConfig(num_waves="auto")`: W chosen by timing the layer itself at its first call.

At the first call of a key (everything the timing depends on), every rank times the
layer's own call on this call's input at W = 1, 2, 4, 8 (those the split allows), the
ranks agree on the slowest rank's time per W in one exchange between the hosts, and all
keep the fastest W. The schedule model (`ep.model`) predicts the same choice for machines
we cannot run; the runtime reads only what it measures here.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable, Dict, Tuple

import torch


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


CANDIDATES = (1, 2, 4, 8)
_WAVES: Dict[Tuple, int] = {}  # per process: (shape, knobs, dtype, device, ranks, T's power of two, training) -> W


def choose_waves(layer, x, topk_idx, topk_weights, status, max_tokens: int) -> int:
    """The fastest W for the layer (`MoEConfig(num_waves="auto")`, either wave split).

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
    key = (cfg.hidden, cfg.ffn_hidden, cfg.num_experts, cfg.top_k, cfg.wave_split, cfg.dedup_across_waves, cfg.transport,
           cfg.sm_carveout, cfg.capacity_factor,
           cfg.swiglu_limit is not None, cfg.num_shared_experts, tr.world_size, str(w1.device), w1.dtype,
           1 << max(max_tokens - 1, 0).bit_length(), training)
    if key in _WAVES:
        return _WAVES[key]
    most = max(1, max_tokens) if cfg.wave_split == "tokens" else layer.num_local_experts
    candidates = [W for W in CANDIDATES if W <= most]

    def call(W: int) -> None:
        y = layer._run(x, topk_idx, topk_weights, W, status, max_tokens)
        if training:
            torch.autograd.grad(y, [w1, w2], torch.ones_like(y))

    with torch.enable_grad() if training else torch.no_grad():
        mine = [_timed(lambda W=W: call(W), w1.device) for W in candidates]
    slowest = [max(col) for col in zip(*tr.host_exchange([round(ms * 1000) for ms in mine], "auto waves (host exchange)"))]
    best = candidates[slowest.index(min(slowest))]
    _WAVES[key] = best
    return best
