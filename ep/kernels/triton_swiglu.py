"""Triton kernels for the SwiGLU between linear1 and linear2, forward and backward (CUDA).

Forward: `a = silu(h[:, :F]) * h[:, F:]`, one pass (reads 2F, writes F per row).
Backward, fused with the parts of linear2's backward that are per item: given
`g = dz @ w2^T` and the item's routing weight w,
    dweight = sum_f g * a        (the weight's gradient, fp32)
    dh      = swiglu'(h) . (w * g)
    wa      = w * a              (so that dw2 = wa^T @ dz)
one pass per row (reads g and h, writes dh and wa), fp32 arithmetic throughout. With QUANT
(the backward's linear1 data product in FP8) dh's row is also quantized with one scale (the
amax of its stored values, then a second pass over the row just written), as
`ep.kernels.fp8.quantize_rowwise` would quantize it.
With `rows` (HAS_ROWS: a device count, for buffers sized by a bound) rows past it are
skipped, their outputs unspecified. With a limit (HAS_LIMIT), gate and up are clamped first (`gate <= limit`,
`-limit <= up <= limit`) and the gradient is 0 where the clamp cut, as autograd's clamp.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .fp8 import FP8
from .triton_fp8 import _scale_of, _to_e4m3


@triton.jit
def _swiglu_fwd_kernel(h, a, F, limit, rows_used, BLOCK: tl.constexpr, HAS_LIMIT: tl.constexpr, HAS_ROWS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    if HAS_ROWS:
        if row >= tl.load(rows_used):
            return
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = cols < F
    gate = tl.load(h + row * 2 * F + cols, mask=m, other=0.0).to(tl.float32)
    up = tl.load(h + row * 2 * F + F + cols, mask=m, other=0.0).to(tl.float32)
    if HAS_LIMIT:
        gate = tl.minimum(gate, limit)
        up = tl.minimum(tl.maximum(up, -limit), limit)
    out = gate * tl.sigmoid(gate) * up
    tl.store(a + row * F + cols, out.to(a.dtype.element_ty), mask=m)


@triton.jit
def _swiglu_bwd_kernel(g, h, w, dh, wa, dweight, dq, ds, limit, rows_used, F: tl.constexpr, BLOCK: tl.constexpr,
                       HAS_LIMIT: tl.constexpr, HAS_ROWS: tl.constexpr, QUANT: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    if HAS_ROWS:
        if row >= tl.load(rows_used):
            return
    weight = tl.load(w + row).to(tl.float32)
    total = tl.zeros([BLOCK], dtype=tl.float32)
    amax = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, F, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        m = cols < F
        gate = tl.load(h + row * 2 * F + cols, mask=m, other=0.0).to(tl.float32)
        up = tl.load(h + row * 2 * F + F + cols, mask=m, other=0.0).to(tl.float32)
        gv = tl.load(g + row * F + cols, mask=m, other=0.0).to(tl.float32)
        if HAS_LIMIT:
            gate_in = gate <= limit
            up_in = (up >= -limit) & (up <= limit)
            gate = tl.minimum(gate, limit)
            up = tl.minimum(tl.maximum(up, -limit), limit)
        sig = tl.sigmoid(gate)
        silu = gate * sig
        act = silu * up
        total += gv * act
        da = weight * gv
        dgate = da * up * sig * (1.0 + gate * (1.0 - sig))
        dup = da * silu
        if HAS_LIMIT:
            dgate = tl.where(gate_in, dgate, 0.0)
            dup = tl.where(up_in, dup, 0.0)
        dgate = dgate.to(dh.dtype.element_ty)
        dup = dup.to(dh.dtype.element_ty)
        tl.store(dh + row * 2 * F + cols, dgate, mask=m)
        tl.store(dh + row * 2 * F + F + cols, dup, mask=m)
        tl.store(wa + row * F + cols, (weight * act).to(wa.dtype.element_ty), mask=m)
        if QUANT:  # (masked columns are 0)
            amax = tl.maximum(amax, tl.maximum(tl.abs(dgate.to(tl.float32)), tl.abs(dup.to(tl.float32))))
    tl.store(dweight + row, tl.sum(total, axis=0))
    if QUANT:
        scale = _scale_of(tl.max(amax, axis=0), False)
        tl.debug_barrier()  # the row's stores are seen by every thread of the program
        for start in range(0, 2 * F, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            m = cols < 2 * F
            v = tl.load(dh + row * 2 * F + cols, mask=m, other=0.0).to(tl.float32)
            tl.store(dq + row * 2 * F + cols, _to_e4m3(v, scale), mask=m)
        tl.store(ds + row, scale)


def swiglu_fwd_triton(h: torch.Tensor, limit: Optional[float] = None, rows: Optional[torch.Tensor] = None) -> torch.Tensor:
    """`rows`: an optional 0-d device int tensor, the rows in use (later rows are skipped)."""
    I, F2 = h.shape
    F = F2 // 2
    a = h.new_empty(I, F)
    if I:
        block = min(1024, triton.next_power_of_2(F))
        _swiglu_fwd_kernel[(I, triton.cdiv(F, block))](h.contiguous(), a, F, float(limit or 0.0),
                                                       rows if rows is not None else a, BLOCK=block,
                                                       HAS_LIMIT=limit is not None, HAS_ROWS=rows is not None,
                                                       num_warps=4)
    return a


def swiglu_bwd_triton(
    g: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, limit: Optional[float] = None,
    rows: Optional[torch.Tensor] = None, quantize: bool = False,
) -> Tuple[torch.Tensor, ...]:
    """(dh, wa, dweight), and with `quantize` dh's rows quantized with one scale each (q `[I, 2F]`
    e4m3, scale `[I]` fp32) after them."""
    I, F = g.shape
    dh = h.new_empty(I, 2 * F)
    wa = h.new_empty(I, F)
    dweight = torch.empty(I, dtype=torch.float32, device=h.device)
    dq = torch.empty(I, 2 * F, dtype=FP8, device=h.device) if quantize else dh
    ds = torch.empty(I, dtype=torch.float32, device=h.device) if quantize else dweight
    if I:
        block = min(2048, triton.next_power_of_2(F))
        _swiglu_bwd_kernel[(I,)](g.contiguous(), h.contiguous(), weight.float().contiguous(), dh, wa, dweight, dq, ds,
                                 float(limit or 0.0), rows if rows is not None else dweight, F, BLOCK=block,
                                 HAS_LIMIT=limit is not None, HAS_ROWS=rows is not None, QUANT=quantize, num_warps=8)
    return (dh, wa, dweight, dq, ds) if quantize else (dh, wa, dweight)
