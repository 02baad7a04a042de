"""Grouped matrix products over a contiguous range of experts.

Rows of `x` are grouped by expert, `counts[e]` rows for expert e, in expert order; rows
past the last group (a buffer sized by a bound) are ignored. On CUDA in bf16 these go to
`torch._grouped_mm` (one launch for all experts, the counts read on the device from
`offs`), or, where the caller expects few rows per expert (`expected_rows` at most
`FEW_ROWS`: decode), to a Triton kernel that streams each expert's weights once
(`ep.kernels.triton_grouped`); elsewhere a plain loop of matmuls (the CPU has no float64
grouped kernel, and its `_grouped_mm` backward fails, so this path has its own backward in
`ep.experts`), which
needs the counts on the host: given, or read from `offs` (free on the CPU; on CUDA in
other dtypes, a device sync).
"""
from __future__ import annotations

import os
from typing import List, Optional, Sequence

import torch

FEW_ROWS = float(os.environ.get("EP_FEW_ROWS", "40"))
"""Expected rows per expert at or below which bf16 products on CUDA take the few-rows kernel
(0: never). r27 (one H200, dsv3 decode widths, 32 experts): at 16 and 32 rows per expert it
took 0.46-0.51 ms where `torch._grouped_mm` took 0.66 (linear1), 0.28-0.29 vs 0.37 (linear2);
at 64 rows `torch._grouped_mm` was ahead (0.65 vs 0.77)."""


def _use_grouped_kernel(x: torch.Tensor) -> bool:
    return x.is_cuda and x.dtype == torch.bfloat16 and hasattr(torch, "_grouped_mm")


def _host_counts(counts: Optional[Sequence[int]], offs: Optional[torch.Tensor]) -> Sequence[int]:
    if counts is not None:
        return counts
    ends: List[int] = offs.tolist()
    return [b - a for a, b in zip([0] + ends[:-1], ends)]


def _few_rows(x_MK: torch.Tensor, w_EKN: torch.Tensor, offs: Optional[torch.Tensor],
              expected_rows: Optional[float]) -> bool:
    """Whether the few-rows kernel takes this product (CUDA bf16, few rows expected)."""
    if offs is None or expected_rows is None or expected_rows > FEW_ROWS or not _use_grouped_kernel(x_MK):
        return False
    from .permute import triton_available

    return w_EKN.stride(2) == 1 and x_MK.stride(1) == 1 and triton_available()


def grouped_mm(
    x_MK: torch.Tensor,
    w_EKN: torch.Tensor,
    counts: Optional[Sequence[int]],
    offs: Optional[torch.Tensor] = None,
    expected_rows: Optional[float] = None,
    index: Optional[torch.Tensor] = None,
    rows: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """`out[rows of e] = x[rows of e] @ w[e]` for every expert e.

    Args:
        x_MK: `[M, K]`, M >= sum(counts), rows in expert order (rows past the groups ignored).
        w_EKN: `[E, K, N]` (any strides with a unit stride in the last two dims).
        counts: `[E]` host ints, or None (then read from `offs`).
        offs: `[E]` int32 cumulative counts on x's device (the GPU kernel's form of counts).
        expected_rows: the caller's estimate of rows per expert (a host number, from shapes:
            it picks the kernel, never the result), or None.
        index, rows: the product's rows are `x[index]` (`[I]` int64; `rows`: a 0-d device
            count of those in use): read through the index by the few-rows kernel, else
            gathered first (`ep.kernels.gather_rows`).
    Returns:
        `[M, N]` (`[I, N]` with `index`) in x's dtype (rows past the groups: unspecified).
    """
    if _few_rows(x_MK, w_EKN, offs, expected_rows):
        from .triton_grouped import grouped_mm_few_rows

        return grouped_mm_few_rows(x_MK, w_EKN, offs, index=index)
    if index is not None:
        from .permute import gather_rows

        x_MK = gather_rows(x_MK, index, rows)
    if offs is not None and _use_grouped_kernel(x_MK):
        return torch._grouped_mm(x_MK, w_EKN, offs=offs)
    counts = _host_counts(counts, offs)
    out = x_MK.new_empty(x_MK.shape[0], w_EKN.shape[2])
    start = 0
    for e, c in enumerate(counts):
        if c:
            torch.mm(x_MK[start:start + c], w_EKN[e], out=out[start:start + c])
        start += c
    return out


def grouped_mm_wgrad(
    x_MK: torch.Tensor, dy_MN: torch.Tensor, counts: Optional[Sequence[int]], offs: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """`dw[e] = x[rows of e]^T @ dy[rows of e]`; zero for experts with no rows.

    Args:
        counts: `[E]` host ints, or None: then every group must have rows (the CUDA kernel
            does not write the result of an empty group, and which ones are empty is not
            known on the host; `ep.plan` keeps one zero row in every group).
    Returns:
        `[E, K, N]` in x's dtype.
    """
    if offs is not None and _use_grouped_kernel(x_MK):
        dw = torch._grouped_mm(x_MK.t(), dy_MN, offs=offs)
        for e, c in enumerate(counts or ()):
            if c == 0:  # a group with no rows is not written by the kernel
                dw[e].zero_()
        return dw
    counts = _host_counts(counts, offs)
    E = len(counts)
    dw = x_MK.new_zeros(E, x_MK.shape[1], dy_MN.shape[1])
    start = 0
    for e, c in enumerate(counts):
        if c:
            torch.mm(x_MK[start:start + c].t(), dy_MN[start:start + c], out=dw[e])
        start += c
    return dw
