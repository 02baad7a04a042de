"""The four stages of one wave (dispatch, linear1, linear2, combine) and their mirrors.

Each stage is a plain function of tensors, the plan and a wave index; none knows about
streams or autograd (that is the pipeline's business). Only dispatch and combine (and
their backward mirrors) talk to other ranks, through the transport, and they return an
`InFlight`: the buffer being filled and the pending operation.

Buffers that live across the waves of one layer are made by the caller with
`received_rows`, `return_accumulator` and `returned_rows`: a row received in its first
wave stays for the experts of later waves, a row's sum over its experts leaves in its
last wave, and the rows that come back are summed per token once, by `unpermute`.

Shapes: S routes this rank sends (in a wave), R_all rows it receives (all waves), I items
(rows of expert math: received rows expanded to their experts here, expert order), H hidden.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from .dtypes import accumulate_dtype
from .experts import linear1_backward, linear2_backward
from .experts import linear1 as _linear1
from .experts import linear2 as _linear2
from .kernels import gather_rows, reduce_rows
from .plan import DispatchPlan, block_transpose_index
from .transport import Pending, Transport


@dataclass
class InFlight:
    """Rows on their way: `rows` is valid once `pending.wait()` returned."""

    rows: torch.Tensor
    pending: Pending

    def wait(self) -> torch.Tensor:
        self.pending.wait()
        return self.rows


def _items(plan: DispatchPlan, wave: int) -> Tuple[slice, slice]:
    i0, i1 = plan.item_range(wave)
    e0, e1 = plan.wave_experts(wave)
    return slice(i0, i1), slice(e0, e1)


def received_rows(plan: DispatchPlan, like: torch.Tensor) -> torch.Tensor:
    """`[R_all, H]` buffer for the rows this rank receives over all waves, like's dtype."""
    return like.new_empty(plan.num_rows_received, like.shape[1])


def returned_rows(plan: DispatchPlan, like: torch.Tensor) -> torch.Tensor:
    """`[R_send, H]` buffer for the rows that come back to this rank over all waves."""
    return like.new_empty(plan.num_routes_sent, like.shape[1])


def return_accumulator(plan: DispatchPlan, like: torch.Tensor) -> torch.Tensor:
    """`[R_all, H]`, at least fp32: partial sums of rows whose items span waves. Only
    rows an earlier wave wrote are read, so it needs no zeroing."""
    return like.new_empty(plan.num_rows_received, like.shape[1], dtype=accumulate_dtype(like.dtype))


def routes_out(src_TH: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    """Every route's row, in dispatch order (all waves at once: one gather instead of W) -> `[R_send, H]`."""
    return gather_rows(src_TH, plan.route_token)


def to_owners(
    src_TH: torch.Tensor, rows_all: torch.Tensor, plan: DispatchPlan, wave: int, transport: Transport,
    label: str = "dispatch", sends: Optional[torch.Tensor] = None,
) -> InFlight:
    """Gather the routes of wave w's dispatch from `src` and start sending them to the
    experts' owners, into this wave's part of `rows_all`.

    Args:
        src_TH: `[T, H]`, this rank's tokens (or their output gradients).
        rows_all: `[R_all, H]` from `received_rows`.
        sends: optional `routes_out(src_TH, plan)`, gathered once for all waves; the
            wave's rows are then a slice of it.
    Returns:
        InFlight of the wave's `[R_w, H]` slice of `rows_all`.
    """
    if sends is not None:
        send_SH = sends[plan.dispatch_slice(wave)]
    else:
        send_SH = gather_rows(src_TH, plan.route_token[plan.dispatch_slice(wave)])
    recv = rows_all[plan.recv_slice(wave)]
    pending = transport.all_to_all(
        recv, send_SH, plan.recv_counts[wave], plan.send_counts[wave], f"{label} of wave {wave}", plan.rows_per_peer
    )
    return InFlight(recv, pending)


def to_sources(
    items_IH: torch.Tensor,
    weights_NK: Optional[torch.Tensor],
    acc_all: torch.Tensor,
    back_all: torch.Tensor,
    plan: DispatchPlan,
    wave: int,
    transport: Transport,
    label: str = "combine",
) -> InFlight:
    """Sum wave w's items into their rows (weighted); rows whose last wave is w start
    back to their sources, the others keep their partial sums in `acc_all`.

    Args:
        items_IH: `[I_w, H]`, the wave's items in expert order.
        weights_NK: `[N_w, k]` the wave's touch weights (`plan.touch_weights` slice), or
            None for unit weights.
        acc_all: `[R_all, H]` from `return_accumulator`.
        back_all: `[R_send, H]` from `returned_rows`, written in this wave's part.
    Returns:
        InFlight of the wave's `[S_w, H]` slice of `back_all`.
    """
    t = plan.touch_slice(wave)
    send_SH = items_IH.new_empty(sum(plan.return_counts[wave]), items_IH.shape[1])
    reduce_rows(
        items_IH, plan.touch_items[t], send_SH, weights_NK, acc_all,
        plan.touch_row[t], plan.touch_carry[t], plan.touch_out[t],
    )
    back = back_all[plan.back_slice(wave)]
    pending = transport.all_to_all(
        back, send_SH, plan.back_counts[wave], plan.return_counts[wave], f"{label} of wave {wave}", plan.rows_per_peer
    )
    return InFlight(back, pending)


def unpermute(back_all: torch.Tensor, plan: DispatchPlan, out_TH: torch.Tensor) -> None:
    """Sum each token's returned rows (one per rank it went to) into `out` `[T, H]`."""
    reduce_rows(back_all, plan.token_back_pos, out_TH)


# ---- the four stages, forward -------------------------------------------------------
def dispatch(
    x_TH: torch.Tensor, rows_all: torch.Tensor, plan: DispatchPlan, wave: int, transport: Transport,
    sends: Optional[torch.Tensor] = None,
) -> InFlight:
    """Stage 1: tokens whose first wave at a rank is w go there (each token once per rank).
    `sends`: `routes_out(x_TH, plan)` when the caller gathered every wave's rows at once."""
    return to_owners(x_TH, rows_all, plan, wave, transport, "dispatch (forward)", sends)


def linear1(rows_all: torch.Tensor, w1: torch.Tensor, plan: DispatchPlan, wave: int) -> torch.Tensor:
    """Stage 2: expand received rows into wave w's items (expert order), `h = x @ w1` -> `[I_w, 2F]`."""
    items, experts = _items(plan, wave)
    x_IH = gather_rows(rows_all, plan.item_row[items])
    counts = plan.items_per_expert[experts]
    return _linear1(x_IH, w1[experts], counts, plan.wave_offs[wave], _mean(counts))


def linear2(
    h_I2F: torch.Tensor, w2: torch.Tensor, plan: DispatchPlan, wave: int, swiglu_limit: Optional[float] = None,
) -> torch.Tensor:
    """Stage 3: `o = swiglu(h) @ w2` -> `[I_w, H]` (h clamped by `swiglu_limit` when given)."""
    _, experts = _items(plan, wave)
    counts = plan.items_per_expert[experts]
    return _linear2(h_I2F, w2[experts], counts, plan.wave_offs[wave], swiglu_limit, _mean(counts))


def _mean(counts) -> float:
    """Rows per expert of a wave (host counts): picks the grouped product's kernel."""
    return sum(counts) / max(len(counts), 1)


def combine(
    o_IH: torch.Tensor,
    weights_NK: torch.Tensor,
    acc_all: torch.Tensor,
    back_all: torch.Tensor,
    plan: DispatchPlan,
    wave: int,
    transport: Transport,
) -> InFlight:
    """Stage 4: weighted sum of each row's experts here; rows done after wave w go back."""
    return to_sources(o_IH, weights_NK, acc_all, back_all, plan, wave, transport, "combine (forward)")


# ---- backward mirrors ---------------------------------------------------------------
def combine_backward(
    dy_TH: torch.Tensor, rows_all: torch.Tensor, plan: DispatchPlan, wave: int, transport: Transport,
    sends: Optional[torch.Tensor] = None,
) -> InFlight:
    """The output gradient of wave w's routes to the owners (dispatch direction)."""
    return to_owners(dy_TH, rows_all, plan, wave, transport, "combine backward", sends)


def experts_backward(
    dz_all: torch.Tensor,
    rows_all: torch.Tensor,
    h_I2F: torch.Tensor,
    weight_I: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    plan: DispatchPlan,
    wave: int,
    swiglu_limit: Optional[float] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """linear2's then linear1's backward for wave w (`swiglu_limit`: the forward's).

    Args:
        dz_all: `[R_all, H]` output gradients of the received rows (landed for this wave).
        rows_all: `[R_all, H]` the received rows of the forward.
        h_I2F: wave w's linear1 output, saved by the forward.
    Returns:
        dx_IH `[I_w, H]` per item, dw1 `[E_w, H, 2F]`, dw2 `[E_w, F, H]`, dweight_I `[I_w]`.
    """
    items, experts = _items(plan, wave)
    counts, offs = plan.items_per_expert[experts], plan.wave_offs[wave]
    rows = plan.item_row[items]
    dh_I2F, dw2, dweight_I = linear2_backward(
        gather_rows(dz_all, rows), h_I2F, weight_I, w2[experts], counts, offs, swiglu_limit
    )
    dx_IH, dw1 = linear1_backward(dh_I2F, gather_rows(rows_all, rows), w1[experts], counts, offs)
    return dx_IH, dw1, dw2, dweight_I


def dispatch_backward(
    dx_IH: torch.Tensor, acc_all: torch.Tensor, back_all: torch.Tensor, plan: DispatchPlan, wave: int,
    transport: Transport,
) -> InFlight:
    """Items' input gradients summed per row; rows done after wave w go back."""
    return to_sources(dx_IH, None, acc_all, back_all, plan, wave, transport, "dispatch backward")


# ---- the routing weights' gradients: one exchange for all waves ----------------------
def exchange_weight_grads(drecv_flat: torch.Tensor, plan: DispatchPlan, transport: Transport) -> torch.Tensor:
    """The gradients of the received routing weights (`plan.recv_weights`) back to `[T, k]`.

    Args:
        drecv_flat: `[R_all * k]`, one per received (row, slot).
    """
    k, device = plan.top_k, drecv_flat.device
    # rows in (wave, source) order -> (source, wave) to send; what comes back is in
    # (dest, wave) order -> (wave, dest), the sender's route order
    send = drecv_flat.view(-1, k)[block_transpose_index(plan.recv_counts, device=device)]
    back = drecv_flat.new_empty(plan.num_routes_sent, k)
    transport.all_to_all(
        back, send, plan.send_rank_splits(), plan.recv_rank_splits(), "routing-weight gradients (backward)",
        plan.rows_per_peer,
    ).wait()
    sender_order = block_transpose_index(list(zip(*plan.send_counts)), device=device)
    return back[sender_order].flatten()[plan.slot_route_flat]
