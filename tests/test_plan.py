"""The wave plan's index math on hand-derived cases (one process; token and expert wave
maps, with and without dedup across waves), the row layout, and the engine's bounds on
Gloo ranks (errors on every rank, never a silent drop)."""
import pytest
import torch

import ep
from ep.checks import ROWS_OVER, STATUS_SLOTS, InputError
from ep.plan import WaveMap, expert_major, pack_rows, return_items, sender_plan, wave_capacity, wave_items, wave_slots, wave_tokens
from ep.layout import RowLayout
from tests.world import run_world


def test_wave_tokens_and_capacity():
    assert wave_tokens(10, 4) == (0, 3, 5, 8, 10)
    assert [t * 4 // 10 for t in range(10)] == [0, 0, 0, 1, 1, 2, 2, 2, 3, 3]  # the device formula agrees
    assert wave_tokens(2, 4) == (0, 1, 1, 2, 2)  # fewer tokens than waves: empty waves
    assert wave_capacity(10, 4) == 3 and wave_capacity(12, 4) == 3
    assert wave_capacity(100, 1, 0.3) == 30 and wave_capacity(3, 1, 0.01) == 1 and wave_capacity(0, 2) == 0


def test_sender_plan_by_hand():
    # n=2 ranks, E=4 (2 per rank), k=2, W=2, T=4: waves are tokens {0, 1} and {2, 3}
    idx = torch.tensor([[0, 3], [1, 0], [2, 3], [3, 1]])
    plan = sender_plan(idx, None, num_experts=4, num_ranks=2, wave_map=WaveMap(2), capacity=2, max_tokens=4)
    # region (w, d) starts at (w*2 + d) * 2; in each region the wave's tokens for d, in order
    assert plan.route_row.tolist() == [[0, 2], [1, -1], [-1, 6], [4, 7]]
    assert plan.row_token.tolist() == [0, 1, 0, -1, 3, -1, 2, 3]
    assert plan.status.tolist() == [0] * STATUS_SLOTS
    assert plan.region_rows.tolist() == [[2, 1], [1, 2]]  # the routes placed first in each region
    assert plan.back_row is plan.route_row and plan.back_token is plan.row_token  # a route is its touch
    # one row per region: the second route of a region does not fit, and is counted
    small = sender_plan(idx, None, 4, 2, WaveMap(2), capacity=1, max_tokens=4)
    assert small.route_row.tolist() == [[0, 1], [-1, -1], [-1, 3], [2, -1]]
    assert small.status[ROWS_OVER].item() == 2
    assert small.region_rows.tolist() == [[1, 1], [1, 1]]  # never more than the capacity


def test_region_rows_send_the_status_row_of_a_region_without_routes():
    # rank 1 owns experts 2, 3: no token of wave 0 goes there, and no token at all in wave 1
    # of rank 0; the first row of each region still carries the sender's status
    idx = torch.tensor([[0, 1], [1, 0], [0, 1], [1, 0]])
    assert sender_plan(idx, None, 4, 2, WaveMap(2), capacity=2, max_tokens=4).region_rows.tolist() == [[2, 1], [2, 1]]
    empty = torch.empty(0, 2, dtype=torch.int64)  # a rank with no tokens in a call where others have some
    assert sender_plan(empty, None, 4, 2, WaveMap(2), capacity=3, max_tokens=6).region_rows.tolist() == [[1, 1], [1, 1]]
    assert sender_plan(empty, None, 4, 2, WaveMap(2), capacity=0, max_tokens=0).region_rows.tolist() == [[0, 0], [0, 0]]


def test_slot_tables_by_hand():
    idx = torch.tensor([[0, 3], [1, 0], [2, 3], [3, 1]])
    w = torch.tensor([[0.5, 0.25], [0.125, 1.0], [2.0, 4.0], [8.0, 16.0]], dtype=torch.float64)
    plan = sender_plan(idx, w, 4, 2, WaveMap(2), capacity=2, max_tokens=4)
    layout = RowLayout(hidden=3, top_k=2, dtype=torch.float64)
    rows = layout.empty(8, "cpu")
    x = torch.arange(12, dtype=torch.float64).view(4, 3)
    pack_rows(x, w, plan, layout, rows)
    # row 2 is token 0 at rank 1: its slot 1 (expert 3 = rank 1's local 1) is served there
    assert layout.ids(rows).tolist() == [[0, -1], [1, 0], [-1, 1], [-1, -1], [-1, 1], [-1, -1], [0, 1], [1, -1]]
    assert layout.weights(rows)[2].tolist() == [0.0, 0.25] and layout.weights(rows)[7].tolist() == [8.0, 0.0]
    used = plan.row_token >= 0
    assert torch.equal(layout.data(rows)[used], x[plan.row_token[used]])
    assert (layout.status(rows) == 0).all()


def received(ids, weights):
    """The slot tables of received rows (float64: the torch path)."""
    return ids, weights.to(torch.float64)


def test_wave_items_by_hand():
    ids = torch.tensor([[1, 0], [-1, 1], [0, -1]], dtype=torch.int32)
    w = torch.tensor([[0.1, 0.2], [0.3, 0.4], [0.5, 0.6]], dtype=torch.float64)
    it = wave_items(*received(ids, w), num_local_experts=2, item_capacity=8)
    # expert 0: its anchor, (row 0, slot 1), (row 2, slot 0); expert 1: anchor, (0, 0), (1, 1)
    assert it.offs.tolist() == [3, 6]
    assert it.item_row.tolist() == [3, 0, 2, 3, 0, 1, 3, 3]  # 3 = N: the zero row
    assert it.item_weight.tolist() == [0, 0.2, 0.5, 0, 0.1, 0.4, 0, 0]
    assert it.item_expert.tolist() == [0, 0, 0, 1, 1, 1, 2, 2]
    assert it.slot_item.tolist() == [[4, 1], [-1, 5], [2, -1]]


def test_expert_major_by_hand():
    a = wave_items(*received(torch.tensor([[1, 0], [-1, 1], [0, -1]], dtype=torch.int32), torch.ones(3, 2)), 2, 8)
    b = wave_items(*received(torch.tensor([[0, -1], [-1, -1], [-1, 1]], dtype=torch.int32), torch.ones(3, 2)), 2, 8)
    rows = [a.item_row, b.item_row + 4]  # wave b's rows from 4 = N + 1 in the stack
    order, x_rows, dz_rows, offs = expert_major([a, b], rows, rows, num_local_experts=2)
    assert order.tolist() == [0, 1, 2, 8, 9, 3, 4, 5, 10, 11, 6, 7, 12, 13, 14, 15]
    # unused items (past each wave's count) last, row 0
    assert x_rows.tolist() == [3, 0, 2, 7, 4, 3, 0, 1, 7, 6, 0, 0, 0, 0, 0, 0]
    assert torch.equal(x_rows, dz_rows)
    assert offs.tolist() == [5, 10]


# n=2 ranks, E=8 (4 per rank), k=3, W=2 expert waves: local experts {0, 1} are wave 0 and
# {2, 3} wave 1, so global experts 0, 1, 4, 5 are wave 0 and 2, 3, 6, 7 wave 1
EXPERT_IDX = torch.tensor([[0, 3, 4], [2, 1, 6], [7, 5, 3]])


def test_expert_waves_without_dedup_by_hand():
    # a route per (wave, rank): column w * n + d of the route table
    plan = sender_plan(EXPERT_IDX, None, 8, 2, WaveMap(2, by_experts=True), capacity=3, max_tokens=3)
    # token 0: (w0, d0) expert 0, (w1, d0) expert 3, (w0, d1) expert 4
    # token 1: (w1, d0) 2, (w0, d0) 1, (w1, d1) 6; token 2: (w1, d1) 7, (w0, d1) 5, (w1, d0) 3
    # region (w, d) starts at (w * 2 + d) * 3
    assert plan.route_row.tolist() == [[0, 3, 6, -1], [1, -1, 7, 9], [-1, 4, 8, 10]]
    assert plan.row_token.tolist() == [0, 1, -1, 0, 2, -1, 0, 1, 2, 1, 2, -1]
    assert plan.region_rows.tolist() == [[2, 2], [3, 2]]
    assert plan.back_row is plan.route_row
    layout = RowLayout(hidden=2, top_k=3, dtype=torch.float64)
    rows = layout.empty(12, "cpu")
    pack_rows(torch.zeros(3, 2, dtype=torch.float64), None, plan, layout, rows)
    # a row serves only its wave's slots: row 6 is token 0 at rank 0 in wave 1 (expert 3 = local 3)
    assert layout.ids(rows).tolist() == [
        [0, -1, -1], [-1, 1, -1], [-1] * 3, [-1, -1, 0], [-1, 1, -1], [-1] * 3,
        [-1, 3, -1], [2, -1, -1], [-1, -1, 3], [-1, -1, 2], [3, -1, -1], [-1] * 3]
    assert plan.item_capacity(0) == 6 * 2 + 4  # a row serves at most 2 experts of a wave


def test_expert_waves_with_dedup_by_hand():
    plan = sender_plan(EXPERT_IDX, None, 8, 2, WaveMap(2, by_experts=True, dedup=True), capacity=3, max_tokens=3)
    # a route per rank, in the first wave of the token's slots there: token 0 -> d0 in w0
    # (experts 0, 3), d1 in w0 (4); token 1 -> d0 in w0 (2, 1), d1 in w1 (6);
    # token 2 -> d0 in w1 (3), d1 in w0 (7, 5)
    assert plan.route_row.tolist() == [[0, 3], [1, 9], [6, 4]]
    assert plan.row_token.tolist() == [0, 1, -1, 0, 2, -1, 2, -1, -1, 1, -1, -1]
    # touches per (wave, rank), as without dedup: they come back in their own wave
    assert plan.back_row.tolist() == [[0, 3, 6, -1], [1, -1, 7, 9], [-1, 4, 8, 10]]
    assert plan.back_token.tolist() == [0, 1, -1, 0, 2, -1, 0, 1, 2, 1, 2, -1]
    layout = RowLayout(hidden=2, top_k=3, dtype=torch.float64)
    rows = layout.empty(12, "cpu")
    pack_rows(torch.zeros(3, 2, dtype=torch.float64), None, plan, layout, rows)
    ids, back = layout.ids(rows), layout.back(rows)
    # row 0: token 0 at rank 0 with both its slots there (waves 0 and 1) and each slot's
    # returned row in its wave's region: expert 0 -> row 0 of (w0, d0), expert 3 -> row 0 of (w1, d0)
    assert ids[0].tolist() == [0, 3, -1] and back[0].tolist() == [0, 0, -1]
    # row 1: token 1 at rank 0: expert 2 (wave 1, returned row 1 of (w1, d0)), expert 1 (wave 0, row 1)
    assert ids[1].tolist() == [2, 1, -1] and back[1].tolist() == [1, 1, -1]
    # row 4: token 2 at rank 1 in wave 0: experts 7 (local 3, wave 1) and 5 (local 1, wave 0)
    assert ids[4].tolist() == [3, 1, -1] and back[4].tolist() == [1, 1, -1]
    # rank 0 as the owner of wave 1, with what source 0 (this plan's rank) sent it: its
    # candidates are both waves' received rows, each wave followed by its zero row (source
    # 1's regions left empty here)
    N = plan.rows_per_wave
    stacked = layout.empty(2 * (N + 1), "cpu")
    layout.ids(stacked).fill_(-1)
    layout.weights(stacked).zero_()
    stacked[0:3] = rows[0:3]  # region (w0, d0) of source 0
    stacked[N + 1:N + 4] = rows[6:9]  # region (w1, d0) of source 0
    first, count = plan.candidate_rows(1)
    assert (first, count) == (0, 2 * (N + 1) - 1)
    cand = stacked[first:first + count]
    ids_w1 = wave_slots(plan, layout, cand, 1)
    assert ids_w1[0].tolist() == [-1, 3, -1] and ids_w1[1].tolist() == [2, -1, -1]  # wave 0's slots masked
    it = wave_items(ids_w1, layout.weights(cand), 4, plan.item_capacity(1))
    back_item, _, item_back = return_items(plan, layout, cand, first, it)
    # source 0's touches of (w1, d0): token 0 (its expert 3) and token 1 (its expert 2) from
    # wave 0's rows, returned in rows 0 and 1; token 2 (expert 3) arrived in wave 1 (candidate
    # row N + 1), returned in row 2
    assert back_item[0].tolist() == [-1, it.slot_item[0, 1].item(), -1]
    assert back_item[1].tolist() == [it.slot_item[1, 0].item(), -1, -1]
    assert back_item[2].tolist() == [-1, -1, it.slot_item[N + 1, 2].item()]
    assert item_back[it.slot_item[0, 1]].item() == 0 and item_back[it.slot_item[1, 0]].item() == 1
    assert (back_item[3:] == -1).all()  # nothing from source 1
    assert it.count.item() == 3 + 4  # three items and the four anchors


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
def test_row_layout_parts_do_not_overlap(dtype):
    layout = RowLayout(hidden=7, top_k=3, dtype=dtype)
    rows = layout.empty(5, "cpu")
    layout.data(rows).fill_(1.5)
    layout.weights(rows).fill_(0.25)
    layout.ids(rows).fill_(-7)
    layout.back(rows).fill_(5)
    layout.status(rows).fill_(9)
    assert (layout.data(rows) == 1.5).all() and (layout.weights(rows) == 0.25).all()
    assert (layout.ids(rows) == -7).all() and (layout.back(rows) == 5).all() and (layout.status(rows) == 9).all()
    assert layout.width * rows.element_size() % (16 * rows.element_size()) == 0  # whole 16-element groups


def check_overflow_raises_everywhere(rank, n):
    # every token of rank 1 picks experts on rank 0 only; a capacity of 1/4 of a wave cannot hold them
    cfg = ep.MoEConfig(hidden=8, ffn_hidden=6, num_experts=2 * n, top_k=2, capacity_factor=0.25)
    layer = ep.ExpertParallelMoE(cfg).double()
    x = torch.randn(12, 8, dtype=torch.float64)
    idx = torch.tensor([[0, 1]] * 12)
    w = torch.full((12, 2), 0.5, dtype=torch.float64)
    with pytest.raises(InputError, match=r"rank \d: \d+ routes \(token, rank\) did not fit"):
        layer(x, topk_idx=idx, topk_weights=w)
    return True


def check_max_tokens(rank, n):
    cfg = ep.MoEConfig(hidden=8, ffn_hidden=6, num_experts=2 * n, top_k=2, max_tokens=10)
    layer = ep.ExpertParallelMoE(cfg).double()
    x = torch.randn(10, 8, dtype=torch.float64)
    assert layer(x).shape == x.shape  # at the bound: fine, with no host exchange
    too_many = torch.randn(11 if rank == 1 else 4, 8, dtype=torch.float64)
    with pytest.raises(InputError, match=r"rank 1: x: 11 tokens, more than MoEConfig.max_tokens=10"):
        layer(too_many)
    return layer(x).shape == x.shape  # and the group still works


def test_capacity_overflow_raises_on_every_rank():
    assert run_world(2, check_overflow_raises_everywhere) == [True, True]


def test_max_tokens_bound_raises_on_every_rank():
    assert run_world(2, check_max_tokens) == [True, True]
