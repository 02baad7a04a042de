"""Skewed routing: results stay right and memory stays bounded by the tokens routed."""
import dataclasses

import pytest
import torch

from ep.plan_exchange import make_plan
from ep.transport import TorchDistTransport
from tests.cases import make_problem, rel_err
from tests.test_layer import build_layer, run_layer, run_reference
from tests.world import run_world


def plan_sizes_bounded(plan, T, k):
    """Every tensor of the plan is sized by the routed work, never by T x E or n x capacity."""
    allowed = {T * k, T, plan.num_routes_sent, plan.num_rows_received, plan.num_rows_received * k,
               sum(plan.items_per_expert), sum(plan.touch_counts), sum(plan.touch_counts) * k}
    allowed |= {plan.wave_bounds[w + 1] - plan.wave_bounds[w] for w in range(plan.num_waves)}
    for f in dataclasses.fields(plan):
        values = getattr(plan, f.name)
        for t in values if isinstance(values, tuple) else (values,):
            if isinstance(t, torch.Tensor):
                assert t.numel() in allowed, f"plan.{f.name} has {t.numel()} elements, not one of {sorted(allowed)}"


def check_skew(rank, n, routing):
    p = make_problem(n, k=4 if routing == "powerlaw4" else 2, local_experts=4, routing=routing, seed=11,
                     tokens_range=(30, 60))
    loads = torch.bincount(p.topk_idx.flatten(), minlength=p.E).double()
    ref = run_reference(p, n, rank)
    for W in (1, 2, 4):
        got = run_layer(build_layer(p, n, rank, W), p, rank)
        for name, want in ref.items():
            if want is not None:
                assert rel_err(got[name], want) <= 1e-10, f"{routing} W={W} {name}"
        rows = p.rows(rank)
        plan = make_plan(p.topk_idx[rows], p.E, W, TorchDistTransport(), p.topk_weights[rows])
        plan_sizes_bounded(plan, rows.stop - rows.start, p.k)
    return (loads.max() / loads.mean()).item()


@pytest.mark.parametrize("routing", ["powerlaw4", "hot"])
def test_skewed_routing(routing):
    ratios = run_world(4, check_skew, routing, timeout_s=120)
    if routing == "powerlaw4":
        assert 3.0 <= ratios[0] <= 5.5, f"max/mean load {ratios[0]:.2f}, wanted about 4"
    else:  # every token at expert 0: its load is all the tokens
        assert ratios[0] > 4.0
