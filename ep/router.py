"""Top-k router: `x [T, H]` -> `topk_idx [T, k]`, `topk_weights [T, k]`.

Scores, in at least fp32: softmax over all E, sigmoid, or sqrt(softplus) of the logits
`x @ router.weight.T`. The experts are chosen by the *biased* scores
(`scores + e_score_correction_bias`, DeepSeek's auxiliary-loss-free balancing), from the
`topk_group` best of `n_group` groups when groups are configured; the weights are the
chosen experts' *unbiased* scores, renormalised when `norm_topk`, times
`routed_scaling_factor`. Pure tensor math: no host sync (no .item(), no nonzero, no
boolean-mask indexing), so it can be captured in a CUDA graph.
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .config import MoEConfig
from .dtypes import accumulate_dtype

BIAS = "e_score_correction_bias"


class Router(nn.Module):
    """`router.weight [E, H]` and the selection bias `router.e_score_correction_bias [E]`
    (a float32 buffer, zeros by default; it stays float32 when the module is cast)."""

    def __init__(self, config: MoEConfig) -> None:
        super().__init__()
        self.config = config
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.hidden))
        self.register_buffer(BIAS, torch.empty(config.num_experts, dtype=torch.float32))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=self.config.hidden ** -0.5)
        with torch.no_grad():
            self.e_score_correction_bias.zero_()

    def _apply(self, fn, recurse=True):
        # `.double()`, `.bfloat16()`, `.to(dtype)` cast buffers too: the selection bias
        # follows the module's device only, and keeps its float32 values exactly
        bias = self._buffers.pop(BIAS)
        try:
            super()._apply(fn, recurse)
        finally:
            moved = fn(bias)
            self._buffers[BIAS] = moved if moved.dtype == torch.float32 else bias.to(moved.device)
        return self

    def scores(self, x_TH: torch.Tensor) -> torch.Tensor:
        """`[T, E]` scores in at least fp32 (float64 under float64), differentiable."""
        acc = accumulate_dtype(self.weight.dtype)
        logits_TE = F.linear(x_TH.to(acc), self.weight.to(acc))
        if self.config.score_func == "softmax":
            return logits_TE.softmax(dim=-1)
        if self.config.score_func == "sigmoid":
            return logits_TE.sigmoid()
        return F.softplus(logits_TE).sqrt()

    def weigh(self, scores_TE: torch.Tensor, topk_idx_TK: torch.Tensor) -> torch.Tensor:
        """The chosen experts' weights: their unbiased scores, renormalised when `norm_topk`,
        times `routed_scaling_factor` -> `[T, k]` (also for caller-chosen experts, e.g. the
        hash routing of DeepSeek-V4's first layers: `weigh(scores(x), tid2eid[ids])`)."""
        w_TK = scores_TE.gather(1, topk_idx_TK)
        if self.config.norm_topk:
            w_TK = w_TK / w_TK.sum(dim=-1, keepdim=True)
        if self.config.routed_scaling_factor != 1.0:
            w_TK = w_TK * self.config.routed_scaling_factor
        return w_TK

    def choose(self, scores_TE: torch.Tensor) -> torch.Tensor:
        """`[T, k]` int64: the top-k of the biased scores, within the best groups."""
        cfg = self.config
        choice_TE = scores_TE.detach() + self.e_score_correction_bias.to(scores_TE.dtype)
        if cfg.n_group > 1:
            T, G, size = choice_TE.shape[0], cfg.n_group, cfg.num_experts // cfg.n_group
            group_TG = choice_TE.view(T, G, size).topk(2, dim=-1).values.sum(dim=-1)
            best_TG = group_TG.topk(cfg.topk_group, dim=-1).indices
            keep_TG = torch.zeros_like(group_TG, dtype=torch.bool).scatter_(1, best_TG, True)
            keep_TE = keep_TG.unsqueeze(2).expand(T, G, size).reshape(T, cfg.num_experts)
            choice_TE = choice_TE.masked_fill(~keep_TE, float("-inf"))
        return torch.topk(choice_TE, cfg.top_k, dim=-1).indices

    def forward(self, x_TH: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Returns `topk_idx [T, k]` int64 and `topk_weights [T, k]` in the logits' dtype."""
        scores_TE = self.scores(x_TH)
        topk_idx_TK = self.choose(scores_TE)
        return topk_idx_TK, self.weigh(scores_TE, topk_idx_TK)
