"""An independent, plainly written, single-process float64 MoE: the oracle for the tests.

It shares no code with `ep`: routing, SwiGLU and the weighted sum are written out here.
"""
from __future__ import annotations

import torch


def reference_routing(x, router_weight, top_k, score_func="softmax", norm_topk=True):
    """x `[T, H]`, router_weight `[E, H]` -> (topk_idx `[T, k]`, topk_weights `[T, k]`)."""
    logits = x @ router_weight.T
    if score_func == "softmax":
        scores = torch.exp(logits - logits.max(dim=1, keepdim=True).values)
        scores = scores / scores.sum(dim=1, keepdim=True)
    else:
        scores = 1.0 / (1.0 + torch.exp(-logits))
    weights, idx = torch.topk(scores, top_k, dim=1)
    if norm_topk:
        weights = weights / weights.sum(dim=1, keepdim=True)
    return idx, weights


def reference_moe(x, w1, w2, topk_idx, topk_weights):
    """y[t] = sum_j w[t, j] * (silu(x[t] @ w1g[e]) * (x[t] @ w1u[e])) @ w2[e], e = idx[t, j].

    x `[T, H]`, w1 `[E, H, 2F]` (gate columns first), w2 `[E, F, H]`: all global experts.
    """
    F = w2.shape[1]
    y = torch.zeros_like(x)
    for j in range(topk_idx.shape[1]):
        e = topk_idx[:, j]
        h = torch.einsum("th,thf->tf", x, w1[e])
        gate, up = h[:, :F], h[:, F:]
        a = gate / (1.0 + torch.exp(-gate)) * up
        y = y + topk_weights[:, j:j + 1] * torch.einsum("tf,tfh->th", a, w2[e])
    return y


def reference_moe_by_expert(x, w1, w2, topk_idx, topk_weights):
    """The same function as `reference_moe`, one expert at a time: memory O(T x F) instead of
    O(T x H x F), for shapes where gathering every token's weights does not fit (the README's)."""
    F = w2.shape[1]
    y = torch.zeros_like(x)
    for e in range(w1.shape[0]):
        t, j = (topk_idx == e).nonzero(as_tuple=True)
        if t.numel() == 0:
            continue
        h = x[t] @ w1[e]
        gate, up = h[:, :F], h[:, F:]
        a = gate / (1.0 + torch.exp(-gate)) * up
        y = y.index_add(0, t, topk_weights[t, j].unsqueeze(1) * (a @ w2[e]))
    return y
