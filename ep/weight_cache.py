"""Weights derived from the layer's parameters (autocast's casts, FP8 quantizations), kept
between calls while the parameters are unchanged (`MoEConfig.weight_cache`).

`DerivedWeights` is the layer's one cache of tensors, named as one. An entry is keyed on
the identity of its sources when it was made: storage address, offset, shape, strides,
dtype and version counter. Any in-place change torch tracks gives a source a new version
(an optimizer's step, `load_state_dict`, `copy_` under `no_grad`, a broadcast into the
tensor), so the next call derives the value again. Changes made through `.data` are not
tracked by torch: call `ExpertParallelMoE.clear_weight_cache()` after them. An entry holds
its sources, so no other tensor can take their storage while it lives (a freed source's
address reused by a new tensor of version 0 would otherwise look unchanged).

Nothing is cached while a CUDA graph is being captured: a replay must read the parameters
as they are then, so the derivation is captured with the rest. A value that is kept is made
through the cache's `allocate` (the layer's: `ep.pipeline.outside_graph_pools`), so a first
call inside cudagraph trees' warm-up (`torch.compile(mode="reduce-overhead")`) keeps nothing
in their pool, where a later graph's tensors would take its memory.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Hashable, Optional, Sequence, Tuple

import torch


def _identity(t: torch.Tensor) -> Optional[tuple]:
    """What makes a source the same tensor with the same values (None: not trackable, e.g. an
    inference-mode tensor, which has no version counter)."""
    try:
        version = t._version
    except RuntimeError:
        return None
    return (t.data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype, t.device, version)


def capturing(device: torch.device) -> bool:
    """Whether a CUDA graph is being captured on `device`'s current stream."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


@dataclass
class _Entry:
    key: Tuple[tuple, ...]
    sources: Tuple[torch.Tensor, ...]
    value: Any


class DerivedWeights:
    """A named cache: per name, a value derived from source tensors, made again when any
    source is no longer the tensor (storage, layout, version) it was made from."""

    def __init__(self, allocate: Optional[Callable[[torch.device, Callable[[], Any]], Any]] = None) -> None:
        """`allocate(device, make)`: how a value to be kept is made (it outlives the call making
        it); None: `make()`. A value that is not kept is made by `make()` on the caller's thread."""
        self._allocate = allocate or (lambda device, make: make())
        self._entries: Dict[Hashable, _Entry] = {}

    def get(self, name: Hashable, sources: Sequence[torch.Tensor], make: Callable[[], Any]) -> Any:
        """The value of `name` for `sources`: the cached one if they are unchanged, else `make()`
        (then cached, made through `allocate`, unless a source is not trackable). While a CUDA
        graph is being captured, always `make()`, and nothing is cached."""
        if any(capturing(t.device) for t in sources):  # a replay must derive from the parameters as they are then
            return make()
        key = tuple(_identity(t) for t in sources)
        entry = self._entries.get(name)
        if entry is not None and entry.key == key:
            return entry.value
        self._entries.pop(name, None)  # the stale value goes before its replacement is made
        if None in key:
            return make()
        value = self._allocate(sources[0].device, make)
        self._entries[name] = _Entry(key, tuple(sources), value)
        return value

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


class _GivenCast(torch.autograd.Function):
    """`source.to(value.dtype)` whose value is given (a cached cast): forward returns an alias
    of it, backward hands the gradient to `source` in the source's dtype, as `Tensor.to`."""

    @staticmethod
    def forward(ctx, source: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        ctx.source_dtype = source.dtype
        return value.detach()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad.to(ctx.source_dtype), None


def given_cast(source: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """`value` (a cast of `source`, made earlier) as a differentiable function of `source`."""
    if torch.is_grad_enabled() and source.requires_grad:
        return _GivenCast.apply(source, value)
    return value
