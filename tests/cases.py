"""Shared test data: one global problem, identical on every rank, and a rank's share of it."""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch


@dataclass
class Problem:
    H: int
    F: int
    E: int
    k: int
    tokens_per_rank: List[int]
    x: torch.Tensor  # [sum T, H]
    dy: torch.Tensor  # [sum T, H]
    router: torch.Tensor  # [E, H]
    w1: torch.Tensor  # [E, H, 2F]
    w2: torch.Tensor  # [E, F, H]
    topk_idx: Optional[torch.Tensor] = None  # [sum T, k] when routing is given
    topk_weights: Optional[torch.Tensor] = None

    def rows(self, rank: int) -> slice:
        start = sum(self.tokens_per_rank[:rank])
        return slice(start, start + self.tokens_per_rank[rank])


def make_problem(
    n: int,
    k: int,
    local_experts: int = 4,
    H: int = 12,
    F: int = 10,
    tokens: str = "uneven",
    routing: str = "router",
    seed: int = 0,
    dtype=torch.float64,
    tokens_range: tuple = (5, 23),
    tokens_per_rank: Optional[List[int]] = None,
) -> Problem:
    """A global problem, the same on every rank (its own generator).

    tokens: "uneven" (token counts that are multiples of nothing), "one_empty" (rank 1
        sends no tokens), "none" (no rank has tokens).
    routing: "router" (the layer routes), "skewed" (given, power-law over experts),
        "starve" (given, no token picks any of rank n-1's experts), "hot" (given, every
        token picks expert 0 and k-1 others), "powerlaw4" (given, power-law loads with
        max/mean about 4).
    """
    g = torch.Generator().manual_seed(seed)
    E = n * local_experts
    if tokens_per_rank is not None:
        counts = list(tokens_per_rank)
    elif tokens == "none":
        counts = [0] * n
    else:
        counts = [int(c) for c in torch.randint(*tokens_range, (n,), generator=g)]
        if tokens == "one_empty":
            counts[1 % n] = 0
    T = sum(counts)
    x = torch.randn(T, H, generator=g, dtype=dtype)
    dy = torch.randn(T, H, generator=g, dtype=dtype)
    router = torch.randn(E, H, generator=g, dtype=dtype) * 0.7
    w1 = torch.randn(E, H, 2 * F, generator=g, dtype=dtype) / H ** 0.5
    w2 = torch.randn(E, F, H, generator=g, dtype=dtype) / F ** 0.5
    p = Problem(H, F, E, k, counts, x, dy, router, w1, w2)
    if routing != "router":
        p.topk_idx = skewed_routing(T, E, k, routing, g, n)
        p.topk_weights = torch.rand(T, k, generator=g, dtype=dtype) + 0.1
    return p


def power_law_probs(E: int, k: int, max_over_mean: float) -> torch.Tensor:
    """Expert probabilities 1/(i+1)^a, with a chosen so that drawing k distinct experts per
    token gives expert loads with max/mean = max_over_mean (an expert is picked by a token
    with probability about 1 - (1 - p)^k; the mean load is k/E per token)."""
    lo, hi = 0.0, 16.0
    ranks = torch.arange(1, E + 1, dtype=torch.float64)
    for _ in range(60):
        a = (lo + hi) / 2
        p = ranks ** -a
        p /= p.sum()
        top = 1 - (1 - p.max().item()) ** k
        lo, hi = (a, hi) if top * E / k < max_over_mean else (lo, a)
    return p


def skewed_routing(T: int, E: int, k: int, kind: str, g: torch.Generator, n: int = 1) -> torch.Tensor:
    """`[T, k]` distinct expert ids per token, drawn with the skew `kind` names."""
    if kind == "hot":
        rest = torch.stack([torch.randperm(E - 1, generator=g)[: k - 1] + 1 for _ in range(T)]) if T else \
            torch.empty(0, k - 1, dtype=torch.int64)
        return torch.cat([torch.zeros(T, 1, dtype=torch.int64), rest.view(T, k - 1)], dim=1)
    if kind == "powerlaw4":
        probs = power_law_probs(E, k, 4.0)
    else:
        probs = 1.0 / torch.arange(1, E + 1, dtype=torch.float64) ** 1.2
    probs = probs[torch.randperm(E, generator=g)]
    if kind == "starve":
        probs[E - E // n:] = 0
    return torch.multinomial(probs.expand(max(T, 1), E), k, replacement=False, generator=g)[:T]


def rel_err(a: torch.Tensor, b: torch.Tensor, floor: float = 1e-3) -> float:
    """||a - b|| / max(||b||, floor).

    The floor keeps a quantity that is zero up to rounding (the router's gradient at k=1
    with renormalised weights, whose weights are identically 1) from dividing rounding
    noise by rounding noise; the tests' tensors are O(1), far above it.
    """
    if a.shape != b.shape:
        raise AssertionError(f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    num = (a.double() - b.double()).norm().item()
    return num / max(b.double().norm().item(), floor)


def load_weights(layer, p: Problem, rank: int, n: int):
    """The problem's router and this rank's experts copied into `layer` (returned)."""
    El = p.E // n
    with torch.no_grad():
        layer.router.weight.copy_(p.router)
        layer.experts.w1.copy_(p.w1[rank * El:(rank + 1) * El])
        layer.experts.w2.copy_(p.w2[rank * El:(rank + 1) * El])
    return layer
