"""The dispatch plan: where every (token, slot) goes, in which wave, and how rows come back.

A *route* is one row on the wire: token t sent to rank r. A token that picks several
experts on one rank travels there once, with its k weights, and comes back once: the
owner sums its experts' outputs for that row. With waves, a route travels in the
dispatch of its *first* wave (the first wave with one of its experts) and the owner
keeps the row for its later waves; the summed row travels back in the combine of its
*last* wave. So waves cost no extra bytes over W=1. (With `dedup_across_waves=False`
a route is (token, rank, wave) instead, first = last wave: more bytes, but each wave's
dispatch and combine carry only that wave's rows.) An *item* is one (received row,
slot) pair, i.e. one row of expert math.

Orders (all stable, so the plan is deterministic):
- sender routes, dispatch order: `(first wave, dest rank, token)`; wave w's dispatch is one
  contiguous range, already split by destination as `all_to_all_single` wants.
- sender routes, combine order: `(last wave, dest rank, first wave, token)`.
- receiver rows: `(first wave, source rank, source's dispatch order)`; rows going back in
  wave w's combine: `(last wave, source rank, first wave, position)`, which is the source's
  combine order.
- items: by local expert, then received row, then slot; wave w's items are contiguous
  because waves are contiguous groups of experts.

The plan is made once per forward from `topk_idx` alone and reused by backward, in pure
steps (no transport here; `ep.plan_exchange.make_plan` makes the two exchanges between them):
1. `sender_side`: routing -> the count table this rank sends (`ep.count_table`: per
   destination its routes per wave, touches, items per expert, and this rank's token count
   and status);
2. `CountTable.parse`: what every rank sent, read on the host once (the layer's only host
   sync) -> the counts (`PlanCounts`); the largest token count bounds every all-to-all's
   rows per peer (`SenderSide.rows_per_peer_bound`, for `Transport.reserve`);
3. `sender_routes`: counts -> the sender's routes in both orders and the routes'
   slot-to-expert tables it sends;
4. `receiver_side`: the received slot tables -> the receiver's tables and the `DispatchPlan`.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .checks import STATUS_SLOTS, value_status
from .count_table import Counts, CountTable, PlanCounts, per_rank
from .kernels.permute import triton_available


def wave_bounds(num_local_experts: int, num_waves: int) -> Tuple[int, ...]:
    """Local-expert boundaries of the W contiguous waves: wave w owns `[b[w], b[w+1])`.

    Sizes differ by at most one: `b[w] = ceil(w * E_local / W)`.
    """
    if not 1 <= num_waves <= num_local_experts:
        raise ValueError(f"num_waves must be in [1, {num_local_experts}], got {num_waves}")
    return tuple(-(-w * num_local_experts // num_waves) for w in range(num_waves + 1))


def block_transpose_index(counts, total: Optional[int] = None, device=None) -> torch.Tensor:
    """Gather index that reorders rows laid out in blocks `(a, b)` into `(b, a)` order.

    Args:
        counts: `[A][B]` ints, rows in block (a, b), blocks stored a-major: host ints
            (computed on the host, then copied to `device` once), or a tensor (computed
            where it lives).
        total: sum(counts) when known on the host (saves a device sync for a CUDA tensor).
    Returns:
        `[sum(counts)]` int64: `rows[index]` holds the same blocks, b-major.
    """
    if not isinstance(counts, torch.Tensor):
        c = np.asarray(counts, dtype=np.int64).reshape(len(counts), -1)
        flat = c.ravel()
        start = (np.cumsum(flat) - flat).reshape(c.shape)
        ct, st = c.T.ravel(), start.T.ravel()
        new_start = np.cumsum(ct) - ct
        index = np.arange(int(flat.sum())) - np.repeat(new_start, ct) + np.repeat(st, ct)
        return torch.from_numpy(index).to(device)
    c = counts.to(torch.int64).reshape(counts.shape[0], -1)
    flat = c.flatten()
    start = (flat.cumsum(0) - flat).view_as(c)
    ct, st = c.t().flatten(), start.t().flatten()
    new_start = ct.cumsum(0) - ct
    total = int(flat.sum()) if total is None else total
    return (
        torch.arange(total, device=c.device)
        - torch.repeat_interleave(new_start, ct, output_size=total)
        + torch.repeat_interleave(st, ct, output_size=total)
    )


def _transposed(counts: Counts) -> List[List[int]]:
    return [list(col) for col in zip(*counts)]


def first_slot_of_channel(channel_TK: torch.Tensor) -> torch.Tensor:
    """For each (token, slot), the first slot of that token with the same channel.

    Args:
        channel_TK: `[T, k]` int64.
    Returns:
        `[T, k]` int64; equal to the slot's own index where it opens its channel.
    """
    same_TKK = channel_TK.unsqueeze(2) == channel_TK.unsqueeze(1)  # [t, j, j']
    return same_TKK.to(torch.uint8).argmax(dim=2)  # first j' with the same channel


def sender_tables(
    topk_idx_TK: torch.Tensor,
    topk_weights_TK: Optional[torch.Tensor],
    num_experts: int,
    layout: CountTable,
    num_ranks: int,
    dedup_across_waves: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The sender's per-slot tables and counts (one Triton kernel on CUDA, torch elsewhere).

    Returns:
        first_TK: `[T, k]` first slot of the token on the same route;
        fw_TK, lw_TK: `[T, k]` first and last wave of the slot's route;
        count_table: `[n, layout.width]` int64, row r for rank r: routes out per first wave,
            routes back per last wave, (route, wave) touches per wave, items per local
            expert of r; the tokens and status columns 0;
        status: `[STATUS_SLOTS]` the value checks (`ep.checks.value_status`).
    """
    T, k = topk_idx_TK.shape
    E_local, W, n = layout.num_local_experts, layout.num_waves, num_ranks
    if topk_idx_TK.is_cuda and triton_available():
        from .checks import IDX_RANGE, IDX_REPEAT, W_NONFINITE
        from .kernels.triton_plan import sender_tables_triton

        first, fw, lw, _, count_table, status = sender_tables_triton(
            topk_idx_TK, topk_weights_TK, num_experts, layout, n, dedup_across_waves, STATUS_SLOTS,
            (IDX_RANGE, IDX_REPEAT, W_NONFINITE),
        )
        return first, fw, lw, count_table, status
    device = topk_idx_TK.device
    status = value_status(topk_idx_TK, topk_weights_TK, num_experts)
    idx = topk_idx_TK.to(torch.int64).clamp(0, num_experts - 1)
    dest_TK = idx // E_local
    wave_TK = (idx % E_local) * W // E_local
    channel_TK = dest_TK if dedup_across_waves else wave_TK * n + dest_TK
    first_TK = first_slot_of_channel(channel_TK)
    opens_TK = first_TK == torch.arange(k, device=device)
    # first and last wave of each slot's route: min / max over the slots sharing it
    same_TKK = channel_TK.unsqueeze(2) == channel_TK.unsqueeze(1)
    waves_TKK = wave_TK.unsqueeze(1).expand(T, k, k)
    fw_TK = torch.where(same_TKK, waves_TKK, W).amin(dim=2)
    lw_TK = torch.where(same_TKK, waves_TKK, -1).amax(dim=2)
    # (route, wave) pairs: a route touched by wave w gets that wave's partial sum
    opens_touch_TK = first_slot_of_channel(wave_TK * n + dest_TK) == torch.arange(k, device=device)
    # each count lands in its destination's row of the table
    row_TK = dest_TK * layout.width
    cells = torch.cat([
        (row_TK + layout.routes_out.start + fw_TK).flatten(),
        (row_TK + layout.routes_back.start + lw_TK).flatten(),
        (row_TK + layout.touches.start + wave_TK).flatten(),
        (row_TK + layout.items.start + idx % E_local).flatten(),
    ])
    counted = torch.cat([opens_TK.flatten(), opens_TK.flatten(), opens_touch_TK.flatten(),
                         torch.ones_like(opens_TK.flatten())]).to(torch.int64)
    count_table = torch.zeros(n, layout.width, dtype=torch.int64, device=device)
    count_table.view(-1).index_add_(0, cells, counted)
    return first_TK, fw_TK, lw_TK, count_table, status


def _offsets(sizes: Sequence[int]) -> Tuple[int, ...]:
    out = [0]
    for s in sizes:
        out.append(out[-1] + s)
    return tuple(out)


@dataclass(frozen=True)
class DispatchPlan:
    """Everything the stages need to move one layer's tokens, for forward and backward.

    Sizes: T tokens here, k slots, n ranks, W waves, E_local experts here, R_send routes
    sent, R_recv rows received, I items (rows of expert math) here.
    """

    num_ranks: int
    num_waves: int
    num_local_experts: int
    num_tokens: int
    top_k: int
    rows_per_peer: int
    """No all-to-all of this plan moves more rows for one peer (the same on every rank)."""
    wave_bounds: Tuple[int, ...]
    """`[W + 1]` local-expert boundaries of the waves."""

    # sender side
    route_token: torch.Tensor
    """`[R_send]` int64: token of each route, in dispatch order."""
    slot_route_flat: torch.Tensor
    """`[T, k]` int64: `route * k + slot` of each (token, slot), an index into a `[R_send, k]` table."""
    send_counts: Counts
    """`[W][n]` routes sent to each rank in each wave's dispatch."""
    back_token: torch.Tensor
    """`[R_send]` int64: token of each route, in combine order."""
    back_counts: Counts
    """`[W][n]` rows coming back from each rank in each wave's combine."""
    token_back_pos: torch.Tensor
    """`[T, k]` int64: for the slot that opens a route, the route's position in combine
    order (its returned row); -1 for the token's other slots (the un-permute's table)."""

    # receiver side
    recv_counts: Counts
    """`[W][n]` rows received from each rank in each wave's dispatch."""
    return_row: torch.Tensor
    """`[R_recv]` int64: received rows in the order they go back (combine order)."""
    return_counts: Counts
    """`[W][n]` rows sent back to each rank in each wave's combine."""
    item_row: torch.Tensor
    """`[I]` int64: received row of each item (rows counted over all waves)."""
    item_slot_flat: torch.Tensor
    """`[I]` int64: `row * k + slot` of each item."""
    items_per_expert: Tuple[int, ...]
    """`[E_local]` items (rows of expert math) of each local expert."""
    touch_counts: Tuple[int, ...]
    """`[W]` touches per wave. A touch is a (wave, received row) pair with items: the
    combine of that wave adds the row's items of the wave to its partial sum."""
    touch_row: torch.Tensor
    """`[N]` int64: received row of each touch (touches wave-major, then by row)."""
    touch_items: torch.Tensor
    """`[N, k]` int64: the touch's items, counted from its wave's first item; -1 pads."""
    touch_carry: torch.Tensor
    """`[N]` bool: an earlier wave left a partial sum of this row."""
    touch_out: torch.Tensor
    """`[N]` int64: where the row goes in its wave's combine when this is its last wave, else -1."""
    touch_slot_flat: torch.Tensor
    """`[N, k]` int64: `row * k + slot` of each of the touch's items; -1 pads."""
    touch_weights: Optional[torch.Tensor]
    """`[N, k]` routing weights of the touch's items (0 pads); None without weights."""
    wave_offs: Tuple[torch.Tensor, ...]
    """`W` int32 device tensors: cumulative item counts of each wave's experts (the
    `offs` of a grouped GEMM over the wave's items)."""
    recv_weights: Optional[torch.Tensor]
    """`[R_recv * k]` routing weight of each received (row, slot), 0 where the slot is
    served elsewhere; the weights' dtype promoted to at least fp32. Values only (no
    autograd): the pipeline sends their gradients back with `stages.exchange_weight_grads`.
    None when the plan was made without weights."""

    # derived offsets, computed once per plan (host ints; the slices below run per wave)
    @cached_property
    def _wave_offsets(self) -> Dict[str, Tuple[int, ...]]:
        per_wave = lambda counts: _offsets([sum(c) for c in counts])  # noqa: E731
        return {
            "send": per_wave(self.send_counts), "recv": per_wave(self.recv_counts),
            "return": per_wave(self.return_counts), "back": per_wave(self.back_counts),
            "touch": _offsets(self.touch_counts),
        }

    def _slice(self, kind: str, wave: int) -> slice:
        off = self._wave_offsets[kind]
        return slice(off[wave], off[wave + 1])

    def dispatch_slice(self, wave: int) -> slice:
        """Wave w's routes in dispatch order (sender side)."""
        return self._slice("send", wave)

    def recv_slice(self, wave: int) -> slice:
        """Wave w's received rows (receiver side)."""
        return self._slice("recv", wave)

    def return_slice(self, wave: int) -> slice:
        """Wave w's rows going back, in `return_row` (receiver side)."""
        return self._slice("return", wave)

    def touch_slice(self, wave: int) -> slice:
        """Wave w's touches (receiver side)."""
        return self._slice("touch", wave)

    def back_slice(self, wave: int) -> slice:
        """Wave w's rows coming back, in `back_token` (sender side)."""
        return self._slice("back", wave)

    @cached_property
    def expert_offsets(self) -> Tuple[int, ...]:
        """`[E_local + 1]` first item of each local expert."""
        return _offsets(self.items_per_expert)

    def item_range(self, wave: int) -> Tuple[int, int]:
        off = self.expert_offsets
        return off[self.wave_bounds[wave]], off[self.wave_bounds[wave + 1]]

    def wave_experts(self, wave: int) -> Tuple[int, int]:
        return self.wave_bounds[wave], self.wave_bounds[wave + 1]

    @property
    def num_routes_sent(self) -> int:
        return self._wave_offsets["send"][-1]

    @property
    def num_rows_received(self) -> int:
        return self._wave_offsets["recv"][-1]

    def send_rank_splits(self) -> List[int]:
        """Routes sent to each rank, summed over waves."""
        return per_rank(self.send_counts)

    def recv_rank_splits(self) -> List[int]:
        """Rows received from each rank, summed over waves."""
        return per_rank(self.recv_counts)


def _wave_offs(items_per_expert: Sequence[int], bounds: Sequence[int], device) -> Tuple[torch.Tensor, ...]:
    """Each wave's cumulative item counts per expert, made on the host, copied once."""
    offs = np.concatenate([np.cumsum(items_per_expert[e0:e1]) for e0, e1 in zip(bounds[:-1], bounds[1:])])
    dev = torch.from_numpy(offs.astype(np.int32)).to(device)
    return tuple(dev[e0:e1] for e0, e1 in zip(bounds[:-1], bounds[1:]))


def route_tables(
    first_TK: torch.Tensor,
    fw_TK: torch.Tensor,
    idx_TK: torch.Tensor,
    topk_weights_TK: Optional[torch.Tensor],
    send_counts: Counts,
    num_local_experts: int,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The sender's routes in dispatch order and their slot tables (torch;
    `ep.kernels.triton_plan.route_tables_triton` on CUDA).

    A route is a slot that opens its (token, channel) (`first_TK[t, j] == j`); routes are
    ordered by (first wave, dest rank, token): within a token each (first wave, dest) key
    occurs once.

    Args:
        first_TK, fw_TK: `[T, k]` from `sender_tables`.
        idx_TK: `[T, k]` int64 global expert ids (in range).
        send_counts: host ints `[W][n]`, routes per (first wave, dest) (the exchanged counts).
    Returns:
        route_slot `[R]` (flat slot of each route), slot_route `[T, k]` (route of each
        slot), and the slot tables `[R, k, 2]` float64 in rank-major order (dest, then first
        wave: as the exchange sends them): per slot of the route's token the local expert
        it serves there (-1: another route's) and its weight (0 without weights).
    """
    T, k = first_TK.shape
    W, n = len(send_counts), len(send_counts[0]) if send_counts else 0
    E_local = num_local_experts
    device = first_TK.device
    R = sum(map(sum, send_counts))
    if first_TK.is_cuda and triton_available() and W * n <= 256:
        from .kernels.triton_plan import route_tables_triton

        return route_tables_triton(first_TK, fw_TK, idx_TK, topk_weights_TK, send_counts, E_local)
    opens_TK = first_TK == torch.arange(k, device=device)
    dest_TK = idx_TK // E_local
    token_TK = torch.arange(T, device=device).unsqueeze(1).expand(T, k)
    never = W * n * T  # sorts after every real key
    key = torch.where(opens_TK, (fw_TK * n + dest_TK) * T + token_TK, torch.full_like(dest_TK, never))
    route_slot = torch.sort(key.flatten(), stable=True).indices[:R]
    route_of_flat_slot = torch.empty(T * k, dtype=torch.int64, device=device)
    route_of_flat_slot[route_slot] = torch.arange(R, device=device)
    slot_route = route_of_flat_slot.view(T, k).gather(1, first_TK)
    slot_route_flat = (slot_route * k + torch.arange(k, device=device)).flatten()
    table = torch.zeros(R * k, 2, dtype=torch.float64, device=device)
    table[:, 0] = -1
    table[slot_route_flat, 0] = (idx_TK % E_local).flatten().to(torch.float64)
    if topk_weights_TK is not None:
        table[slot_route_flat, 1] = topk_weights_TK.detach().flatten().to(torch.float64)
    rank_major = block_transpose_index(send_counts, device=device)
    return route_slot, slot_route, table.view(R, k, 2)[rank_major].contiguous()


def receiver_tables(
    recv_rows: torch.Tensor,
    row_source: torch.Tensor,
    num_local_experts: int,
    num_waves: int,
    num_ranks: int,
    expert_off: Sequence[int],
    return_off: Sequence[int],
    wave_first_item: Sequence[int],
    num_touches: int,
    weights_dtype: torch.dtype,
) -> Dict[str, torch.Tensor]:
    """The receiver's tables (torch; `ep.kernels.triton_plan.receiver_tables_triton` on CUDA).

    Args:
        recv_rows: `[R, k, 2]` float64, the exchanged slot tables in row order: per slot the
            local expert (-1: served elsewhere) and the routing weight.
        row_source: `[R]` int64, the source rank of each row.
        expert_off: host ints `[E_local + 1]`, first item of each local expert.
        return_off: host ints `[W + 1]`, first row of each wave's combine.
        wave_first_item: host ints `[W]`, first item of each wave.
    Returns:
        the `DispatchPlan` fields `recv_weights`, `return_row`, `item_slot_flat`, `item_row`
        and the `touch_*` tables.
    """
    device = recv_rows.device
    R, k = recv_rows.shape[0], recv_rows.shape[1]
    W, n, E_local = num_waves, num_ranks, num_local_experts
    I, N_touch = expert_off[-1], num_touches
    wave_of_expert = torch.arange(E_local, device=device) * W // E_local
    slot_expert_RK = recv_rows[:, :, 0].to(torch.int64)
    recv_weights = recv_rows[:, :, 1].flatten().to(weights_dtype)

    # rows going back: by (last wave, source), stably over row order
    slot_wave_RK = torch.where(slot_expert_RK >= 0, wave_of_expert[slot_expert_RK.clamp(min=0)], -1)
    row_last_wave = slot_wave_RK.amax(dim=1)
    return_row = torch.sort(row_last_wave * n + row_source, stable=True).indices

    # items: received (row, slot) pairs with an expert here, sorted by expert (stable)
    slot_expert = slot_expert_RK.flatten()
    ekey = torch.where(slot_expert >= 0, slot_expert, torch.full_like(slot_expert, E_local))
    item_slot_flat = torch.sort(ekey, stable=True).indices[:I]
    item_row = item_slot_flat // k
    item_wave = slot_wave_RK.flatten()[item_slot_flat]

    # touches: the (wave, row) pairs among items; per touch its items (<= k, relative to
    # the wave's first item), whether an earlier wave left a partial sum, and where the
    # row goes when this is its last wave
    by_touch = torch.sort(item_wave * R + item_row, stable=True)
    opens_touch = torch.ones(I, dtype=torch.bool, device=device)
    opens_touch[1:] = by_touch.values[1:] != by_touch.values[:-1]
    touch_of = opens_touch.to(torch.int64).cumsum(0) - 1  # touch of each (sorted) item
    touch_start = torch.full((N_touch,), I, dtype=torch.int64, device=device)
    touch_start.scatter_reduce_(0, touch_of, torch.arange(I, device=device), "amin")
    slot_in_touch = torch.arange(I, device=device) - touch_start[touch_of]
    item = by_touch.indices
    wave_starts = torch.tensor([list(wave_first_item), list(return_off[:-1])]).to(device)
    wave_first, return_wave_start = wave_starts[0], wave_starts[1]
    touch_items = torch.full((N_touch, k), -1, dtype=torch.int64, device=device)
    touch_items[touch_of, slot_in_touch] = item - wave_first[item_wave[item]]
    touch_slot_flat = torch.full((N_touch, k), -1, dtype=torch.int64, device=device)
    touch_slot_flat[touch_of, slot_in_touch] = item_slot_flat[item]
    touch_row = torch.empty(N_touch, dtype=torch.int64, device=device)
    touch_row[touch_of] = item_row[item]
    touch_wave = torch.empty(N_touch, dtype=torch.int64, device=device)
    touch_wave[touch_of] = item_wave[item]
    row_first_wave = torch.full((R,), W, dtype=torch.int64, device=device)
    row_first_wave.scatter_reduce_(0, item_row, item_wave, "amin")
    return_pos = torch.empty(R, dtype=torch.int64, device=device)
    return_pos[return_row] = torch.arange(R, device=device)
    return_pos -= return_wave_start[row_last_wave]
    touch_out = torch.where(touch_wave == row_last_wave[touch_row], return_pos[touch_row], -1)
    touch_weights = torch.where(touch_slot_flat >= 0, recv_weights[touch_slot_flat.clamp(min=0)], 0)
    return dict(
        recv_weights=recv_weights, return_row=return_row, item_slot_flat=item_slot_flat, item_row=item_row,
        touch_row=touch_row, touch_carry=touch_wave > row_first_wave[touch_row], touch_out=touch_out,
        touch_items=touch_items, touch_slot_flat=touch_slot_flat, touch_weights=touch_weights,
    )


@dataclass(frozen=True)
class SenderSide:
    """This rank's routing, tabled for the count exchange (`sender_side`): T tokens, k slots."""

    layout: CountTable
    wave_bounds: Tuple[int, ...]
    """`[W + 1]` local-expert boundaries of the waves."""
    dedup_across_waves: bool
    idx_TK: torch.Tensor
    """`[T, k]` int64 global expert ids, clamped into `[0, E)` (in range until the status raises)."""
    topk_weights_TK: Optional[torch.Tensor]
    """`[T, k]` routing weights as given, or None."""
    first_TK: torch.Tensor
    """`[T, k]` int64: the first slot of the token on the same route."""
    fw_TK: torch.Tensor
    """`[T, k]` int64: the first wave of the slot's route."""
    lw_TK: torch.Tensor
    """`[T, k]` int64: the last wave of the slot's route."""
    count_table: torch.Tensor
    """`[n, layout.width]` int64: row r is what this rank sends rank r (`ep.count_table`)."""

    @property
    def num_ranks(self) -> int:
        return self.count_table.shape[0]

    def rows_per_peer_bound(self, max_tokens: int) -> int:
        """No all-to-all of this layer moves more rows for one peer than the largest T of any
        rank (`max_tokens`, the same everywhere), or T times the waves a token can reach a
        rank in without the deduplication: the value for `Transport.reserve`."""
        return max_tokens * (1 if self.dedup_across_waves else min(self.layout.num_waves, self.idx_TK.shape[1]))


@dataclass(frozen=True)
class SenderRoutes:
    """The sender's routes, placed by the exchanged counts (`sender_routes`).

    `route_token`, `slot_route_flat`, `back_token` and `token_back_pos` are the
    `DispatchPlan` fields of the same names.
    """

    route_token: torch.Tensor
    slot_route_flat: torch.Tensor
    back_token: torch.Tensor
    token_back_pos: torch.Tensor
    slot_tables: torch.Tensor
    """`[R_send, k, 2]` float64 in rank-major order (dest, then first wave), as the slot-table
    exchange sends them: per slot of the route's token the local expert it serves at the
    destination (-1: another route's) and its weight (0 without weights)."""


def sender_side(
    topk_idx_TK: torch.Tensor,
    topk_weights_TK: Optional[torch.Tensor],
    num_experts: int,
    num_ranks: int,
    num_waves: int,
    dedup_across_waves: bool = True,
    host_status: Optional[Sequence[int]] = None,
) -> SenderSide:
    """Step 1: the routing -> the count table this rank sends, and its per-slot tables.

    Args:
        topk_idx_TK: `[T, k]` int64 global expert ids in `[0, E)`, distinct per token; ids
            that are not are counted in the status (and clamped).
        topk_weights_TK: optional `[T, k]` routing weights (NaN/Inf counted in the status).
        num_experts: E.
        num_ranks: n.
        num_waves: W, 1 <= W <= E / n.
        dedup_across_waves: a token travels to a rank once (True) or once per (rank, wave).
        host_status: this rank's input problems found without looking at values
            (`ep.checks.host_status`), added to the status the table carries.
    Raises:
        ValueError: `num_waves` out of range.
    """
    E_local = num_experts // num_ranks
    bounds = wave_bounds(E_local, num_waves)
    layout = CountTable(num_waves, E_local)
    first_TK, fw_TK, lw_TK, count_table, status = sender_tables(
        topk_idx_TK, topk_weights_TK, num_experts, layout, num_ranks, dedup_across_waves
    )
    if host_status is not None:
        status = status + torch.tensor(host_status, dtype=torch.int64).to(status.device)
    count_table[:, layout.tokens] = topk_idx_TK.shape[0]
    count_table[:, layout.status] = status
    return SenderSide(
        layout=layout, wave_bounds=bounds, dedup_across_waves=dedup_across_waves,
        idx_TK=topk_idx_TK.to(torch.int64).clamp(0, num_experts - 1), topk_weights_TK=topk_weights_TK,
        first_TK=first_TK, fw_TK=fw_TK, lw_TK=lw_TK, count_table=count_table,
    )


def sender_routes(sender: SenderSide, counts: PlanCounts) -> SenderRoutes:
    """Step 3: the sender's routes in dispatch and combine order, and the slot tables it sends.

    Args:
        counts: every rank's count table, parsed (`CountTable.parse`); this step reads
            `send_counts`.
    """
    k = sender.idx_TK.shape[1]
    n, E_local = sender.num_ranks, sender.layout.num_local_experts
    device = sender.idx_TK.device
    route_slot, slot_route, slot_tables = route_tables(
        sender.first_TK, sender.fw_TK, sender.idx_TK, sender.topk_weights_TK, counts.send_counts, E_local,
    )
    route_token = route_slot // k
    # combine order: (last wave, dest) stably over dispatch order -> (.., first wave, token)
    dest_TK = sender.idx_TK // E_local
    back_order = torch.sort((sender.lw_TK * n + dest_TK).flatten()[route_slot], stable=True).indices
    R_send = counts.num_routes_sent
    back_pos_of_route = torch.empty(R_send, dtype=torch.int64, device=device)
    back_pos_of_route[back_order] = torch.arange(R_send, device=device)
    opens_TK = sender.first_TK == torch.arange(k, device=device)
    return SenderRoutes(
        route_token=route_token,
        slot_route_flat=slot_route * k + torch.arange(k, device=device),
        back_token=route_token[back_order],
        token_back_pos=torch.where(opens_TK, back_pos_of_route[slot_route], -1),
        slot_tables=slot_tables,
    )


def _receiver_tabs(
    recv_rows: torch.Tensor, counts: PlanCounts, sender: SenderSide
) -> Dict[str, Optional[torch.Tensor]]:
    """`receiver_tables` (torch) or its Triton kernels (CUDA) on the received slot tables.

    Returns:
        the `DispatchPlan`'s receiver fields (see `receiver_tables`); the weights None when
        the plan is made without weights.
    """
    device = recv_rows.device
    k = recv_rows.shape[1]
    n, W, E_local = sender.num_ranks, sender.layout.num_waves, sender.layout.num_local_experts
    recv_counts = counts.recv_counts
    recv_wave_major = block_transpose_index(_transposed(recv_counts), device=device)
    row_source = torch.from_numpy(
        np.repeat(np.tile(np.arange(n), W), np.asarray(recv_counts, dtype=np.int64).ravel())
    ).to(device)
    expert_off = _offsets(counts.items_per_expert)
    return_off = _offsets([sum(c) for c in counts.return_counts])
    wave_first_item = [expert_off[b] for b in sender.wave_bounds[:-1]]
    I, N_touch = expert_off[-1], sum(counts.touch_counts)
    weights = sender.topk_weights_TK
    wdtype = torch.promote_types(weights.dtype, torch.float32) if weights is not None else torch.float32
    if recv_rows.is_cuda and triton_available():
        from .kernels.triton_plan import receiver_tables_triton

        tabs = receiver_tables_triton(
            recv_rows, recv_wave_major, row_source, E_local, W, n, k, expert_off, _offsets(counts.touch_counts),
            return_off, wave_first_item, I, N_touch, wdtype,
        )
    else:
        tabs = receiver_tables(
            recv_rows[recv_wave_major], row_source, E_local, W, n, expert_off, return_off, wave_first_item, N_touch, wdtype,
        )
    if weights is None:
        tabs["recv_weights"] = tabs["touch_weights"] = None
    return tabs


def receiver_side(
    sender: SenderSide, routes: SenderRoutes, counts: PlanCounts, recv_rows: torch.Tensor
) -> DispatchPlan:
    """Step 4: the receiver's tables from the received slot tables, then the frozen plan.

    Args:
        recv_rows: `[R_recv, k, 2]` float64, the slot tables every rank sent this one
            (`SenderRoutes.slot_tables`), as the exchange lays them out: by source rank, then
            in the source's order (`counts.recv_counts` rows from each per wave).
    """
    T, k = sender.idx_TK.shape
    return DispatchPlan(
        num_ranks=sender.num_ranks,
        num_waves=sender.layout.num_waves,
        num_local_experts=sender.layout.num_local_experts,
        num_tokens=T,
        top_k=k,
        rows_per_peer=sender.rows_per_peer_bound(counts.max_tokens),
        wave_bounds=sender.wave_bounds,
        route_token=routes.route_token,
        slot_route_flat=routes.slot_route_flat,
        send_counts=counts.send_counts,
        back_token=routes.back_token,
        back_counts=counts.back_counts,
        token_back_pos=routes.token_back_pos,
        recv_counts=counts.recv_counts,
        return_counts=counts.return_counts,
        items_per_expert=counts.items_per_expert,
        touch_counts=counts.touch_counts,
        **_receiver_tabs(recv_rows, counts, sender),
        wave_offs=_wave_offs(counts.items_per_expert, sender.wave_bounds, recv_rows.device),
    )
