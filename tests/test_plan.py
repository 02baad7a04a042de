"""Single-process tests of the plan's index math on small hand-derived cases."""
import pytest
import torch

from ep.plan import block_transpose_index, first_slot_of_channel, wave_bounds
from ep.plan_exchange import make_plan
from ep.transport import LocalTransport


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
