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

The plan is made once per forward from `topk_idx` alone and reused by backward. Making it
takes one exchange of per-(rank, wave) route counts and per-(rank, expert) item counts,
read on the host once (the layer's only host sync), and one exchange of the routes'
slot-to-expert tables. The count exchange also carries every rank's token count: the
largest is a bound on every all-to-all's rows per peer, which the plan hands to the
transport (`Transport.reserve`, for transports with preallocated buffers).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .checks import STATUS_SLOTS, raise_on_problems, value_status
from .config import MoEConfig
from .kernels.permute import triton_available
from .transport import Transport

Counts = Tuple[Tuple[int, ...], ...]


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


def _per_rank(counts: Counts) -> List[int]:
    """`[W][n]` counts summed over waves -> `[n]`."""
    return [sum(col) for col in zip(*counts)]


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
    num_local_experts: int,
    num_waves: int,
    num_ranks: int,
    dedup_across_waves: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The sender's per-slot tables and counts (one Triton kernel on CUDA, torch elsewhere).

    Returns:
        first_TK: `[T, k]` first slot of the token on the same route;
        fw_TK, lw_TK: `[T, k]` first and last wave of the slot's route;
        counts: `[3Wn + E]` routes out per (first wave, dest), routes back per (last
            wave, dest), (route, wave) touches per (wave, dest), items per global expert;
        status: `[STATUS_SLOTS]` the value checks (`ep.checks.value_status`).
    """
    T, k = topk_idx_TK.shape
    E_local, W, n = num_local_experts, num_waves, num_ranks
    if topk_idx_TK.is_cuda and triton_available():
        from .checks import IDX_RANGE, IDX_REPEAT, W_NONFINITE
        from .kernels.triton_plan import sender_tables_triton

        first, fw, lw, _, counts, status = sender_tables_triton(
            topk_idx_TK, topk_weights_TK, num_experts, E_local, W, n, dedup_across_waves, STATUS_SLOTS,
            (IDX_RANGE, IDX_REPEAT, W_NONFINITE),
        )
        return first, fw, lw, counts, status
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
    touch_channel_TK = wave_TK * n + dest_TK
    opens_touch_TK = first_slot_of_channel(touch_channel_TK) == torch.arange(k, device=device)
    WN = W * n
    keys = torch.cat([
        (fw_TK * n + dest_TK).flatten(),
        WN + (lw_TK * n + dest_TK).flatten(),
        2 * WN + touch_channel_TK.flatten(),
        3 * WN + idx.flatten(),
    ])
    counted = torch.cat([opens_TK.flatten(), opens_TK.flatten(), opens_touch_TK.flatten(),
                         torch.ones_like(opens_TK.flatten())]).to(torch.int64)
    counts = torch.zeros(3 * WN + num_experts, dtype=torch.int64, device=device)
    counts.index_add_(0, keys, counted)
    return first_TK, fw_TK, lw_TK, counts, status


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
        return _per_rank(self.send_counts)

    def recv_rank_splits(self) -> List[int]:
        """Rows received from each rank, summed over waves."""
        return _per_rank(self.recv_counts)


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


def _bare_config(num_experts: int, k: int) -> MoEConfig:
    """A stand-in config for error messages when make_plan is called without the layer's."""
    return MoEConfig(hidden=1, ffn_hidden=1, num_experts=num_experts, top_k=max(k, 1), num_waves=1)


def make_plan(
    topk_idx_TK: torch.Tensor,
    num_experts: int,
    num_waves: int,
    transport: Transport,
    topk_weights_TK: Optional[torch.Tensor] = None,
    dedup_across_waves: bool = True,
    host_status: Optional[Sequence[int]] = None,
    config: Optional[MoEConfig] = None,
) -> DispatchPlan:
    """Plan one layer's dispatch and combine from the routing.

    Args:
        topk_idx_TK: `[T, k]` int64 global expert ids in `[0, E)`, distinct per token.
        num_experts: E.
        num_waves: W, 1 <= W <= E / n.
        transport: the group's transport; used for one count exchange (read on the host)
            and one exchange of per-route slot tables.
        topk_weights_TK: optional `[T, k]` routing weights, carried to the owners in the
            slot-table exchange (values only, see `DispatchPlan.recv_weights`).
        dedup_across_waves: a token travels to a rank once (True) or once per (rank, wave).
        host_status: this rank's input problems found without looking at values
            (`ep.checks.host_status`); a rank with problems takes part with no tokens.
        config: the layer's config, for error messages.

    Raises:
        InputError: on every rank, when any rank's routing or input is invalid (indices
            out of range or repeated within a token, NaN/Inf weights, ...): the findings
            travel with the count exchange, so no rank is left waiting.
    """
    n = transport.world_size
    device = topk_idx_TK.device
    T, k = topk_idx_TK.shape
    E_local = num_experts // n
    bounds = wave_bounds(E_local, num_waves)
    W = num_waves
    idx = topk_idx_TK.to(torch.int64).clamp(0, num_experts - 1)  # stays in range until we raise
    dest_TK = idx // E_local
    first_TK, fw_TK, lw_TK, counts, status = sender_tables(
        topk_idx_TK, topk_weights_TK, num_experts, E_local, W, n, dedup_across_waves
    )
    opens_TK = first_TK == torch.arange(k, device=device)
    if host_status is not None:
        status = status + torch.tensor(host_status, dtype=torch.int64).to(device)
    WN = W * n
    send_table = torch.cat(
        [
            counts[:WN].view(W, n).t(),  # routes out per (dest, first wave)
            counts[WN:2 * WN].view(W, n).t(),  # routes back per (dest, last wave)
            counts[2 * WN:3 * WN].view(W, n).t(),  # (route, wave) touches per (dest, wave)
            counts[3 * WN:].view(n, E_local),  # items per (dest, expert)
            counts.new_full((n, 1), T),  # my token count
            status.unsqueeze(0).expand(n, STATUS_SLOTS),
        ],
        dim=1,
    ).contiguous()  # [n, 3W + E_local + 1 + S]: what rank r will receive from me, my T, my status
    recv_table = transport.exchange(send_table, "plan: count exchange")
    host = torch.stack([send_table, recv_table]).tolist()  # the one host sync
    raise_on_problems(
        [row[-STATUS_SLOTS:] for row in host[1]], config or _bare_config(num_experts, k), num_experts
    )
    send_counts = tuple(tuple(host[0][r][w] for r in range(n)) for w in range(W))
    back_counts = tuple(tuple(host[0][r][W + w] for r in range(n)) for w in range(W))
    recv_counts = tuple(tuple(host[1][s][w] for s in range(n)) for w in range(W))
    return_counts = tuple(tuple(host[1][s][W + w] for s in range(n)) for w in range(W))
    touch_counts = tuple(sum(host[1][s][2 * W + w] for s in range(n)) for w in range(W))
    items_per_expert = tuple(sum(host[1][s][3 * W + e] for s in range(n)) for e in range(E_local))
    # no all-to-all of this layer moves more rows for one peer than the largest T (same value
    # everywhere), or T times the waves a token can reach a rank in without the deduplication
    transport.reserve(max(host[1][s][3 * W + E_local] for s in range(n)) * (1 if dedup_across_waves else min(W, k)))
    R_send = sum(map(sum, send_counts))
    R_recv = sum(map(sum, recv_counts))
    N_touch = sum(touch_counts)
    I = sum(items_per_expert)

    route_slot, slot_route, table_rank_major = route_tables(
        first_TK, fw_TK, idx, topk_weights_TK, send_counts, E_local,
    )
    route_token = route_slot // k
    slot_route_flat = slot_route * k + torch.arange(k, device=device)
    # combine order: (last wave, dest) stably over dispatch order -> (.., first wave, token)
    back_order = torch.sort((lw_TK * n + dest_TK).flatten()[route_slot], stable=True).indices
    back_pos_of_route = torch.empty(R_send, dtype=torch.int64, device=device)
    back_pos_of_route[back_order] = torch.arange(R_send, device=device)
    token_back_pos = torch.where(opens_TK, back_pos_of_route[slot_route], -1)

    recv_wave_major = block_transpose_index(_transposed(recv_counts), device=device)
    recv_rows = torch.empty(R_recv, k, 2, dtype=torch.float64, device=device)
    transport.all_to_all(
        recv_rows,
        table_rank_major,
        _per_rank(recv_counts),
        _per_rank(send_counts),
        "plan: slot-table exchange",
    ).wait()
    row_source = torch.from_numpy(
        np.repeat(np.tile(np.arange(n), W), np.asarray(recv_counts, dtype=np.int64).ravel())
    ).to(device)
    expert_off = _offsets(items_per_expert)
    return_off = _offsets([sum(c) for c in return_counts])
    wave_first_item = [expert_off[b] for b in bounds[:-1]]
    wdtype = torch.promote_types(topk_weights_TK.dtype, torch.float32) if topk_weights_TK is not None else torch.float32
    if recv_rows.is_cuda and triton_available():
        from .kernels.triton_plan import receiver_tables_triton

        tabs = receiver_tables_triton(
            recv_rows, recv_wave_major, row_source, E_local, W, n, k, expert_off, _offsets(touch_counts), return_off,
            wave_first_item, I, N_touch, wdtype,
        )
    else:
        tabs = receiver_tables(
            recv_rows[recv_wave_major], row_source, E_local, W, n, expert_off, return_off, wave_first_item, N_touch, wdtype,
        )
    if topk_weights_TK is None:
        tabs["recv_weights"] = tabs["touch_weights"] = None

    return DispatchPlan(
        num_ranks=n,
        num_waves=W,
        num_local_experts=E_local,
        num_tokens=T,
        top_k=k,
        wave_bounds=bounds,
        route_token=route_token,
        slot_route_flat=slot_route_flat,
        send_counts=send_counts,
        back_token=route_token[back_order],
        back_counts=back_counts,
        token_back_pos=token_back_pos,
        recv_counts=recv_counts,
        return_counts=return_counts,
        items_per_expert=items_per_expert,
        touch_counts=touch_counts,
        **tabs,
        wave_offs=_wave_offs(items_per_expert, bounds, device),
    )
