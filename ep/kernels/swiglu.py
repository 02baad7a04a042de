"""SwiGLU and its backward fused with linear2's per-item backward: Triton on CUDA, torch elsewhere."""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F

from ..dtypes import accumulate_dtype
from .permute import use_triton


def swiglu(h_I2F: torch.Tensor) -> torch.Tensor:
    """`silu(h[:, :F]) * h[:, F:]` -> `[I, F]` in h's dtype."""
    if use_triton(h_I2F):
        from .triton_swiglu import swiglu_fwd_triton

        return swiglu_fwd_triton(h_I2F)
    gate, up = h_I2F.chunk(2, dim=-1)
    return F.silu(gate) * up


def swiglu_backward_weighted(
    g_IF: torch.Tensor, h_I2F: torch.Tensor, weight_I: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-item backward of `z = weight * (swiglu(h) @ w2)` given `g = dz @ w2^T`.

    Returns:
        dh `[I, 2F]` (h's dtype): the gradient of h, i.e. swiglu'(h) . (weight * g);
        wa `[I, F]` (h's dtype): weight * swiglu(h), so that dw2 = wa^T @ dz;
        dweight `[I]` (weight's dtype, at least fp32): sum_f g * swiglu(h).
    """
    if use_triton(h_I2F):
        from .triton_swiglu import swiglu_bwd_triton

        dh, wa, dweight = swiglu_bwd_triton(g_IF, h_I2F, weight_I)
        return dh, wa, dweight.to(accumulate_dtype(weight_I.dtype))
    acc = accumulate_dtype(h_I2F.dtype)
    gate, up = h_I2F.to(acc).chunk(2, dim=-1)
    g = g_IF.to(acc)
    w = weight_I.to(acc).unsqueeze(1)
    sig = torch.sigmoid(gate)
    silu = gate * sig
    act = silu * up
    dweight = (g * act).sum(dim=1)
    da = w * g
    dh = torch.cat([da * up * (sig * (1 + gate * (1 - sig))), da * silu], dim=-1)
    return dh.to(h_I2F.dtype), (w * act).to(h_I2F.dtype), dweight.to(accumulate_dtype(weight_I.dtype))
