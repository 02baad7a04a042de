"""The four stages of one wave (dispatch, linear1, linear2, combine) and their mirrors.

Each stage is a plain function of tensors, the plan and a wave index; none knows about
streams or autograd (that is the pipeline's business). Only dispatch and combine (and
their backward mirrors) talk to other ranks, through the transport, and they return an
`InFlight`: the buffer being filled and the pending operation.

Shapes (per wave): S routes this rank sends, R rows it receives, I items (rows of expert
math, R rows expanded to their experts here, in expert order), H hidden, F ffn hidden.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import torch

from .dtypes import accumulate_dtype
from .experts import linear1_backward, linear2_backward, swiglu, swiglu_backward
from .experts import linear1 as _linear1
from .experts import linear2 as _linear2
from .kernels import gather_rows, scatter_add_rows
from .plan import DispatchPlan
from .transport import Pending, Transport


@dataclass
class InFlight:
    """Rows on their way: `rows` is valid once `pending.wait()` returned."""

    rows: torch.Tensor
    pending: Pending

    def wait(self) -> torch.Tensor:
        self.pending.wait()
        return self.rows


def _send_slice(plan: DispatchPlan, wave: int) -> slice:
    off = plan.send_offsets
    return slice(off[wave], off[wave + 1])


def _items(plan: DispatchPlan, wave: int) -> Tuple[slice, slice]:
    i0, i1 = plan.item_range(wave)
    e0, e1 = plan.wave_experts(wave)
    return slice(i0, i1), slice(e0, e1)


def to_owners(src_TH: torch.Tensor, plan: DispatchPlan, wave: int, transport: Transport) -> InFlight:
    """Gather the wave's routed rows of `src` and start sending them to the experts' owners.

    Args:
        src_TH: `[T, H]`, this rank's tokens (or their gradients).
    Returns:
        InFlight of `[R, H]` received rows, in the plan's received order, src's dtype.
    """
    send_SH = gather_rows(src_TH, plan.route_token[_send_slice(plan, wave)])
    recv_RH = src_TH.new_empty(sum(plan.recv_counts[wave]), src_TH.shape[1])
    pending = transport.all_to_all(recv_RH, send_SH, plan.recv_counts[wave], plan.send_counts[wave])
    return InFlight(recv_RH, pending)


def to_sources(
    items_IH: torch.Tensor,
    weight_I: torch.Tensor | None,
    plan: DispatchPlan,
    wave: int,
    transport: Transport,
) -> InFlight:
    """Sum the wave's items into their received rows (weighted), start sending rows back.

    Args:
        items_IH: `[I, H]`, the wave's items in expert order.
        weight_I: `[I]` or None (unit weights).
    Returns:
        InFlight of `[S, H]` rows for this rank's routes of the wave, items' dtype.
    """
    items, _ = _items(plan, wave)
    acc = accumulate_dtype(items_IH.dtype)
    rows_RH = items_IH.new_zeros(sum(plan.recv_counts[wave]), items_IH.shape[1], dtype=acc)
    scatter_add_rows(rows_RH, plan.item_row[items], items_IH, weight_I)
    rows_RH = rows_RH.to(items_IH.dtype)
    back_SH = items_IH.new_empty(sum(plan.send_counts[wave]), items_IH.shape[1])
    pending = transport.all_to_all(back_SH, rows_RH, plan.send_counts[wave], plan.recv_counts[wave])
    return InFlight(back_SH, pending)


def unpermute(acc_TH: torch.Tensor, back_SH: torch.Tensor, plan: DispatchPlan, wave: int) -> None:
    """Add the wave's returned rows into their tokens: `acc[token of route] += back[route]`."""
    scatter_add_rows(acc_TH, plan.route_token[_send_slice(plan, wave)], back_SH)


# ---- the four stages, forward -------------------------------------------------------
def dispatch(x_TH: torch.Tensor, plan: DispatchPlan, wave: int, transport: Transport) -> InFlight:
    """Stage 1: the wave's tokens to the ranks owning its experts (each token once per rank)."""
    return to_owners(x_TH, plan, wave, transport)


def linear1(recv_RH: torch.Tensor, w1: torch.Tensor, plan: DispatchPlan, wave: int) -> torch.Tensor:
    """Stage 2: expand received rows into items (expert order), `h = x @ w1` -> `[I, 2F]`."""
    items, experts = _items(plan, wave)
    x_IH = gather_rows(recv_RH, plan.item_row[items])
    return _linear1(x_IH, w1[experts], plan.items_per_expert[experts])


def linear2(h_I2F: torch.Tensor, w2: torch.Tensor, plan: DispatchPlan, wave: int) -> torch.Tensor:
    """Stage 3: `o = swiglu(h) @ w2` -> `[I, H]`."""
    _, experts = _items(plan, wave)
    return _linear2(swiglu(h_I2F), w2[experts], plan.items_per_expert[experts])


def combine(
    o_IH: torch.Tensor, weight_I: torch.Tensor, plan: DispatchPlan, wave: int, transport: Transport
) -> InFlight:
    """Stage 4: weighted sum of each row's experts here, sent back once per route."""
    return to_sources(o_IH, weight_I, plan, wave, transport)


# ---- backward mirrors ---------------------------------------------------------------
def combine_backward(dy_TH: torch.Tensor, plan: DispatchPlan, wave: int, transport: Transport) -> InFlight:
    """The output gradient of the wave's routes, to the owners (dispatch direction)."""
    return to_owners(dy_TH, plan, wave, transport)


def experts_backward(
    dz_RH: torch.Tensor,
    recv_RH: torch.Tensor,
    h_I2F: torch.Tensor,
    weight_I: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    plan: DispatchPlan,
    wave: int,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """linear2's then linear1's backward for one wave.

    Returns:
        dx_IH `[I, H]` per item, dw1 `[E_w, H, 2F]`, dw2 `[E_w, F, H]`, dweight_I `[I]`.
    """
    items, experts = _items(plan, wave)
    counts = plan.items_per_expert[experts]
    rows = plan.item_row[items]
    dz_IH = gather_rows(dz_RH, rows)
    da_IF, dw2, dweight_I = linear2_backward(dz_IH, h_I2F, weight_I, w2[experts], counts)
    dh_I2F = swiglu_backward(h_I2F, da_IF)
    dx_IH, dw1 = linear1_backward(dh_I2F, gather_rows(recv_RH, rows), w1[experts], counts)
    return dx_IH, dw1, dw2, dweight_I


def dispatch_backward(dx_IH: torch.Tensor, plan: DispatchPlan, wave: int, transport: Transport) -> InFlight:
    """Items' input gradients summed per row and sent back to the tokens' ranks."""
    return to_sources(dx_IH, None, plan, wave, transport)


# ---- the routing weights: one exchange for all waves ---------------------------------
def exchange_weights(
    topk_weights_TK: torch.Tensor, plan: DispatchPlan, transport: Transport, dtype: torch.dtype
) -> torch.Tensor:
    """Each route's k weights (zero for slots served elsewhere) to the owners.

    Returns:
        `[R_all * k]` weights of all received rows (all waves, wave-major), `dtype`.
    """
    k = plan.top_k
    table = topk_weights_TK.new_zeros(plan.num_routes_sent * k, dtype=dtype)
    table[plan.slot_route_flat.flatten()] = topk_weights_TK.flatten().to(dtype)
    send = table.view(-1, k)[plan.send_rank_major]
    recv = table.new_empty(plan.num_rows_received, k)
    transport.all_to_all(recv, send, plan.recv_rank_splits(), plan.send_rank_splits()).wait()
    return recv[plan.recv_wave_major].flatten()


def exchange_weight_grads(drecv_flat: torch.Tensor, plan: DispatchPlan, transport: Transport) -> torch.Tensor:
    """Mirror of `exchange_weights`: the weights' gradients back to `[T, k]`."""
    k = plan.top_k
    send = drecv_flat.view(-1, k)[plan.recv_rank_major]
    back = drecv_flat.new_empty(plan.num_routes_sent, k)
    transport.all_to_all(back, send, plan.send_rank_splits(), plan.recv_rank_splits()).wait()
    return back[plan.send_wave_major].flatten()[plan.slot_route_flat]
