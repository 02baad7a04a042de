"""Oracle tests of the wave engine's exchanges on Gloo ranks, piece by piece as
`ep.pipeline.WaveExperts` runs them: `sender_plan`, `pack_rows`, then the transport's
all-to-all of each wave's regions; for all three wave maps (token waves, expert waves,
expert waves with dedup across waves).

- Rank tags: each rank fills its tokens' rows with its rank id (and the token's id in one
  column). Every region a rank receives must hold exactly what its source should have sent
  there, worked out here from the global routing (not from the plan): the source's
  tokens with a route to this rank in that wave, in token order, then padding (slot tables
  all -1); each real row's data is the source's rank id, its slot table the local experts
  (and weights) of the slots it serves here, and with dedup each slot's place among the
  rows that return its touch.
- Dispatch then combine is the identity, and so is its gradient: with identity experts
  (each item's output is its row), the owner sums each touch's items with their routing
  weights into the touch's returned row (`return_items`' tables with dedup; without it a
  touch is its row) and sends it back, and the sender un-permutes (`reduce_rows` over
  `plan.back_row`). With integer-valued x and dy and slot weights 2^j, every sum is exact:
  each returned row must be `(sum of its touch's slot weights) * x[t]`, and
  `y == (2^k - 1) * x` (a slot dropped or counted twice changes it). The mirror (dy out
  to the returned rows, `w * dz` per item, summed per touch, sent back into the returned
  rows) must give `dx == (2^k - 1) * dy` and each slot's weight gradient `<dy[t], x[t]>`.
"""
import pytest
import torch

from ep.kernels import gather_rows, gather_rows_into, gather_slots, reduce_rows
from ep.layout import RowLayout
from ep.plan import WaveMap, pack_rows, return_items, returned_slot_values, sender_plan, wave_items, wave_slots
from ep.transport import TorchDistTransport
from tests.cases import make_problem
from tests.world import run_world

LOCAL_EXPERTS = 4


def _maps():
    for W in (1, 2, 4):
        yield WaveMap(W)
        yield WaveMap(W, by_experts=True)
        yield WaveMap(W, by_experts=True, dedup=True)


def _problem(n, k, seed):
    p = make_problem(n, k=k, local_experts=LOCAL_EXPERTS, routing="skewed", tokens="one_empty", seed=seed)
    return p, max(p.tokens_per_rank)


def _plan(p, rank, wave_map, max_tokens, weights):
    idx = p.topk_idx[p.rows(rank)]
    return sender_plan(idx, weights, p.E, len(p.tokens_per_rank), wave_map, wave_map.capacity(max_tokens),
                       max_tokens)


def _slot_waves(idx_TK, wave_map):
    """Reference wave of each (token, slot), from the definitions in `ep.plan`'s docstring."""
    T, k = idx_TK.shape
    W = wave_map.num_waves
    if wave_map.by_experts:
        return (idx_TK % LOCAL_EXPERTS) * W // LOCAL_EXPERTS
    return (torch.arange(T) * W // max(T, 1)).unsqueeze(1).expand(T, k)


def _expected_region(idx_TK, wave_map, dest, wave):
    """What a source with routing `idx_TK` sends rank `dest` in `wave`: per row in token order,
    (token, ids [k], back [k] or None). With dedup a token travels in the first wave of its
    slots at `dest` and its row serves them all; `back` is each slot's place among the
    tokens with a touch at (dest, that slot's wave)."""
    rank, waves = idx_TK // LOCAL_EXPERTS, _slot_waves(idx_TK, wave_map)
    here = rank == dest
    rows = []
    for t in range(idx_TK.shape[0]):
        if not here[t].any():
            continue
        first = int(waves[t][here[t]].min())
        if wave_map.dedup:
            if first != wave:
                continue
            served = here[t]
        else:
            served = here[t] & (waves[t] == wave)
            if not served.any():
                continue
        ids = torch.where(served, idx_TK[t] % LOCAL_EXPERTS, -1)
        back = None
        if wave_map.dedup:
            back = torch.full_like(ids, -1)
            for j in served.nonzero().flatten().tolist():
                v = int(waves[t, j])
                touches = [u for u in range(idx_TK.shape[0]) if (here[u] & (waves[u] == v)).any()]
                back[j] = touches.index(t)
        rows.append((t, ids, back))
    return rows


def check_rank_tags(rank, n):
    transport = TorchDistTransport()
    H, regions = 5, 0
    for k in (1, 3):
        for wave_map in _maps():
            p, T_max = _problem(n, k, seed=10 * wave_map.num_waves + k)
            rows = p.rows(rank)
            T = rows.stop - rows.start
            w = p.topk_weights[rows]
            plan = _plan(p, rank, wave_map, T_max, w)
            layout = RowLayout(H, k, torch.float64)
            x = torch.full((T, H), float(rank), dtype=torch.float64)
            x[:, 1] = torch.arange(T, dtype=torch.float64)  # the token id rides along
            send = layout.empty(plan.num_waves * plan.rows_per_wave, "cpu")
            pack_rows(x, w, plan, layout, send)
            cap, splits = plan.capacity, [plan.capacity] * n
            transport.reserve(cap)
            for wave in range(plan.num_waves):
                recv = layout.empty(plan.rows_per_wave, "cpu")
                transport.all_to_all(recv, send[plan.wave_rows(wave)], splits, splits, f"tags wave {wave}", cap,
                                     plan.region_rows[wave]).wait()
                for src in range(n):
                    region = recv[src * cap:(src + 1) * cap]
                    src_rows = p.rows(src)
                    want = _expected_region(p.topk_idx[src_rows], wave_map, rank, wave)
                    where = f"{wave_map} k={k}: wave {wave} from rank {src}"
                    assert len(want) <= cap, f"{where}: {len(want)} routes over the capacity {cap}"
                    data, ids = layout.data(region), layout.ids(region)
                    for q, (t, want_ids, want_back) in enumerate(want):
                        assert data[q, 0] == src and torch.all(data[q, 2:] == src), f"{where}: row {q} {data[q]}"
                        assert data[q, 1] == t, f"{where}: row {q} holds token {data[q, 1]}, not {t}"
                        assert torch.equal(ids[q].long(), want_ids), f"{where}: row {q} ids {ids[q]} != {want_ids}"
                        want_w = torch.where(want_ids >= 0, p.topk_weights[src_rows][t], 0)
                        assert torch.equal(layout.weights(region)[q], want_w), f"{where}: row {q} weights"
                        if want_back is not None:
                            got = layout.back(region)[q].long()
                            assert torch.equal(got, want_back), f"{where}: row {q} back {got} != {want_back}"
                    assert torch.all(ids[len(want):] == -1), f"{where}: padding rows with slots"
                    assert torch.all(layout.status(region)[:len(want)] == 0), f"{where}: status"
                    regions += 1
    return regions


@pytest.mark.parametrize("n", [2, 4])
def test_rank_tagged_tokens(n):
    counts = run_world(n, check_rank_tags)
    assert counts == [2 * 3 * (1 + 2 + 4) * n] * n  # k in (1, 3) x 3 splits x their waves x n sources


def _round_trip(p, rank, n, wave_map, T_max, transport):
    """Forward (dispatch, identity experts, combine) and its mirror, as `WaveExperts` runs them."""
    rows = p.rows(rank)
    T, k, H = rows.stop - rows.start, p.k, p.H
    g = torch.Generator().manual_seed(rank)
    x = torch.randint(-64, 65, (T, H), generator=g).double()
    dy = torch.randint(-64, 65, (T, H), generator=g).double()
    w = (2.0 ** torch.arange(k, dtype=torch.float64)).expand(T, k).contiguous()
    plan = _plan(p, rank, wave_map, T_max, w)
    layout = RowLayout(H, k, torch.float64)
    W, N, cap = plan.num_waves, plan.rows_per_wave, plan.capacity
    splits = [cap] * n
    transport.reserve(cap)

    send = layout.empty(W * N, "cpu")
    pack_rows(x, w, plan, layout, send)
    recv = layout.empty(W * (N + 1), "cpu").view(W, N + 1, layout.width)
    recv[:, N].zero_()
    layout.ids(recv[:, N]).fill_(-1)
    stacked = recv.view(-1, layout.width)
    back = x.new_empty(W * N, H)
    recv_dy = x.new_empty(W, N + 1, H)
    recv_dy[:, N].zero_()
    back_dx = layout.empty(W * N, "cpu")
    send_dy = x.new_empty(W * N, H)
    gather_rows_into(dy, plan.back_token, send_dy)
    for wave in range(W):
        transport.all_to_all(recv[wave, :N], send[plan.wave_rows(wave)], splits, splits, "dispatch", cap,
                             plan.region_rows[wave]).wait()
    for wave in range(W):
        first, count = plan.candidate_rows(wave)
        cand = stacked[first:first + count + 1]
        it = wave_items(wave_slots(plan, layout, cand[:count], wave), layout.weights(cand[:count]),
                        plan.num_local_experts, plan.item_capacity(wave))
        if wave_map.dedup:
            back_item, back_weight, item_back = return_items(plan, layout, cand[:count], first, it)
        else:
            back_item, back_weight, item_back = it.slot_item, layout.weights(cand[:N]), it.item_row
        x_I = gather_rows(layout.data(cand), it.item_row)  # identity experts: each item's output is its row
        sums = x.new_empty(N, H)
        reduce_rows(x_I, back_item, sums, back_weight)
        transport.all_to_all(back[plan.wave_rows(wave)], sums, splits, splits, "combine", cap).wait()
        # the mirror: dy to the returned rows, w * dz per item, summed per touch, back to the sender
        transport.all_to_all(recv_dy[wave, :N], send_dy[plan.wave_rows(wave)], splits, splits, "combine backward",
                             cap, plan.back_region_rows[wave]).wait()
        dz_I = gather_rows(recv_dy[wave], item_back)
        used = torch.arange(it.item_row.shape[0]) < it.count
        weight_I = torch.where(used, it.item_weight, 0)
        rows_dx = layout.empty(N, "cpu")
        reduce_rows(dz_I * weight_I.unsqueeze(1), back_item, layout.data(rows_dx))
        gather_slots((dz_I * x_I).sum(1), back_item, layout.weights(rows_dx))
        transport.all_to_all(back_dx[plan.wave_rows(wave)], rows_dx, splits, splits, "dispatch backward", cap).wait()
    y, dx = torch.empty_like(x), torch.empty_like(x)
    reduce_rows(back, plan.back_row, y)
    reduce_rows(layout.data(back_dx), plan.back_row, dx)
    dw = returned_slot_values(plan, layout.weights(back_dx))
    return plan, x, dy, w, back, y, dx, dw


def check_identity(rank, n):
    transport = TorchDistTransport()
    cases = 0
    for k in (1, 2, 4):
        for wave_map in _maps():
            p, T_max = _problem(n, k, seed=100 + 10 * wave_map.num_waves + k)
            plan, x, dy, w, back, y, dx, dw = _round_trip(p, rank, n, wave_map, T_max, transport)
            where = f"{wave_map} k={k}"
            idx = p.topk_idx[p.rows(rank)]
            column = _slot_waves(idx, wave_map) * n + idx // LOCAL_EXPERTS
            if plan.back_row.shape[1] == n:  # a touch per rank
                column = idx // LOCAL_EXPERTS
            for t in range(x.shape[0]):  # each touch's returned row: its slots' weights times x[t]
                for c in range(plan.back_row.shape[1]):
                    row = int(plan.back_row[t, c])
                    scale = w[t][column[t] == c].sum()
                    assert (row >= 0) == bool(scale), f"{where}: token {t} touch {c} row {row}"
                    if row >= 0:
                        assert torch.equal(back[row], scale * x[t]), f"{where}: token {t} touch {c}"
            total = float(2 ** k - 1)
            assert torch.equal(y, total * x), f"{where}: y != (2^k - 1) x, max err {(y - total * x).abs().max()}"
            assert torch.equal(dx, total * dy), f"{where}: dx != (2^k - 1) dy"
            assert torch.equal(dw, (dy * x).sum(1, keepdim=True).expand_as(dw)), f"{where}: weight gradients"
            cases += 1
    return cases


@pytest.mark.parametrize("n", [2, 4])
def test_dispatch_combine_identity(n):
    assert run_world(n, check_identity) == [3 * 9] * n
