"""The wave schedule, forward and backward: the only room that knows streams and events.

Forward, per layer (`ep.plan` made the plan; every size below is fixed before the call):
    1. gather every route's row into its place among the sent rows, with its slot table
       (`ep.layout`): one pass for all waves;
    2. dispatch(w) sends wave w's n regions (one all-to-all of n x capacity rows each way),
       every wave's at once (each waits only for the pack, `issue_after`); with the
       regions' rows in use (`WavePlan.region_rows`), so a transport that can leaves the
       padding out (`Transport.all_to_all`'s `sent_rows`; the combine then returns only the
       rows that arrived);
    3. per wave as its rows land: the items in expert order from the candidate rows' slot
       tables (`ep.plan.wave_items`; with dedup across expert waves the rows of earlier
       waves serve later ones), linear1 and linear2 over the local experts (grouped GEMMs
       that read their group sizes on the device), each touch's weighted sum over its items
       here, and combine(w) sends the sums back into the sender's returned rows of that wave;
    4. after the last combine: each token's returned rows summed into `y` (the un-permute).
Backward mirrors it: the output gradients go out per wave into the returned rows, each
wave's expert backward (data gradients) runs as its rows land, and the input gradients fly
back with the routing weights' gradients in the same rows while the next wave computes.
The weight gradients sum over every wave: they run once, after the last wave's data
gradients (beside the last transfers), over all waves' items in expert order
(`ep.plan.expert_major`).

Nothing here reads a device value on the host: the layer can be captured in a CUDA graph.
Every transfer is issued with `issue_after` its inputs' `ready_point`, so it waits for them
only (not for the math of waves issued before it), and `run_waves` orders the issue.
"""
from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass, replace
from typing import Callable, Dict, List, Optional, Tuple, TypeVar

import torch
from torch.profiler import record_function

from .checks import STATUS_SLOTS
from .experts import linear1, linear1_backward_data, linear1_fp8, linear2, linear2_backward_data, linear2_fp8
from .kernels import gather_rows, gather_rows_into, gather_slots, grouped_mm_wgrad, reduce_rows
from .kernels.fp8 import Fp8Experts, dequantize_rows, gather_quantize_rowwise, gather_quantized
from .layout import RowLayout
from .plan import (PLAN_TENSORS, WaveItems, WavePlan, expert_major, pack_rows, return_items, returned_slot_values,
                   wave_items, wave_slots)
from .transport import Pending, Transport

Started = TypeVar("Started")
Made = TypeVar("Made")


class _SmCarveout:
    """On CUDA, leave `sms` SMs to communication kernels while GEMMs run (0: no change)."""

    def __init__(self, sms: int, device: torch.device) -> None:
        self.sms = sms if device.type == "cuda" else 0

    def __enter__(self):
        if self.sms:
            self._before = torch._C._get_sm_carveout_experimental()
            torch._C._set_sm_carveout_experimental(self.sms)

    def __exit__(self, *exc):
        if self.sms:
            torch._C._set_sm_carveout_experimental(self._before)


_ISSUE_STREAMS: Dict[Tuple[torch.device, int], torch.cuda.Stream] = {}  # the stream collectives are issued from
_SIDE_STREAMS: Dict[Tuple[torch.device, int], torch.cuda.Stream] = {}  # the stream work beside the waves runs on


def _stream(cache: Dict[Tuple[torch.device, int], torch.cuda.Stream], device: torch.device) -> torch.cuda.Stream:
    """The cache's stream for `device` and the calling thread (made at the first use, kept for
    the process). Per thread, as torch's current stream is: threads that each drive layers of
    their own must not queue behind each other."""
    key = (device, threading.get_ident())
    if key not in cache:
        cache[key] = torch.cuda.Stream(device)
    return cache[key]


def outside_graph_pools(device: torch.device, make: Callable[[], Made]) -> Made:
    """`make()` for state that outlives the call making it (a named cache's), allocated outside
    any graph's memory pool: on CUDA on a thread of its own, with the caller's device and
    stream current (so its kernels queue where the caller's would). cudagraph trees
    (`torch.compile(mode="reduce-overhead")`) route the allocations of the thread that warms a
    graph up into their pool, where a tensor that outlives the graph is an error ("tensor(s)
    in the cudagraph pool not tracked as outputs") and its memory another graph's. For
    allocations only: the thread has its own grad and autocast modes. Elsewhere: `make()`."""
    if device.type != "cuda":
        return make()
    stream, made = torch.cuda.current_stream(device), []

    def run() -> None:
        try:
            with torch.cuda.device(device), torch.cuda.stream(stream):
                made.append((True, make()))
        except BaseException as e:  # noqa: BLE001 - raised again on the caller's thread
            made.append((False, e))

    worker = threading.Thread(target=run, name="ep-outside-graph-pools")
    worker.start()
    worker.join()
    ok, value = made[0]
    if not ok:
        raise value
    return value


def ready_point(device: torch.device) -> Optional[torch.cuda.Event]:
    """On CUDA, an event marking the work issued so far on the current stream (None elsewhere)."""
    if device.type != "cuda":
        return None
    event = torch.cuda.Event()
    event.record()
    return event


def issue_after(device: torch.device, ready: Optional[torch.cuda.Event], start: Callable[[], Started]) -> Started:
    """Start a transfer that waits for `ready` (the point its inputs were complete), not for
    what the caller issued after that point.

    NCCL (and the copy-engine transport) order a transfer after everything queued on the
    stream it is issued from. Issued from the compute stream, wave w's dispatch would wait
    for wave 0's math (issued first, so the device computes while the host goes on). On
    CUDA the transfer is therefore issued from a side stream that first waits for `ready`
    and nothing more; `Pending.wait()` still joins it back into the compute stream. A named
    cache: one side stream per device and thread, for the process. Elsewhere (CPU) it calls `start`."""
    if device.type != "cuda":
        return start()
    side = _stream(_ISSUE_STREAMS, device)
    side.wait_event(ready)
    with torch.cuda.stream(side):
        return start()


def run_beside(device: torch.device, work: Callable[[], torch.Tensor]) -> Tuple[torch.Tensor, Callable[[], None]]:
    """Issue `work` so that it runs beside what the caller issues next (on CUDA: on a side
    stream, after the current stream's work so far), e.g. the shared experts beside the first
    dispatch. Returns its result and `join`, which makes the current stream wait for it
    (call it before using the result). Autograd runs the backward on the same streams. A
    named cache: one side stream per device and thread, for the process. Elsewhere: `work()` now."""
    if device.type != "cuda":
        return work(), lambda: None
    side = _stream(_SIDE_STREAMS, device)
    current = torch.cuda.current_stream(device)
    side.wait_stream(current)
    with torch.cuda.stream(side):
        out = work()

    def join() -> None:
        current.wait_stream(side)
        out.record_stream(current)  # made on the side stream, used (and freed) on this one

    return out, join


def _range(name: str):
    """A named range in profiler traces; nothing (no host cost, ~20 us a range) when no profiler runs."""
    return record_function(name) if torch.autograd.profiler._is_profiler_enabled else contextlib.nullcontext()


def run_waves(
    num_waves: int,
    start_in: Callable[[int], Pending],
    compute: Callable[[int], Callable[[], Pending]],
    math_first: bool,
    wait_out: bool = True,
) -> List[Pending]:
    """Drive W waves. `compute(w)` issues wave w's math and returns the call that starts
    its outbound transfer.

    Issue order with `math_first` (CUDA, where issuing math returns at once): inbound(0);
    math(0), so the device computes while the host goes on; inbound(1..W-1); outbound(0);
    then math(w) and outbound(w) for each later wave. Without it (CPU, where math runs
    as it is issued): every inbound transfer first, so they all fly during wave 0's math.
    Either way the transport runs its transfers in issue order, with every inbound transfer
    ahead of every outbound one (an outbound transfer waits for its wave's math, and must
    not hold up a later wave's rows). Then every outbound transfer is waited for (or, with
    `wait_out=False`, returned in flight, so the caller can issue more work first)."""
    inbound: List[Pending] = []
    outbound: List[Pending] = []
    early = 1 if math_first else num_waves  # inbound transfers started before wave 0's math
    for w in range(early):
        with _range(f"ep.in[{w}]"):
            inbound.append(start_in(w))
    with _range("ep.compute[0]"):
        inbound[0].wait()
        send_first = compute(0)
    for w in range(early, num_waves):
        with _range(f"ep.in[{w}]"):
            inbound.append(start_in(w))
    with _range("ep.out[0]"):
        outbound.append(send_first())
    for w in range(1, num_waves):
        with _range(f"ep.compute[{w}]"):
            inbound[w].wait()
            outbound.append(compute(w)())
    if wait_out:
        with _range("ep.out"):
            for flight in outbound:
                flight.wait()
    return outbound


_WAVE_TENSORS = ("item_row", "item_weight", "item_expert", "offs", "slot_item", "back_item", "item_back")


@dataclass
class Saved:
    """What the backward reads from its forward: the weights, every wave's received rows
    (`recv [W, N + 1, width]`, each wave's zero row last), linear1's outputs per wave, the
    plan and each wave's tables (`waves[w]`: items, back_item, item_back). The autograd
    Function saves it all; the compiled path's ops carry recv and hidden between them and
    make the tables again (`rebuild_saved`)."""

    w1: torch.Tensor
    w2: torch.Tensor
    recv: torch.Tensor
    layout: RowLayout
    plan: WavePlan
    hidden: List[torch.Tensor]
    waves: List[Tuple[WaveItems, torch.Tensor, torch.Tensor]]


def received_rows(plan: WavePlan, layout: RowLayout, device: torch.device) -> torch.Tensor:
    """`[W, N + 1, width]`, uninitialised: every wave's received rows and its zero row."""
    return layout.empty(plan.num_waves * (plan.rows_per_wave + 1), device).view(plan.num_waves,
                                                                                 plan.rows_per_wave + 1, layout.width)


def hidden_shapes(plan: WavePlan, w1: torch.Tensor) -> List[Tuple[int, int]]:
    """linear1's output per wave: `[item_capacity(w), 2F]`."""
    return [(plan.item_capacity(w), w1.shape[2]) for w in range(plan.num_waves)]


def _wave_tables(plan: WavePlan, layout: RowLayout, stacked: torch.Tensor, w: int):
    """Wave w's candidate rows (the anchors' zero row last), its items, and where its sums go
    back: (rows, items, back_item `[N, k]`, back_weight `[N, k]`, item_back `[I]`)."""
    first, count = plan.candidate_rows(w)
    rows = stacked[first:first + count + 1]
    it = wave_items(wave_slots(plan, layout, rows[:count], w), layout.weights(rows[:count]),
                    plan.num_local_experts, plan.item_capacity(w))
    if plan.wave_map.dedup:
        back_item, back_weight, item_back = return_items(plan, layout, rows[:count], first, it)
    else:  # a touch is its row: it comes back in the row's place
        back_item, back_weight, item_back = it.slot_item, layout.weights(rows[:plan.rows_per_wave]), it.item_row
    return rows, it, back_item, back_weight, item_back


def rebuild_saved(plan: WavePlan, layout: RowLayout, w1: torch.Tensor, w2: torch.Tensor, recv: torch.Tensor,
                  hidden: List[torch.Tensor]) -> Saved:
    """`Saved` from the forward's received rows and hidden rows, the tables made again (the
    plan from the same routing is the same plan: every table is a function of it)."""
    stacked = recv.view(-1, layout.width)
    waves = [_wave_tables(plan, layout, stacked, w) for w in range(plan.num_waves)]
    return Saved(w1, w2, recv, layout, plan, list(hidden),
                 [(it, back_item, item_back) for _, it, back_item, _, item_back in waves])


def item_rows(layout: RowLayout, rows: torch.Tensor, index: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """The items' hidden vectors `rows[index]` in the layout's dtype (dequantized from FP8
    dispatch's rows; `count`: the items in use, a 0-d device tensor)."""
    if not layout.quantized:
        return gather_rows(layout.data(rows), index, count)
    return dequantize_rows(*gather_quantized(layout.data(rows), layout.scales(rows), index, count), layout.dtype)


def _transfer(transport: Transport, ready: Optional[torch.cuda.Event], out: torch.Tensor, rows: torch.Tensor,
              plan: WavePlan, label: str, rows_in_use: Optional[torch.Tensor]) -> Pending:
    """One wave's all-to-all of `rows` into `out` (a region of `plan.capacity` rows per rank
    each way, `rows_in_use` of each sent: `Transport.all_to_all`), issued after `ready` only."""
    splits = [plan.capacity] * plan.num_ranks
    return issue_after(rows.device, ready, lambda: transport.all_to_all(out, rows, splits, splits, label,
                                                                          plan.capacity, rows_in_use))


def waves_forward(x_TH, topk_weights_TK, w1, w2, plan: WavePlan, transport: Transport, sm_carveout: int,
                  swiglu_limit: Optional[float], fp8: Optional[Fp8Experts] = None,
                  dispatch_dtype: Optional[torch.dtype] = None):
    """The forward schedule (see the module docstring). Returns y `[T, H]`, the status every
    rank sent `[n, STATUS_SLOTS]` int32 and what the backward needs (`Saved`).
    `fp8`: the experts in FP8 for the forward products (`MoEConfig.expert_dtype`; made once
    per call or kept, `ep.experts.quantize_expert_weight`: every wave shares them; a product
    whose weight is None runs in the layer's dtype); `dispatch_dtype`: FP8 rows on the wire
    (`MoEConfig.dispatch_dtype`). The backward uses w1 and w2."""
    H, device = x_TH.shape[1], x_TH.device
    layout = RowLayout(H, plan.top_k, x_TH.dtype, dispatch_dtype)
    W, N, n, cap = plan.num_waves, plan.rows_per_wave, plan.num_ranks, plan.capacity
    dedup = plan.wave_map.dedup
    transport.reserve(cap)  # the same on every rank: transports with fixed buffers size them from it
    x_TH = x_TH.contiguous()

    send = layout.empty(W * N, device)
    pack_rows(x_TH, topk_weights_TK, plan, layout, send)
    packed = ready_point(device)
    recv = received_rows(plan, layout, device)
    recv[:, N].zero_()  # each wave's zero row: the anchors' source
    if dedup:  # (its ids are read with the later waves' candidate rows)
        layout.ids(recv[:, N]).fill_(-1)
    stacked = recv.view(-1, layout.width)
    back = x_TH.new_empty(W * N, H)
    waves: List[Optional[Tuple[WaveItems, torch.Tensor, torch.Tensor]]] = [None] * W
    hidden: List[Optional[torch.Tensor]] = [None] * W
    arrived: List[Optional[torch.Tensor]] = [None] * W  # rows in use per source, where the transport counted them
    carve = _SmCarveout(sm_carveout if W > 1 else 0, device)

    def dispatch(w: int) -> Pending:
        flight = _transfer(transport, packed, recv[w, :N], send[plan.wave_rows(w)], plan,
                           f"dispatch (forward) of wave {w}", plan.region_rows[w])
        arrived[w] = flight.arrived_rows
        return flight

    def compute(w: int) -> Callable[[], Pending]:
        rows, it, back_item, back_weight, item_back = _wave_tables(plan, layout, stacked, w)
        with carve:
            few = plan.expected_items_per_expert
            if fp8 is not None and fp8.w1 is not None:
                h = linear1_fp8(layout.data(rows), fp8.w1, it.offs, index=it.item_row, rows=it.count,
                                x_scale=layout.scales(rows) if layout.quantized else None, out_dtype=x_TH.dtype,
                                fast_accum=fp8.fast_accum)
            elif layout.quantized:  # FP8 rows into a product in the layer's dtype
                h = linear1(item_rows(layout, rows, it.item_row, it.count), w1, None, it.offs, few)
            else:
                h = linear1(layout.data(rows), w1, None, it.offs, few, index=it.item_row, rows=it.count)
            if fp8 is not None and fp8.w2 is not None:
                o = linear2_fp8(h, fp8.w2, it.offs, swiglu_limit, fp8.fast_accum)
            else:
                o = linear2(h, w2, None, it.offs, swiglu_limit, few)
        sums = x_TH.new_empty(N, H)
        reduce_rows(o, back_item, sums, back_weight)
        waves[w], hidden[w] = (it, back_item, item_back), h
        summed = ready_point(device)
        rows_back = None if dedup else arrived[w]  # with dedup every returned row goes back
        return lambda: _transfer(transport, summed, back[plan.wave_rows(w)], sums, plan,
                                 f"combine (forward) of wave {w}", rows_back)

    run_waves(W, dispatch, compute, math_first=False)  # dispatches wait for the pack only: all go first
    y_TH = torch.empty_like(x_TH)
    with _range("ep.unpermute"):
        reduce_rows(back, plan.back_row, y_TH)
    if cap:
        status = layout.status(recv[0, :N]).view(n, cap, STATUS_SLOTS)[:, 0]
    else:  # no rank has tokens: nothing was sent, so nothing was found
        status = torch.zeros(n, STATUS_SLOTS, dtype=torch.int32, device=device)
    return y_TH, status, Saved(w1, w2, recv, layout, plan, hidden, waves)


def waves_backward(saved: Saved, dy_TH: torch.Tensor, transport: Transport, sm_carveout: int,
                   swiglu_limit: Optional[float], fp8: Optional[Fp8Experts] = None):
    """The backward schedule (the forward's mirror). Returns dx `[T, H]`, the routing
    weights' gradients `[T, k]` (acc dtype), dw1, dw2. `fp8`: the weights' transposes in FP8
    for the data products (`MoEConfig.fp8_backward`, `ep.experts.quantize_transposed_weight`;
    None, or a product's None: that product in the layer's dtype; its `fast_accum`:
    `MoEConfig.fp8_fast_accum="all"`)."""
    w1, w2, recv, plan, hidden = saved.w1, saved.w2, saved.recv, saved.plan, list(saved.hidden)
    W, N = plan.num_waves, plan.rows_per_wave
    items = [it for it, _, _ in saved.waves]
    H, device = dy_TH.shape[1], dy_TH.device
    layout = saved.layout.plain()  # the returning rows: gradients in the layer's dtype
    dy_TH = dy_TH.to(layout.dtype).contiguous()

    send = dy_TH.new_empty(W * N, H)
    gather_rows_into(dy_TH, plan.back_token, send)
    packed = ready_point(device)
    recv_dy = dy_TH.new_empty(W, N + 1, H)
    recv_dy[:, N].zero_()
    back = layout.empty(W * N, device)
    dh: List[Optional[torch.Tensor]] = [None] * W
    wa: List[Optional[torch.Tensor]] = [None] * W
    dz: List[Optional[torch.Tensor]] = [None] * W
    arrived: List[Optional[torch.Tensor]] = [None] * W
    carve = _SmCarveout(sm_carveout if W > 1 else 0, device)
    fp8_t = fp8 or Fp8Experts(None, None)

    def combine_backward(w: int) -> Pending:
        flight = _transfer(transport, packed, recv_dy[w, :N], send[plan.wave_rows(w)], plan,
                           f"combine backward of wave {w}", plan.back_region_rows[w])
        arrived[w] = flight.arrived_rows
        return flight

    def compute(w: int) -> Callable[[], Pending]:
        it, back_item, item_back = saved.waves[w]
        dz_q = None
        if fp8_t.w2 is None:
            dz[w] = gather_rows(recv_dy[w], item_back, it.count)
        else:  # the rows and their FP8 in one pass: the weight gradient reads the first, the data product the second
            dz[w], q, scale = gather_quantize_rowwise(recv_dy[w], item_back, it.count)
            dz_q = (q, scale)
        with carve:
            dh[w], wa[w], dweight_I, dh_q = linear2_backward_data(  # dh quantized in SwiGLU's backward for an FP8 product
                dz[w], hidden[w], it.item_weight, w2, None, it.offs, swiglu_limit, fp8_t.w2, fp8_t.fast_accum, dz_q,
                quantize_dh=fp8_t.w1 is not None)
            dx_I = linear1_backward_data(dh[w], w1, None, it.offs, fp8_t.w1, fp8_t.fast_accum, dh_q)
        hidden[w] = None
        rows = layout.empty(N, device)
        reduce_rows(dx_I, back_item, layout.data(rows))
        gather_slots(dweight_I, back_item, layout.weights(rows))
        summed = ready_point(device)
        return lambda: _transfer(transport, summed, back[plan.wave_rows(w)], rows, plan,
                                 f"dispatch backward of wave {w}", arrived[w])

    flights = run_waves(W, combine_backward, compute, math_first=False, wait_out=False)
    stacked = recv.view(-1, saved.layout.width)
    with _range("ep.weight_grads"), carve:  # beside the last transfers
        if W == 1:
            it = items[0]
            x_I = item_rows(saved.layout, recv[0], it.item_row, it.count)
            dw1 = grouped_mm_wgrad(x_I, dh[0], None, it.offs)
            dw2 = grouped_mm_wgrad(wa[0], dz[0], None, it.offs)
        else:
            x_rows = [it.item_row + plan.candidate_rows(w)[0] for w, it in enumerate(items)]
            dz_rows = [item_back + w * (N + 1) for w, (_, _, item_back) in enumerate(saved.waves)]
            order, x_at, dz_at, offs = expert_major(items, x_rows, dz_rows, plan.num_local_experts)
            used = offs[-1]
            dw1 = grouped_mm_wgrad(item_rows(saved.layout, stacked, x_at, used),
                                   gather_rows(torch.cat(dh), order, used), None, offs)
            dw2 = grouped_mm_wgrad(gather_rows(torch.cat(wa), order, used),
                                   gather_rows(recv_dy.view(-1, H), dz_at, used), None, offs)
    for flight in flights:
        flight.wait()
    dx_TH = torch.empty_like(dy_TH)
    with _range("ep.unpermute"):
        reduce_rows(layout.data(back), plan.back_row, dx_TH)
    return dx_TH, returned_slot_values(plan, layout.weights(back)), dw1, dw2


class WaveExperts(torch.autograd.Function):
    """`y = sum_j w[t, j] * expert_j(x[t])` over experts on all ranks, in waves
    (`waves_forward`, `waves_backward`).

    Returns y `[T, H]` and the status every rank sent `[n, STATUS_SLOTS]` int32 (device;
    not differentiable): the layer reports it.
    """

    @staticmethod
    def forward(ctx, x_TH, topk_weights_TK, w1, w2, plan: WavePlan, transport: Transport, sm_carveout: int,
                swiglu_limit: Optional[float], fp8: Optional[Fp8Experts] = None,
                dispatch_dtype: Optional[torch.dtype] = None,
                fp8_backward: Optional[Callable[[torch.Tensor, torch.Tensor], Optional[Fp8Experts]]] = None):
        y_TH, status, saved = waves_forward(x_TH, topk_weights_TK, w1, w2, plan, transport, sm_carveout,
                                            swiglu_limit, fp8, dispatch_dtype)
        ctx.mark_non_differentiable(status)
        ctx.fp8_backward = fp8_backward
        ctx.layout = saved.layout
        ctx.plan = replace(plan, **{name: None for name in PLAN_TENSORS})
        ctx.transport, ctx.sm_carveout, ctx.swiglu_limit = transport, sm_carveout, swiglu_limit
        ctx.w_dtype = topk_weights_TK.dtype
        per_wave = [t for it, back_item, item_back in saved.waves
                    for t in (it.item_row, it.item_weight, it.item_expert, it.offs, it.slot_item, back_item, item_back)]
        ctx.save_for_backward(w1, w2, saved.recv, *(getattr(plan, name) for name in PLAN_TENSORS), *saved.hidden,
                              *per_wave)
        return y_TH, status

    @staticmethod
    def backward(ctx, dy_TH, _dstatus):
        w1, w2, recv, *rest = ctx.saved_tensors
        plan: WavePlan = replace(ctx.plan, **dict(zip(PLAN_TENSORS, rest)))
        rest = rest[len(PLAN_TENSORS):]
        W = plan.num_waves
        per = len(_WAVE_TENSORS)
        tables = [dict(zip(_WAVE_TENSORS, rest[W + w * per: W + (w + 1) * per])) for w in range(W)]
        waves = [(WaveItems(*(t[name] for name in _WAVE_TENSORS[:5])), t["back_item"], t["item_back"]) for t in tables]
        saved = Saved(w1, w2, recv, ctx.layout, plan, list(rest[:W]), waves)
        fp8 = ctx.fp8_backward(w1, w2) if ctx.fp8_backward is not None else None
        dx_TH, dtopk_TK, dw1, dw2 = waves_backward(saved, dy_TH, ctx.transport, ctx.sm_carveout, ctx.swiglu_limit, fp8)
        return dx_TH, dtopk_TK.to(ctx.w_dtype), dw1, dw2, None, None, None, None, None, None, None


def wave_experts(
    x_TH: torch.Tensor,
    topk_weights_TK: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    plan: WavePlan,
    transport: Transport,
    sm_carveout: int = 0,
    swiglu_limit: Optional[float] = None,
    fp8: Optional[Fp8Experts] = None,
    dispatch_dtype: Optional[torch.dtype] = None,
    fp8_backward: Optional[Callable[[torch.Tensor, torch.Tensor], Optional[Fp8Experts]]] = None,
):
    """Differentiable expert part of the layer: `[T, H]` in, (`[T, H]`, the ranks' status
    `[n, STATUS_SLOTS]`) out. `fp8`: the experts in FP8 for the forward products;
    `dispatch_dtype`: FP8 rows on the wire (`MoEConfig.dispatch_dtype`); `fp8_backward`:
    called by the backward with w1, w2 for their transposes in FP8 (`waves_backward`'s `fp8`)."""
    return WaveExperts.apply(x_TH, topk_weights_TK, w1, w2, plan, transport, sm_carveout, swiglu_limit, fp8,
                             dispatch_dtype, fp8_backward)
