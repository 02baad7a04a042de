"""The layer on Gloo CPU ranks against the independent float64 reference."""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.distributed as dist

import ep
from tests.cases import load_weights, make_problem, rel_err
from tests.reference import reference_moe, reference_routing
from tests.world import run_world

TOL = 1e-10


def build_layer(p, n, rank, num_waves, score_func="softmax", norm_topk=True, dedup_across_waves=True,
                wave_split="tokens", **knobs):
    cfg = ep.MoEConfig(
        hidden=p.H, ffn_hidden=p.F, num_experts=p.E, top_k=p.k, num_waves=num_waves,
        score_func=score_func, norm_topk=norm_topk, dedup_across_waves=dedup_across_waves, wave_split=wave_split,
        **knobs,
    )
    return load_weights(ep.ExpertParallelMoE(cfg).double(), p, rank, n)


def run_layer(layer, p, rank):
    """Forward and backward of this rank's share; returns y and every gradient."""
    rows = p.rows(rank)
    x = p.x[rows].clone().requires_grad_(True)
    if p.topk_idx is None:
        y = layer(x)
        tw = None
    else:
        tw = p.topk_weights[rows].clone().requires_grad_(True)
        y = layer(x, topk_idx=p.topk_idx[rows], topk_weights=tw)
    y.backward(p.dy[rows])
    router_grad = layer.router.weight.grad
    router_grad = torch.zeros_like(layer.router.weight) if router_grad is None else router_grad.clone()
    dist.all_reduce(router_grad)  # replicated parameter: each rank's grad is from its tokens
    return dict(
        y=y.detach(), dx=x.grad, dw1=layer.experts.w1.grad, dw2=layer.experts.w2.grad,
        drouter=router_grad, dweights=None if tw is None else tw.grad,
    )


def run_reference(p, n, rank, score_func="softmax", norm_topk=True):
    x = p.x.clone().requires_grad_(True)
    router = p.router.clone().requires_grad_(True)
    w1 = p.w1.clone().requires_grad_(True)
    w2 = p.w2.clone().requires_grad_(True)
    if p.topk_idx is None:
        idx, tw = reference_routing(x, router, p.k, score_func, norm_topk)
    else:
        idx, tw = p.topk_idx, p.topk_weights.clone().requires_grad_(True)
    y = reference_moe(x, w1, w2, idx, tw)
    y.backward(p.dy)
    rows, El = p.rows(rank), p.E // n
    experts = slice(rank * El, (rank + 1) * El)
    return dict(
        y=y.detach()[rows], dx=x.grad[rows], dw1=w1.grad[experts], dw2=w2.grad[experts],
        drouter=router.grad if p.topk_idx is None else torch.zeros_like(router),
        dweights=None if p.topk_idx is None else tw.grad[rows],
    )


def check_matrix(rank, n, cases):
    """Every case: the layer (each W) against the reference; W>1 against W=1."""
    failures = []
    for case in cases:
        score_func = case.pop("score_func", "softmax")
        norm_topk = case.pop("norm_topk", True)
        across = case.pop("dedup_across_waves", True)
        split = case.pop("wave_split", "tokens")
        p = make_problem(n, **case)
        ref = run_reference(p, n, rank, score_func, norm_topk)
        first = None
        for W in (1, 2, 4):
            got = run_layer(build_layer(p, n, rank, W, score_func, norm_topk, across, split), p, rank)
            for name, want in ref.items():
                if want is None:
                    continue
                err = rel_err(got[name], want)
                if not err <= TOL:
                    failures.append(f"{case} W={W} {name}: rel err {err:.3e} vs reference")
            if first is None:
                first = got
            else:
                for name, want in first.items():
                    if want is not None and not rel_err(got[name], want) <= TOL:
                        failures.append(f"{case} W={W} {name} differs from W=1")
    assert not failures, "\n".join(failures)
    return len(cases)


def _cases(seed):
    cases = []
    for i, (k, tokens, routing) in enumerate(
        itertools.product((1, 2, 4), ("uneven", "one_empty"), ("router", "skewed", "starve"))
    ):
        cases.append(dict(k=k, tokens=tokens, routing=routing, seed=seed + i))
    cases.append(dict(k=2, tokens="uneven", routing="router", score_func="sigmoid", norm_topk=False, seed=seed + 99))
    cases.append(dict(k=4, tokens="uneven", routing="router", score_func="sigmoid", norm_topk=True, seed=seed + 98))
    # the expert-wave engine: both deduplication modes
    for i, (k, routing) in enumerate(itertools.product((1, 2, 4), ("router", "skewed", "starve"))):
        cases.append(dict(k=k, tokens="one_empty", routing=routing, wave_split="experts", seed=seed + 50 + i))
    for k in (1, 2, 4):
        cases.append(dict(k=k, tokens="one_empty", routing="skewed", dedup_across_waves=False, wave_split="experts",
                          seed=seed + 90 + k))
    return cases


@pytest.mark.parametrize("n", [2, 4, 8])
def test_layer_matches_reference(n):
    """Forward and all gradients, W in {1,2,4}, k in {1,2,4}, uneven / empty-rank tokens,
    router / skewed / starved-rank routing, softmax and sigmoid; token and expert waves."""
    out = run_world(n, check_matrix, _cases(seed=10 * n), timeout_s=300)
    assert out == [len(_cases(0))] * n


def check_no_tokens_anywhere(rank, n):
    p = make_problem(n, k=2, tokens="none")
    for W, split in itertools.product((1, 4), ("tokens", "experts")):
        got = run_layer(build_layer(p, n, rank, W, wave_split=split), p, rank)
        assert got["y"].shape == (0, p.H)
        assert torch.count_nonzero(got["dw1"]) == 0 and torch.count_nonzero(got["dw2"]) == 0
    return True


def test_no_tokens_on_any_rank():
    assert run_world(2, check_no_tokens_anywhere) == [True, True]


def check_deterministic(rank, n):
    """20 repeats of forward and backward, per W: bitwise identical outputs and gradients."""
    for routing, split in itertools.product(("router", "skewed"), ("tokens", "experts")):
        p = make_problem(n, k=4, routing=routing, seed=5)
        for W in (1, 2, 4):
            first = run_layer(build_layer(p, n, rank, W, wave_split=split), p, rank)
            for _ in range(19):
                again = run_layer(build_layer(p, n, rank, W, wave_split=split), p, rank)
                for name in first:
                    if first[name] is not None:
                        assert torch.equal(first[name], again[name]), \
                            f"{split} {routing} W={W} {name} not bitwise identical"
    return True


def test_same_seed_bitwise_identical():
    assert run_world(4, check_deterministic) == [True] * 4


def check_trains(rank, n):
    """A toy regression: fit a fixed random target map with a few Adam steps."""
    torch.manual_seed(1234)  # same router init on all ranks; experts differ by rank below
    cfg = ep.MoEConfig(hidden=16, ffn_hidden=16, num_experts=2 * n, top_k=2, num_waves=2)
    layer = ep.ExpertParallelMoE(cfg).double()
    g = torch.Generator().manual_seed(77)
    target_map = torch.randn(16, 16, generator=g, dtype=torch.float64) / 4
    torch.manual_seed(rank)
    x = torch.randn(32, 16, dtype=torch.float64)
    target = torch.tanh(x @ target_map)
    opt = torch.optim.Adam(layer.parameters(), lr=3e-2)
    losses = []
    for _ in range(12):
        opt.zero_grad()
        loss = ((layer(x) - target) ** 2).mean()
        loss.backward()
        dist.all_reduce(layer.router.weight.grad)
        layer.router.weight.grad /= n
        opt.step()
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        losses.append(mean_loss.item() / n)
    assert losses[-1] < 0.5 * losses[0], f"loss did not fall: {losses}"
    return losses


def test_layer_trains_on_four_ranks():
    losses = run_world(4, check_trains)
    assert all(l == losses[0] for l in losses)  # the mean loss is the same number everywhere


def test_a_given_transport_is_the_one_used():
    """`ExpertParallelMoE(config, transport=...)`: the layer moves its rows through that
    transport (here one that counts its calls) and sizes itself from its world."""
    from ep.transport import LocalTransport

    class Counting(LocalTransport):
        calls = 0

        def all_to_all(self, *args, **kwargs):
            Counting.calls += 1
            return super().all_to_all(*args, **kwargs)

    tr = Counting()
    cfg = ep.MoEConfig(hidden=8, ffn_hidden=4, num_experts=4, top_k=2, num_waves=2)
    layer = ep.ExpertParallelMoE(cfg, transport=tr).double()
    assert layer.transport is tr and layer.experts.w1.shape[0] == 4
    x = torch.randn(6, 8, dtype=torch.float64)
    y = layer(x)
    want = reference_moe(x, layer.experts.w1, layer.experts.w2, *reference_routing(x, layer.router.weight, 2))
    assert rel_err(y, want) < 1e-10
    assert Counting.calls == 4  # dispatch and combine of each of the 2 waves
