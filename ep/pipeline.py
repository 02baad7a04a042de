"""The wave schedule, forward and backward: the only room that knows streams and events.

Forward, per layer:
    1. (the plan already carried every route's weights to the owners);
    2. gather every route's row once (dispatch order); start dispatch(0), wait for it and
       issue wave 0's linear1 and linear2 (on CUDA; on CPU, where math runs as it is
       issued, every dispatch starts first); then start dispatch(w) of every later wave,
       each sending its slice (the transport runs them in order), while wave 0 computes;
    3. start combine(0), which sends back the rows whose last wave is 0; then for
       w = 1..W-1: wait for dispatch(w); linear1(w); linear2(w); start combine(w) (it
       flies during wave w+1's math);
    4. wait for the combines; un-permute: each token's returned rows summed into `y`.
Backward mirrors it: the output gradient goes out per wave in the dispatch direction,
each wave's expert backward runs as its gradient lands, and the input gradients fly back
while the next wave computes. The weights' gradients go back in one exchange at the end.

With W=1 this is the plain sequential layer. On CUDA, communication runs on the
transport's streams; the compute stream waits only for its own wave's data.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Callable, Dict, List, Optional, Tuple, TypeVar

import torch
from torch.profiler import record_function

from . import stages
from .dtypes import accumulate_dtype
from .plan import DispatchPlan
from .transport import Transport

Started = TypeVar("Started")


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
    start_in: Callable[[int], stages.InFlight],
    compute: Callable[[int], Callable[[], stages.InFlight]],
    math_first: bool,
    wait_out: bool = True,
) -> List[stages.InFlight]:
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
    inbound: List[stages.InFlight] = []
    outbound: List[stages.InFlight] = []
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


class WavedExperts(torch.autograd.Function):
    """`y = sum_j w[t, j] * expert_j(x[t])` over experts on all ranks, in waves."""

    @staticmethod
    def forward(ctx, x_TH, topk_weights_TK, w1, w2, plan: DispatchPlan, transport: Transport, sm_carveout: int,
                swiglu_limit: Optional[float] = None):
        if plan.recv_weights is None:
            raise ValueError("WavedExperts needs a plan made with topk_weights")
        acc = accumulate_dtype(x_TH.dtype)
        x_TH = x_TH.contiguous()
        weights_flat = plan.recv_weights.to(acc)
        touch_weights = plan.touch_weights.to(acc)
        rows_all = stages.received_rows(plan, x_TH)
        acc_all = stages.return_accumulator(plan, x_TH)
        back_all = stages.returned_rows(plan, x_TH)
        hidden: List[torch.Tensor] = [None] * plan.num_waves  # type: ignore[list-item]
        carve = _SmCarveout(sm_carveout if plan.num_waves > 1 else 0, x_TH.device)

        def compute(w: int) -> Callable[[], stages.InFlight]:
            with carve:
                h = stages.linear1(rows_all, w1, plan, w)
                o = stages.linear2(h, w2, plan, w, swiglu_limit=swiglu_limit)
            hidden[w] = h
            return lambda: stages.combine(o, touch_weights[plan.touch_slice(w)], acc_all, back_all, plan, w, transport)

        sends = stages.routes_out(x_TH, plan)  # one gather for all waves
        run_waves(plan.num_waves, lambda w: stages.dispatch(x_TH, rows_all, plan, w, transport, sends), compute,
                  math_first=x_TH.is_cuda)
        y_TH = torch.empty_like(x_TH)
        with _range("ep.unpermute"):
            stages.unpermute(back_all, plan, y_TH)
        # every tensor through save_for_backward, so checkpointing and saved-tensor hooks see them;
        # the plan (host ints and index tables, no activations) stays on ctx
        ctx.save_for_backward(w1, w2, rows_all, weights_flat, *hidden)
        ctx.plan, ctx.transport, ctx.sm_carveout, ctx.swiglu_limit = plan, transport, sm_carveout, swiglu_limit
        ctx.x_dtype, ctx.w_dtype = x_TH.dtype, topk_weights_TK.dtype
        return y_TH

    @staticmethod
    def backward(ctx, dy_TH):
        w1, w2, rows_all, weights_flat, *hidden = ctx.saved_tensors  # unpacked once (hooks may copy)
        plan: DispatchPlan = ctx.plan
        transport: Transport = ctx.transport
        dy_TH = dy_TH.to(ctx.x_dtype).contiguous()
        dz_all = stages.received_rows(plan, dy_TH)
        dacc_all = stages.return_accumulator(plan, dy_TH)
        dback_all = stages.returned_rows(plan, dy_TH)
        dw1, dw2 = torch.empty_like(w1), torch.empty_like(w2)
        dweights_flat = torch.zeros_like(weights_flat)
        carve = _SmCarveout(ctx.sm_carveout if plan.num_waves > 1 else 0, dy_TH.device)

        def compute(w: int) -> Callable[[], stages.InFlight]:
            i0, i1 = plan.item_range(w)
            e0, e1 = plan.wave_experts(w)
            slots = plan.item_slot_flat[i0:i1]
            with carve:
                dx_IH, dw1[e0:e1], dw2[e0:e1], dweight_I = stages.experts_backward(
                    dz_all, rows_all, hidden[w], weights_flat[slots], w1, w2, plan, w, swiglu_limit=ctx.swiglu_limit
                )
            hidden[w] = None  # this wave's unpacked copy (the autograd graph frees its own after backward)
            dweights_flat[slots] = dweight_I
            return lambda: stages.dispatch_backward(dx_IH, dacc_all, dback_all, plan, w, transport)

        sends = stages.routes_out(dy_TH, plan)
        run_waves(plan.num_waves, lambda w: stages.combine_backward(dy_TH, dz_all, plan, w, transport, sends), compute,
                  math_first=dy_TH.is_cuda)
        dx_TH = torch.empty_like(dy_TH)
        with _range("ep.unpermute"):
            stages.unpermute(dback_all, plan, dx_TH)
        dtopk_TK = stages.exchange_weight_grads(dweights_flat, plan, transport).to(ctx.w_dtype)
        return dx_TH, dtopk_TK, dw1, dw2, None, None, None, None


def waved_experts(
    x_TH: torch.Tensor,
    topk_weights_TK: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    plan: DispatchPlan,
    transport: Transport,
    sm_carveout: int = 0,
    swiglu_limit: Optional[float] = None,
) -> torch.Tensor:
    """Differentiable expert part of the layer: `[T, H]` in, `[T, H]` out (x's dtype)."""
    return WavedExperts.apply(x_TH, topk_weights_TK, w1, w2, plan, transport, sm_carveout, swiglu_limit)
