"""The token-wave plan's index math on hand-derived cases (one process), the row layout, and
the token-wave engine's bounds on Gloo ranks (errors on every rank, never a silent drop)."""
import pytest
import torch

import ep
from ep.checks import ROWS_OVER, STATUS_SLOTS, InputError
from ep.chunks import expert_major, pack_rows, sender_plan, wave_capacity, wave_items, wave_tokens
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
    plan = sender_plan(idx, None, num_experts=4, num_ranks=2, num_waves=2, capacity=2)
    # region (w, d) starts at (w*2 + d) * 2; in each region the wave's tokens for d, in order
    assert plan.route_row.tolist() == [[0, 2], [1, -1], [-1, 6], [4, 7]]
    assert plan.row_token.tolist() == [0, 1, 0, -1, 3, -1, 2, 3]
    assert plan.status.tolist() == [0] * STATUS_SLOTS
    assert plan.region_rows.tolist() == [[2, 1], [1, 2]]  # the routes placed first in each region
    # one row per region: the second route of a region does not fit, and is counted
    small = sender_plan(idx, None, 4, 2, 2, capacity=1)
    assert small.route_row.tolist() == [[0, 1], [-1, -1], [-1, 3], [2, -1]]
    assert small.status[ROWS_OVER].item() == 2
    assert small.region_rows.tolist() == [[1, 1], [1, 1]]  # never more than the capacity


def test_region_rows_send_the_status_row_of_a_region_without_routes():
    # rank 1 owns experts 2, 3: no token of wave 0 goes there, and no token at all in wave 1
    # of rank 0; the first row of each region still carries the sender's status
    idx = torch.tensor([[0, 1], [1, 0], [0, 1], [1, 0]])
    assert sender_plan(idx, None, 4, 2, 2, capacity=2).region_rows.tolist() == [[2, 1], [2, 1]]
    empty = torch.empty(0, 2, dtype=torch.int64)  # a rank with no tokens in a call where others have some
    assert sender_plan(empty, None, 4, 2, 2, capacity=3).region_rows.tolist() == [[1, 1], [1, 1]]
    assert sender_plan(empty, None, 4, 2, 2, capacity=0).region_rows.tolist() == [[0, 0], [0, 0]]


def test_slot_tables_by_hand():
    idx = torch.tensor([[0, 3], [1, 0], [2, 3], [3, 1]])
    w = torch.tensor([[0.5, 0.25], [0.125, 1.0], [2.0, 4.0], [8.0, 16.0]], dtype=torch.float64)
    plan = sender_plan(idx, w, 4, 2, 2, capacity=2)
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
    """Received rows carrying these slot tables (float64 rows: the torch path)."""
    layout = RowLayout(hidden=4, top_k=ids.shape[1], dtype=torch.float64)
    rows = layout.empty(ids.shape[0], "cpu")
    layout.ids(rows).copy_(ids)
    layout.weights(rows).copy_(weights)
    return layout, rows


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
    order, rows, offs = expert_major([a, b], rows_per_wave=3, num_local_experts=2)
    assert order.tolist() == [0, 1, 2, 8, 9, 3, 4, 5, 10, 11, 6, 7, 12, 13, 14, 15]
    # wave b's rows from 4 = N + 1; unused items (past each wave's count) last, row 0
    assert rows.tolist() == [3, 0, 2, 7, 4, 3, 0, 1, 7, 6, 0, 0, 0, 0, 0, 0]
    assert offs.tolist() == [5, 10]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
def test_row_layout_parts_do_not_overlap(dtype):
    layout = RowLayout(hidden=7, top_k=3, dtype=dtype)
    rows = layout.empty(5, "cpu")
    layout.data(rows).fill_(1.5)
    layout.weights(rows).fill_(0.25)
    layout.ids(rows).fill_(-7)
    layout.status(rows).fill_(9)
    assert (layout.data(rows) == 1.5).all() and (layout.weights(rows) == 0.25).all()
    assert (layout.ids(rows) == -7).all() and (layout.status(rows) == 9).all()
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
