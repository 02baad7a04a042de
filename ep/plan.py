"""The wave plan: pure tensor math over buffers whose sizes are known before the call.

A wave is a set of (token, slot) items chosen by the *wave map* (`WaveMap`), the only place
where the two wave splits differ:
- `wave_split="tokens"`: the w-th of W chunks of every rank's tokens, through all experts
  (token t of T is in wave `t * W // T`);
- `wave_split="experts"`: the w-th group of each rank's local experts (local expert e is in
  wave `e * W // E_local`); with `dedup_across_waves` a token's row travels to a rank once,
  in the wave of its first use there, and that rank's later waves reuse it.
Everything after the map is shared. A *route* is one row on the wire: a token sent to a
rank in a wave with the slots that row serves there; a *touch* is a (token, rank, wave) that
has items, whose result comes back in that wave's combine, summed over its items. Without
dedup across waves a route is a touch (one table serves both directions); with it, a route
(token, rank) travels in its first wave and each of its touches comes back in its own wave.

Every buffer has a size fixed by bounds the host knows without reading the device:
- a *region* holds the rows one rank sends another in one wave: `capacity` rows (token
  waves: at most the tokens of a wave, ceil(T_max / W); expert waves: T_max), lowered by
  `MoEConfig.capacity_factor`; the rows of wave w sent to rank d sit in region (w, d), in
  token order, so the sender alone decides where a row goes (no count exchange);
- a wave's *items* (rows of expert math) at one owner are bounded per wave
  (`WavePlan.item_capacity`), plus one *anchor* item per local expert: a zero row that
  keeps every expert's group non-empty, so grouped kernels write every expert's output
  (their weight gradient) without the host knowing which experts got tokens.
Counts stay on the device: the grouped GEMMs take cumulative counts (`offs`) there, and
the kernels skip the unused rows.

Sender side (`sender_plan`): each route's row among the sent rows and each touch's row among
the returned rows, from `topk_idx` alone. Receiver side (`wave_items`, `return_items`): from
the received rows' slot tables, the items in expert order (stable: by expert, then row,
then slot) and where each touch's sum goes back. Nothing here talks to other ranks: the
pipeline (`ep.pipeline`) moves the rows.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch

from .checks import IDX_RANGE, IDX_REPEAT, ROWS_OVER, STATUS_SLOTS, W_NONFINITE, value_status
from .kernels import gather_rows_into
from .kernels.fp8 import quantize_rows
from .kernels.permute import triton_available, use_triton
from .layout import RowLayout


@dataclass(frozen=True)
class WaveMap:
    """Which wave each (token, slot) item is in, and whether a row serves several waves.

    Args:
        num_waves: W.
        by_experts: False: token waves; True: expert waves (W at most E_local).
        dedup: expert waves only: a token travels to a rank once, in its first wave there.
    """

    num_waves: int
    by_experts: bool = False
    dedup: bool = False

    @classmethod
    def of(cls, wave_split: str, num_waves: int, dedup_across_waves: bool) -> "WaveMap":
        """The map of `MoEConfig`'s knobs; with one wave both splits are the same map."""
        by_experts = wave_split == "experts" and num_waves > 1
        return cls(num_waves, by_experts, by_experts and dedup_across_waves)

    def capacity(self, max_tokens: int, capacity_factor: float = 1.0) -> int:
        """Rows of one region (`wave_capacity`)."""
        return wave_capacity(max_tokens, 1 if self.by_experts else self.num_waves, capacity_factor)

    def item_waves(self, topk_idx_TK: torch.Tensor, num_local_experts: int) -> torch.Tensor:
        """`[T, k]` int64: each item's wave (ids already clamped into range)."""
        T, k = topk_idx_TK.shape
        W = self.num_waves
        if self.by_experts:
            return (topk_idx_TK % num_local_experts) * W // num_local_experts
        return (torch.arange(T, device=topk_idx_TK.device) * W // max(T, 1)).unsqueeze(1).expand(T, k)

    def expert_waves(self, ids: torch.Tensor, num_local_experts: int) -> torch.Tensor:
        """The wave of each local expert id at the owner (-1 stays negative)."""
        return ids * self.num_waves // num_local_experts


def wave_capacity(max_tokens: int, num_waves: int, capacity_factor: float = 1.0) -> int:
    """Rows of one region: ceil(factor x ceil(T_max / W)), at least one row when there are
    tokens; the worst case (every token of the wave) at factor 1. Expert waves pass W=1:
    any token may have a route in any wave."""
    per_wave = -(-max_tokens // num_waves)
    if capacity_factor >= 1 or per_wave == 0:
        return per_wave
    return max(1, math.ceil(per_wave * capacity_factor - 1e-9))


def wave_tokens(num_tokens: int, num_waves: int) -> Tuple[int, ...]:
    """`[W + 1]` first token of each token wave: token t is in wave `t * W // T`."""
    return tuple(-(-w * num_tokens // num_waves) for w in range(num_waves + 1))


PLAN_TENSORS = ("route_row", "row_token", "region_rows", "back_row", "back_token", "back_region_rows", "topk_idx",
                "status")
"""`WavePlan`'s tensor fields (the rest are host sizes, the same on every rank)."""


@dataclass(frozen=True)
class WavePlan:
    """This rank's sending side of one call, and the sizes every rank shares.

    Rows are numbered over all waves: region (w, d) holds rows
    `[(w*n + d) * capacity, (w*n + d + 1) * capacity)`, for the sent rows and the returned
    rows alike. Route and touch tables have one column per rank or per (wave, rank): their
    width says which (`slot_columns`).
    """

    num_ranks: int
    wave_map: WaveMap
    num_local_experts: int
    top_k: int
    capacity: int
    """Rows per region (the same on every rank)."""
    max_tokens: int
    """T_max: the most tokens of any rank in this call (bounds a wave's items with dedup)."""
    route_row: torch.Tensor
    """`[T, C]` int64: the sent row of each route; -1 where the token has none there (or its
    row did not fit a lowered capacity). C = n (a route per rank: token waves, dedup) or
    W x n (a route per wave and rank: expert waves without dedup), column `w * n + d`."""
    row_token: torch.Tensor
    """`[W * n * capacity]` int64: the token in each sent row; -1 for an unused row."""
    region_rows: torch.Tensor
    """`[W, n]` int64: the rows of each region that carry data, from its start (the routes
    placed there come first, in token order), and at least one where the region has rows
    (every sent row carries the sender's status, which the receiver reads from the first
    row of each region of wave 0). The rest of a region is padding: a transport may leave it
    out (`Transport.all_to_all`'s `sent_rows`)."""
    back_row: torch.Tensor
    """`[T, C']` int64: the returned row of each touch (-1: none); the un-permute's table.
    The same tensor as `route_row` unless the map dedups across waves (then C' = W x n)."""
    back_token: torch.Tensor
    """`[W * n * capacity]` int64: the token of each returned row (the backward sends the
    output gradient there); `row_token` unless dedup."""
    back_region_rows: torch.Tensor
    """`[W, n]` int64: `region_rows` of the returned rows; `region_rows` unless dedup."""
    topk_idx: torch.Tensor
    """`[T, k]` int64: each slot's global expert, clamped into `[0, E)` (its rank: `// E_local`)."""
    status: torch.Tensor
    """`[STATUS_SLOTS]` int32: this rank's findings (host and device checks, rows over capacity)."""

    @classmethod
    def of_sizes(cls, num_experts: int, num_ranks: int, wave_map: WaveMap, top_k: int, capacity: int,
                 max_tokens: int) -> "WavePlan":
        """A plan of host sizes only, its tensors None: shapes before any routing (the
        compiled path's fake implementations; the backward's saved plan)."""
        return cls(**plan_sizes(num_experts, num_ranks, wave_map, top_k, capacity, max_tokens),
                   **{name: None for name in PLAN_TENSORS})

    @property
    def num_waves(self) -> int:
        return self.wave_map.num_waves

    @property
    def rows_per_wave(self) -> int:
        return self.num_ranks * self.capacity

    @property
    def experts_per_wave(self) -> int:
        """The most local experts whose items one wave computes."""
        if self.wave_map.by_experts:
            return -(-self.num_local_experts // self.num_waves)
        return self.num_local_experts

    def item_capacity(self, wave: int) -> int:
        """Items wave w may hold at an owner, anchors included (the same on every rank): a row
        serves at most min(k, experts of the wave) items of it; with dedup the wave's rows
        may have arrived in any earlier wave, at most T_max (and the regions' rows) per source."""
        per_row = min(self.top_k, self.experts_per_wave)
        rows = self.rows_per_wave
        if self.wave_map.dedup:
            rows = self.num_ranks * min(self.max_tokens, (wave + 1) * self.capacity)
        return rows * per_row + self.num_local_experts

    @property
    def expected_items_per_expert(self) -> float:
        """Items one local expert gets in a wave with uniform routing and full waves: a host
        number that picks kernels (`ep.kernels.grouped_mm`), never a size."""
        tokens = self.max_tokens if self.wave_map.by_experts else self.capacity
        return tokens * self.num_ranks * self.top_k / max(self.num_local_experts * self.num_ranks, 1)

    def wave_rows(self, wave: int) -> slice:
        """Wave w's rows among all sent (or received, or returned) rows."""
        return slice(wave * self.rows_per_wave, (wave + 1) * self.rows_per_wave)

    def candidate_rows(self, wave: int) -> Tuple[int, int]:
        """(first, count): the received rows that may serve wave w, in the stack of every wave's
        received rows each followed by its zero row (`[W * (N + 1)]`); the zero row after them
        (at first + count) is the wave's anchor row. With dedup: every wave's rows so far."""
        N = self.rows_per_wave
        if self.wave_map.dedup:
            return 0, (wave + 1) * (N + 1) - 1
        return wave * (N + 1), N

    def slot_columns(self, table: torch.Tensor) -> torch.Tensor:
        """`[T, k]` int64: the column of each slot's route (or touch) in `table`."""
        rank = self.topk_idx // self.num_local_experts
        if table.shape[1] == self.num_ranks:
            return rank
        return self.wave_map.item_waves(self.topk_idx, self.num_local_experts) * self.num_ranks + rank


def _place(region_TK: torch.Tensor, columns: int, num_ranks: int, num_regions: int, capacity: int):
    """Rows for the distinct regions of each token's slots: a token's route in region r is
    row `r * capacity + (its earlier tokens with a route in r)` when that fits, else -1.

    Returns the `[T, columns]` table (column `r % columns`), the row tokens
    `[num_regions * capacity]`, the rows in use per region `[num_regions]`, and the routes
    that did not fit (0-d)."""
    T = region_TK.shape[0]
    device = region_TK.device
    # [regions, T]: the scan over tokens runs along the inner dimension
    has_RT = torch.zeros(num_regions, T, dtype=torch.int32, device=device).scatter_(0, region_TK.t(), 1)
    before_RT = has_RT.cumsum(1, dtype=torch.int32) - has_RT
    pos_TK = before_RT.gather(0, region_TK.t()).t().to(torch.int64)
    row_TK = torch.where(pos_TK < capacity, region_TK * capacity + pos_TK, -1)
    table = torch.full((T, columns), -1, dtype=torch.int64, device=device).scatter_(1, region_TK % columns, row_TK)
    rows = num_regions * capacity
    row_token = torch.full((rows + 1,), -1, dtype=torch.int64, device=device)  # + a sink for non-routes
    tokens = torch.arange(T, device=device).unsqueeze(1).expand_as(table)
    row_token.scatter_(0, torch.where(table >= 0, table, rows).flatten(), tokens.flatten())
    placed = has_RT.sum(1)
    region_rows = placed.clamp(min=min(1, capacity), max=capacity).to(torch.int64)
    return table, row_token[:rows], region_rows, (placed - capacity).clamp(min=0).sum()


def sender_plan(
    topk_idx_TK: torch.Tensor,
    topk_weights_TK: Optional[torch.Tensor],
    num_experts: int,
    num_ranks: int,
    wave_map: WaveMap,
    capacity: int,
    max_tokens: int,
    host_status: Optional[Sequence[int]] = None,
) -> WavePlan:
    """Where each route's row goes and each touch's row comes back. Sync-free: device
    tensors in, device tensors out. Token waves on CUDA: two Triton kernels; otherwise torch.

    Args:
        topk_idx_TK: `[T, k]` global expert ids (out-of-range ids are counted in the status
            and clamped, so kernels stay in bounds until the error is raised).
        topk_weights_TK: `[T, k]` or None; only checked here (NaN/Inf).
        capacity: rows per region (`WaveMap.capacity`), the same on every rank.
        max_tokens: T_max, the same on every rank.
        host_status: this rank's host-visible findings (`ep.checks.host_status`), sent along.
    """
    T, k = topk_idx_TK.shape
    n, W = num_ranks, wave_map.num_waves
    E_local = num_experts // n
    device = topk_idx_TK.device
    sizes = plan_sizes(num_experts, n, wave_map, k, capacity, max_tokens)
    if topk_idx_TK.is_cuda and triton_available():
        from .kernels.triton_plan import PER_WAVE, route_mode, route_rows_triton

        slots = (IDX_RANGE, IDX_REPEAT, W_NONFINITE, ROWS_OVER)
        idx64 = topk_idx_TK.to(torch.int64)
        route_row, row_token, status, idx, region_rows = route_rows_triton(
            idx64, topk_weights_TK, num_experts, n, W, capacity, STATUS_SLOTS, slots,
            route_mode(wave_map.by_experts, wave_map.dedup))
        back = (route_row, row_token, region_rows.view(W, n))
        if wave_map.dedup:  # the touches: a route per (wave, rank), as without dedup
            back_row, back_token, back_over, _, back_rows = route_rows_triton(
                idx64, None, num_experts, n, W, capacity, STATUS_SLOTS, slots, PER_WAVE, checks=False)
            back = (back_row, back_token, back_rows.view(W, n))
            status[ROWS_OVER] += back_over[ROWS_OVER]
        _add_host_status(status, host_status)
        return WavePlan(**sizes, route_row=route_row, row_token=row_token, region_rows=region_rows.view(W, n),
                        back_row=back[0], back_token=back[1], back_region_rows=back[2], topk_idx=idx, status=status)
    idx = topk_idx_TK.to(torch.int64).clamp(0, num_experts - 1)
    rank_TK = idx // E_local
    wave_TK = wave_map.item_waves(idx, E_local)
    per_wave = wave_map.by_experts and not wave_map.dedup  # a route per (wave, rank)
    route_wave_TK = wave_TK
    if wave_map.dedup:  # a route per rank, in the first wave of the token's slots there
        same_TKK = rank_TK.unsqueeze(2) == rank_TK.unsqueeze(1)
        route_wave_TK = torch.where(same_TKK, wave_TK.unsqueeze(1), W).amin(dim=2)
    route_row, row_token, region_rows, over = _place(route_wave_TK * n + rank_TK, W * n if per_wave else n, n,
                                                     W * n, capacity)
    region_rows = region_rows.view(W, n)
    back = (route_row, row_token, region_rows)
    if wave_map.dedup:  # each (wave, rank) touch comes back in its own wave
        back_row, back_token, back_rows, back_over = _place(wave_TK * n + rank_TK, W * n, n, W * n, capacity)
        back, over = (back_row, back_token, back_rows.view(W, n)), over + back_over

    checks = value_status(topk_idx_TK, topk_weights_TK, num_experts)
    status = torch.zeros(STATUS_SLOTS, dtype=torch.int64, device=device)
    for slot in (IDX_RANGE, IDX_REPEAT, W_NONFINITE):
        status[slot] = checks[slot]
    status[ROWS_OVER] = over
    _add_host_status(status, host_status)
    return WavePlan(**sizes, route_row=route_row, row_token=row_token, region_rows=region_rows, back_row=back[0],
                    back_token=back[1], back_region_rows=back[2], topk_idx=idx, status=status.to(torch.int32))


def plan_sizes(num_experts: int, num_ranks: int, wave_map: WaveMap, top_k: int, capacity: int,
               max_tokens: int) -> dict:
    """`WavePlan`'s host fields."""
    return dict(num_ranks=num_ranks, wave_map=wave_map, num_local_experts=num_experts // num_ranks, top_k=top_k,
                capacity=capacity, max_tokens=max_tokens)


def _add_host_status(status: torch.Tensor, host_status: Optional[Sequence[int]]) -> None:
    for slot, value in enumerate(host_status or ()):
        if value:  # a host int: added as a kernel argument, no copy to the device
            status[slot] += value


def returned_slot_values(plan: WavePlan, values_RK: torch.Tensor) -> torch.Tensor:
    """`[T, k]`: for slot j of token t, `values[row, j]` of the returned row of that slot's
    touch (`plan.back_row`), 0 where there is none (the backward's routing-weight gradients,
    which come back in the rows' weight columns). One kernel on CUDA."""
    if values_RK.is_cuda and triton_available():
        from .kernels.triton_plan import returned_slots_triton

        return returned_slots_triton(plan.back_row, plan.topk_idx, plan.num_local_experts, values_RK, plan.num_ranks,
                                     plan.num_waves)
    slot_row = plan.back_row.gather(1, plan.slot_columns(plan.back_row))  # [T, k]: each slot's row
    return torch.where(slot_row >= 0, values_RK.gather(0, slot_row.clamp(min=0)), 0)


def pack_rows(x_TH: torch.Tensor, topk_weights_TK: Optional[torch.Tensor], plan: WavePlan, layout: RowLayout,
              rows: torch.Tensor) -> None:
    """Write every sent row (`ep.layout`): its token's hidden vector, and for each slot of the
    token its expert at the row's rank (-1: served by another row) and its weight, and this
    rank's status; with dedup also each slot's returned row within its region. Unused rows
    get -1 everywhere in their slot table (their data is unspecified). One Triton kernel on
    CUDA (below float64), torch elsewhere. With a quantized layout (FP8 dispatch) each
    token's row is quantized in 1x128 tiles (`ep.kernels.fp8.quantize_rows`'s bits) and its
    bytes and tile scales are packed: in the pack kernel itself on CUDA, once per token
    first and then packed in torch.

    Args:
        x_TH: `[T, H]`.
        rows: `[W * n * capacity, layout.width]`.
    """
    n, cap, E = plan.num_ranks, plan.capacity, plan.num_local_experts * plan.num_ranks
    src, data = x_TH, layout.data(rows)
    if use_triton(x_TH) and rows.shape[0]:
        from .kernels.triton_plan import pack_rows_triton, route_mode

        wm = plan.wave_map
        pack_rows_triton(src, plan.topk_idx, topk_weights_TK, plan.row_token, plan.status, data,
                         layout.ids(rows), layout.weights(rows), layout.status(rows), E, n, cap,
                         route_mode(wm.by_experts, wm.dedup), wm.num_waves, plan.back_row if wm.dedup else None,
                         layout.back(rows) if wm.dedup else None, layout.scales(rows) if layout.quantized else None)
        return
    if layout.quantized:  # each token once, before dispatch; its bytes and tile scales travel
        q, scales = quantize_rows(x_TH) if x_TH.shape[0] else (x_TH.new_empty(x_TH.shape, dtype=torch.uint8), None)
        src, data = q.view(torch.uint8), data.view(torch.uint8)
        if scales is not None:
            gather_rows_into(scales, plan.row_token, layout.scales(rows))
    gather_rows_into(src, plan.row_token, data)
    token = plan.row_token
    layout.status(rows).copy_(plan.status.unsqueeze(0).expand(token.shape[0], -1))
    if plan.topk_idx.shape[0] == 0:  # no tokens here: every row is unused
        layout.ids(rows).fill_(-1)
        layout.weights(rows).zero_()
        return
    t = token.clamp(min=0)
    row = torch.arange(token.shape[0], device=rows.device)
    slot_row = plan.route_row.gather(1, plan.slot_columns(plan.route_row))[t]  # [R, k]: the row serving each slot
    here = (slot_row == row.unsqueeze(1)) & (token >= 0).unsqueeze(1)
    layout.ids(rows).copy_(torch.where(here, plan.topk_idx[t] % plan.num_local_experts, -1))
    if topk_weights_TK is not None:
        w = topk_weights_TK.detach().to(layout.acc_dtype)[t]
        layout.weights(rows).copy_(torch.where(here, w, 0))
    else:
        layout.weights(rows).zero_()
    if plan.wave_map.dedup:  # each slot's touch: its row within the returned region
        back = plan.back_row.gather(1, plan.slot_columns(plan.back_row))[t]
        layout.back(rows).copy_(torch.where(here & (back >= 0), back % max(cap, 1), -1))


@dataclass(frozen=True)
class WaveItems:
    """One wave's items at their owner, in expert order (anchors first in each expert's group).

    Sizes: M candidate rows (`WavePlan.candidate_rows`; the anchors' zero row is row M),
    I = the plan's item_capacity, k slots.
    """

    item_row: torch.Tensor
    """`[I]` int64: the candidate row of each item (M for anchors)."""
    item_weight: torch.Tensor
    """`[I]` acc dtype: the item's routing weight (0 for anchors)."""
    item_expert: torch.Tensor
    """`[I]` int64: the item's local expert. Past `count` (unused items) these three are
    unspecified: every consumer stops there."""
    offs: torch.Tensor
    """`[E_local]` int32: cumulative items per expert (anchors included): a grouped GEMM's `offs`."""
    slot_item: torch.Tensor
    """`[M, k]` int64: the item of each candidate (row, slot); -1 where the slot is not this wave's."""

    @property
    def count(self) -> torch.Tensor:
        """`[]` items in use (device)."""
        return self.offs[-1]


def wave_items(ids_MK: torch.Tensor, weights_MK: torch.Tensor, num_local_experts: int, item_capacity: int) -> WaveItems:
    """The items of one wave from its candidate rows' slot tables. Sync-free. A counting sort
    in Triton on CUDA (below float64: its consumers stop at `offs[-1]`, and it leaves the
    entries past it unwritten), a stable sort in torch elsewhere.

    Args:
        ids_MK: `[M, k]` int32: each slot's local expert, -1 for none (`RowLayout.ids`, the
            slots of other waves already masked out).
        weights_MK: `[M, k]` acc dtype: the slots' routing weights (`RowLayout.weights`).
        item_capacity: items this wave may hold, anchors included (`WavePlan.item_capacity`).
    """
    if use_triton(weights_MK):
        from .kernels.triton_plan import wave_items_triton

        return WaveItems(*wave_items_triton(ids_MK, weights_MK, num_local_experts, item_capacity))
    M, k = ids_MK.shape
    E_local, device = num_local_experts, ids_MK.device
    slot_key = torch.where(ids_MK >= 0, ids_MK.to(torch.int64), E_local).flatten()
    key = torch.cat([torch.arange(E_local, device=device), slot_key])  # anchors first: first in their group
    sorted_key, order = torch.sort(key, stable=True)
    order, sorted_key = order[:item_capacity], sorted_key[:item_capacity]
    real = (order >= E_local) & (sorted_key < E_local)
    slot = torch.where(real, order - E_local, M * k)  # M * k: past the slots (anchors, unused items)
    counts = torch.zeros(E_local + 1, dtype=torch.int64, device=device).scatter_add_(0, key, torch.ones_like(key))
    # within the capacity by construction, but repeated ids in a token (an input error,
    # reported) could make more items than a row may have: clamp so kernels stay in bounds
    offs = counts[:E_local].cumsum(0).clamp(max=item_capacity).to(torch.int32)
    item_row = slot // k  # M (the zero row) for anchors and unused items
    item_weight = torch.cat([weights_MK.flatten(), weights_MK.new_zeros(1)])[slot]
    slot_item = torch.full((M * k + 1,), -1, dtype=torch.int64, device=device)  # + a sink at M * k
    slot_item.scatter_(0, slot, torch.arange(order.shape[0], device=device))
    return WaveItems(item_row=item_row, item_weight=item_weight, item_expert=sorted_key, offs=offs,
                     slot_item=slot_item[:M * k].view(M, k))


def wave_slots(plan: WavePlan, layout: RowLayout, candidates: torch.Tensor, wave: int) -> torch.Tensor:
    """`[M, k]` int32: the candidate rows' local expert ids of wave w's slots, -1 elsewhere
    (with dedup a row serves every wave of its token there; otherwise the rows' own ids)."""
    ids = layout.ids(candidates)
    if not plan.wave_map.dedup:
        return ids
    return torch.where(plan.wave_map.expert_waves(ids, plan.num_local_experts) == wave, ids, -1)


def return_items(plan: WavePlan, layout: RowLayout, candidates: torch.Tensor, first_row: int,
                 items: WaveItems) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """With dedup: where wave w's results go back. Row q of the wave's returned rows (region
    of the source, then the touch's place written by the sender, `RowLayout.back`) sums the
    items of its touch.

    Returns back_item `[N, k]` int64 (the item of each returned (row, slot), -1 for none),
    back_weight `[N, k]` (their routing weights) and item_back `[I]` int64 (the returned row
    of each item; N, the zero row, for anchors and unused items)."""
    N, k, cap = plan.rows_per_wave, plan.top_k, plan.capacity
    M = candidates.shape[0]
    device = candidates.device
    source = ((torch.arange(M, device=device) + first_row) % (N + 1)) // max(cap, 1)  # [M]: the sending rank
    back = layout.back(candidates).to(torch.int64)
    ok = (items.slot_item >= 0) & (back >= 0)
    cell = torch.where(ok, (source.unsqueeze(1) * cap + back) * k + torch.arange(k, device=device), N * k).flatten()
    back_item = torch.full((N * k + 1,), -1, dtype=torch.int64, device=device)
    back_item.scatter_(0, cell, items.slot_item.flatten())
    weights = layout.weights(candidates)
    back_weight = weights.new_zeros(N * k + 1).scatter_(0, cell, weights.flatten())
    I = items.item_row.shape[0]
    back_item, back_weight = back_item[:N * k].view(N, k), back_weight[:N * k].view(N, k)
    q = torch.arange(N, device=device).repeat_interleave(k)
    item_back = torch.full((I + 1,), N, dtype=torch.int64, device=device)
    item_back.scatter_(0, torch.where(back_item.flatten() >= 0, back_item.flatten(), I), q)
    return back_item, back_weight, item_back[:I]


def expert_major(items: Sequence[WaveItems], x_rows: Sequence[torch.Tensor], dz_rows: Sequence[torch.Tensor],
                 num_local_experts: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """All waves' items in one expert-major order (by expert, then wave), for the weight
    gradients that sum over every wave. Sync-free.

    Args:
        items: each wave's `WaveItems`.
        x_rows, dz_rows: per wave `[I_w]` the rows of its items in the stacked received rows
            and in the stacked output-gradient rows.
    Returns:
        order `[sum I_w]` (positions in the waves' concatenated items), x rows and dz rows in
        that order, offs `[E_local]` int32.
    """
    E_local = num_local_experts
    device = items[0].item_row.device
    used = [torch.arange(it.item_row.shape[0], device=device) < it.count for it in items]
    expert = torch.cat([torch.where(u, it.item_expert, E_local) for u, it in zip(used, items)])  # unused: E_local
    wave = torch.cat([torch.full_like(u, w, dtype=torch.int64) for w, u in enumerate(used)])
    order = torch.sort(expert * len(items) + wave, stable=True).indices
    x = torch.cat([torch.where(u, r, 0) for u, r in zip(used, x_rows)])[order]
    dz = torch.cat([torch.where(u, r, 0) for u, r in zip(used, dz_rows)])[order]
    counts = torch.zeros(E_local + 1, dtype=torch.int64, device=device).scatter_add_(0, expert, torch.ones_like(expert))
    return order, x, dz, counts[:E_local].cumsum(0).to(torch.int32)
