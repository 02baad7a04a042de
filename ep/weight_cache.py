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
as they are then, so the derivation is captured with the rest. Unless the caller asks for
captures to read kept values (`MoEConfig.weight_cache="graphs"`: a training step's graph
that does not quantize the weights it reads): then a capture reads the value kept for
unchanged sources, which is pinned from then on: its storage is never replaced, a stale
pinned value is derived again into the same storage (by the next call, or by `refresh()`,
which replays need, as they run no Python). A value that is kept is made
through the cache's `allocate` (the layer's: `ep.pipeline.outside_graph_pools`), so a first
call inside cudagraph trees' warm-up (`torch.compile(mode="reduce-overhead")`) keeps nothing
in their pool, where a later graph's tensors would take its memory.
"""
from __future__ import annotations

import dataclasses
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
    make: Callable[[], Any]
    pinned: bool = False
    """A CUDA graph capture read `value`: its storage must stay (refreshed in place)."""


def _leaves(value: Any) -> list:
    """The tensors and other leaves of a derived value (a tensor, a dataclass or tuple of them,
    None, flags), in order."""
    if isinstance(value, torch.Tensor):
        return [value]
    if dataclasses.is_dataclass(value):
        return [leaf for f in dataclasses.fields(value) for leaf in _leaves(getattr(value, f.name))]
    if isinstance(value, (tuple, list)):
        return [leaf for v in value for leaf in _leaves(v)]
    return [value]


def write_into(dst: Any, src: Any) -> None:
    """Copy `src` into `dst`, a value of the same structure (`_leaves`) and the same shapes and
    dtypes, keeping `dst`'s storage (what a captured graph reads). Checked whole before any
    copy: ValueError leaves `dst` as it was."""
    to, given = _leaves(dst), _leaves(src)
    same = len(to) == len(given) and all(
        (a.shape == b.shape and a.dtype == b.dtype) if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
        else (not isinstance(a, torch.Tensor) and not isinstance(b, torch.Tensor) and a == b)
        for a, b in zip(to, given))
    if not same:
        raise ValueError("a derived weight that a CUDA graph reads cannot take the new value (its structure, shape "
                         "or dtype changed): capture the graphs that read it again")
    for a, b in zip(to, given):
        if isinstance(a, torch.Tensor):
            a.copy_(b)


class DerivedWeights:
    """A named cache: per name, a value derived from source tensors, made again when any
    source is no longer the tensor (storage, layout, version) it was made from."""

    def __init__(self, allocate: Optional[Callable[[torch.device, Callable[[], Any]], Any]] = None) -> None:
        """`allocate(device, make)`: how a value to be kept is made (it outlives the call making
        it); None: `make()`. A value that is not kept is made by `make()` on the caller's thread."""
        self._allocate = allocate or (lambda device, make: make())
        self._entries: Dict[Hashable, _Entry] = {}

    def get(self, name: Hashable, sources: Sequence[torch.Tensor], make: Callable[[], Any],
            in_captures: bool = False) -> Any:
        """The value of `name` for `sources`: the cached one if they are unchanged, else `make()`
        (then cached, made through `allocate`, unless a source is not trackable; a pinned one is
        derived again into its own storage). While a CUDA graph is being captured, `make()`
        and nothing is cached, unless `in_captures`: then the cached value of unchanged
        sources, pinned (with none cached, `make()` captured as without)."""
        entry = self._entries.get(name)
        if any(capturing(t.device) for t in sources):  # a replay must derive from the parameters as they are then
            if in_captures and entry is not None and entry.key == self._key(sources):
                entry.pinned = True
                return entry.value
            return make()
        key = self._key(sources)
        if entry is not None and entry.key == key:
            return entry.value
        if entry is not None and entry.pinned:  # (never dropped: a graph reads it)
            self._refresh(entry, make, sources)
            return entry.value
        self._entries.pop(name, None)  # the stale value goes before its replacement is made
        if None in key:
            return make()
        value = self._allocate(sources[0].device, make)
        self._entries[name] = _Entry(key, tuple(sources), value, make)
        return value

    def refresh(self) -> int:
        """Derive every pinned value again, into its own storage (what CUDA graphs replayed
        after a change of the parameters need: once per optimizer step, before the replays;
        also after changes torch does not track). Returns how many were refreshed."""
        pinned = [e for e in self._entries.values() if e.pinned]
        for entry in pinned:
            self._refresh(entry, entry.make, entry.sources)
        return len(pinned)

    def _refresh(self, entry: _Entry, make: Callable[[], Any], sources: Sequence[torch.Tensor]) -> None:
        """`make()` written into the pinned `entry`'s value; the entry now stands for `sources`."""
        write_into(entry.value, make())
        entry.key, entry.sources, entry.make = self._key(sources), tuple(sources), make

    @staticmethod
    def _key(sources: Sequence[torch.Tensor]) -> Tuple[Optional[tuple], ...]:
        return tuple(_identity(t) for t in sources)

    def clear(self) -> None:
        """Drop every kept value, but derive the pinned ones again in place (a captured graph
        reads their storage: dropping it would leave the graph reading freed memory)."""
        self.refresh()
        self._entries = {name: e for name, e in self._entries.items() if e.pinned}

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
