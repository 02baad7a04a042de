"""The layer's choices made by timing itself at its first call of a shape:
`MoEConfig(num_waves="auto")` (W) and `MoEConfig(fp8_products="auto")` (which products run
in FP8).

At the first call of a key (everything the timing depends on), every rank times the
layer's own call on this call's input for each candidate, the ranks agree on the slowest
rank's time per candidate in one exchange between the hosts, and all keep the fastest. The
schedule model (`ep.model`) predicts the same choice of W for machines we cannot run; the
runtime reads only what it measures here.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable, Dict, Tuple

import torch

from .kernels.timing import device_ms


def _timed(fn: Callable[[], object], device: torch.device, reps: int = 3,
           agree: Callable[[float], float] = lambda ms: ms) -> float:
    """`fn`'s time in ms after one warm-up: on CUDA its device time, `reps` calls queued behind
    a device-side sleep so that the host's launch time is not in it (r39a: wall times of eager
    calls, host time included, chose FP8 where its graph replay was 1.23x slower); on the
    CPU the median wall time of `reps` runs. `agree`: the ranks' largest of a host value
    (every rank sleeps as long, starting together, so no rank's collectives wait for
    another's sleep)."""
    if device.type == "cuda":
        return device_ms(fn, reps, agree=agree)
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


CANDIDATES = (1, 2, 4, 8)
FP8_CANDIDATES = ((True, True), (True, False), (False, True), (False, False))
"""(linear1 in FP8, linear2 in FP8): both, either, neither; ties go to the earlier."""
_CHOSEN: Dict[Tuple, object] = {}
"""A named cache, per process: the key of a choice (`_key`) -> the W or FP8 products chosen."""


def _key(layer, max_tokens: int, training: bool) -> Tuple:
    """What a timing of the layer depends on: layer shape, dtype, device, transport, SM
    carveout, capacity, ranks, power of two of the largest token count, whether the call
    trains."""
    cfg, tr, w1 = layer.config, layer.transport, layer.experts.w1
    return (cfg.hidden, cfg.ffn_hidden, cfg.num_experts, cfg.top_k, cfg.wave_split, cfg.dedup_across_waves,
            cfg.transport, cfg.sm_carveout, cfg.capacity_factor, cfg.swiglu_limit is not None, cfg.num_shared_experts,
            cfg.expert_dtype, cfg.dispatch_dtype, cfg.fp8_scaling, tr.world_size, str(w1.device), w1.dtype,
            1 << max(max_tokens - 1, 0).bit_length(), training)


def _fastest(layer, key: Tuple, candidates, run: Callable[[object], None], what: str):
    """The candidate whose call `run(candidate)` the slowest rank ran fastest (kept under
    `key`), or the one kept already. Collective: every rank calls it in the same forward."""
    if key in _CHOSEN:
        return _CHOSEN[key]
    w1 = layer.experts.w1
    if w1.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(f"ep.ExpertParallelMoE: {what}='auto' chooses by timing eager calls; make one call of "
                           "this shape before capturing a CUDA graph")
    training = key[-1]
    with torch.enable_grad() if training else torch.no_grad():
        mine = [_timed(lambda c=c: run(c), w1.device, agree=lambda ms: _largest(layer, ms, what)) for c in candidates]
    table = layer.transport.host_exchange([round(ms * 1000) for ms in mine], f"auto {what} (host exchange)")
    slowest = [max(col) for col in zip(*table)]
    best = candidates[slowest.index(min(slowest))]
    _CHOSEN[key] = best
    return best


def _largest(layer, ms: float, what: str) -> float:
    """The largest `ms` of any rank (one exchange between the hosts)."""
    table = layer.transport.host_exchange([round(ms * 1000)], f"auto {what} (host exchange)")
    return max(row[0] for row in table) / 1000


def _call(layer, x, topk_idx, topk_weights, W: int, status, max_tokens: int, training: bool) -> None:
    """One call of the layer at W (forward, and when training the expert weights' gradients:
    `torch.autograd.grad`, so no `.grad` is touched)."""
    w1, w2 = layer.experts.w1, layer.experts.w2
    y = layer._run(x, topk_idx, topk_weights, W, status, max_tokens)
    if training:
        torch.autograd.grad(y, [w1, w2], torch.ones_like(y))


def _training(layer) -> bool:
    return torch.is_grad_enabled() and layer.experts.w1.requires_grad


def choose_waves(layer, x, topk_idx, topk_weights, status, max_tokens: int) -> int:
    """The fastest W for the layer (`MoEConfig(num_waves="auto")`, either wave split).

    At the first call of a key (`_key`), every rank times the layer's own call on this
    call's input at W = 1, 2, 4, 8 (those the split allows; forward, or forward and backward
    of the expert weights when autograd is on; `_timed`: device time on CUDA); every rank
    takes the slowest rank's time per W (one exchange between the hosts), so all keep the
    same W. Cached for the process. Collective: every rank of the group calls it in the
    same forward.
    """
    cfg = layer.config
    training = _training(layer)
    most = max(1, max_tokens) if cfg.wave_split == "tokens" else layer.num_local_experts
    candidates = [W for W in CANDIDATES if W <= most]
    key = ("waves", layer.fp8_products, *_key(layer, max_tokens, training))
    return _fastest(layer, key, candidates,
                    lambda W: _call(layer, x, topk_idx, topk_weights, W, status, max_tokens, training), "num_waves")


def choose_fp8_products(layer, x, topk_idx, topk_weights, status, max_tokens: int, W: int) -> Tuple[bool, bool]:
    """Which products run in FP8 (`MoEConfig(fp8_products="auto")`): of both, linear1 only,
    linear2 only and neither, the fastest layer call, timed as `choose_waves` times W, at
    this call's W. The key adds W, whether the FP8 experts are held
    (`ExpertParallelMoE.hold_fp8_experts`) and whether the layer keeps its derived weights
    between calls (`MoEConfig.weight_cache`): where it does not, each call quantizes the
    weights it uses, and the timing includes that. Collective, as `choose_waves`."""
    training = _training(layer)
    key = ("fp8 products", W, layer._held_fp8 is not None, layer._keeps_derived(),
           *_key(layer, max_tokens, training))

    def run(products: Tuple[bool, bool]) -> None:
        layer.fp8_products = products
        _call(layer, x, topk_idx, topk_weights, W, status, max_tokens, training)

    return _fastest(layer, key, FP8_CANDIDATES, run, "fp8_products")
