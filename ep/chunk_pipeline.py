"""The token-wave schedule (`MoEConfig(wave_split="tokens")`), forward and backward.

Forward, per layer (`ep.chunks` made the plan; every size below is fixed before the call):
    1. gather every route's row into its place among the sent rows, with its slot table
       (`ep.layout`): one pass for all waves;
    2. dispatch(w) sends wave w's n regions (one all-to-all of n x capacity rows each way),
       every wave's at once (each waits only for the pack, `ep.pipeline.issue_after`); with
       the regions' rows in use (`ChunkPlan.region_rows`), so a transport that can leaves the
       padding out (`Transport.all_to_all`'s `sent_rows`; the combine then returns only the
       rows that arrived);
    3. per wave as its rows land: the items in expert order from the rows' slot tables
       (`ep.chunks.wave_items`), linear1 and linear2 over all local experts (grouped GEMMs
       that read their group sizes on the device), each row's weighted sum over its items
       here, and combine(w) sends the sums back into the sender's rows of that wave;
    4. after the last combine: each token's returned rows summed into `y` (the un-permute).
Backward mirrors it: the output gradients go out per wave into the same rows, each wave's
expert backward (data gradients) runs as its rows land, and the input gradients fly back
with the routing weights' gradients in the same rows while the next wave computes. The
weight gradients sum over every wave: they run once, after the last wave's data gradients
(beside the last transfers), over all waves' items in expert order (`ep.chunks.expert_major`).

Nothing here reads a device value on the host: the layer can be captured in a CUDA graph.
Streams and events come from the transport's `Pending`s and `ep.pipeline`: every transfer is
issued with `issue_after` its inputs' `ready_point`, so it waits for them only (not for the math of
waves issued before it), and `run_waves` orders the issue.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Callable, List, Optional

import torch

from .checks import STATUS_SLOTS
from .chunks import ChunkPlan, WaveItems, expert_major, pack_rows, returned_slot_values, wave_items
from .experts import linear1, linear1_backward_data, linear2, linear2_backward_data
from .kernels import gather_rows, gather_rows_into, gather_slots, grouped_mm_wgrad, reduce_rows
from .layout import RowLayout
from .pipeline import _range, _SmCarveout, issue_after, ready_point, run_waves
from .transport import Pending, Transport

_PLAN_TENSORS = ("route_row", "row_token", "topk_idx", "status", "region_rows")
_ITEM_TENSORS = ("item_row", "item_weight", "item_expert", "offs", "slot_item")


class ChunkedExperts(torch.autograd.Function):
    """`y = sum_j w[t, j] * expert_j(x[t])` over experts on all ranks, in token waves.

    Returns y `[T, H]` and the status every rank sent `[n, STATUS_SLOTS]` int32 (device;
    not differentiable): the layer reports it.
    """

    @staticmethod
    def forward(ctx, x_TH, topk_weights_TK, w1, w2, plan: ChunkPlan, transport: Transport, sm_carveout: int,
                swiglu_limit: Optional[float]):
        H, device = x_TH.shape[1], x_TH.device
        layout = RowLayout(H, plan.top_k, x_TH.dtype)
        W, N, n, cap = plan.num_waves, plan.rows_per_wave, plan.num_ranks, plan.capacity
        splits = [cap] * n
        transport.reserve(cap)  # the same on every rank: transports with fixed buffers size them from it
        x_TH = x_TH.contiguous()

        send = layout.empty(W * N, device)
        pack_rows(x_TH, topk_weights_TK, plan, layout, send)
        packed = ready_point(device)
        recv = layout.empty(W * (N + 1), device).view(W, N + 1, layout.width)
        recv[:, N].zero_()  # each wave's zero row: the anchors' source
        back = x_TH.new_empty(W * N, H)
        items: List[Optional[WaveItems]] = [None] * W
        hidden: List[Optional[torch.Tensor]] = [None] * W
        arrived: List[Optional[torch.Tensor]] = [None] * W  # rows in use per source, where the transport counted them
        carve = _SmCarveout(sm_carveout if W > 1 else 0, device)

        def dispatch(w: int) -> Pending:
            flight = issue_after(device, packed, lambda: transport.all_to_all(
                recv[w, :N], send[plan.wave_rows(w)], splits, splits, f"dispatch (forward) of wave {w}", cap,
                plan.region_rows[w]))
            arrived[w] = flight.arrived_rows
            return flight

        def compute(w: int) -> Callable[[], Pending]:
            rows = recv[w]
            it = wave_items(layout, rows[:N], plan.num_local_experts, plan.item_capacity)
            with carve:
                few = plan.expected_items_per_expert
                h = linear1(layout.data(rows), w1, None, it.offs, few, index=it.item_row, rows=it.count)
                o = linear2(h, w2, None, it.offs, swiglu_limit, few)
            sums = x_TH.new_empty(N, H)
            reduce_rows(o, it.slot_item, sums, layout.weights(rows[:N]))
            items[w], hidden[w] = it, h
            summed = ready_point(device)
            return lambda: issue_after(device, summed, lambda: transport.all_to_all(
                back[plan.wave_rows(w)], sums, splits, splits, f"combine (forward) of wave {w}", cap, arrived[w]))

        run_waves(W, dispatch, compute, math_first=False)  # dispatches wait for the pack only: all go first
        y_TH = torch.empty_like(x_TH)
        with _range("ep.unpermute"):
            reduce_rows(back, plan.route_row, y_TH)
        if cap:
            status = layout.status(recv[0, :N]).view(n, cap, STATUS_SLOTS)[:, 0]
        else:  # no rank has tokens: nothing was sent, so nothing was found
            status = torch.zeros(n, STATUS_SLOTS, dtype=torch.int32, device=device)
        ctx.mark_non_differentiable(status)

        ctx.plan = replace(plan, **{name: None for name in _PLAN_TENSORS})
        ctx.transport, ctx.sm_carveout, ctx.swiglu_limit = transport, sm_carveout, swiglu_limit
        ctx.w_dtype = topk_weights_TK.dtype
        ctx.save_for_backward(
            w1, w2, recv, *(getattr(plan, name) for name in _PLAN_TENSORS), *hidden,
            *(getattr(it, name) for it in items for name in _ITEM_TENSORS),
        )
        return y_TH, status

    @staticmethod
    def backward(ctx, dy_TH, _dstatus):
        w1, w2, recv, *rest = ctx.saved_tensors
        plan: ChunkPlan = replace(ctx.plan, **dict(zip(_PLAN_TENSORS, rest)))
        rest = rest[len(_PLAN_TENSORS):]
        transport: Transport = ctx.transport
        W, N, n, cap = plan.num_waves, plan.rows_per_wave, plan.num_ranks, plan.capacity
        hidden = list(rest[:W])
        per = len(_ITEM_TENSORS)
        items = [WaveItems(*rest[W + w * per: W + (w + 1) * per]) for w in range(W)]
        H, device = dy_TH.shape[1], dy_TH.device
        layout = RowLayout(H, plan.top_k, recv.dtype)
        splits = [cap] * n
        dy_TH = dy_TH.to(recv.dtype).contiguous()

        send = dy_TH.new_empty(W * N, H)
        gather_rows_into(dy_TH, plan.row_token, send)
        packed = ready_point(device)
        recv_dy = dy_TH.new_empty(W, N + 1, H)
        recv_dy[:, N].zero_()
        back = layout.empty(W * N, device)
        dh: List[Optional[torch.Tensor]] = [None] * W
        wa: List[Optional[torch.Tensor]] = [None] * W
        dz: List[Optional[torch.Tensor]] = [None] * W
        arrived: List[Optional[torch.Tensor]] = [None] * W
        carve = _SmCarveout(ctx.sm_carveout if W > 1 else 0, device)

        def combine_backward(w: int) -> Pending:
            flight = issue_after(device, packed, lambda: transport.all_to_all(
                recv_dy[w, :N], send[plan.wave_rows(w)], splits, splits, f"combine backward of wave {w}", cap,
                plan.region_rows[w]))
            arrived[w] = flight.arrived_rows
            return flight

        def compute(w: int) -> Callable[[], Pending]:
            it = items[w]
            dz[w] = gather_rows(recv_dy[w], it.item_row, it.count)
            with carve:
                dh[w], wa[w], dweight_I = linear2_backward_data(dz[w], hidden[w], it.item_weight, w2, None, it.offs,
                                                                ctx.swiglu_limit)
                dx_I = linear1_backward_data(dh[w], w1, None, it.offs)
            hidden[w] = None
            rows = layout.empty(N, device)
            reduce_rows(dx_I, it.slot_item, layout.data(rows))
            gather_slots(dweight_I, it.slot_item, layout.weights(rows))
            summed = ready_point(device)
            return lambda: issue_after(device, summed, lambda: transport.all_to_all(
                back[plan.wave_rows(w)], rows, splits, splits, f"dispatch backward of wave {w}", cap, arrived[w]))

        flights = run_waves(W, combine_backward, compute, math_first=False, wait_out=False)
        with _range("ep.weight_grads"), carve:  # beside the last transfers
            if W == 1:
                it = items[0]
                x_I = gather_rows(layout.data(recv[0]), it.item_row, it.count)
                dw1 = grouped_mm_wgrad(x_I, dh[0], None, it.offs)
                dw2 = grouped_mm_wgrad(wa[0], dz[0], None, it.offs)
            else:
                order, rows, offs = expert_major(items, N, plan.num_local_experts)
                used = offs[-1]
                dw1 = grouped_mm_wgrad(gather_rows(layout.data(recv.view(-1, layout.width)), rows, used),
                                       gather_rows(torch.cat(dh), order, used), None, offs)
                dw2 = grouped_mm_wgrad(gather_rows(torch.cat(wa), order, used),
                                       gather_rows(recv_dy.view(-1, H), rows, used), None, offs)
        for flight in flights:
            flight.wait()
        dx_TH = torch.empty_like(dy_TH)
        with _range("ep.unpermute"):
            reduce_rows(layout.data(back), plan.route_row, dx_TH)
        dtopk_TK = returned_slot_values(plan, layout.weights(back))
        return dx_TH, dtopk_TK.to(ctx.w_dtype), dw1, dw2, None, None, None, None


def chunked_experts(
    x_TH: torch.Tensor,
    topk_weights_TK: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    plan: ChunkPlan,
    transport: Transport,
    sm_carveout: int = 0,
    swiglu_limit: Optional[float] = None,
):
    """Differentiable expert part of the layer in token waves: `[T, H]` in, (`[T, H]`, the
    ranks' status `[n, STATUS_SLOTS]`) out."""
    return ChunkedExperts.apply(x_TH, topk_weights_TK, w1, w2, plan, transport, sm_carveout, swiglu_limit)
