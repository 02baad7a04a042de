"""Triton kernel for the sender side of the dispatch plan (CUDA).

One pass over `topk_idx [T, k]` (and the weights) does what ~45 small torch ops do in
`ep.plan`: for every (token, slot) its first slot on the same route, whether it opens
the route, the route's first and last wave, whether it opens a (route, wave) touch; the
input checks (ids out of range, repeated ids, NaN/Inf weights); and the counts the plan
exchanges, accumulated with integer atomics (exact, order-free) into the count table's
columns (`ep.count_table.CountTable`).
"""
from __future__ import annotations

import itertools
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl


@triton.jit
def _sender_kernel(
    idx_ptr, w_ptr, first_ptr, fw_ptr, lw_ptr, opens_touch_ptr, table_ptr, status_ptr,
    T, E, E_local, W, n, WIDTH, OUT, BACK, TOUCH, ITEMS,
    K: tl.constexpr, KP: tl.constexpr, HAS_W: tl.constexpr, ACROSS: tl.constexpr,
    SLOT_RANGE: tl.constexpr, SLOT_REPEAT: tl.constexpr, SLOT_NONFINITE: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    tok = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)  # [BT]
    slot = tl.arange(0, KP)  # [KP]
    valid = (tok[:, None] < T) & (slot[None, :] < K)  # [BT, KP]
    offs = tok[:, None].to(tl.int64) * K + slot[None, :]
    raw = tl.load(idx_ptr + offs, mask=valid, other=0)
    bad = valid & ((raw < 0) | (raw >= E))
    idx = tl.minimum(tl.maximum(raw, 0), E - 1)
    dest = idx // E_local
    wave = (idx % E_local) * W // E_local
    if ACROSS:
        chan = dest
    else:
        chan = wave * n + dest
    touch = wave * n + dest
    # pairwise over the token's slots: [BT, KP, KP] (j, j')
    vj = valid[:, :, None] & valid[:, None, :]
    same = (chan[:, :, None] == chan[:, None, :]) & vj
    jj = slot[None, None, :]
    first = tl.min(tl.where(same, jj, KP), axis=2)
    fw = tl.min(tl.where(same, wave[:, None, :], W), axis=2)
    lw = tl.max(tl.where(same, wave[:, None, :], -1), axis=2)
    same_t = (touch[:, :, None] == touch[:, None, :]) & vj
    first_t = tl.min(tl.where(same_t, jj, KP), axis=2)
    opens = valid & (first == slot[None, :])
    opens_t = valid & (first_t == slot[None, :])
    tl.store(first_ptr + offs, first.to(tl.int64), mask=valid)
    tl.store(fw_ptr + offs, fw.to(tl.int64), mask=valid)
    tl.store(lw_ptr + offs, lw.to(tl.int64), mask=valid)
    tl.store(opens_touch_ptr + offs, opens_t.to(tl.int8), mask=valid)
    # the count table's row for dest (columns given by the CountTable): routes out per first
    # wave, back per last wave, touches per wave, items per local expert
    row = table_ptr + dest * WIDTH
    one = tl.full([BLOCK_T, KP], 1, tl.int32)
    tl.atomic_add(row + OUT + fw, one, mask=opens)
    tl.atomic_add(row + BACK + lw, one, mask=opens)
    tl.atomic_add(row + TOUCH + wave, one, mask=opens_t)
    tl.atomic_add(row + ITEMS + idx % E_local, one, mask=valid)
    # checks, counted per token
    rep = (raw[:, :, None] == raw[:, None, :]) & vj & (slot[None, :, None] < slot[None, None, :])
    tok_ok = tok < T
    n_range = tl.sum(tl.sum(bad.to(tl.int32), axis=1), axis=0)  # entries, as the torch path counts
    n_rep = tl.sum(tl.where(tok_ok & (tl.max(tl.max(rep.to(tl.int32), axis=2), axis=1) > 0), 1, 0), axis=0)
    tl.atomic_add(status_ptr + SLOT_RANGE, n_range)
    tl.atomic_add(status_ptr + SLOT_REPEAT, n_rep)
    if HAS_W:
        w = tl.load(w_ptr + offs, mask=valid, other=0.0).to(tl.float32)
        nonfinite = valid & ((w != w) | (tl.abs(w) == float("inf")))
        n_nf = tl.sum(tl.where(tok_ok & (tl.max(nonfinite.to(tl.int32), axis=1) > 0), 1, 0), axis=0)
        tl.atomic_add(status_ptr + SLOT_NONFINITE, n_nf)


def sender_tables_triton(
    topk_idx: torch.Tensor, topk_weights: Optional[torch.Tensor], num_experts: int, layout, num_ranks: int,
    dedup_across_waves: bool, status_slots: int, slots: Tuple[int, int, int],
):
    """Returns first_TK, fw_TK, lw_TK (int64), opens_touch_TK (bool), the count table
    `[n, layout.width]` (int64, `layout` an `ep.count_table.CountTable`; its route, touch and
    item columns filled, the others 0) and the value checks `[status_slots]` (int64, slots
    (range, repeat, nonfinite))."""
    T, k = topk_idx.shape
    dev = topk_idx.device
    idx = topk_idx.to(torch.int64).contiguous()
    first = torch.empty(T, k, dtype=torch.int64, device=dev)
    fw, lw = torch.empty_like(first), torch.empty_like(first)
    opens_touch = torch.empty(T, k, dtype=torch.int8, device=dev)
    cells = num_ranks * layout.width
    counts = torch.zeros(cells + status_slots, dtype=torch.int32, device=dev)  # the table, then the status
    table, status = counts[:cells], counts[cells:]
    if T:
        kp = triton.next_power_of_2(k)
        block_t = max(1, min(64, 1024 // (kp * kp)))
        w = topk_weights.detach().contiguous() if topk_weights is not None else idx
        _sender_kernel[(triton.cdiv(T, block_t),)](
            idx, w, first, fw, lw, opens_touch, table, status,
            T, num_experts, layout.num_local_experts, layout.num_waves, num_ranks, layout.width,
            layout.routes_out.start, layout.routes_back.start, layout.touches.start, layout.items.start,
            K=k, KP=kp, HAS_W=topk_weights is not None, ACROSS=dedup_across_waves,
            SLOT_RANGE=slots[0], SLOT_REPEAT=slots[1], SLOT_NONFINITE=slots[2], BLOCK_T=block_t,
        )
    counts = counts.to(torch.int64)
    return first, fw, lw, opens_touch.bool(), counts[:cells].view(num_ranks, layout.width), counts[cells:]


# ---- the receiver side: two passes over the received slot tables ------------------------
@triton.jit
def _load_rows(table_ptr, order_ptr, b, R, E_local, W, K: tl.constexpr, KP: tl.constexpr, BR: tl.constexpr):
    """Rows `[b*BR, (b+1)*BR)` in row order: each slot's local expert (-1: none), its wave,
    its weight, and per row the first and last wave with an item."""
    row = b * BR + tl.arange(0, BR)
    slot = tl.arange(0, KP)
    m = (row[:, None] < R) & (slot[None, :] < K)
    src = tl.load(order_ptr + row, mask=row < R, other=0)  # row -> its place in the exchanged table
    at = (src[:, None] * K + slot[None, :]) * 2
    e = tl.load(table_ptr + at, mask=m, other=-1.0).to(tl.int32)
    wt = tl.load(table_ptr + at + 1, mask=m, other=0.0)
    valid = m & (e >= 0)
    wave = tl.where(valid, e * W // E_local, -1)
    lw = tl.max(wave, axis=1)
    fw = tl.min(tl.where(valid, wave, W), axis=1)
    return row, slot, m, e, wt, valid, wave, fw, lw


@triton.jit
def _receiver_count_kernel(
    table_ptr, order_ptr, source_ptr, weights_ptr, key_ptr, hist_ptr, R, E_local, W, n,
    K: tl.constexpr, KP: tl.constexpr, EP: tl.constexpr, WP: tl.constexpr, BR: tl.constexpr,
):
    b = tl.program_id(0)
    row, slot, m, e, wt, valid, wave, fw, lw = _load_rows(table_ptr, order_ptr, b, R, E_local, W, K, KP, BR)
    flat = row[:, None].to(tl.int64) * K + slot[None, :]
    tl.store(weights_ptr + flat, wt.to(weights_ptr.dtype.element_ty), mask=m)
    src = tl.load(source_ptr + row, mask=row < R, other=0)
    tl.store(key_ptr + row, lw.to(tl.int64) * n + src, mask=row < R)  # combine order: (last wave, source)
    ex = tl.arange(0, EP)
    wv = tl.arange(0, WP)
    has_e = (e[:, :, None] == ex[None, None, :]) & valid[:, :, None]  # [BR, KP, EP]
    items = tl.sum(tl.sum(has_e.to(tl.int32), axis=1), axis=0)  # items per expert in this block
    touches = tl.sum(tl.max(((wave[:, :, None] == wv[None, None, :]) & valid[:, :, None]).to(tl.int32), axis=1), axis=0)
    tl.store(hist_ptr + b * (E_local + W) + ex, items, mask=ex < E_local)
    tl.store(hist_ptr + b * (E_local + W) + E_local + wv, touches, mask=wv < W)


@triton.jit
def _receiver_place_kernel(
    table_ptr, order_ptr, base_ptr, return_pos_ptr, return_start_ptr, wave_first_ptr,
    item_slot_ptr, item_row_ptr, touch_row_ptr, touch_carry_ptr, touch_out_ptr,
    touch_items_ptr, touch_slot_ptr, touch_w_ptr, R, E_local, W,
    K: tl.constexpr, KP: tl.constexpr, EP: tl.constexpr, WP: tl.constexpr, BR: tl.constexpr,
):
    b = tl.program_id(0)
    row, slot, m, e, wt, valid, wave, fw, lw = _load_rows(table_ptr, order_ptr, b, R, E_local, W, K, KP, BR)
    rmask = row < R
    ex = tl.arange(0, EP)
    wv = tl.arange(0, WP)
    base = base_ptr + b * (E_local + W)
    # items: position = expert's start for this block + rows before it (in the block) with that expert
    has_e = ((e[:, :, None] == ex[None, None, :]) & valid[:, :, None]).to(tl.int32)  # [BR, KP, EP]
    row_e = tl.max(has_e, axis=1)  # [BR, EP]: a row has an expert at most once
    before_e = tl.cumsum(row_e, axis=0) - row_e
    rank = tl.sum(has_e * before_e[:, None, :], axis=2)  # [BR, KP]
    pos = tl.load(base + e, mask=valid, other=0).to(tl.int64) + rank
    flat = row[:, None].to(tl.int64) * K + slot[None, :]
    tl.store(item_slot_ptr + pos, flat, mask=valid)
    tl.store(item_row_ptr + pos, row[:, None].to(tl.int64) + slot[None, :] * 0, mask=valid)
    # touches: one per (row, wave with items), wave-major then row
    has_w = ((wave[:, :, None] == wv[None, None, :]) & valid[:, :, None]).to(tl.int32)  # [BR, KP, WP]
    row_w = tl.max(has_w, axis=1)  # [BR, WP]
    before_w = tl.cumsum(row_w, axis=0) - row_w
    tmask = (row_w > 0) & rmask[:, None] & (wv[None, :] < W)
    t = tl.load(base + E_local + wv, mask=wv < W, other=0)[None, :].to(tl.int64) + before_w  # [BR, WP]
    ret_rel = tl.load(return_pos_ptr + row, mask=rmask, other=0) - tl.load(return_start_ptr + lw, mask=rmask, other=0)
    row2 = row[:, None].to(tl.int64) + wv[None, :] * 0
    tl.store(touch_row_ptr + t, row2, mask=tmask)
    tl.store(touch_carry_ptr + t, (wv[None, :] > fw[:, None]).to(tl.int8), mask=tmask)
    tl.store(touch_out_ptr + t, tl.where(wv[None, :] == lw[:, None], ret_rel[:, None], -1), mask=tmask)
    # each item's place in its touch: after the row's items of the same wave with a smaller expert
    t_slot = tl.sum(has_w.to(tl.int64) * t[:, None, :], axis=2)  # [BR, KP]
    earlier = (wave[:, :, None] == wave[:, None, :]) & (e[:, None, :] < e[:, :, None]) & valid[:, None, :]
    s = tl.sum(earlier.to(tl.int64), axis=2)
    at = t_slot * K + s
    first_item = tl.load(wave_first_ptr + wave, mask=valid, other=0)
    tl.store(touch_items_ptr + at, pos - first_item, mask=valid)
    tl.store(touch_slot_ptr + at, flat, mask=valid)
    tl.store(touch_w_ptr + at, wt.to(touch_w_ptr.dtype.element_ty), mask=valid)


def receiver_tables_triton(table, order, row_source, num_local_experts, num_waves, num_ranks, k,
                           expert_off, touch_off, return_off, wave_first_item, n_items, n_touch, weights_dtype):
    """The receiver's tables from the exchanged slot tables (see `ep.plan.receiver_tables`).

    Args:
        table: `[R, k, 2]` float64 as exchanged (source-major); `order`: `[R]` int64, row r's
            place in it; `row_source`: `[R]` int64 source rank of each row.
        expert_off / touch_off / return_off: host ints, first item of each local expert,
            first touch of each wave, first returned row of each wave.
    """
    dev = table.device
    R = order.numel()
    E_local, W = num_local_experts, num_waves
    kp, ep_, wp = triton.next_power_of_2(k), triton.next_power_of_2(E_local), triton.next_power_of_2(W)
    br = max(1, min(64, 8192 // (kp * max(ep_, kp, wp))))
    nblocks = max(triton.cdiv(R, br), 1)
    weights = torch.empty(R * k, dtype=weights_dtype, device=dev)
    key = torch.empty(R, dtype=torch.int64, device=dev)
    hist = torch.zeros(nblocks, E_local + W, dtype=torch.int32, device=dev)
    args = dict(K=k, KP=kp, EP=ep_, WP=wp, BR=br)
    if R:
        _receiver_count_kernel[(nblocks,)](table, order, row_source, weights, key, hist, R, E_local, W, num_ranks, **args)
    return_row = torch.sort(key, stable=True).indices
    return_pos = torch.empty_like(return_row)
    return_pos[return_row] = torch.arange(R, device=dev)
    starts = torch.tensor([*expert_off[:-1], *touch_off[:-1], *return_off[:-1], *wave_first_item], dtype=torch.int64)
    starts = starts.to(dev, non_blocking=True)
    h = hist.to(torch.int64)
    base = h.cumsum(0) - h + starts[: E_local + W]
    return_start = starts[E_local + W: E_local + 2 * W]
    wave_first = starts[E_local + 2 * W:]
    item_slot = torch.empty(n_items, dtype=torch.int64, device=dev)
    item_row = torch.empty_like(item_slot)
    touch_row = torch.empty(n_touch, dtype=torch.int64, device=dev)
    touch_carry = torch.empty(n_touch, dtype=torch.int8, device=dev)
    touch_out = torch.empty(n_touch, dtype=torch.int64, device=dev)
    touch_items = torch.full((n_touch, k), -1, dtype=torch.int64, device=dev)
    touch_slot = torch.full((n_touch, k), -1, dtype=torch.int64, device=dev)
    touch_w = torch.zeros(n_touch, k, dtype=weights_dtype, device=dev)
    if R:
        _receiver_place_kernel[(nblocks,)](
            table, order, base, return_pos, return_start, wave_first, item_slot, item_row, touch_row, touch_carry,
            touch_out, touch_items, touch_slot, touch_w, R, E_local, W, **args)
    return dict(recv_weights=weights, return_row=return_row, item_slot_flat=item_slot, item_row=item_row,
                touch_row=touch_row, touch_carry=touch_carry.bool(), touch_out=touch_out, touch_items=touch_items,
                touch_slot_flat=touch_slot, touch_weights=touch_w)


# ---- the sender's routes after the count exchange ------------------------------------------
@triton.jit
def _load_routes(first_ptr, fw_ptr, idx_ptr, b, T, E_local, n,
                 K: tl.constexpr, KP: tl.constexpr, KEYP: tl.constexpr, BT: tl.constexpr):
    """Tokens `[b*BT, (b+1)*BT)`: which slots open a route, each route's (first wave, dest)
    key, and per token which keys it has (one route each at most)."""
    tok = b * BT + tl.arange(0, BT)
    slot = tl.arange(0, KP)
    m = (tok[:, None] < T) & (slot[None, :] < K)
    offs = tok[:, None].to(tl.int64) * K + slot[None, :]
    first = tl.load(first_ptr + offs, mask=m, other=-1)
    fw = tl.load(fw_ptr + offs, mask=m, other=0)
    idx = tl.load(idx_ptr + offs, mask=m, other=0)
    opens = m & (first == slot[None, :])
    key = fw * n + idx // E_local
    kk = tl.arange(0, KEYP)
    has = ((key[:, :, None] == kk[None, None, :]) & opens[:, :, None]).to(tl.int32)  # [BT, KP, KEYP]
    return tok, slot, m, offs, first, idx, opens, key, has


@triton.jit
def _route_count_kernel(first_ptr, fw_ptr, idx_ptr, hist_ptr, T, E_local, n, WN,
                        K: tl.constexpr, KP: tl.constexpr, KEYP: tl.constexpr, BT: tl.constexpr):
    b = tl.program_id(0)
    tok, slot, m, offs, first, idx, opens, key, has = _load_routes(
        first_ptr, fw_ptr, idx_ptr, b, T, E_local, n, K, KP, KEYP, BT)
    kk = tl.arange(0, KEYP)
    tl.store(hist_ptr + b * WN + kk, tl.sum(tl.sum(has, axis=1), axis=0), mask=kk < WN)


@triton.jit
def _route_place_kernel(first_ptr, fw_ptr, idx_ptr, w_ptr, base_ptr, route_slot_ptr, slot_route_ptr, table_ptr,
                        T, E_local, n, WN,
                        K: tl.constexpr, KP: tl.constexpr, KEYP: tl.constexpr, BT: tl.constexpr,
                        HAS_W: tl.constexpr):
    b = tl.program_id(0)
    tok, slot, m, offs, first, idx, opens, key, has = _load_routes(
        first_ptr, fw_ptr, idx_ptr, b, T, E_local, n, K, KP, KEYP, BT)
    kk = tl.arange(0, KEYP)
    row_has = tl.max(has, axis=1)  # [BT, KEYP]
    before = tl.cumsum(row_has, axis=0) - row_has  # routes of the same key in earlier tokens of the block
    rank = tl.sum(has * before[:, None, :], axis=2)  # [BT, KP], for the opening slots
    base = base_ptr + b * 2 * WN
    keyc = tl.where(opens, key, 0)
    r = tl.load(base + keyc, mask=opens, other=0) + rank  # dispatch order
    r_rm = tl.load(base + WN + keyc, mask=opens, other=0) + rank  # rank-major order
    tl.store(route_slot_ptr + r, offs, mask=opens)
    # each slot's route: the route of the slot that opens its channel (j' -> first[j'])
    of_first = (first[:, :, None] == slot[None, None, :]) & opens[:, None, :]  # [BT, KP(j'), KP(j)]
    slot_route = tl.sum(tl.where(of_first, r[:, None, :], 0), axis=2)
    tl.store(slot_route_ptr + offs, slot_route, mask=m)
    # the route's slot table: column j' holds slot j''s local expert and weight when the
    # slot belongs to the route (opened at j), else (-1, 0)
    local = (idx % E_local).to(tl.float64)
    if HAS_W:
        wt = tl.load(w_ptr + offs, mask=m, other=0.0).to(tl.float64)
    else:
        wt = tl.zeros([BT, KP], dtype=tl.float64)
    mine = (first[:, None, :] == slot[None, :, None]) & m[:, None, :]  # [BT, KP(j: route), KP(j')]
    cell = (r_rm[:, :, None] * K + slot[None, None, :]) * 2
    cmask = opens[:, :, None] & (slot[None, None, :] < K)
    tl.store(table_ptr + cell, tl.where(mine, local[:, None, :], -1.0), mask=cmask)
    tl.store(table_ptr + cell + 1, tl.where(mine, wt[:, None, :], 0.0), mask=cmask)


def route_tables_triton(first, fw, idx, weights, send_counts, num_local_experts):
    """`ep.plan.route_tables` in two kernels: per block of tokens the routes per (first wave,
    dest) key; then, from their prefix sums and the exchanged counts, each route's place in
    dispatch order and in rank-major order, its slot, and its slot table (W x n <= 256)."""
    T, k = first.shape
    dev = first.device
    first, fw, idx = (t.to(torch.int64).contiguous() for t in (first, fw, idx))
    W, n = len(send_counts), len(send_counts[0])
    WN = W * n
    R = sum(map(sum, send_counts))
    kp, keyp = triton.next_power_of_2(k), triton.next_power_of_2(WN)
    bt = max(1, min(64, 16384 // (kp * max(keyp, kp))))
    nblocks = max(triton.cdiv(T, bt), 1)
    args = dict(K=k, KP=kp, KEYP=keyp, BT=bt)
    route_slot = torch.empty(R, dtype=torch.int64, device=dev)
    slot_route = torch.empty(T, k, dtype=torch.int64, device=dev)
    table = torch.empty(R, k, 2, dtype=torch.float64, device=dev)
    if T == 0:
        return route_slot, slot_route, table
    hist = torch.empty(nblocks, WN, dtype=torch.int32, device=dev)
    _route_count_kernel[(nblocks,)](first, fw, idx, hist, T, num_local_experts, n, WN, **args)
    # where each key's routes start: dispatch order is (wave, dest), rank-major is (dest, wave)
    disp = list(itertools.accumulate((c for row in send_counts for c in row), initial=0))[:-1]
    rm_dw = list(itertools.accumulate((send_counts[w][d] for d in range(n) for w in range(W)), initial=0))
    rm = [rm_dw[d * W + w] for w in range(W) for d in range(n)]  # back in key (wave, dest) order
    starts = torch.tensor([disp, rm], dtype=torch.int64).to(dev)  # [2, WN]
    h = hist.to(torch.int64)
    before = (h.cumsum(0) - h).unsqueeze(1)  # [nblocks, 1, WN]
    base = (before + starts.unsqueeze(0)).contiguous()  # [nblocks, 2, WN]
    w = weights.detach().contiguous() if weights is not None else first
    _route_place_kernel[(nblocks,)](first, fw, idx, w, base, route_slot, slot_route, table, T, num_local_experts, n, WN,
                                    HAS_W=weights is not None, **args)
    return route_slot, slot_route, table
