"""Triton kernels for the wave plan (`ep.plan`) on CUDA: a handful of launches where the
torch path takes ~60 small ops (the host's issue time, not the device's, paced the call).

Every kernel of the sending side takes the wave map as `MODE` (`ROUTE_MODES`): token waves
(a route per (token, rank) in the token's wave), expert waves with a route per (token,
rank, wave), or expert waves with dedup (a route per (token, rank), in the first wave of
the token's slots there).
- `route_rows_triton`: programs per (wave x rank, block of the wave's tokens: every token
  for expert waves) count each block's routes, then (after the blocks' prefix sums) give
  each route its row in that region, in token order (no sort); they also count the input
  checks and the routes past the capacity.
- `pack_rows_triton`: one program per (sent row, block of columns) copies the token's hidden
  vector (with FP8 dispatch: quantizes it into the row, 1x128 tiles) and writes the row's
  slot table and status (`ep.layout`; with dedup each slot's returned row too).
- `wave_items_triton`: a counting sort of a wave's received slots by local expert, stable in
  (row, slot) order: per block of rows, counts per expert, their running sums along the
  blocks (one program per expert), then each slot's place (its rank among the block's slots
  of the same expert; the groups' ends summed over the experts by every program). Items
  past the count in use are left unwritten (consumers stop at `offs[-1]`).
Their results equal the torch path's, element for element (tests/test_triton_kernels.py).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .fp8 import BLOCK as BLOCK_FP8
from .fp8 import FP8
from .triton_fp8 import _TILE, _store_quantized

TOKENS, PER_WAVE, FIRST_WAVE = 0, 1, 2
"""`MODE`: token waves; expert waves, a route per (token, rank, wave); expert waves with
dedup, a route per (token, rank) in its first wave."""


def route_mode(by_experts: bool, dedup: bool) -> int:
    return FIRST_WAVE if dedup else PER_WAVE if by_experts else TOKENS


@triton.jit
def _wave_block(idx_ptr, T, E, E_local, n, W, K: tl.constexpr, KP: tl.constexpr, BT: tl.constexpr,
                MODE: tl.constexpr):
    """Program (wave x rank, block): its tokens, their loaded ids and whether each has a route
    in the program's region."""
    wd = tl.program_id(0)
    w, d = wd // n, wd % n
    if MODE == 0:  # token waves: the wave's chunk of the tokens
        t0 = (w * T + W - 1) // W
        t1 = ((w + 1) * T + W - 1) // W
    else:  # expert waves: any token may have a route in any wave
        t0 = 0
        t1 = T
    tok = t0 + tl.program_id(1) * BT + tl.arange(0, BT)
    vt = tok < t1
    slot = tl.arange(0, KP)
    valid = vt[:, None] & (slot[None, :] < K)
    offs = tok[:, None].to(tl.int64) * K + slot[None, :]
    raw = tl.load(idx_ptr + offs, mask=valid, other=0)
    e = tl.minimum(tl.maximum(raw, 0), E - 1)
    at_d = valid & (e // E_local == d)
    if MODE == 0:
        has = tl.max(at_d.to(tl.int32), axis=1)  # [BT]
    elif MODE == 1:
        has = tl.max((at_d & ((e % E_local) * W // E_local == w)).to(tl.int32), axis=1)
    else:
        first = tl.min(tl.where(at_d, (e % E_local) * W // E_local, W), axis=1)
        has = (first == w).to(tl.int32)
    return w, d, tok, vt, slot, valid, offs, raw, e, has


@triton.jit
def _route_count_kernel(idx_ptr, w_ptr, counts_ptr, status_ptr, clamped_ptr, row_token_ptr, T, E, E_local, n, W, NB,
                        cap, K: tl.constexpr, KP: tl.constexpr, HAS_W: tl.constexpr, BT: tl.constexpr,
                        SLOT_RANGE: tl.constexpr, SLOT_REPEAT: tl.constexpr, SLOT_NONFINITE: tl.constexpr,
                        MODE: tl.constexpr, CHECKS: tl.constexpr):
    w, d, tok, vt, slot, valid, offs, raw, e, has = _wave_block(idx_ptr, T, E, E_local, n, W, K, KP, BT, MODE)
    tl.store(counts_ptr + tl.program_id(0) * NB + tl.program_id(1), tl.sum(has, axis=0))
    region = row_token_ptr + tl.program_id(0).to(tl.int64) * cap  # every row unused (-1) until placed
    at = tl.program_id(1) * BT
    while at < cap:  # (while: Triton's interpreter cannot range over device scalars)
        r = at + tl.arange(0, BT)
        tl.store(region + r, tl.full([BT], -1, tl.int64), mask=r < cap)
        at += NB * BT
    if CHECKS and d == 0 and (MODE == 0 or w == 0):  # each token's input checks and clamped ids, once
        tl.store(clamped_ptr + offs, e, mask=valid)
        tl.atomic_add(status_ptr + SLOT_RANGE, tl.sum(tl.sum((valid & ((raw < 0) | (raw >= E))).to(tl.int32), axis=1), axis=0))
        pair = valid[:, :, None] & valid[:, None, :] & (slot[None, :, None] < slot[None, None, :])
        rep = tl.max(tl.max((pair & (raw[:, :, None] == raw[:, None, :])).to(tl.int32), axis=2), axis=1)
        tl.atomic_add(status_ptr + SLOT_REPEAT, tl.sum(tl.where(vt & (rep > 0), 1, 0), axis=0))
        if HAS_W:
            wt = tl.load(w_ptr + offs, mask=valid, other=0.0).to(tl.float32)
            bad = tl.max((valid & ((wt != wt) | (tl.abs(wt) == float("inf")))).to(tl.int32), axis=1)
            tl.atomic_add(status_ptr + SLOT_NONFINITE, tl.sum(tl.where(vt & (bad > 0), 1, 0), axis=0))


@triton.jit
def _route_place_kernel(idx_ptr, counts_ptr, route_ptr, row_token_ptr, status_ptr, region_rows_ptr, T, E, E_local, n,
                        W, NB, cap, K: tl.constexpr, KP: tl.constexpr, BT: tl.constexpr, NBP: tl.constexpr,
                        SLOT_OVER: tl.constexpr, MODE: tl.constexpr):
    w, d, tok, vt, slot, valid, offs, raw, e, has = _wave_block(idx_ptr, T, E, E_local, n, W, K, KP, BT, MODE)
    blocks = tl.arange(0, NBP)  # the routes of the wave's earlier blocks: their counts, summed here
    earlier = tl.load(counts_ptr + tl.program_id(0) * NB + blocks, mask=blocks < tl.program_id(1), other=0)
    before = tl.sum(earlier, axis=0)
    pos = before + tl.cumsum(has, axis=0) - has
    fits = pos < cap
    route = tl.where((has > 0) & fits, (w * n + d) * cap + pos, -1)
    if MODE == 1:  # a column per (wave, rank)
        tl.store(route_ptr + tok.to(tl.int64) * (W * n) + tl.program_id(0), route.to(tl.int64), mask=vt)
    elif MODE == 0:
        tl.store(route_ptr + tok.to(tl.int64) * n + d, route.to(tl.int64), mask=vt)
    else:  # a route per rank, written by its first wave's program; wave 0's writes -1 for no route
        none = tl.max((valid & (e // E_local == d)).to(tl.int32), axis=1) == 0
        tl.store(route_ptr + tok.to(tl.int64) * n + d, route.to(tl.int64), mask=vt & ((has > 0) | ((w == 0) & none)))
    tl.store(row_token_ptr + route, tok.to(tl.int64), mask=vt & (has > 0) & fits)
    tl.atomic_add(status_ptr + SLOT_OVER, tl.sum(tl.where(vt & (has > 0) & ~fits, 1, 0), axis=0))
    if tl.program_id(1) == NB - 1:  # the region's last block: its rows in use (at least one, the status row)
        placed = before + tl.sum(has, axis=0)
        tl.store(region_rows_ptr + tl.program_id(0), tl.minimum(tl.maximum(placed, 1), cap).to(tl.int64))


def route_rows_triton(idx: torch.Tensor, weights: Optional[torch.Tensor], num_experts: int, num_ranks: int,
                      num_waves: int, capacity: int, status_slots: int, slots: Tuple[int, int, int, int],
                      mode: int = TOKENS, checks: bool = True):
    """Returns route_row `[T, C]` int64 (C = W x n for `PER_WAVE`, else n), row_token
    `[W * n * capacity]` int64, the status `[status_slots]` int32 (slots: range, repeat,
    nonfinite, over capacity; without `checks` only the last), the ids clamped into `[0, E)`
    `[T, k]` int64 (written only with `checks`) and each region's rows in use `[W * n]` int64
    (`ep.plan.WavePlan.region_rows`). Programs per (wave x rank, block of the wave's tokens):
    a count pass, then a place pass (each route's row: the region's routes from earlier
    blocks, summed from their counts, and earlier tokens of the block; a region's last block
    also writes its rows in use)."""
    T, k = idx.shape
    n, W = num_ranks, num_waves
    dev = idx.device
    route = torch.empty(T, W * n if mode == PER_WAVE else n, dtype=torch.int64, device=dev)
    status = torch.zeros(status_slots, dtype=torch.int32, device=dev)
    clamped = torch.empty(T, k, dtype=torch.int64, device=dev)
    if T == 0:
        return (route, torch.full((W * n * capacity,), -1, dtype=torch.int64, device=dev), status, clamped,
                torch.full((W * n,), min(1, capacity), dtype=torch.int64, device=dev))
    region_rows = torch.empty(W * n, dtype=torch.int64, device=dev)
    row_token = torch.empty(W * n * capacity, dtype=torch.int64, device=dev)  # the count pass fills it with -1
    kp = triton.next_power_of_2(k)
    block = max(16, min(256, 2048 // (kp * kp)))
    NB = triton.cdiv(-(-T // W) if mode == TOKENS else T, block)
    idx = idx.contiguous()
    w = weights.detach().contiguous() if weights is not None else idx
    counts = torch.empty(W * n, NB, dtype=torch.int32, device=dev)
    args = (T, num_experts, num_experts // n, n, W, NB)
    _route_count_kernel[(W * n, NB)](idx, w, counts, status, clamped, row_token, *args, capacity, K=k, KP=kp,
                                     HAS_W=weights is not None, BT=block, SLOT_RANGE=slots[0], SLOT_REPEAT=slots[1],
                                     SLOT_NONFINITE=slots[2], MODE=mode, CHECKS=checks, num_warps=4)
    _route_place_kernel[(W * n, NB)](idx, counts, route, row_token, status, region_rows, *args, capacity, K=k, KP=kp,
                                     BT=block, NBP=triton.next_power_of_2(NB), SLOT_OVER=slots[3], MODE=mode,
                                     num_warps=4)
    return route, row_token, status, clamped, region_rows


@triton.jit
def _returned_slots_kernel(route_ptr, idx_ptr, values_ptr, out_ptr, T, n, E_local, W, v_stride,
                           K: tl.constexpr, KP: tl.constexpr, BT: tl.constexpr, PER_WAVE_COLS: tl.constexpr):
    t = tl.program_id(0).to(tl.int64) * BT + tl.arange(0, BT)
    j = tl.arange(0, KP)
    m = (t[:, None] < T) & (j[None, :] < K)
    e = tl.load(idx_ptr + t[:, None] * K + j[None, :], mask=m, other=0)
    if PER_WAVE_COLS:  # the table has a column per (wave, rank)
        r = tl.load(route_ptr + t[:, None] * (W * n) + ((e % E_local) * W // E_local) * n + e // E_local, mask=m,
                    other=-1)
    else:
        r = tl.load(route_ptr + t[:, None] * n + e // E_local, mask=m, other=-1)
    v = tl.load(values_ptr + tl.maximum(r, 0) * v_stride + j[None, :], mask=m & (r >= 0), other=0.0)
    tl.store(out_ptr + t[:, None] * K + j[None, :], v, mask=m)


def returned_slots_triton(route_row: torch.Tensor, topk_idx: torch.Tensor, num_local_experts: int,
                          values: torch.Tensor, num_ranks: Optional[int] = None, num_waves: int = 1) -> torch.Tensor:
    """`[T, k]` in values' dtype: `values[route_row[t, column of slot j], j]`, 0 where that
    route has no row (`ep.plan.returned_slot_values`): the column is the slot's rank, or with
    a table of W x n columns (wave, rank)."""
    T, k = topk_idx.shape
    out = values.new_empty(T, k)
    if T == 0:
        return out
    assert values.stride(1) == 1 or k <= 1
    route_row, topk_idx = route_row.contiguous(), topk_idx.contiguous()  # (the plan's own: already)
    kp = triton.next_power_of_2(k)
    bt = max(1, 1024 // kp)
    n = route_row.shape[1] if num_ranks is None else num_ranks
    _returned_slots_kernel[(triton.cdiv(T, bt),)](route_row, topk_idx, values, out, T, n, num_local_experts, num_waves,
                                                  values.stride(0), K=k, KP=kp, BT=bt,
                                                  PER_WAVE_COLS=route_row.shape[1] != n, num_warps=4)
    return out


@triton.jit
def _pack_kernel(x_ptr, idx_ptr, w_ptr, row_token_ptr, status_ptr, data_ptr, ids_ptr, wts_ptr, st_ptr, back_row_ptr,
                 back_ptr, scale_ptr, H, x_stride, data_stride, meta_stride, wts_stride, scale_stride, E, E_local, n, W,
                 cap, K: tl.constexpr, KP: tl.constexpr, S: tl.constexpr, SP: tl.constexpr, HAS_W: tl.constexpr,
                 BLOCK: tl.constexpr, MODE: tl.constexpr, QUANT: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cb = tl.program_id(1)
    t = tl.load(row_token_ptr + row)
    if QUANT:  # FP8 dispatch: BLOCK // 128 tiles of the token quantized into the row (e4m3, fp32 scales)
        tiles = cb * (BLOCK // _TILE) + tl.arange(0, BLOCK // _TILE)
        live = (tiles < H // _TILE) & (t >= 0)
        cols2 = tiles[:, None] * _TILE + tl.arange(0, _TILE)[None, :]
        v = tl.load(x_ptr + tl.maximum(t, 0) * x_stride + cols2, mask=live[:, None], other=0.0).to(tl.float32)
        _store_quantized(v, data_ptr, scale_ptr, row, tiles, live, cols2, data_stride, scale_stride, False)
    else:
        cols = cb * BLOCK + tl.arange(0, BLOCK)
        inb = cols < H
        if t >= 0:
            tl.store(data_ptr + row * data_stride + cols, tl.load(x_ptr + t * x_stride + cols, mask=inb), mask=inb)
    if cb == 0:
        d = (row // cap) % n
        slot = tl.arange(0, KP)
        ms = slot < K
        used = ms & (t >= 0)
        e = tl.load(idx_ptr + tl.maximum(t, 0) * K + slot, mask=used, other=0)
        e = tl.minimum(tl.maximum(e, 0), E - 1)
        here = used & (e // E_local == d)
        wave = (e % E_local) * W // E_local
        if MODE == 1:  # the row serves its own wave's slots only
            here = here & (wave == (row // cap) // n)
        tl.store(ids_ptr + row * meta_stride + slot, tl.where(here, e % E_local, -1).to(tl.int32), mask=ms)
        if MODE == 2:  # each slot's touch: its row within the returned region of the slot's wave
            back = tl.load(back_row_ptr + tl.maximum(t, 0) * (W * n) + wave * n + d, mask=here, other=-1)
            tl.store(back_ptr + row * meta_stride + slot, tl.where(back >= 0, back % cap, -1).to(tl.int32), mask=ms)
        if HAS_W:
            wt = tl.load(w_ptr + tl.maximum(t, 0) * K + slot, mask=here, other=0.0)
        else:
            wt = tl.zeros([KP], dtype=tl.float32)
        tl.store(wts_ptr + row * wts_stride + slot, wt.to(wts_ptr.dtype.element_ty), mask=ms)
        s = tl.arange(0, SP)
        tl.store(st_ptr + row * meta_stride + s, tl.load(status_ptr + s, mask=s < S, other=0), mask=s < S)


def pack_rows_triton(x: torch.Tensor, idx: torch.Tensor, weights: Optional[torch.Tensor], row_token: torch.Tensor,
                     status: torch.Tensor, data: torch.Tensor, ids: torch.Tensor, wts: torch.Tensor, st: torch.Tensor,
                     num_experts: int, num_ranks: int, capacity: int, mode: int = TOKENS, num_waves: int = 1,
                     back_row: Optional[torch.Tensor] = None, back: Optional[torch.Tensor] = None,
                     scales: Optional[torch.Tensor] = None) -> None:
    """Rows `row_token`'s tokens: data `[R, H]`, ids `[R, k]` int32, weights `[R, k]`, status
    `[R, S]` int32 (views into the rows, one row stride for ids, back and status); with
    `FIRST_WAVE` also back `[R, k]` int32 from the touches' table `back_row [T, W * n]`.
    With `scales` (`[R, H/128]` fp32; FP8 dispatch) data is e4m3 and each token is quantized
    in 1x128 tiles as it is packed (the bits of `ep.kernels.fp8.quantize_rows`), in the same
    kernel."""
    R, H = data.shape
    if R == 0:
        return
    k, S = ids.shape[1], st.shape[1]
    assert ids.stride(0) == st.stride(0) and idx.is_contiguous() and x.stride(1) == 1
    if mode == FIRST_WAVE:
        assert back is not None and back.stride(0) == ids.stride(0) and back_row is not None and back_row.is_contiguous()
    quant = scales is not None
    if quant:
        assert data.dtype == FP8 and H % BLOCK_FP8 == 0 and scales.shape == (R, H // BLOCK_FP8) and scales.stride(1) == 1
    block = min(1024, triton.next_power_of_2(H))
    w = weights.detach().contiguous() if weights is not None else wts
    _pack_kernel[(R, triton.cdiv(H, block))](
        x, idx, w, row_token, status, data, ids, wts, st, row_token if back_row is None else back_row,
        ids if back is None else back, scales if quant else wts, H, x.stride(0), data.stride(0), ids.stride(0),
        wts.stride(0), scales.stride(0) if quant else 0, num_experts, num_experts // num_ranks, num_ranks, num_waves,
        capacity, K=k, KP=triton.next_power_of_2(k), S=S, SP=triton.next_power_of_2(S), HAS_W=weights is not None,
        BLOCK=block, MODE=mode, QUANT=quant, num_warps=4,
    )


@triton.jit
def _block_slots(ids_ptr, N, E_local, ids_stride, K: tl.constexpr, KP: tl.constexpr, BR: tl.constexpr):
    """Program b's slots (rows b x BR.., flattened with their slots) and their local experts."""
    s = tl.arange(0, BR * KP)
    row = tl.program_id(0) * BR + s // KP
    slot = s % KP
    m = (row < N) & (slot < K)
    e = tl.load(ids_ptr + row.to(tl.int64) * ids_stride + slot, mask=m, other=-1)
    return s, row, slot, m, e, m & (e >= 0) & (e < E_local)


@triton.jit
def _count_kernel(ids_ptr, counts_ptr, N, B, E_local, ids_stride, K: tl.constexpr, KP: tl.constexpr, BR: tl.constexpr,
                  EP: tl.constexpr):
    """counts[e, b]: block b's slots of expert e (every column written by its own program)."""
    s, row, slot, m, e, valid = _block_slots(ids_ptr, N, E_local, ids_stride, K, KP, BR)
    ex = tl.arange(0, EP)
    c = tl.sum(((e[None, :] == ex[:, None]) & valid[None, :]).to(tl.int32), axis=1)
    tl.store(counts_ptr + ex.to(tl.int64) * B + tl.program_id(0), c, mask=ex < E_local)


@triton.jit
def _items_scan_kernel(counts_ptr, incl_ptr, B, BB: tl.constexpr):
    """incl[e, b] = counts[e, 0] + ... + counts[e, b] (int64), one program per expert."""
    at = tl.program_id(0).to(tl.int64) * B
    running = tl.zeros([], dtype=tl.int64)
    b0 = 0
    while b0 < B:  # (while: Triton's interpreter cannot range over device scalars)
        bs = b0 + tl.arange(0, BB)
        c = tl.load(counts_ptr + at + bs, mask=bs < B, other=0).to(tl.int64)
        tl.store(incl_ptr + at + bs, running + tl.cumsum(c, axis=0), mask=bs < B)
        running += tl.sum(c, axis=0)
        b0 += BB


@triton.jit
def _place_kernel(ids_ptr, w_ptr, incl_ptr, counts_ptr, slot_item_ptr, item_row_ptr, item_w_ptr, item_e_ptr,
                  offs_ptr, N, B, E_local, I, ids_stride, w_stride,
                  K: tl.constexpr, KP: tl.constexpr, BR: tl.constexpr, EP: tl.constexpr):
    # expert e's group: [ends[e] - total[e] - 1, ends[e]): its anchor, then its items, where
    # ends = cumsum(total + 1) over the experts (every program sums the EP totals itself);
    # block b's items of e start after the anchor and the earlier blocks' (incl - counts)
    b = tl.program_id(0)
    s, row, slot, m, e, valid = _block_slots(ids_ptr, N, E_local, ids_stride, K, KP, BR)
    ex = tl.arange(0, EP)
    live = ex < E_local
    total = tl.load(incl_ptr + ex.to(tl.int64) * B + B - 1, mask=live, other=0)
    ends = tl.cumsum(tl.where(live, total + 1, 0), axis=0)
    earlier = (e[:, None] == e[None, :]) & valid[None, :] & (s[None, :] < s[:, None])
    within = tl.sum(earlier.to(tl.int32), axis=1)
    ec = tl.maximum(e, 0).to(tl.int64)
    first = tl.sum(tl.where(ex[None, :] < ec[:, None], total[None, :] + 1, 0), axis=1) + 1  # after e's anchor
    at = ec * B + b
    pos = first + tl.load(incl_ptr + at, mask=valid, other=0) - tl.load(counts_ptr + at, mask=valid, other=0) + within
    valid = valid & (pos < I)  # past the capacity only with repeated ids in a row (an input error, reported)
    tl.store(slot_item_ptr + row.to(tl.int64) * K + slot, tl.where(valid, pos, -1).to(tl.int64), mask=m)
    tl.store(item_row_ptr + pos, row.to(tl.int64), mask=valid)
    tl.store(item_w_ptr + pos, tl.load(w_ptr + row.to(tl.int64) * w_stride + slot, mask=valid, other=0.0), mask=valid)
    tl.store(item_e_ptr + pos, e.to(tl.int64), mask=valid)
    if b == 0:  # the anchors (first of each group: the zero row N, weight 0) and offs
        anchor = ends - total - 1
        me = live & (anchor < I)
        tl.store(item_row_ptr + anchor, tl.full([EP], 0, tl.int64) + N, mask=me)
        tl.store(item_w_ptr + anchor, tl.zeros([EP], dtype=item_w_ptr.dtype.element_ty), mask=me)
        tl.store(item_e_ptr + anchor, ex.to(tl.int64), mask=me)
        tl.store(offs_ptr + ex, tl.minimum(ends, I).to(tl.int32), mask=live)


def wave_items_triton(ids: torch.Tensor, weights: torch.Tensor, num_local_experts: int, item_capacity: int):
    """Returns item_row `[I]`, item_weight `[I]`, item_expert `[I]` (int64), offs `[E_local]`
    int32 and slot_item `[N, k]` int64, as `ep.plan.wave_items`; entries past `offs[-1]`
    are unspecified. Three launches: counts per (expert, block), their running sums along
    the blocks, the places."""
    N, k = ids.shape
    E_local, dev = num_local_experts, ids.device
    kp, ep = triton.next_power_of_2(k), triton.next_power_of_2(E_local)
    br = max(1, min(128 // kp, 8192 // (kp * ep)))  # a block's [slots x experts] tiles stay small
    B = max(1, triton.cdiv(N, br))
    counts = torch.zeros(E_local, B, dtype=torch.int32, device=dev) if not N else \
        torch.empty(E_local, B, dtype=torch.int32, device=dev)
    if N:
        _count_kernel[(B,)](ids, counts, N, B, E_local, ids.stride(0), K=k, KP=kp, BR=br, EP=ep, num_warps=4)
    incl = torch.empty(E_local, B, dtype=torch.int64, device=dev)
    _items_scan_kernel[(E_local,)](counts, incl, B, BB=min(1024, triton.next_power_of_2(B)), num_warps=4)
    item_row = torch.empty(item_capacity, dtype=torch.int64, device=dev)
    item_weight = torch.empty(item_capacity, dtype=weights.dtype, device=dev)
    item_expert = torch.empty(item_capacity, dtype=torch.int64, device=dev)
    offs = torch.empty(E_local, dtype=torch.int32, device=dev)
    slot_item = torch.empty(N, k, dtype=torch.int64, device=dev)
    _place_kernel[(B,)](ids, weights, incl, counts, slot_item, item_row, item_weight, item_expert, offs, N, B,
                        E_local, item_capacity, ids.stride(0), weights.stride(0), K=k, KP=kp, BR=br, EP=ep,
                        num_warps=4)
    return item_row, item_weight, item_expert, offs, slot_item
