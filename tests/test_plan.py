"""Single-process tests of the plan's index math on small hand-derived cases (a world of n ranks
simulated in one process for the pure steps; one Gloo world checks that simulation)."""
import dataclasses

import pytest
import torch

from ep.checks import IDX_RANGE, STATUS_SLOTS
from ep.count_table import CountTable, per_rank
from ep.plan import block_transpose_index, first_slot_of_channel, receiver_side, sender_routes, sender_side, wave_bounds
from ep.plan_exchange import make_plan
from ep.transport import LocalTransport
from tests.world import run_world


@pytest.mark.parametrize(
    "experts, waves, want",
    [(4, 1, (0, 4)), (4, 2, (0, 2, 4)), (5, 2, (0, 3, 5)), (4, 4, (0, 1, 2, 3, 4)), (7, 3, (0, 3, 5, 7))],
)
def test_wave_bounds(experts, waves, want):
    assert wave_bounds(experts, waves) == want


@pytest.mark.parametrize("waves", [0, 5])
def test_wave_bounds_rejects(waves):
    with pytest.raises(ValueError, match="num_waves"):
        wave_bounds(4, waves)


def test_block_transpose_index():
    # blocks (a, b), a-major: (0,0)=[0] (0,1)=[1,2] (1,0)=[3,4,5] (1,1)=[]
    # b-major: (0,0) (1,0) (0,1) (1,1)
    assert block_transpose_index([[1, 2], [3, 0]]).tolist() == [0, 3, 4, 5, 1, 2]
    assert block_transpose_index([[0, 0], [0, 0]]).tolist() == []


def test_block_transpose_index_round_trip():
    counts = [[2, 0, 1], [1, 3, 0]]
    fwd = block_transpose_index(counts)
    back = block_transpose_index([list(c) for c in zip(*counts)])
    assert fwd[back].tolist() == list(range(7))


def test_first_slot_of_channel():
    assert first_slot_of_channel(torch.tensor([[3, 1, 3, 2, 1]])).tolist() == [[0, 1, 0, 3, 1]]


def test_plan_by_hand_once_per_rank():
    """T=3, k=2, E=4, W=2 on one rank: experts 0,1 are wave 0 and 2,3 wave 1.

    token 0 -> experts 0 (wave 0) and 3 (wave 1): one route, out in wave 0, back in wave 1
    token 1 -> experts 1, 0: one route, out and back in wave 0
    token 2 -> experts 2, 3: one route, out and back in wave 1
    """
    topk_idx = torch.tensor([[0, 3], [1, 0], [2, 3]])
    plan = make_plan(topk_idx, num_experts=4, num_waves=2, transport=LocalTransport())
    assert plan.route_token.tolist() == [0, 1, 2]  # (first wave, dest, token)
    assert plan.send_counts == ((2,), (1,)) and plan.recv_counts == ((2,), (1,))
    assert plan.back_token.tolist() == [1, 0, 2]  # (last wave, dest, first wave, token)
    assert plan.back_counts == ((1,), (2,)) and plan.return_counts == ((1,), (2,))
    assert plan.slot_route_flat.tolist() == [[0, 1], [2, 3], [4, 5]]  # route * k + slot
    assert plan.return_row.tolist() == [1, 0, 2]  # row 1 is done after wave 0, rows 0, 2 after 1
    # items by expert: e0 <- (row0,slot0),(row1,slot1); e1 <- (row1,slot0);
    #                  e2 <- (row2,slot0); e3 <- (row0,slot1),(row2,slot1)
    assert plan.items_per_expert == (2, 1, 1, 2)
    assert plan.item_slot_flat.tolist() == [0, 3, 2, 4, 1, 5]
    assert plan.item_row.tolist() == [0, 1, 1, 2, 0, 2]  # row 0 serves waves 0 and 1
    assert plan.item_range(0) == (0, 3) and plan.item_range(1) == (3, 6)
    # un-permute: the slot opening each token's route points at its returned row
    assert plan.token_back_pos.tolist() == [[1, -1], [0, -1], [2, -1]]
    # touches (wave, row): w0 row0 {i0}, w0 row1 {i1, i2}, w1 row0 {i4}, w1 row2 {i3, i5};
    # items counted from their wave's first item (0 and 3)
    assert plan.touch_counts == (2, 2)
    assert plan.touch_row.tolist() == [0, 1, 0, 2]
    assert plan.touch_items.tolist() == [[0, -1], [1, 2], [1, -1], [0, 2]]
    assert plan.touch_slot_flat.tolist() == [[0, -1], [3, 2], [1, -1], [4, 5]]
    assert plan.touch_carry.tolist() == [False, False, True, False]  # row 0 carries w0's sum
    assert plan.touch_out.tolist() == [-1, 0, 0, 1]  # row 0 waits for w1; rows 1, 0, 2 leave


def test_plan_by_hand_once_per_rank_and_wave():
    """The same routing with a route per (token, rank, wave)."""
    topk_idx = torch.tensor([[0, 3], [1, 0], [2, 3]])
    plan = make_plan(topk_idx, 4, 2, LocalTransport(), dedup_across_waves=False)
    # routes: 0=(t0,w0) 1=(t1,w0) 2=(t0,w1) 3=(t2,w1)
    assert plan.route_token.tolist() == [0, 1, 0, 2]
    assert plan.send_counts == ((2,), (2,)) and plan.back_counts == ((2,), (2,))
    assert plan.back_token.tolist() == [0, 1, 0, 2]
    assert plan.slot_route_flat.tolist() == [[0, 5], [2, 3], [6, 7]]
    assert plan.return_row.tolist() == [0, 1, 2, 3]
    assert plan.item_slot_flat.tolist() == [0, 3, 2, 6, 5, 7]
    assert plan.item_row.tolist() == [0, 1, 1, 3, 2, 3]


def test_plan_weights_ride_along():
    topk_idx = torch.tensor([[0, 3], [1, 0], [2, 3]])
    w = torch.tensor([[0.1, 0.2], [0.3, 0.4], [0.5, 0.6]], dtype=torch.float64)
    plan = make_plan(topk_idx, 4, 2, LocalTransport(), topk_weights_TK=w)
    # received (row, slot) table = the token's weights (one rank: rows are tokens here)
    assert plan.recv_weights.tolist() == [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
    assert plan.recv_weights[plan.item_slot_flat].tolist() == [0.1, 0.4, 0.3, 0.5, 0.2, 0.6]


def test_plan_dropless_counts():
    """Every (token, slot) becomes exactly one item; routes are at most T * k."""
    g = torch.Generator().manual_seed(0)
    T, k, E = 37, 3, 12
    topk_idx = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    for W in (1, 2, 3, 4, 6, 12):
        for across in (True, False):
            plan = make_plan(topk_idx, num_experts=E, num_waves=W, transport=LocalTransport(), dedup_across_waves=across)
            assert sum(plan.items_per_expert) == T * k
            assert plan.items_per_expert == tuple(torch.bincount(topk_idx.flatten(), minlength=E).tolist())
            # one rank: a route per token, or per distinct (token, wave)
            waves = torch.tensor([e * W // E for e in range(E)])[topk_idx]
            distinct = T if across else sum(len(set(row)) for row in waves.tolist())
            assert plan.num_routes_sent == distinct == plan.num_rows_received
            assert sorted(plan.return_row.tolist()) == list(range(distinct))
        assert sorted(plan.item_slot_flat.tolist()) == sorted(set(plan.item_slot_flat.tolist()))


def test_plan_empty():
    plan = make_plan(torch.empty(0, 2, dtype=torch.int64), num_experts=4, num_waves=2, transport=LocalTransport())
    assert plan.num_routes_sent == 0 and plan.items_per_expert == (0, 0, 0, 0)


# ---- the pure steps, with a world of n ranks simulated in one process ----------------------
def simulate_world(routing, num_experts, num_waves, dedup_across_waves=True):
    """Every rank's plan from its `(topk_idx, topk_weights)`, the exchanges done by hand.

    Returns per rank the parsed counts and the plan.
    """
    n = len(routing)
    senders = [sender_side(idx, w, num_experts, n, num_waves, dedup_across_waves) for idx, w in routing]
    tables = [s.count_table for s in senders]
    # the count exchange: rank r receives row r of every rank's table
    counts = [s.layout.parse(tables[r].tolist(), [t[r].tolist() for t in tables]) for r, s in enumerate(senders)]
    routes = [sender_routes(s, c) for s, c in zip(senders, counts)]
    # the slot-table exchange: rank r receives its block of every rank's rank-major tables
    blocks = [r.slot_tables.split(per_rank(c.send_counts)) for r, c in zip(routes, counts)]
    plans = [
        receiver_side(senders[r], routes[r], counts[r], torch.cat([b[r] for b in blocks]))
        for r in range(n)
    ]
    return counts, plans


def _two_rank_routing():
    """n=2, E=4 (E_local=2), W=2, k=2: rank r owns experts 2r (wave 0) and 2r+1 (wave 1).

    rank 0: t0 -> experts 0, 3 (a route to each rank); t1 -> experts 2, 3 (one route to rank 1,
            out in wave 0, back in wave 1)
    rank 1: u0 -> experts 1, 2 (a route to each rank)
    """
    w0 = torch.tensor([[0.1, 0.2], [0.3, 0.4]], dtype=torch.float64)
    w1 = torch.tensor([[0.5, 0.6]], dtype=torch.float64)
    return [(torch.tensor([[0, 3], [2, 3]]), w0), (torch.tensor([[1, 2]]), w1)]


def test_count_table_by_hand():
    """Rank 0's count table: row r is [routes out per wave | back per wave | touches per wave |
    items per local expert of r | T | status]."""
    (idx, w), _ = _two_rank_routing()
    sender = sender_side(idx, w, num_experts=4, num_ranks=2, num_waves=2)
    zeros = [0] * STATUS_SLOTS
    assert sender.count_table.tolist() == [
        [1, 0, 1, 0, 1, 0, 1, 0, 2, *zeros],  # to rank 0: t0 (expert 0, wave 0)
        [1, 1, 0, 2, 1, 2, 1, 2, 2, *zeros],  # to rank 1: t1 (waves 0, 1), t0 (wave 1)
    ]


def test_pure_steps_by_hand_on_two_ranks():
    counts, (p0, p1) = simulate_world(_two_rank_routing(), num_experts=4, num_waves=2)
    c0, c1 = counts
    # rank 0 sends t0 to itself and t1 to rank 1 in wave 0, t0 to rank 1 in wave 1
    assert c0.send_counts == ((1, 1), (0, 1)) and c0.back_counts == ((1, 0), (0, 2))
    assert c0.recv_counts == ((1, 0), (0, 1)) and c0.return_counts == ((1, 0), (0, 1))
    assert c0.touch_counts == (1, 1) and c0.items_per_expert == (1, 1)
    assert c1.send_counts == ((0, 1), (1, 0)) and c1.back_counts == ((0, 1), (1, 0))
    assert c1.recv_counts == ((1, 1), (1, 0)) and c1.return_counts == ((0, 1), (2, 0))
    assert c1.touch_counts == (2, 2) and c1.items_per_expert == (2, 2)
    assert c0.max_tokens == c1.max_tokens == 2
    # rank 0's routes: (w0, r0, t0), (w0, r1, t1), (w1, r1, t0); back in the same order
    assert p0.route_token.tolist() == [0, 1, 0] and p0.back_token.tolist() == [0, 1, 0]
    assert p0.slot_route_flat.tolist() == [[0, 5], [2, 3]]
    assert p0.token_back_pos.tolist() == [[0, 2], [1, -1]]
    # rank 0 receives its own t0 (wave 0) and rank 1's u0 (wave 1), one item each
    assert p0.item_slot_flat.tolist() == [0, 2] and p0.return_row.tolist() == [0, 1]
    assert p0.recv_weights.tolist() == [0.1, 0.0, 0.5, 0.0]
    assert p0.touch_row.tolist() == [0, 1] and p0.touch_out.tolist() == [0, 0]
    # rank 1 receives, wave-major: t1 (from 0), u0 (from 1) in wave 0, then t0 (from 0) in wave 1
    assert p1.recv_weights.tolist() == [0.3, 0.4, 0.0, 0.6, 0.0, 0.2]
    assert p1.item_slot_flat.tolist() == [0, 3, 1, 5] and p1.item_row.tolist() == [0, 1, 0, 2]
    assert p1.return_row.tolist() == [1, 0, 2]  # u0 leaves after wave 0; t1, t0 after wave 1
    assert p1.touch_row.tolist() == [0, 1, 0, 2]
    assert p1.touch_items.tolist() == [[0, -1], [1, -1], [0, -1], [1, -1]]
    assert p1.touch_carry.tolist() == [False, False, True, False]  # t1 carries wave 0's sum
    assert p1.touch_out.tolist() == [-1, 0, 0, 1]
    assert p1.touch_weights.tolist() == [[0.3, 0.0], [0.6, 0.0], [0.4, 0.0], [0.2, 0.0]]


def test_count_table_round_trip():
    """Counts written at the layout's columns come back from the parser, on every rank."""
    g = torch.Generator().manual_seed(5)
    n, layout = 3, CountTable(num_waves=2, num_local_experts=3)
    groups = (layout.routes_out, layout.routes_back, layout.touches, layout.items,
              slice(layout.tokens, layout.tokens + 1), layout.status)
    assert [c for g_ in groups for c in range(g_.start, g_.stop)] == list(range(layout.width))  # they tile a row
    tables = torch.randint(0, 50, (n, n, layout.width), generator=g)  # [sender, receiver, column]
    tables[:, :, layout.tokens] = torch.tensor([7, 0, 11]).unsqueeze(1)  # a sender's T in each of its rows
    tables[:, :, layout.status] = tables[:, :1, layout.status]
    for r in range(n):
        c = layout.parse(tables[r].tolist(), tables[:, r].tolist())
        assert c.send_counts == tuple(map(tuple, tables[r][:, layout.routes_out].t().tolist()))
        assert c.back_counts == tuple(map(tuple, tables[r][:, layout.routes_back].t().tolist()))
        assert c.recv_counts == tuple(map(tuple, tables[:, r, layout.routes_out].t().tolist()))
        assert c.return_counts == tuple(map(tuple, tables[:, r, layout.routes_back].t().tolist()))
        assert c.touch_counts == tuple(tables[:, r, layout.touches].sum(0).tolist())
        assert c.items_per_expert == tuple(tables[:, r, layout.items].sum(0).tolist())
        assert c.max_tokens == 11
        assert c.status_by_rank == tuple(map(tuple, tables[:, 0, layout.status].tolist()))


def test_bad_input_status_reaches_every_rank():
    routing = _two_rank_routing()
    routing[1] = (torch.tensor([[1, 9]]), routing[1][1])  # rank 1: expert 9 is out of range
    n = len(routing)
    senders = [sender_side(idx, w, 4, n, 2) for idx, w in routing]
    for r, s in enumerate(senders):
        c = s.layout.parse(s.count_table.tolist(), [t.count_table[r].tolist() for t in senders])
        assert [row[IDX_RANGE] for row in c.status_by_rank] == [0, 1]


def test_host_status_travels_in_the_table():
    host = [0] * STATUS_SLOTS
    host[2] = 1
    sender = sender_side(torch.empty(0, 2, dtype=torch.int64), None, 4, 2, 2, host_status=host)
    layout = sender.layout
    assert sender.count_table[:, layout.status].tolist() == [host, host]
    assert sender.count_table[:, :layout.status.start].eq(0).all()  # no tokens, no counts


def _plan_lists(plan):
    return {f.name: (v.tolist() if isinstance(v, torch.Tensor) else
                     [t.tolist() for t in v] if f.name == "wave_offs" else v)
            for f in dataclasses.fields(plan) for v in [getattr(plan, f.name)]}


def _world_routing(n, E, k, seed):
    g = torch.Generator().manual_seed(seed)
    sizes = [int(t) for t in torch.randint(0, 15, (n,), generator=g)]
    return [(torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]) if T
             else torch.empty(0, k, dtype=torch.int64), torch.rand(T, k, generator=g, dtype=torch.float64))
            for T in sizes]


def _make_plans_on_rank(rank, n, E, W, k, seed):
    from ep.transport import TorchDistTransport

    idx, w = _world_routing(n, E, k, seed)[rank]
    return [_plan_lists(make_plan(idx, E, W, TorchDistTransport(), w, dedup_across_waves=across))
            for across in (True, False)]


def test_simulated_world_matches_make_plan_on_gloo():
    """The pure steps with the exchanges done by hand give the plans make_plan makes on a
    real group of 3 ranks, field for field."""
    n, E, W, k, seed = 3, 12, 2, 3, 7
    got = run_world(n, _make_plans_on_rank, E, W, k, seed)
    for i, across in enumerate((True, False)):
        _, plans = simulate_world(_world_routing(n, E, k, seed), E, W, across)
        assert [g[i] for g in got] == [_plan_lists(p) for p in plans], f"dedup_across_waves={across}"
