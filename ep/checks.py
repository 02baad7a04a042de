"""Input and configuration checks that raise on every rank, never hang.

A rank that finds a problem locally cannot just raise: the others would wait for it in
the next collective. So each rank's findings travel in an exchange every rank makes
anyway (the first forward's fingerprint exchange, the plan's count exchange), and every
rank raises the same `InputError`, naming the rank, the argument, what was expected and
what was found.
"""
from __future__ import annotations

import struct
from typing import Callable, List, Optional, Sequence

import torch

from .config import (EXPERT_DTYPES, FP8_BACKWARDS, FP8_FAST_ACCUMS, FP8_PRODUCTS, FP8_SCALINGS, SCORE_FUNCS,
                     TRANSPORTS, WAVE_SPLITS, MoEConfig)

_DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.int32,
           torch.int16, torch.int8, torch.uint8, torch.bool]


def dtype_code(dtype: torch.dtype) -> int:
    return _DTYPES.index(dtype) + 1 if dtype in _DTYPES else len(_DTYPES) + 1


def dtype_name(code: int) -> str:
    return str(_DTYPES[code - 1]) if 1 <= code <= len(_DTYPES) else "another dtype"


class InputError(ValueError):
    """Invalid input or configuration, raised on every rank of the group."""


# ---- per-forward status: slots exchanged with the plan's counts ------------------------
X_HIDDEN, X_DTYPE, X_DEVICE, TOPK_SHAPE, IDX_DTYPE, IDX_RANGE, IDX_REPEAT, W_NONFINITE, W_DTYPE, X_TOKENS, ROWS_OVER = range(11)
STATUS_SLOTS = 11
"""Slots of a rank's status (one int each): the host checks (`host_status`), the value checks
counted on the device (`value_status`), and the token-wave engine's capacity checks
(X_TOKENS: more tokens than `MoEConfig.max_tokens`; ROWS_OVER: routes past a region's rows)."""


def host_status(cfg: MoEConfig, x: torch.Tensor, param: torch.Tensor, topk_idx, topk_weights) -> List[int]:
    """Problems visible without looking at values (no device sync). 0 = fine."""
    s = [0] * STATUS_SLOTS
    if x.dim() < 1 or x.shape[-1] != cfg.hidden:
        s[X_HIDDEN] = 1 + (x.shape[-1] if x.dim() else 0)
    if x.dtype != param.dtype:
        s[X_DTYPE] = dtype_code(x.dtype)
    if x.device != param.device:
        s[X_DEVICE] = 1
    if (topk_idx is None) != (topk_weights is None):
        s[TOPK_SHAPE] = 2
    elif topk_idx is not None:
        T = x.numel() // cfg.hidden if not s[X_HIDDEN] else -1
        if tuple(topk_idx.shape) != (T, cfg.top_k) or tuple(topk_weights.shape) != (T, cfg.top_k):
            s[TOPK_SHAPE] = 1
        if topk_idx.dtype.is_floating_point or topk_idx.dtype == torch.bool or topk_idx.is_complex():
            s[IDX_DTYPE] = dtype_code(topk_idx.dtype)
        if not topk_weights.dtype.is_floating_point:
            s[W_DTYPE] = dtype_code(topk_weights.dtype)
        if topk_idx.device != param.device or topk_weights.device != param.device:
            s[X_DEVICE] = 1
    return s


def value_status(topk_idx_TK: torch.Tensor, topk_weights_TK: Optional[torch.Tensor], num_experts: int) -> torch.Tensor:
    """Problems in the values, counted on the device: `[STATUS_SLOTS]` int64."""
    s = torch.zeros(STATUS_SLOTS, dtype=torch.int64, device=topk_idx_TK.device)
    idx = topk_idx_TK.to(torch.int64)
    s[IDX_RANGE] = ((idx < 0) | (idx >= num_experts)).sum()
    if idx.shape[1] > 1:
        srt = idx.sort(dim=1).values
        s[IDX_REPEAT] = (srt[:, 1:] == srt[:, :-1]).any(dim=1).sum()
    if topk_weights_TK is not None:
        s[W_NONFINITE] = (~torch.isfinite(topk_weights_TK.detach())).any(dim=1).sum()
    return s


def describe(slot: int, value: int, cfg: MoEConfig, num_experts: int) -> str:
    if slot == X_HIDDEN:
        return f"x: last dimension must be hidden={cfg.hidden}, got {value - 1}"
    if slot == X_DTYPE:
        return f"x: dtype must be the parameters' dtype, got {dtype_name(value)}"
    if slot == X_DEVICE:
        return "x/topk_idx/topk_weights: must be on the parameters' device"
    if slot == TOPK_SHAPE and value == 2:
        return "topk_idx, topk_weights: give both or neither"
    if slot == TOPK_SHAPE:
        return f"topk_idx, topk_weights: shape must be [T, k={cfg.top_k}] with T = x.numel() / hidden"
    if slot == IDX_DTYPE:
        return f"topk_idx: dtype must be an integer type, got {dtype_name(value)}"
    if slot == IDX_RANGE:
        return f"topk_idx: {value} entries are outside [0, num_experts={num_experts})"
    if slot == IDX_REPEAT:
        return f"topk_idx: {value} tokens pick the same expert twice (the k experts of a token must differ)"
    if slot == W_NONFINITE:
        return (f"topk_weights: {value} tokens have NaN or Inf weights (with the router: NaN/Inf in x or "
                f"router.weight; the layer raises rather than route them)")
    if slot == W_DTYPE:
        return f"topk_weights: dtype must be floating point, got {dtype_name(value)}"
    if slot == X_TOKENS:
        return f"x: {value} tokens, more than MoEConfig.max_tokens={cfg.max_tokens}"
    if slot == ROWS_OVER:
        return (f"{value} routes (token, rank) did not fit the rows that MoEConfig.capacity_factor="
                f"{cfg.capacity_factor} leaves per rank and wave; their results are missing: raise the factor")
    return f"problem {slot}"


def raise_on_problems(status_by_rank: Sequence[Sequence[int]], cfg: MoEConfig, num_experts: int) -> None:
    """Raise `InputError` (on every rank: all see the same table) if any rank found a problem."""
    lines = [
        f"rank {r}: {describe(slot, v, cfg, num_experts)}"
        for r, status in enumerate(status_by_rank)
        for slot, v in enumerate(status)
        if v
    ]
    if lines:
        raise InputError("ep.ExpertParallelMoE: invalid input\n  " + "\n  ".join(lines))


# ---- the same configuration everywhere ---------------------------------------------------
_FINGERPRINT_FIELDS = ("hidden", "ffn_hidden", "num_experts", "top_k", "num_waves", "score_func",
                       "norm_topk", "dedup_across_waves", "sm_carveout", "transport", "wave_split", "max_tokens",
                       "capacity_factor", "n_group", "topk_group", "routed_scaling_factor", "swiglu_limit",
                       "num_shared_experts", "timeout_s", "expert_dtype", "dispatch_dtype", "fp8_scaling",
                       "fp8_products", "fp8_backward", "fp8_fast_accum")
_CHOICES = {"score_func": SCORE_FUNCS, "transport": TRANSPORTS, "wave_split": WAVE_SPLITS, "expert_dtype": EXPERT_DTYPES,
            "dispatch_dtype": EXPERT_DTYPES, "fp8_scaling": FP8_SCALINGS,
            "fp8_products": FP8_PRODUCTS, "fp8_backward": FP8_BACKWARDS, "fp8_fast_accum": FP8_FAST_ACCUMS}
_FLOATS = ("capacity_factor", "routed_scaling_factor", "swiglu_limit", "timeout_s")
_NONE = -1  # a float field's None (its int64 is a NaN's bit pattern, which no valid value has)


def _encode(name: str, v) -> int:
    if name in _CHOICES:
        return _CHOICES[name].index(v)
    if name == "num_waves" and v == "auto":
        return 0
    if name in _FLOATS:
        return _NONE if v is None else struct.unpack("<q", struct.pack("<d", float(v)))[0]
    return _NONE if v is None else int(v)  # max_tokens: None, or a positive int


def _decode(name: str, code: int):
    if name in _CHOICES:
        return _CHOICES[name][code] if 0 <= code < len(_CHOICES[name]) else code
    if name == "num_waves" and code == 0:
        return "auto"
    if name in _FLOATS:
        return None if code == _NONE else struct.unpack("<d", struct.pack("<q", code))[0]
    if name == "max_tokens" and code == _NONE:
        return None
    return bool(code) if name in ("norm_topk", "dedup_across_waves") else code


def fingerprint(cfg: MoEConfig) -> List[int]:
    """Every field that must agree across ranks, as int64s (floats by their bits)."""
    return [_encode(name, getattr(cfg, name)) for name in _FINGERPRINT_FIELDS]


def check_same_config(cfg: MoEConfig, transport) -> None:
    """One small exchange of every rank's config; raise on every rank if any differs."""
    n = transport.world_size
    if n == 1:
        return
    mine = torch.tensor(fingerprint(cfg), dtype=torch.int64)
    theirs = transport.exchange(mine.unsqueeze(0).expand(n, -1).contiguous(), "config check (first forward)").tolist()
    diffs = [
        f"rank {r}: {name}={_decode(name, v)!r} where rank {transport.rank} has {_decode(name, m)!r}"
        for r, row in enumerate(theirs)
        for name, v, m in zip(_FINGERPRINT_FIELDS, row, mine.tolist())
        if v != m
    ]
    if diffs:
        raise InputError("ep.ExpertParallelMoE: ranks disagree on the configuration\n  " + "\n  ".join(diffs))


# ---- device findings of the token-wave engine, reported without a device sync -----------------
class PostedFindings:
    """A cache of the status tables (`[n, STATUS_SLOTS]`, every rank's findings) that calls on
    CUDA found on the device: accumulated there (max) and copied without a sync into pinned
    host memory, which the host reads at its next call (or `settle`). So a call never waits
    for the device to check its input; a problem surfaces one call later, on every rank."""

    def __init__(self, allocate: Optional[Callable[[torch.device, Callable[[], torch.Tensor]], torch.Tensor]] = None
                 ) -> None:
        """`allocate(device, make)`: how the device table is made (it outlives the call that makes
        it: the layer passes `ep.pipeline.outside_graph_pools`); None: `make()`."""
        self._allocate = allocate or (lambda device, make: make())
        self._device: Optional[torch.Tensor] = None
        self._host: Optional[torch.Tensor] = None

    def post(self, table: torch.Tensor) -> None:
        if self._device is None or self._device.shape != table.shape:
            self._device = self._allocate(table.device, lambda: torch.zeros_like(table))
            self._host = torch.zeros(table.shape, dtype=table.dtype, pin_memory=True)
        torch.maximum(self._device, table, out=self._device)
        self._host.copy_(self._device, non_blocking=True)

    def seen(self) -> Optional[List[List[int]]]:
        """What has reached the host so far (no sync); None when nothing was found."""
        if self._host is None:
            return None
        table = self._host.tolist()  # host memory: read as ints (no Tensor.item(), which Dynamo breaks at)
        return table if any(map(any, table)) else None

    def settle(self) -> Optional[List[List[int]]]:
        """Wait for every posted table (a device sync), then `seen()`."""
        if self._device is not None and self._device.is_cuda:
            torch.cuda.synchronize(self._device.device)
        return self.seen()

    def clear(self) -> None:
        if self._device is not None:
            if self._device.is_cuda:
                torch.cuda.synchronize(self._device.device)  # no copy may land after the clear
            self._device.zero_()
            self._host.zero_()
