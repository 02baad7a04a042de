"""Permute (gather rows into an order) and un-permute (weighted sums of rows back).

Pre- and post-processing only: nothing here talks to other ranks. On CUDA the row sums
run as one Triton kernel (`ep.kernels.triton_rows`); elsewhere as plain torch. Both sum
a row's terms in slot order with at least fp32 accumulation, so results are
deterministic.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Optional

import torch

from ..dtypes import accumulate_dtype


def gather_rows(x_MH: torch.Tensor, index_N: torch.Tensor, rows: Optional[torch.Tensor] = None) -> torch.Tensor:
    """`out[i] = x[index[i]]` -> `[N, H]`, contiguous, x's dtype.

    `rows`: optional 0-d device tensor, the rows in use: the GPU kernel skips later rows
    (their values are then unspecified), for buffers sized by a bound."""
    if rows is not None and use_triton(x_MH):
        from .triton_rows import gather_rows_triton

        out = x_MH.new_empty(index_N.shape[0], x_MH.shape[1])
        gather_rows_triton(x_MH, index_N, out, rows)
        return out
    if x_MH.is_cuda:
        return x_MH.index_select(0, index_N)
    return x_MH[index_N]  # on CPU faster than index_select


def gather_rows_into(x_MH: torch.Tensor, index_N: torch.Tensor, out_NH: torch.Tensor) -> None:
    """`out[i] = x[index[i]]` where `index[i] >= 0`; rows with index -1 get unspecified values.

    Args:
        x_MH: `[M, H]` (rows may be strided).
        index_N: `[N]` int64.
        out_NH: `[N, H]`, any row stride (e.g. the data part of `ep.layout` rows).
    """
    if index_N.numel() == 0 or x_MH.shape[0] == 0:
        return
    if use_triton(x_MH):
        from .triton_rows import gather_rows_triton

        gather_rows_triton(x_MH, index_N, out_NH)
        return
    out_NH.copy_(x_MH[index_N.clamp(min=0)])


def gather_slots(values_I: torch.Tensor, items_NK: torch.Tensor, out_NK: torch.Tensor) -> None:
    """`out[n, j] = values[items[n, j]]`, 0 where `items[n, j]` is -1 (per-slot values of
    items, e.g. the routing weights' gradients; `out` rows may be strided). One kernel on CUDA."""
    if use_triton(values_I):
        from .triton_rows import gather_slots_triton

        gather_slots_triton(values_I, items_NK, out_NK)
        return
    out_NK.copy_(torch.where(items_NK >= 0, values_I[items_NK.clamp(min=0)], 0))


@lru_cache(maxsize=None)
def triton_available() -> bool:
    """Whether triton imports here (checked once)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def use_triton(t: torch.Tensor) -> bool:
    """The Triton kernels serve CUDA tensors below float64."""
    return t.is_cuda and t.dtype != torch.float64 and triton_available()


def reduce_rows(src_MH: torch.Tensor, items_NK: torch.Tensor, out: torch.Tensor,
                weights_NK: Optional[torch.Tensor] = None) -> None:
    """Sum rows of `src` into output rows: `out[n] = sum_j weights[n, j] * src[items[n, j]]`
    over the slots j with `items[n, j] >= 0`, accumulated in at least fp32 (0 for a row
    without any).

    Args:
        src_MH: `[M, H]` (rows may be strided).
        items_NK: `[N, K]` int64 row indices into src, -1 for none.
        out: `[N, H]` output rows (rows may be strided), cast to out's dtype.
        weights_NK: `[N, K]` or None (unit weights).
    """
    if use_triton(src_MH):
        from .triton_rows import reduce_rows_triton

        reduce_rows_triton(src_MH, items_NK, out, weights_NK)
        return
    accd = accumulate_dtype(src_MH.dtype)
    total = torch.zeros(items_NK.shape[0], src_MH.shape[1], dtype=accd, device=src_MH.device)
    n_idx, j_idx = (items_NK >= 0).nonzero(as_tuple=True)  # row-major: slot order per row
    terms = src_MH[items_NK[n_idx, j_idx]].to(accd)
    if weights_NK is not None:
        terms *= weights_NK[n_idx, j_idx].to(accd).unsqueeze(1)
    total.index_add_(0, n_idx, terms)  # sequential on the CPU: deterministic
    out.copy_(total)
