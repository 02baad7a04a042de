"""Grouped matrix products over a contiguous range of experts.

Rows of `x` are grouped by expert, `counts[e]` rows for expert e, in expert order. On
CUDA in bf16 these go to `torch._grouped_mm` (one launch for all experts); elsewhere a
plain loop of matmuls (the CPU has no float64 grouped kernel, and its `_grouped_mm`
backward fails, so this path has its own backward in `ep.experts`).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch


def _use_grouped_kernel(x: torch.Tensor) -> bool:
    return x.is_cuda and x.dtype == torch.bfloat16 and hasattr(torch, "_grouped_mm")


def grouped_mm(
    x_MK: torch.Tensor,
    w_EKN: torch.Tensor,
    counts: Sequence[int],
    offs: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """`out[rows of e] = x[rows of e] @ w[e]` for every expert e.

    Args:
        x_MK: `[M, K]`, M = sum(counts), rows in expert order.
        w_EKN: `[E, K, N]` (any strides with a unit stride in the last two dims).
        counts: `[E]` host ints.
        offs: `[E]` int32 cumulative counts on x's device (the GPU kernel's form of counts).
    Returns:
        `[M, N]` in x's dtype.
    """
    if offs is not None and _use_grouped_kernel(x_MK):
        return torch._grouped_mm(x_MK, w_EKN, offs=offs)
    out = x_MK.new_empty(x_MK.shape[0], w_EKN.shape[2])
    start = 0
    for e, c in enumerate(counts):
        if c:
            torch.mm(x_MK[start:start + c], w_EKN[e], out=out[start:start + c])
        start += c
    return out


def grouped_mm_wgrad(
    x_MK: torch.Tensor, dy_MN: torch.Tensor, counts: Sequence[int], offs: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """`dw[e] = x[rows of e]^T @ dy[rows of e]`; zero for experts with no rows.

    Returns:
        `[E, K, N]` in x's dtype.
    """
    E = len(counts)
    if offs is not None and _use_grouped_kernel(x_MK):
        dw = torch._grouped_mm(x_MK.t(), dy_MN, offs=offs)
        for e, c in enumerate(counts):
            if c == 0:  # a group with no rows is not written by the kernel
                dw[e].zero_()
        return dw
    dw = x_MK.new_zeros(E, x_MK.shape[1], dy_MN.shape[1])
    start = 0
    for e, c in enumerate(counts):
        if c:
            torch.mm(x_MK[start:start + c].t(), dy_MN[start:start + c], out=dw[e])
        start += c
    return dw
