"""A Triton grouped matrix product for groups of few rows (CUDA): decode-sized expert math.

`out[rows of e] = x[rows of e] @ w[e]` with the groups' ends `offs` on the device, as
`torch._grouped_mm` takes them. With few rows per expert (dsv3 decode on 2 ranks: ~32) the product
is a stream of the experts' weights: r26 measured `torch._grouped_mm` reading them at
~3.0 TB/s on an H200 (0.62 + 0.31 ms for dsv3's 32 experts, a floor of 0.39 + 0.20 at
4.8 TB/s). Here program (j, e) streams columns `[j x BLOCK_N, (j + 1) x BLOCK_N)` of
`w[e]` once along K, for up to BLOCK_M rows of expert e at a time (a group of more rows
takes more passes: correct for any counts, fast for few); a group with no rows reads
nothing. No host sync: the counts are read on the device. It can read its rows through an
index (linear1: the gather of a wave's items from the received rows, one kernel fewer). SwiGLU
applied as linear2 reads its rows was tried and slowed the weight stream (r32: 0.222 -> 0.290
ms, the SwiGLU kernel it saved took 5 us): linear2 reads SwiGLU's output.
"""
from __future__ import annotations

import os
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl


CONFIG: Tuple[int, ...] = tuple(int(v) for v in os.environ.get("EP_FEW_ROWS_CONFIG", "64,128,64,4,4").split(","))
"""(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages), `EP_FEW_ROWS_CONFIG="m,n,k,w,s"` to override
(read once, at import). r27: within 12% of the best configuration at 16-32 rows per expert."""
if len(CONFIG) != 5:
    raise ValueError(f"EP_FEW_ROWS_CONFIG takes 5 integers m,n,k,w,s, got {CONFIG}")


@triton.jit
def _few_rows_kernel(x, index, w, offs, out, N, x_stride, w_se, w_sk, out_stride, K: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GATHER: tl.constexpr):
    j = tl.program_id(0)
    e = tl.program_id(1).to(tl.int64)
    end = tl.load(offs + e).to(tl.int64)
    start = tl.load(offs + e - 1, mask=e > 0, other=0).to(tl.int64)
    cols = j * BLOCK_N + tl.arange(0, BLOCK_N)
    live_col = cols < N
    w_e = w + e * w_se
    m0 = start
    while m0 < end:  # (while: Triton's interpreter cannot range over device scalars)
        rows = m0 + tl.arange(0, BLOCK_M)
        live_row = rows < end
        if GATHER:  # row r of the product is row index[r] of x
            src = tl.load(index + rows, mask=live_row, other=0)
        else:
            src = rows
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):  # K a constant (a model's width): a loop the compiler pipelines
            ks = k0 + tl.arange(0, BLOCK_K)
            a = tl.load(x + src[:, None] * x_stride + ks[None, :], mask=live_row[:, None] & (ks < K)[None, :], other=0.0)
            b = tl.load(w_e + ks[:, None] * w_sk + cols[None, :], mask=(ks < K)[:, None] & live_col[None, :], other=0.0)
            acc = tl.dot(a, b, acc)
        tl.store(out + rows[:, None] * out_stride + cols[None, :], acc.to(out.dtype.element_ty),
                 mask=live_row[:, None] & live_col[None, :])
        m0 += BLOCK_M


def grouped_mm_few_rows(x_MK: torch.Tensor, w_EKN: torch.Tensor, offs: torch.Tensor,
                        config: Optional[Tuple[int, int, int, int, int]] = None,
                        index: Optional[torch.Tensor] = None) -> torch.Tensor:
    """`[M, N]` (rows past `offs[-1]`: unspecified); `w_EKN` with a unit stride in its last dim.

    index: `[M]` int64: the product's row r is `x[index[r]]` (the gather done as rows are read)."""
    E, K, N = w_EKN.shape
    if w_EKN.stride(2) != 1 or x_MK.stride(1) != 1:
        raise ValueError("grouped_mm_few_rows: w needs unit stride along N and x along K")
    if x_MK.shape[1] != K:
        raise ValueError(f"grouped_mm_few_rows: x has {x_MK.shape[1]} columns for K={K}")
    bm, bn, bk, warps, stages = config or CONFIG
    M = index.shape[0] if index is not None else x_MK.shape[0]
    out = x_MK.new_empty(M, N)
    _few_rows_kernel[(triton.cdiv(N, bn), E)](
        x_MK, index if index is not None else offs, w_EKN, offs, out, N, x_MK.stride(0), w_EKN.stride(0),
        w_EKN.stride(1), out.stride(0), K=K, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GATHER=index is not None,
        num_warps=warps, num_stages=stages)
    return out
