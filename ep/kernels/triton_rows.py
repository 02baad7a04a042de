"""Triton kernels for `ep.kernels.permute.reduce_rows` and `gather_rows(_into)` on CUDA.

One program per (output row, block of columns); the K slot loads are issued without
branches (masked), so they are in flight together; fp32 accumulation; 16-byte accesses
for bf16 at the default block. Memory-bound: it reads each term row once and writes
each output row once.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl


@triton.jit
def _reduce_rows_kernel(
    src, items, weights, out, H, src_stride, out_stride, w_stride, K: tl.constexpr, HAS_W: tl.constexpr,
    BLOCK: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inb = cols < H
    total = tl.zeros([BLOCK], dtype=tl.float32)
    for j in tl.static_range(K):
        i = tl.load(items + n * K + j)
        term = tl.load(src + tl.maximum(i, 0) * src_stride + cols, mask=inb & (i >= 0), other=0.0).to(tl.float32)
        if HAS_W:  # (a slot served elsewhere may carry any bytes: its row may be padding)
            term = term * tl.load(weights + n * w_stride + j, mask=i >= 0, other=0.0).to(tl.float32)
        total += term
    tl.store(out + n * out_stride + cols, total.to(out.dtype.element_ty), mask=inb)


@triton.jit
def _gather_rows_kernel(src, index, out, rows_used, H, src_stride, out_stride, BLOCK: tl.constexpr,
                        HAS_ROWS: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    if HAS_ROWS:
        if n >= tl.load(rows_used):
            return
    i = tl.load(index + n)
    if i >= 0:
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        inb = cols < H
        tl.store(out + n * out_stride + cols, tl.load(src + i * src_stride + cols, mask=inb), mask=inb)


@triton.jit
def _gather_slots_kernel(values, items, out, N, out_stride, K: tl.constexpr, KP: tl.constexpr, BN: tl.constexpr):
    n = tl.program_id(0).to(tl.int64) * BN + tl.arange(0, BN)
    j = tl.arange(0, KP)
    m = (n[:, None] < N) & (j[None, :] < K)
    i = tl.load(items + n[:, None] * K + j[None, :], mask=m, other=-1)
    v = tl.load(values + tl.maximum(i, 0), mask=m & (i >= 0), other=0.0)
    tl.store(out + n[:, None] * out_stride + j[None, :], v.to(out.dtype.element_ty), mask=m)


def gather_slots_triton(values: torch.Tensor, items: torch.Tensor, out: torch.Tensor) -> None:
    """`out[n, j] = values[items[n, j]]`, 0 where `items[n, j]` is -1 (rows of out may be strided)."""
    N, K = items.shape
    if N == 0:
        return
    assert items.is_contiguous() and values.is_contiguous() and (out.stride(1) == 1 or K <= 1)
    kp = triton.next_power_of_2(K)
    bn = max(1, 1024 // kp)
    _gather_slots_kernel[(triton.cdiv(N, bn),)](values, items, out, N, out.stride(0), K=K, KP=kp, BN=bn, num_warps=4)


def _unit_rows(t: torch.Tensor) -> bool:
    return t.dim() == 2 and (t.stride(1) == 1 or t.shape[1] <= 1)


def gather_rows_triton(src: torch.Tensor, index: torch.Tensor, out: torch.Tensor,
                       rows: Optional[torch.Tensor] = None) -> None:
    """`out[n] = src[index[n]]` where index[n] >= 0 (rows with -1 untouched), for n < rows
    (a 0-d device tensor; all rows when None); any row strides."""
    N, H = out.shape
    if N == 0 or H == 0:
        return
    assert _unit_rows(src) and _unit_rows(out) and index.is_contiguous() and src.dtype == out.dtype
    block = min(1024, triton.next_power_of_2(H))
    _gather_rows_kernel[(N, triton.cdiv(H, block))](src, index, out, rows if rows is not None else index, H,
                                                    src.stride(0), out.stride(0), BLOCK=block,
                                                    HAS_ROWS=rows is not None, num_warps=4)


def reduce_rows_triton(
    src: torch.Tensor,
    items: torch.Tensor,
    out: torch.Tensor,
    weights: Optional[torch.Tensor],
) -> None:
    N, K = items.shape
    if N == 0:
        return
    H = src.shape[1]
    assert _unit_rows(src) and _unit_rows(out) and items.is_contiguous()
    assert weights is None or weights.shape[1] <= 1 or weights.stride(1) == 1  # rows may be strided (`ep.layout`)
    block = min(1024, triton.next_power_of_2(H))
    _reduce_rows_kernel[(N, triton.cdiv(H, block))](
        src, items, weights if weights is not None else items, out, H, src.stride(0), out.stride(0),
        weights.stride(0) if weights is not None else K, K=K, HAS_W=weights is not None, BLOCK=block, num_warps=4,
    )
