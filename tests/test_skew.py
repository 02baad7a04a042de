"""Skewed routing on 4 Gloo ranks: the layer still gives the float64 reference's output and
every gradient (input, experts, routing weights), for both wave splits (token waves; expert
waves with and without dedup across waves) and W in {1, 2, 4}.

Routings: "powerlaw4" (power-law expert loads, max/mean about 4) and "hot" (every token
picks expert 0: one rank's experts get every token of every rank, the worst case the
fixed-size buffers must hold at `capacity_factor=1` without raising). The load ratio is
checked too, so the routing really is skewed. What the skew does not change: every tensor of
this rank's plan (`ep.plan.sender_plan`) has the shape it has under uniform routing of the
same tokens, and so has every wave's item bound: memory is fixed by the token bound alone.
"""
import dataclasses

import pytest
import torch

from ep.plan import WaveMap, sender_plan
from tests.cases import make_problem, rel_err
from tests.test_layer import build_layer, run_layer, run_reference
from tests.world import run_world

SPLITS = (("tokens", True), ("experts", True), ("experts", False))  # (wave_split, dedup_across_waves)


def _shapes(idx, E, n, wave_map, max_tokens):
    plan = sender_plan(idx, None, E, n, wave_map, wave_map.capacity(max_tokens), max_tokens)
    shapes = {f.name: tuple(getattr(plan, f.name).shape) for f in dataclasses.fields(plan)
              if isinstance(getattr(plan, f.name), torch.Tensor)}
    return shapes, [plan.item_capacity(w) for w in range(wave_map.num_waves)]


def check_skew(rank, n, routing):
    p = make_problem(n, k=4 if routing == "powerlaw4" else 2, local_experts=4, routing=routing, seed=11,
                     tokens_range=(30, 60))
    loads = torch.bincount(p.topk_idx.flatten(), minlength=p.E).double()
    ref = run_reference(p, n, rank)
    failures = []
    for split, dedup in SPLITS:
        for W in (1, 2, 4):
            got = run_layer(build_layer(p, n, rank, W, dedup_across_waves=dedup, wave_split=split), p, rank)
            for name, want in ref.items():
                if want is not None and not rel_err(got[name], want) <= 1e-10:
                    failures.append(f"{routing} {split} dedup={dedup} W={W} {name}: {rel_err(got[name], want):.2e}")
            wave_map = WaveMap.of(split, W, dedup)
            idx = p.topk_idx[p.rows(rank)]
            g = torch.Generator().manual_seed(rank)
            uniform = torch.stack([torch.randperm(p.E, generator=g)[:p.k] for _ in range(idx.shape[0])])
            T_max = max(p.tokens_per_rank)
            if _shapes(idx, p.E, n, wave_map, T_max) != _shapes(uniform, p.E, n, wave_map, T_max):
                failures.append(f"{routing} {split} dedup={dedup} W={W}: the plan's sizes depend on the routing")
    assert not failures, "\n".join(failures)
    return (loads.max() / loads.mean()).item()


@pytest.mark.parametrize("routing", ["powerlaw4", "hot"])
def test_skewed_routing(routing):
    ratios = run_world(4, check_skew, routing, timeout_s=120)
    if routing == "powerlaw4":
        assert 3.0 <= ratios[0] <= 5.5, f"max/mean load {ratios[0]:.2f}, wanted about 4"
    else:  # every token at expert 0: its load is all the tokens
        assert ratios[0] > 4.0
