"""Triton kernel for the sender side of the dispatch plan (CUDA).

One pass over `topk_idx [T, k]` (and the weights) does what ~45 small torch ops do in
`ep.plan`: for every (token, slot) its first slot on the same route, whether it opens
the route, the route's first and last wave, whether it opens a (route, wave) touch; the
input checks (ids out of range, repeated ids, NaN/Inf weights); and the counts the plan
exchanges, accumulated with integer atomics (exact, order-free).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl


@triton.jit
def _sender_kernel(
    idx_ptr, w_ptr, first_ptr, fw_ptr, lw_ptr, opens_touch_ptr, counts_ptr, status_ptr,
    T, E, E_local, W, n,
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
    # counts: routes out per (first wave, dest), back per (last wave, dest), touches per
    # (wave, dest), items per expert
    WN = W * n
    one = tl.full([BLOCK_T, KP], 1, tl.int32)
    tl.atomic_add(counts_ptr + (fw * n + dest), one, mask=opens)
    tl.atomic_add(counts_ptr + WN + (lw * n + dest), one, mask=opens)
    tl.atomic_add(counts_ptr + 2 * WN + touch, one, mask=opens_t)
    tl.atomic_add(counts_ptr + 3 * WN + idx, one, mask=valid)
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
    topk_idx: torch.Tensor, topk_weights: Optional[torch.Tensor], num_experts: int, num_local_experts: int,
    num_waves: int, num_ranks: int, dedup_across_waves: bool, status_slots: int, slots: Tuple[int, int, int],
):
    """Returns first_TK, fw_TK, lw_TK (int64), opens_touch_TK (bool), counts `[3Wn + E]`
    (int64) and the value checks `[status_slots]` (int64, slots (range, repeat, nonfinite))."""
    T, k = topk_idx.shape
    dev = topk_idx.device
    idx = topk_idx.to(torch.int64).contiguous()
    first = torch.empty(T, k, dtype=torch.int64, device=dev)
    fw, lw = torch.empty_like(first), torch.empty_like(first)
    opens_touch = torch.empty(T, k, dtype=torch.int8, device=dev)
    counts = torch.zeros(3 * num_waves * num_ranks + num_experts + status_slots, dtype=torch.int32, device=dev)
    status = counts[-status_slots:]
    if T:
        kp = triton.next_power_of_2(k)
        block_t = max(1, min(64, 1024 // (kp * kp)))
        w = topk_weights.detach().contiguous() if topk_weights is not None else idx
        _sender_kernel[(triton.cdiv(T, block_t),)](
            idx, w, first, fw, lw, opens_touch, counts, status,
            T, num_experts, num_local_experts, num_waves, num_ranks,
            K=k, KP=kp, HAS_W=topk_weights is not None, ACROSS=dedup_across_waves,
            SLOT_RANGE=slots[0], SLOT_REPEAT=slots[1], SLOT_NONFINITE=slots[2], BLOCK_T=block_t,
        )
    counts = counts.to(torch.int64)
    return first, fw, lw, opens_touch.bool(), counts[:-status_slots], counts[-status_slots:]
