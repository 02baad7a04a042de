"""Oracle tests of the stages on Gloo ranks: rank tags, and dispatch-then-combine identity."""
import pytest
import torch

from ep import stages
from ep.kernels import gather_rows
from ep.plan_exchange import make_plan
from ep.transport import TorchDistTransport
from tests.cases import make_problem
from tests.world import run_world


def _routing(n, rank, k, seed):
    p = make_problem(n, k=k, routing="skewed", tokens="one_empty", seed=seed)
    rows = p.rows(rank)
    return p, p.topk_idx[rows], p.topk_weights[rows]


def check_rank_tags(rank, n):
    """Each rank fills its rows with its rank id; every received segment carries its source."""
    transport = TorchDistTransport()
    for W in (1, 2, 4):
        for k in (1, 3):
            p, idx, _ = _routing(n, rank, k, seed=W * 10 + k)
            plan = make_plan(idx, p.E, W, transport)
            x = torch.full((idx.shape[0], 5), float(rank), dtype=torch.float64)
            x[:, 1] = torch.arange(idx.shape[0], dtype=torch.float64)  # token id rides along
            received_total = 0
            rows_all = stages.received_rows(plan, x)
            for w in range(W):
                recv = stages.dispatch(x, rows_all, plan, w, transport).wait()
                start = 0
                for src, count in enumerate(plan.recv_counts[w]):
                    seg = recv[start:start + count]
                    assert torch.all(seg[:, 0] == src), f"W={W} wave {w}: segment from {src} holds {seg[:, 0]}"
                    assert torch.all(seg[:, 2:] == src)
                    start += count
                received_total += start
            assert received_total == plan.num_rows_received
    return True


@pytest.mark.parametrize("n", [2, 4])
def test_rank_tagged_tokens(n):
    assert run_world(n, check_rank_tags) == [True] * n


def check_identity(rank, n):
    """dispatch -> identity experts -> combine with weights w gives y = (sum_j w_j) x, and the
    mirror (combine backward -> identity -> dispatch backward) gives dx = (sum_j w_j) dy."""
    transport = TorchDistTransport()
    for W in (1, 2, 4):
        for k in (1, 2, 4):
            p, idx, tw = _routing(n, rank, k, seed=100 + W * 10 + k)
            for weights, across in ((torch.ones_like(tw), True), (tw, True), (tw, False)):
                plan = make_plan(idx, p.E, W, transport, weights, dedup_across_waves=across)
                x = p.x[p.rows(rank)]
                dy = p.dy[p.rows(rank)]
                flat = plan.recv_weights
                rows_all, acc_all, back_all = (f(plan, x) for f in (
                    stages.received_rows, stages.return_accumulator, stages.returned_rows))
                dz_all, dacc_all, dback_all = (f(plan, x) for f in (
                    stages.received_rows, stages.return_accumulator, stages.returned_rows))
                for w in range(W):
                    i0, i1 = plan.item_range(w)
                    t = plan.touch_slice(w)
                    stages.dispatch(x, rows_all, plan, w, transport).wait()
                    items = gather_rows(rows_all, plan.item_row[i0:i1])
                    stages.combine(items, plan.touch_weights[t], acc_all, back_all, plan, w, transport).wait()
                    stages.combine_backward(dy, dz_all, plan, w, transport).wait()
                    ditems = gather_rows(dz_all, plan.item_row[i0:i1]) * flat[plan.item_slot_flat[i0:i1]].unsqueeze(1)
                    stages.dispatch_backward(ditems, dacc_all, dback_all, plan, w, transport).wait()
                y, dx = torch.empty_like(x), torch.empty_like(x)
                stages.unpermute(back_all, plan, y)
                stages.unpermute(dback_all, plan, dx)
                scale = weights.sum(dim=1, keepdim=True)
                torch.testing.assert_close(y, scale * x, rtol=1e-13, atol=1e-13)
                torch.testing.assert_close(dx, scale * dy, rtol=1e-13, atol=1e-13)
                if torch.equal(weights, torch.ones_like(weights)):
                    # unit weights: the exact round trip of every route, summed k times
                    torch.testing.assert_close(y, k * x, rtol=1e-14, atol=0)
                # the plan carried each weight to its owner; the mirror exchange brings it back
                round_trip = stages.exchange_weight_grads(flat, plan, transport)
                torch.testing.assert_close(round_trip, weights.to(torch.float64), rtol=0, atol=0)
    return True


@pytest.mark.parametrize("n", [2, 4])
def test_dispatch_combine_identity(n):
    assert run_world(n, check_identity) == [True] * n
