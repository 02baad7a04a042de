"""`SharedExperts`: the dense SwiGLU beside the routed experts (DeepSeek-V3/V4's shared experts).

Every token goes through it on its own rank: no communication. Its parameters are
replicated like the router's (their gradient on a rank comes from that rank's tokens).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .kernels.swiglu import swiglu_torch


class SharedExperts(nn.Module):
    """`y = swiglu(x @ w1) @ w2`, computed in plain torch ops (autograd saves what it needs).

    Parameters:
        w1: `[H, 2Fs]`, columns `[:Fs]` the gate and `[Fs:]` the up projection.
        w2: `[Fs, H]`.
    Args:
        swiglu_limit: None, or the clamp of gate (`max=limit`) and up (`-limit, limit`).
    """

    def __init__(self, hidden: int, ffn_hidden: int, swiglu_limit: Optional[float] = None) -> None:
        super().__init__()
        self.swiglu_limit = swiglu_limit
        self.w1 = nn.Parameter(torch.empty(hidden, 2 * ffn_hidden))
        self.w2 = nn.Parameter(torch.empty(ffn_hidden, hidden))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.w1, std=self.w1.shape[0] ** -0.5)
        nn.init.normal_(self.w2, std=self.w2.shape[0] ** -0.5)

    def forward(self, x_TH: torch.Tensor) -> torch.Tensor:
        """`x [T, H]` -> `[T, H]` in x's dtype."""
        return swiglu_torch(x_TH @ self.w1, self.swiglu_limit) @ self.w2
