"""The token-wave plan: pure tensor math over buffers whose sizes are known before the call.

With `MoEConfig(wave_split="tokens")` wave w is the w-th of W chunks of every rank's tokens,
sent through all experts: token t of T is in wave `t * W // T`. A token travels to each
rank that owns one of its experts once, in its wave, with its slot table (`ep.layout`),
and comes back once, summed over that rank's experts: W=1's bytes for any W, and each
wave carries 1/W of them.

Every buffer has a size fixed by bounds the host knows without reading the device:
- a *region* holds the rows one rank sends another in one wave: `capacity` rows, at most
  the tokens of a wave (ceil(T_max / W), T_max the most tokens of any rank), lowered by
  `MoEConfig.capacity_factor`; the rows of wave w sent to rank d sit in region (w, d), in
  token order, so the sender alone decides where a row goes (no count exchange);
- a wave's *items* (rows of expert math) at one owner number at most
  n x capacity x min(k, E_local), plus one *anchor* item per local expert: a zero row that
  keeps every expert's group non-empty, so grouped kernels write every expert's output
  (their weight gradient) without the host knowing which experts got tokens.
Counts stay on the device: the grouped GEMMs take cumulative counts (`offs`) there, and
the kernels skip the unused rows.

Sender side (`sender_plan`): each (token, rank) route's row in the sent rows, from
`topk_idx` alone. Receiver side (`wave_items`): from the received rows' slot tables, the
items in expert order (stable: by expert, then row, then slot). Neither talks to other
ranks: the pipeline (`ep.chunk_pipeline`) moves the rows.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch

from .checks import IDX_RANGE, IDX_REPEAT, ROWS_OVER, STATUS_SLOTS, W_NONFINITE, value_status
from .kernels import gather_rows_into
from .kernels.permute import triton_available, use_triton
from .layout import RowLayout


def wave_capacity(max_tokens: int, num_waves: int, capacity_factor: float = 1.0) -> int:
    """Rows of one region: ceil(factor x ceil(T_max / W)), at least one row when there are
    tokens; the worst case (every token of the wave) at factor 1."""
    per_wave = -(-max_tokens // num_waves)
    if capacity_factor >= 1 or per_wave == 0:
        return per_wave
    return max(1, math.ceil(per_wave * capacity_factor - 1e-9))


def wave_tokens(num_tokens: int, num_waves: int) -> Tuple[int, ...]:
    """`[W + 1]` first token of each wave: token t is in wave `t * W // T`."""
    return tuple(-(-w * num_tokens // num_waves) for w in range(num_waves + 1))


@dataclass(frozen=True)
class ChunkPlan:
    """This rank's sending side of one call, and the sizes every rank shares.

    Rows are numbered over all waves: region (w, d) holds rows
    `[(w*n + d) * capacity, (w*n + d + 1) * capacity)`.
    """

    num_ranks: int
    num_waves: int
    num_local_experts: int
    top_k: int
    capacity: int
    """Rows per region (the same on every rank)."""
    route_row: torch.Tensor
    """`[T, n]` int64: the row of route (token, rank) among the sent rows; -1 where the token
    has no expert on that rank (or its row did not fit a lowered capacity)."""
    row_token: torch.Tensor
    """`[W * n * capacity]` int64: the token in each sent row; -1 for an unused row."""
    topk_idx: torch.Tensor
    """`[T, k]` int64: each slot's global expert, clamped into `[0, E)` (its rank: `// E_local`)."""
    status: torch.Tensor
    """`[STATUS_SLOTS]` int32: this rank's findings (host and device checks, rows over capacity)."""
    region_rows: torch.Tensor
    """`[W, n]` int64: the rows of each region that carry data, from its start (the routes
    placed there come first, in token order), and at least one where the region has rows
    (every sent row carries the sender's status, which the receiver reads from the first
    row of each region of wave 0). The rest of a region is padding: a transport may leave it
    out (`Transport.all_to_all`'s `sent_rows`)."""

    @property
    def rows_per_wave(self) -> int:
        return self.num_ranks * self.capacity

    @property
    def item_capacity(self) -> int:
        """Items per wave at an owner, anchors included (the same on every rank)."""
        return self.rows_per_wave * min(self.top_k, self.num_local_experts) + self.num_local_experts

    @property
    def expected_items_per_expert(self) -> float:
        """Items one local expert gets in a wave with uniform routing and full waves (n x capacity
        tokens arrive, each with k x E_local / E items here): capacity x k / E_local. A host
        number that picks kernels (`ep.kernels.grouped_mm`), never a size."""
        return self.capacity * self.top_k / max(self.num_local_experts, 1)

    def wave_rows(self, wave: int) -> slice:
        """Wave w's rows among all sent (or received) rows."""
        return slice(wave * self.rows_per_wave, (wave + 1) * self.rows_per_wave)


def sender_plan(
    topk_idx_TK: torch.Tensor,
    topk_weights_TK: Optional[torch.Tensor],
    num_experts: int,
    num_ranks: int,
    num_waves: int,
    capacity: int,
    host_status: Optional[Sequence[int]] = None,
) -> ChunkPlan:
    """Where each route's row goes. Sync-free: device tensors in, device tensors out.

    Args:
        topk_idx_TK: `[T, k]` global expert ids (out-of-range ids are counted in the status
            and clamped, so kernels stay in bounds until the error is raised).
        topk_weights_TK: `[T, k]` or None; only checked here (NaN/Inf).
        capacity: rows per region (`wave_capacity`), the same on every rank.
        host_status: this rank's host-visible findings (`ep.checks.host_status`), sent along.
    """
    T, k = topk_idx_TK.shape
    n, W = num_ranks, num_waves
    E_local = num_experts // n
    device = topk_idx_TK.device
    if topk_idx_TK.is_cuda and triton_available():
        from .kernels.triton_chunks import route_rows_triton

        route_row, row_token, status, idx, region_rows = route_rows_triton(
            topk_idx_TK.to(torch.int64), topk_weights_TK, num_experts, n, W, capacity, STATUS_SLOTS,
            (IDX_RANGE, IDX_REPEAT, W_NONFINITE, ROWS_OVER))
        for slot, value in enumerate(host_status or ()):
            if value:  # a host int: added as a kernel argument, no copy to the device
                status[slot] += value
        return ChunkPlan(num_ranks=n, num_waves=W, num_local_experts=E_local, top_k=k, capacity=capacity,
                         route_row=route_row, row_token=row_token, topk_idx=idx, status=status,
                         region_rows=region_rows.view(W, n))
    idx = topk_idx_TK.to(torch.int64).clamp(0, num_experts - 1)
    slot_rank = idx // E_local
    # [n, T]: the scan over tokens runs along the inner dimension (an outer-dimension scan of
    # [T, n] runs n threads over T steps: 0.4 ms at T=4096 on an H200)
    has_NT = torch.zeros(n, T, dtype=torch.int64, device=device).scatter_(0, slot_rank.t(), 1)
    before_NT = has_NT.cumsum(1) - has_NT  # routes to each rank from earlier tokens
    wave_T = torch.arange(T, device=device) * W // max(T, 1)
    starts = ((torch.arange(W, device=device) * T + W - 1) // W).clamp(max=max(T - 1, 0))  # wave_tokens, on the device
    pos_TN = (before_NT - (before_NT[:, starts] if T else before_NT.new_zeros(n, W))[:, wave_T]).t()
    has_TN = has_NT.t()
    fits = pos_TN < capacity
    region = wave_T.unsqueeze(1) * n + torch.arange(n, device=device)
    route_row = torch.where((has_TN > 0) & fits, region * capacity + pos_TN, -1)

    rows = W * n * capacity
    row_token = torch.full((rows + 1,), -1, dtype=torch.int64, device=device)  # + a sink for non-routes
    tokens = torch.arange(T, device=device).unsqueeze(1).expand(T, n)
    row_token.scatter_(0, torch.where(route_row >= 0, route_row, rows).flatten(), tokens.flatten())
    row_token = row_token[:rows]
    region = torch.where(route_row >= 0, route_row // max(capacity, 1), W * n).flatten()
    placed = torch.zeros(W * n + 1, dtype=torch.int64, device=device).scatter_add_(0, region, torch.ones_like(region))
    region_rows = placed[:W * n].clamp(min=min(1, capacity)).view(W, n)  # at most the capacity: only fits are placed

    checks = value_status(topk_idx_TK, topk_weights_TK, num_experts)
    status = torch.zeros(STATUS_SLOTS, dtype=torch.int64, device=device)
    for slot in (IDX_RANGE, IDX_REPEAT, W_NONFINITE):
        status[slot] = checks[slot]
    status[ROWS_OVER] = ((has_TN > 0) & ~fits).sum()
    for slot, value in enumerate(host_status or ()):
        if value:  # a host int: added as a kernel argument, no copy to the device
            status[slot] += value
    return ChunkPlan(
        num_ranks=n, num_waves=W, num_local_experts=E_local, top_k=k, capacity=capacity,
        route_row=route_row, row_token=row_token, topk_idx=idx, status=status.to(torch.int32),
        region_rows=region_rows,
    )


def returned_slot_values(plan: ChunkPlan, values_RK: torch.Tensor) -> torch.Tensor:
    """`[T, k]`: for slot j of token t, `values[row, j]` of the row token t sent to that slot's
    rank (`plan.route_row`), 0 where it sent none (the backward's routing-weight gradients,
    which come back in the rows' weight columns). One kernel on CUDA."""
    if values_RK.is_cuda and triton_available():
        from .kernels.triton_chunks import returned_slots_triton

        return returned_slots_triton(plan.route_row, plan.topk_idx, plan.num_local_experts, values_RK)
    slot_row = plan.route_row.gather(1, plan.topk_idx // plan.num_local_experts)  # [T, k]: each slot's row
    return torch.where(slot_row >= 0, values_RK.gather(0, slot_row.clamp(min=0)), 0)


def pack_rows(x_TH: torch.Tensor, topk_weights_TK: Optional[torch.Tensor], plan: ChunkPlan, layout: RowLayout,
              rows: torch.Tensor) -> None:
    """Write every sent row (`ep.layout`): its token's hidden vector, and for each slot of the
    token its expert at the row's rank (-1: elsewhere) and its weight, and this rank's
    status; unused rows get -1 everywhere in their slot table (their data is unspecified).
    One Triton kernel on CUDA (below float64), torch elsewhere.

    Args:
        x_TH: `[T, H]`.
        rows: `[W * n * capacity, layout.width]`.
    """
    n, cap, E = plan.num_ranks, plan.capacity, plan.num_local_experts * plan.num_ranks
    if use_triton(x_TH) and rows.shape[0]:
        from .kernels.triton_chunks import pack_rows_triton

        pack_rows_triton(x_TH, plan.topk_idx, topk_weights_TK, plan.row_token, plan.status, layout.data(rows),
                         layout.ids(rows), layout.weights(rows), layout.status(rows), E, n, cap)
        return
    gather_rows_into(x_TH, plan.row_token, layout.data(rows))
    token = plan.row_token
    layout.status(rows).copy_(plan.status.unsqueeze(0).expand(token.shape[0], -1))
    if plan.topk_idx.shape[0] == 0:  # no tokens here: every row is unused
        layout.ids(rows).fill_(-1)
        layout.weights(rows).zero_()
        return
    E_local = plan.num_local_experts
    t = token.clamp(min=0)
    row_rank = (torch.arange(token.shape[0], device=rows.device) // max(cap, 1)) % n
    idx = plan.topk_idx[t]
    here = (idx // E_local == row_rank.unsqueeze(1)) & (token >= 0).unsqueeze(1)
    layout.ids(rows).copy_(torch.where(here, idx % E_local, -1))
    if topk_weights_TK is not None:
        w = topk_weights_TK.detach().to(layout.acc_dtype)[t]
        layout.weights(rows).copy_(torch.where(here, w, 0))
    else:
        layout.weights(rows).zero_()


@dataclass(frozen=True)
class WaveItems:
    """One wave's items at their owner, in expert order (anchors first in each expert's group).

    Sizes: N = n x capacity received rows (the anchors' zero row is row N), I = the plan's
    item_capacity, k slots.
    """

    item_row: torch.Tensor
    """`[I]` int64: the received row of each item (N for anchors)."""
    item_weight: torch.Tensor
    """`[I]` acc dtype: the item's routing weight (0 for anchors)."""
    item_expert: torch.Tensor
    """`[I]` int64: the item's local expert. Past `count` (unused items) these three are
    unspecified: every consumer stops there."""
    offs: torch.Tensor
    """`[E_local]` int32: cumulative items per expert (anchors included): a grouped GEMM's `offs`."""
    slot_item: torch.Tensor
    """`[N, k]` int64: the item of each received (row, slot); -1 where the slot is served elsewhere."""

    @property
    def count(self) -> torch.Tensor:
        """`[]` items in use (device)."""
        return self.offs[-1]


def wave_items(layout: RowLayout, rows_N: torch.Tensor, num_local_experts: int, item_capacity: int) -> WaveItems:
    """The items of one wave from its received rows' slot tables. Sync-free. A counting sort
    in Triton on CUDA (below float64: its consumers stop at `offs[-1]`, and it leaves the
    entries past it unwritten), a stable sort in torch elsewhere.

    Args:
        rows_N: `[N, layout.width]` the wave's received rows (`RowLayout.ids`: each slot's
            local expert, -1 for none; `RowLayout.weights`: the slots' routing weights).
        item_capacity: items this wave may hold, anchors included (`ChunkPlan.item_capacity`).
    """
    ids_NK, weights_NK = layout.ids(rows_N), layout.weights(rows_N)
    if use_triton(rows_N):
        from .kernels.triton_chunks import wave_items_triton

        return WaveItems(*wave_items_triton(ids_NK, weights_NK, num_local_experts, item_capacity))
    N, k = ids_NK.shape
    E_local, device = num_local_experts, ids_NK.device
    slot_key = torch.where(ids_NK >= 0, ids_NK.to(torch.int64), E_local).flatten()
    key = torch.cat([torch.arange(E_local, device=device), slot_key])  # anchors first: first in their group
    sorted_key, order = torch.sort(key, stable=True)
    order, sorted_key = order[:item_capacity], sorted_key[:item_capacity]
    real = (order >= E_local) & (sorted_key < E_local)
    slot = torch.where(real, order - E_local, N * k)  # N * k: past the slots (anchors, unused items)
    counts = torch.zeros(E_local + 1, dtype=torch.int64, device=device).scatter_add_(0, key, torch.ones_like(key))
    # within the capacity by construction, but repeated ids in a token (an input error,
    # reported) could make more items than a row may have: clamp so kernels stay in bounds
    offs = counts[:E_local].cumsum(0).clamp(max=item_capacity).to(torch.int32)
    item_row = slot // k  # N (the zero row) for anchors and unused items
    item_weight = torch.cat([weights_NK.flatten(), weights_NK.new_zeros(1)])[slot]
    slot_item = torch.full((N * k + 1,), -1, dtype=torch.int64, device=device)  # + a sink at N * k
    slot_item.scatter_(0, slot, torch.arange(order.shape[0], device=device))
    return WaveItems(item_row=item_row, item_weight=item_weight, item_expert=sorted_key, offs=offs,
                     slot_item=slot_item[:N * k].view(N, k))


def expert_major(items: Sequence[WaveItems], rows_per_wave: int, num_local_experts: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """All waves' items in one expert-major order (by expert, then wave), for the weight
    gradients that sum over every wave. Sync-free.

    Args:
        items: each wave's `WaveItems` (all of the same item capacity I).
        rows_per_wave: N, the received rows of a wave; wave w's rows are numbered from
            w * (N + 1) in a stack of the waves' row buffers with their zero rows.
    Returns:
        order `[W * I]` (positions in the waves' stacked items), row `[W * I]` (rows in the
        stacked row buffers), offs `[E_local]` int32.
    """
    W, E_local = len(items), num_local_experts
    I = items[0].item_row.shape[0]
    device = items[0].item_row.device
    used = [torch.arange(I, device=device) < it.count for it in items]
    expert = torch.cat([torch.where(u, it.item_expert, E_local) for u, it in zip(used, items)])  # unused: E_local
    key = expert * W + torch.arange(W, device=device).repeat_interleave(I)
    order = torch.sort(key, stable=True).indices
    rows = torch.cat([torch.where(u, it.item_row + w * (rows_per_wave + 1), 0) for w, (u, it) in enumerate(zip(used, items))])
    counts = torch.zeros(E_local + 1, dtype=torch.int64, device=device).scatter_add_(0, expert, torch.ones_like(expert))
    offs = counts[:E_local].cumsum(0).to(torch.int32)
    return order, rows[order], offs
