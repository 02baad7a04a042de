"""The layer under `torch.compile`: what Dynamo traces, and the engine as custom ops.

Dynamo traces `forward` (`ExpertParallelMoE.forward` hands over here while compiling): the
host checks of shapes, dtypes and devices (static in a graph), the router, the shared
experts and autocast's casts are plain torch ops that Inductor compiles (the router and the
shared experts as module calls: FSDP2's hooks run around them as in eager). The engine (plan,
waves, transports, streams, host exchanges) is opaque to it, in three custom ops:
- `ep::sync_replicas` (mutates the replicated tensors): the first call's configuration
  check and broadcast; traced only while the layer has not synced (then Dynamo recompiles
  once without it);
- `ep::waves`: the layer's forward after routing (`ep.pipeline.waves_forward`) -> y, the
  ranks' findings, and what its backward reads: the received rows and linear1's outputs.
  Its fake implementation sizes them from the plan's host sizes (`ep.pipeline.received_rows`,
  `hidden_shapes`), so the bound on every rank's tokens must be known when tracing:
  `MoEConfig.max_tokens`. Without it (each call then exchanges the ranks' counts) the layer
  runs eagerly behind a graph break (`fullgraph=True` raises, naming `max_tokens`);
- `ep::waves_backward` (registered as `ep::waves`' autograd): the plan and each wave's tables
  made again from the routing and the received rows (the same plan: every table is a
  function of it), then `ep.pipeline.waves_backward`.
A graph holds ints, not modules: the ops find their layer by a handle in `_LAYERS`. Input
problems raise `InputError` on every rank from inside the op, as in eager; shared experts
run in the graph, after the op (not beside the first dispatch). `num_waves="auto"` and
`fp8_products="auto"` choose by timing eager calls: the first call runs eagerly (a graph
break), later ones are traced with the choice of the last eager call.
"""
from __future__ import annotations

import itertools
import weakref
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from .checks import STATUS_SLOTS, host_status
from .layout import RowLayout
from .pipeline import hidden_shapes, rebuild_saved, received_rows, waves_backward, waves_forward
from .plan import WavePlan

_LAYERS: "weakref.WeakValueDictionary[int, torch.nn.Module]" = weakref.WeakValueDictionary()
"""A named cache: the layers that compiled graphs call, by handle (held weakly)."""
_HANDLES = itertools.count(1)


def register(layer) -> int:
    """A new handle for `layer` in `_LAYERS` (at construction, and for a copy: `__setstate__`).
    Dynamo reads it as a constant int attribute of the layer."""
    handle = next(_HANDLES)
    _LAYERS[handle] = layer
    return handle


def forward(layer, x: Tensor, topk_idx: Optional[Tensor], topk_weights: Optional[Tensor]) -> Tensor:
    """`ExpertParallelMoE.forward` as Dynamo traces it (see the module docstring)."""
    from .layer import _autocast, mark_over_bound, num_tokens, stand_ins

    cfg = layer.config
    W = layer.num_waves
    if cfg.max_tokens is None or W is None or layer.fp8_products is None:
        return _eager(layer, x, topk_idx, topk_weights)
    handle = layer._compile_handle
    device_type = x.device.type
    w1, w2 = layer.experts.w1, layer.experts.w2
    if torch.is_autocast_enabled(device_type):  # as nn.Linear: x and the expert weights in the autocast dtype
        dtype = torch.get_autocast_dtype(device_type)
        x, w1, w2 = _autocast(x, dtype), _autocast(w1, dtype), _autocast(w2, dtype)
    if not layer._replicas_synced:
        torch.ops.ep.sync_replicas(layer.replicated_tensors(), handle)
    status = host_status(cfg, x, w1, topk_idx, topk_weights)
    mark_over_bound(cfg, status, num_tokens(cfg, x))
    max_tokens = cfg.max_tokens
    bad = any(status)
    with torch.autocast(device_type, enabled=False):
        if bad:  # take part with no tokens; the op raises on every rank
            x_TH, topk_idx, topk_weights = stand_ins(cfg, w1)
        else:
            x_TH = x.reshape(-1, cfg.hidden)
            if topk_idx is None:
                topk_idx, topk_weights = layer.router(x_TH)
        y_TH, _found, _recv, _hidden = torch.ops.ep.waves(x_TH, topk_idx, topk_weights, w1, w2, handle, W,
                                                          max_tokens, status)
        if bad:  # never returned (the op raises); made from its output so the op is not dead code
            return torch.zeros_like(x) + y_TH.sum()
    if layer.shared_experts is not None:  # a module call: its hooks run (FSDP2 gathers its shards), and
        y_TH = y_TH + layer.shared_experts(x_TH)  # under autocast its matmuls cast its weights, as eager's casts do
    return y_TH.view(x.shape)


@torch.compiler.disable(reason="ep.ExpertParallelMoE is traced only with MoEConfig.max_tokens set (the bound its "
                               "buffers are sized from) and num_waves and fp8_products chosen (not 'auto' before "
                               "the first call)")
def _eager(layer, x: Tensor, topk_idx: Optional[Tensor], topk_weights: Optional[Tensor]) -> Tensor:
    """The eager layer, behind a graph break."""
    return layer(x, topk_idx, topk_weights)


def _layer(handle: int):
    layer = _LAYERS.get(handle)
    if layer is None:
        raise RuntimeError(f"ep: a compiled graph calls a layer that no longer exists (handle {handle})")
    return layer


def _plan(layer, topk_idx: Tensor, topk_weights: Tensor, num_waves: int, status: List[int], max_tokens: int) -> WavePlan:
    return layer._plan(topk_idx, topk_weights, num_waves, list(status), max_tokens)


def _sizes(layer, num_waves: int, max_tokens: int, top_k: int) -> WavePlan:
    """The plan's host sizes (its tensors None): what the fake implementations read."""
    cfg = layer.config
    waves = layer.wave_map(num_waves, max_tokens)
    return WavePlan.of_sizes(cfg.num_experts, layer.world_size, waves, top_k,
                             waves.capacity(max_tokens, cfg.capacity_factor), max_tokens)


@torch.library.custom_op("ep::sync_replicas", mutates_args=("replicas",))
def _sync_replicas(replicas: List[Tensor], handle: int) -> None:
    _layer(handle).sync_replicas(replicas)


@_sync_replicas.register_fake
def _(replicas, handle):
    return None


@torch.library.custom_op("ep::waves", mutates_args=())
def _waves(x_TH: Tensor, topk_idx: Tensor, topk_weights: Tensor, w1: Tensor, w2: Tensor, handle: int, num_waves: int,
           max_tokens: int, status: List[int]) -> Tuple[Tensor, Tensor, Tensor, List[Tensor]]:
    layer = _layer(handle)
    cfg, tr = layer.config, layer.transport
    status = list(status)
    bad = any(status)
    with torch.autocast(x_TH.device.type, enabled=False):
        tr.raise_errors()  # what the device saw go wrong in earlier calls
        layer._token_bound(status, x_TH.shape[0])  # earlier findings; T over max_tokens was found when tracing
        plan = _plan(layer, topk_idx, topk_weights, num_waves, status, max_tokens)
        y_TH, found, saved = waves_forward(x_TH, topk_weights, w1, w2, plan, tr, cfg.sm_carveout, cfg.swiglu_limit,
                                           layer._fp8_experts(w1, w2), cfg.dispatch_dtype)
        layer._report(found, bad)
    return y_TH, found.clone(), saved.recv, saved.hidden  # found is a view of recv: outputs must not alias


@_waves.register_fake
def _(x_TH, topk_idx, topk_weights, w1, w2, handle, num_waves, max_tokens, status):
    layer = _layer(handle)
    plan = _sizes(layer, num_waves, max_tokens, topk_idx.shape[1])
    layout = RowLayout(x_TH.shape[1], plan.top_k, x_TH.dtype, layer.config.dispatch_dtype)
    recv = received_rows(plan, layout, x_TH.device)
    hidden = [x_TH.new_empty(shape) for shape in hidden_shapes(plan, w1)]
    found = torch.empty(plan.num_ranks, STATUS_SLOTS, dtype=torch.int32, device=x_TH.device)
    return torch.empty_like(x_TH), found, recv, hidden


@torch.library.custom_op("ep::waves_backward", mutates_args=())
def _waves_backward(dy_TH: Tensor, topk_idx: Tensor, topk_weights: Tensor, w1: Tensor, w2: Tensor, recv: Tensor,
                    hidden: List[Tensor], handle: int, num_waves: int,
                    max_tokens: int) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    layer = _layer(handle)
    cfg = layer.config
    with torch.autocast(dy_TH.device.type, enabled=False):
        plan = _plan(layer, topk_idx, topk_weights, num_waves, [0] * STATUS_SLOTS, max_tokens)
        layout = RowLayout(dy_TH.shape[1], plan.top_k, recv.dtype, cfg.dispatch_dtype)
        saved = rebuild_saved(plan, layout, w1, w2, recv, hidden)
        dx_TH, dtopk_TK, dw1, dw2 = waves_backward(saved, dy_TH, layer.transport, cfg.sm_carveout, cfg.swiglu_limit,
                                                   layer._fp8_transposed_experts(w1, w2))
    return dx_TH, dtopk_TK.to(topk_weights.dtype), dw1, dw2


@_waves_backward.register_fake
def _(dy_TH, topk_idx, topk_weights, w1, w2, recv, hidden, handle, num_waves, max_tokens):
    return torch.empty_like(dy_TH), torch.empty_like(topk_weights), torch.empty_like(w1), torch.empty_like(w2)


def _setup_context(ctx, inputs, output) -> None:
    x_TH, topk_idx, topk_weights, w1, w2, handle, num_waves, max_tokens, status = inputs
    _y, _found, recv, hidden = output
    ctx.save_for_backward(topk_idx, topk_weights, w1, w2, recv, *hidden)
    ctx.sizes = (handle, num_waves, max_tokens)


def _backward(ctx, dy_TH, _dfound, _drecv, _dhidden):
    topk_idx, topk_weights, w1, w2, recv, *hidden = ctx.saved_tensors
    dx_TH, dtopk_TK, dw1, dw2 = torch.ops.ep.waves_backward(dy_TH, topk_idx, topk_weights, w1, w2, recv, hidden,
                                                            *ctx.sizes)
    return dx_TH, None, dtopk_TK, dw1, dw2, None, None, None, None


torch.library.register_autograd("ep::waves", _backward, setup_context=_setup_context)
