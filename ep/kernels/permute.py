"""Permute (gather rows into an order) and un-permute (weighted sum of rows back).

Pre- and post-processing only: nothing here talks to other ranks.
"""
from __future__ import annotations

from typing import Optional

import torch


def gather_rows(x_MH: torch.Tensor, index_N: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """`out[i] = x[index[i]]`.

    Args:
        x_MH: `[M, H]`.
        index_N: `[N]` int64 in `[0, M)`.
        out: optional `[N, H]` buffer of x's dtype.
    Returns:
        `[N, H]`, contiguous.
    """
    if out is not None:
        return torch.index_select(x_MH, 0, index_N, out=out)
    return x_MH[index_N]  # on CPU faster than index_select


def scatter_add_rows(
    out_MH: torch.Tensor,
    index_N: torch.Tensor,
    src_NH: torch.Tensor,
    weight_N: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """In place `out[index[i]] += weight[i] * src[i]`, accumulated in out's dtype.

    Args:
        out_MH: `[M, H]` accumulator (fp32 or wider under low-precision inputs).
        index_N: `[N]` int64 in `[0, M)`; repeats add up.
        src_NH: `[N, H]`.
        weight_N: optional `[N]`.
    """
    src = src_NH.to(out_MH.dtype)
    if weight_N is not None:
        src = src * weight_N.to(out_MH.dtype).unsqueeze(1)
    return out_MH.index_add_(0, index_N, src)
