"""The experts: SwiGLU MLPs over a contiguous range of local experts, forward and backward.

Rows arrive grouped by expert (`counts[e]` rows for expert e). linear1 is `x @ w1` then
SwiGLU (`silu(gate) * up`, gate = columns `[:F]`, up = `[F:]`); linear2 is `a @ w2`.
Backward is written out by hand so the pipeline can run it wave by wave.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .dtypes import accumulate_dtype
from .kernels import grouped_mm, grouped_mm_wgrad


class Experts(nn.Module):
    """This rank's experts.

    Parameters:
        w1: `[E_local, H, 2F]`, columns `[:F]` the gate and `[F:]` the up projection.
        w2: `[E_local, F, H]`.
    """

    def __init__(self, num_local_experts: int, hidden: int, ffn_hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(num_local_experts, hidden, 2 * ffn_hidden))
        self.w2 = nn.Parameter(torch.empty(num_local_experts, ffn_hidden, hidden))
        nn.init.normal_(self.w1, std=hidden ** -0.5)
        nn.init.normal_(self.w2, std=ffn_hidden ** -0.5)


def swiglu(h_I2F: torch.Tensor) -> torch.Tensor:
    """`silu(h[:, :F]) * h[:, F:]` -> `[I, F]`."""
    gate, up = h_I2F.chunk(2, dim=-1)
    return F.silu(gate) * up


def swiglu_backward(h_I2F: torch.Tensor, da_IF: torch.Tensor) -> torch.Tensor:
    """Gradient of `swiglu` at `h` for output gradient `da` -> `[I, 2F]`."""
    gate, up = h_I2F.to(accumulate_dtype(h_I2F.dtype)).chunk(2, dim=-1)
    da = da_IF.to(gate.dtype)
    sig = torch.sigmoid(gate)
    silu = gate * sig
    dgate = da * up * (sig * (1 + gate * (1 - sig)))
    dup = da * silu
    return torch.cat([dgate, dup], dim=-1).to(h_I2F.dtype)


def linear1(x_IH: torch.Tensor, w1_EH2F: torch.Tensor, counts: Sequence[int], offs: Optional[torch.Tensor] = None) -> torch.Tensor:
    """`h = x @ w1[e]` per expert -> `[I, 2F]` (SwiGLU is applied by the caller)."""
    return grouped_mm(x_IH, w1_EH2F, counts, offs)


def linear2(a_IF: torch.Tensor, w2_EFH: torch.Tensor, counts: Sequence[int], offs: Optional[torch.Tensor] = None) -> torch.Tensor:
    """`o = a @ w2[e]` per expert -> `[I, H]`."""
    return grouped_mm(a_IF, w2_EFH, counts, offs)


def linear2_backward(
    dz_IH: torch.Tensor,
    h_I2F: torch.Tensor,
    weight_I: torch.Tensor,
    w2_EFH: torch.Tensor,
    counts: Sequence[int],
    offs: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward of `z = weight * (swiglu(h) @ w2)` for the gradient `dz` of each item's row.

    Returns:
        da `[I, F]` (x's dtype), dw2 `[E, F, H]`, dweight `[I]` (weight's dtype).
    """
    a_IF = swiglu(h_I2F)
    g_IF = grouped_mm(dz_IH, w2_EFH.transpose(1, 2), counts, offs)  # dz @ w2^T
    dweight_I = (g_IF.to(weight_I.dtype) * a_IF.to(weight_I.dtype)).sum(dim=1)
    wcol = weight_I.unsqueeze(1)
    da_IF = (g_IF.to(weight_I.dtype) * wcol).to(h_I2F.dtype)
    do_IH = (dz_IH.to(weight_I.dtype) * wcol).to(dz_IH.dtype)
    dw2 = grouped_mm_wgrad(a_IF, do_IH, counts, offs)
    return da_IF, dw2, dweight_I


def linear1_backward(
    dh_I2F: torch.Tensor,
    x_IH: torch.Tensor,
    w1_EH2F: torch.Tensor,
    counts: Sequence[int],
    offs: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Backward of `h = x @ w1[e]`. Returns dx `[I, H]` and dw1 `[E, H, 2F]`."""
    dx_IH = grouped_mm(dh_I2F, w1_EH2F.transpose(1, 2), counts, offs)
    dw1 = grouped_mm_wgrad(x_IH, dh_I2F, counts, offs)
    return dx_IH, dw1
