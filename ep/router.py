"""Top-k router: `x [T, H]` -> `topk_idx [T, k]`, `topk_weights [T, k]`."""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .config import MoEConfig
from .dtypes import accumulate_dtype


class Router(nn.Module):
    """`router.weight [E, H]`: logits in at least fp32, softmax or sigmoid, `torch.topk`."""

    def __init__(self, config: MoEConfig) -> None:
        super().__init__()
        self.config = config
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.hidden))
        nn.init.normal_(self.weight, std=config.hidden ** -0.5)

    def forward(self, x_TH: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Returns `topk_idx [T, k]` int64 and `topk_weights [T, k]` in the logits' dtype."""
        acc = accumulate_dtype(self.weight.dtype)
        logits_TE = F.linear(x_TH.to(acc), self.weight.to(acc))
        if self.config.score_func == "softmax":
            scores_TE = logits_TE.softmax(dim=-1)
        else:
            scores_TE = logits_TE.sigmoid()
        topk_weights_TK, topk_idx_TK = torch.topk(scores_TE, self.config.top_k, dim=-1)
        if self.config.norm_topk:
            topk_weights_TK = topk_weights_TK / topk_weights_TK.sum(dim=-1, keepdim=True)
        return topk_idx_TK, topk_weights_TK
