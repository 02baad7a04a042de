"""An independent, plainly written, single-process float64 MoE: the oracle for the tests.

It shares no code with `ep`: routing, SwiGLU and the weighted sum are written out here.
"""
from __future__ import annotations

import torch


def reference_routing(x, router_weight, top_k, score_func="softmax", norm_topk=True, bias=None, n_group=1,
                      topk_group=1, scaling=1.0):
    """x `[T, H]`, router_weight `[E, H]` -> (topk_idx `[T, k]`, topk_weights `[T, k]`).

    bias `[E]`: added to the scores to choose only. n_group/topk_group: a token chooses
    from the topk_group groups whose two best biased scores sum highest.
    """
    logits = x @ router_weight.T
    if score_func == "softmax":
        scores = torch.exp(logits - logits.max(dim=1, keepdim=True).values)
        scores = scores / scores.sum(dim=1, keepdim=True)
    elif score_func == "sigmoid":
        scores = 1.0 / (1.0 + torch.exp(-logits))
    else:  # sqrtsoftplus
        scores = torch.log1p(torch.exp(logits)) ** 0.5
    choice = scores.detach().clone()
    if bias is not None:
        choice = choice + bias.double()
    T, E = choice.shape
    idx = torch.topk(choice, top_k, dim=1).indices if n_group == 1 else torch.empty(T, top_k, dtype=torch.int64)
    size = E // n_group
    for t in range(T if n_group > 1 else 0):  # group-limited: written out per token
        groups = sorted(range(n_group), key=lambda g: -float(choice[t, g * size:(g + 1) * size].sort().values[-2:].sum())
                        if size > 1 else -float(choice[t, g]))[:topk_group]
        allowed = [e for g in groups for e in range(g * size, (g + 1) * size)]
        best = sorted(allowed, key=lambda e: -float(choice[t, e]))[:top_k]
        idx[t] = torch.tensor(best)
    weights = torch.gather(scores, 1, idx)
    if norm_topk:
        weights = weights / weights.sum(dim=1, keepdim=True)
    return idx, weights * scaling


def _swiglu(h, F, limit):
    gate, up = h[..., :F], h[..., F:]
    if limit is not None:
        gate = torch.minimum(gate, torch.tensor(limit, dtype=h.dtype))
        up = torch.maximum(torch.minimum(up, torch.tensor(limit, dtype=h.dtype)), torch.tensor(-limit, dtype=h.dtype))
    return gate / (1.0 + torch.exp(-gate)) * up


def reference_moe(x, w1, w2, topk_idx, topk_weights, swiglu_limit=None, shared_w1=None, shared_w2=None):
    """y[t] = sum_j w[t, j] * (silu(x[t] @ w1g[e]) * (x[t] @ w1u[e])) @ w2[e], e = idx[t, j]
    (+ the shared expert's `swiglu(x @ shared_w1) @ shared_w2` when given).

    x `[T, H]`, w1 `[E, H, 2F]` (gate columns first), w2 `[E, F, H]`: all global experts.
    swiglu_limit: gate clamped above, up clamped to +-limit, before the activation.
    """
    F = w2.shape[1]
    y = torch.zeros_like(x)
    for j in range(topk_idx.shape[1]):
        e = topk_idx[:, j]
        h = torch.einsum("th,thf->tf", x, w1[e])
        a = _swiglu(h, F, swiglu_limit)
        y = y + topk_weights[:, j:j + 1] * torch.einsum("tf,tfh->th", a, w2[e])
    if shared_w1 is not None:
        y = y + _swiglu(x @ shared_w1, shared_w2.shape[0], swiglu_limit) @ shared_w2
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
