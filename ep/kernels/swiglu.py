"""SwiGLU and its backward fused with linear2's per-item backward: Triton on CUDA, torch elsewhere.

`limit` (None, or DeepSeek-V4's `swiglu_limit`) clamps the input first: `gate.clamp(max=limit)`,
`up.clamp(-limit, limit)`; where a value was clamped its gradient is 0 (as autograd's clamp).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from ..dtypes import accumulate_dtype
from .permute import use_triton


def clamped_halves(h_I2F: torch.Tensor, limit: Optional[float]) -> Tuple[torch.Tensor, torch.Tensor]:
    """gate `h[:, :F]` and up `h[:, F:]`, clamped by `limit`; plain torch, differentiable."""
    gate, up = h_I2F.chunk(2, dim=-1)
    if limit is not None:
        gate, up = gate.clamp(max=limit), up.clamp(-limit, limit)
    return gate, up


def swiglu_torch(h_I2F: torch.Tensor, limit: Optional[float] = None) -> torch.Tensor:
    """`silu(gate) * up` in plain torch ops (autograd sees it: the shared experts use it)."""
    gate, up = clamped_halves(h_I2F, limit)
    return F.silu(gate) * up


def swiglu(h_I2F: torch.Tensor, limit: Optional[float] = None, rows: Optional[torch.Tensor] = None) -> torch.Tensor:
    """`silu(h[:, :F]) * h[:, F:]` (clamped by `limit`) -> `[I, F]` in h's dtype.

    `rows`: optional 0-d device tensor, the rows in use (the GPU kernel skips later ones,
    whose outputs are then unspecified; the torch path computes them all)."""
    if use_triton(h_I2F):
        from .triton_swiglu import swiglu_fwd_triton

        return swiglu_fwd_triton(h_I2F, limit, rows)
    return swiglu_torch(h_I2F, limit)


def swiglu_backward_weighted(
    g_IF: torch.Tensor, h_I2F: torch.Tensor, weight_I: torch.Tensor, limit: Optional[float] = None,
    rows: Optional[torch.Tensor] = None, quantize_dh: bool = False,
) -> Tuple[torch.Tensor, ...]:
    """Per-item backward of `z = weight * (swiglu(h) @ w2)` given `g = dz @ w2^T`
    (`rows`: as in `swiglu`).

    Returns:
        dh `[I, 2F]` (h's dtype): the gradient of h, i.e. swiglu'(h) . (weight * g);
        wa `[I, F]` (h's dtype): weight * swiglu(h), so that dw2 = wa^T @ dz;
        dweight `[I]` (weight's dtype, at least fp32): sum_f g * swiglu(h);
        with `quantize_dh` also dh's rows quantized with one scale each (q `[I, 2F]` e4m3,
        scale `[I]` fp32: `ep.kernels.fp8.quantize_rowwise` of dh, in the same kernel on CUDA;
        the rows past `rows` unspecified), for linear1's data product in FP8.
    """
    if use_triton(h_I2F):
        from .triton_swiglu import swiglu_bwd_triton

        dh, wa, dweight, *dh_q = swiglu_bwd_triton(g_IF, h_I2F, weight_I, limit, rows, quantize_dh)
        return (dh, wa, dweight.to(accumulate_dtype(weight_I.dtype)), *dh_q)
    acc = accumulate_dtype(h_I2F.dtype)
    gate, up = clamped_halves(h_I2F.to(acc), limit)
    g = g_IF.to(acc)
    w = weight_I.to(acc).unsqueeze(1)
    sig = torch.sigmoid(gate)
    silu = gate * sig
    act = silu * up
    dweight = (g * act).sum(dim=1)
    da = w * g
    dgate, dup = da * up * (sig * (1 + gate * (1 - sig))), da * silu
    if limit is not None:  # no gradient where the clamp cut (autograd's clamp passes it at the bound)
        h_gate, h_up = h_I2F.to(acc).chunk(2, dim=-1)
        dgate = torch.where(h_gate <= limit, dgate, 0)
        dup = torch.where(h_up.abs() <= limit, dup, 0)
    dh = torch.cat([dgate, dup], dim=-1)
    out = (dh.to(h_I2F.dtype), (w * act).to(h_I2F.dtype), dweight.to(accumulate_dtype(weight_I.dtype)))
    if quantize_dh:
        from .fp8 import quantize_rowwise_torch

        out += quantize_rowwise_torch(out[0])
    return out
