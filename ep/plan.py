"""The dispatch plan: where every (token, slot) goes, in which wave, and how rows come back.

A *route* is one row on the wire: token t sent to rank r in wave w. A token that picks
several experts of one (rank, wave) travels there once, with its k weights; the owner
sums its experts' outputs for that row and sends one row back. An *item* is one
(received row, slot) pair, i.e. one row of expert math.

Orders (all stable, so the plan is deterministic):
- sender routes: wave-major `(wave, dest rank, token)`; wave w's routes are one contiguous
  range, already split by destination rank as `all_to_all_single` wants.
- receiver rows: wave-major `(wave, source rank, source's route order)`.
- items: by local expert, then received row, then slot; wave w's items are contiguous
  because waves are contiguous groups of experts.

The plan is made once per forward from `topk_idx` alone and reused by backward. Making it
takes one exchange of per-(rank, wave) route counts and per-(rank, expert) item counts,
read on the host once (the layer's only host sync), and one exchange of the routes'
slot-to-expert tables.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence, Tuple

import torch

from .transport import Transport

Counts = Tuple[Tuple[int, ...], ...]


def wave_bounds(num_local_experts: int, num_waves: int) -> Tuple[int, ...]:
    """Local-expert boundaries of the W contiguous waves: wave w owns `[b[w], b[w+1])`.

    Sizes differ by at most one: `b[w] = ceil(w * E_local / W)`.
    """
    if not 1 <= num_waves <= num_local_experts:
        raise ValueError(f"num_waves must be in [1, {num_local_experts}], got {num_waves}")
    return tuple(-(-w * num_local_experts // num_waves) for w in range(num_waves + 1))


def block_transpose_index(counts: Sequence[Sequence[int]], device=None) -> torch.Tensor:
    """Gather index that reorders rows laid out in blocks `(a, b)` into `(b, a)` order.

    Args:
        counts: `[A][B]` host ints, rows in block (a, b), blocks stored a-major.
    Returns:
        `[sum(counts)]` int64: `rows[index]` holds the same blocks, b-major.
    """
    c = torch.tensor(counts, dtype=torch.int64).reshape(len(counts), -1)
    flat = c.flatten()
    start = (flat.cumsum(0) - flat).view_as(c)
    ct, st = c.t().flatten(), start.t().flatten()
    new_start = ct.cumsum(0) - ct
    total = int(flat.sum())
    index = (
        torch.arange(total)
        - torch.repeat_interleave(new_start, ct, output_size=total)
        + torch.repeat_interleave(st, ct, output_size=total)
    )
    return index.to(device)


def first_slot_of_channel(channel_TK: torch.Tensor) -> torch.Tensor:
    """For each (token, slot), the first slot of that token with the same channel.

    Args:
        channel_TK: `[T, k]` int64.
    Returns:
        `[T, k]` int64; equal to the slot's own index where it opens its channel.
    """
    same_TKK = channel_TK.unsqueeze(2) == channel_TK.unsqueeze(1)  # [t, j, j']
    return same_TKK.to(torch.uint8).argmax(dim=2)  # first j' with the same channel


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
    """`[R_send]` int64: token of each route, routes wave-major (wave, dest, token)."""
    slot_route_flat: torch.Tensor
    """`[T, k]` int64: `route * k + slot` of each (token, slot), an index into a `[R_send, k]` table."""
    send_counts: Counts
    """`[W][n]` routes sent to each rank in each wave."""

    # receiver side
    recv_counts: Counts
    """`[W][n]` rows received from each rank in each wave."""
    item_row: torch.Tensor
    """`[I]` int64: received row of each item, counted from its wave's first row."""
    item_slot_flat: torch.Tensor
    """`[I]` int64: `row * k + slot` of each item, rows counted over all waves."""
    items_per_expert: Tuple[int, ...]
    """`[E_local]` items (rows of expert math) of each local expert."""

    # the one exchange of per-route tables (weights) over all waves at once
    send_rank_major: torch.Tensor
    """`[R_send]` int64: gathers sender routes into (dest, wave) order."""
    recv_wave_major: torch.Tensor
    """`[R_recv]` int64: gathers rows received in (source, wave) order into (wave, source)."""
    recv_rank_major: torch.Tensor
    """`[R_recv]` int64: the inverse gather, received rows back into (source, wave) order."""
    send_wave_major: torch.Tensor
    """`[R_send]` int64: the inverse gather, sender routes back into (wave, dest) order."""

    # ---- derived sizes (host ints) -------------------------------------------------
    @property
    def send_offsets(self) -> Tuple[int, ...]:
        """`[W + 1]` first route of each wave."""
        return _offsets([sum(c) for c in self.send_counts])

    @property
    def recv_offsets(self) -> Tuple[int, ...]:
        """`[W + 1]` first received row of each wave."""
        return _offsets([sum(c) for c in self.recv_counts])

    @property
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
        return self.send_offsets[-1]

    @property
    def num_rows_received(self) -> int:
        return self.recv_offsets[-1]

    def send_rank_splits(self) -> List[int]:
        """Routes sent to each rank, summed over waves."""
        return [sum(self.send_counts[w][r] for w in range(self.num_waves)) for r in range(self.num_ranks)]

    def recv_rank_splits(self) -> List[int]:
        return [sum(self.recv_counts[w][r] for w in range(self.num_waves)) for r in range(self.num_ranks)]


def make_plan(
    topk_idx_TK: torch.Tensor,
    num_experts: int,
    num_waves: int,
    transport: Transport,
) -> DispatchPlan:
    """Plan one layer's dispatch and combine from the routing.

    Args:
        topk_idx_TK: `[T, k]` int64 global expert ids in `[0, E)`, distinct per token.
        num_experts: E.
        num_waves: W, 1 <= W <= E / n.
        transport: the group's transport; used for one count exchange (read on the host)
            and one exchange of per-route slot tables.
    """
    n = transport.world_size
    device = topk_idx_TK.device
    T, k = topk_idx_TK.shape
    E_local = num_experts // n
    bounds = wave_bounds(E_local, num_waves)
    W = num_waves
    wave_of_expert = torch.tensor(
        [e * W // E_local for e in range(E_local)], dtype=torch.int64, device=device
    )

    idx = topk_idx_TK.to(torch.int64)
    dest_TK = idx // E_local
    local_expert_TK = idx % E_local
    channel_TK = wave_of_expert[local_expert_TK] * n + dest_TK  # (wave, dest)
    first_TK = first_slot_of_channel(channel_TK)
    opens_TK = first_TK == torch.arange(k, device=device)

    # route counts per (wave, dest) and item counts per (dest, expert): one exchange, one sync
    routes_per_channel = torch.zeros(W * n, dtype=torch.int64, device=device)
    routes_per_channel.index_add_(0, channel_TK.flatten(), opens_TK.flatten().to(torch.int64))
    items_per_global_expert = torch.bincount(idx.flatten(), minlength=num_experts)
    send_table = torch.cat(
        [routes_per_channel.view(W, n).t(), items_per_global_expert.view(n, E_local)], dim=1
    )  # [n, W + E_local]: what rank r will receive from me
    recv_table = transport.exchange(send_table.contiguous())
    host = torch.stack([send_table, recv_table]).tolist()  # the one host sync
    send_counts = tuple(tuple(host[0][r][w] for r in range(n)) for w in range(W))
    recv_counts = tuple(tuple(host[1][s][w] for s in range(n)) for w in range(W))
    items_per_expert = tuple(sum(host[1][s][W + e] for s in range(n)) for e in range(E_local))
    R_send = sum(map(sum, send_counts))
    R_recv = sum(map(sum, recv_counts))

    # routes: the slots that open a (token, channel), sorted by (channel, token)
    token_TK = torch.arange(T, device=device).unsqueeze(1).expand(T, k)
    never = W * n * T  # sorts after every real key
    key = torch.where(opens_TK, channel_TK * T + token_TK, torch.full_like(channel_TK, never))
    route_slot = torch.sort(key.flatten(), stable=True).indices[:R_send]  # flat slot of each route
    route_token = route_slot // k
    route_of_flat_slot = torch.empty(T * k, dtype=torch.int64, device=device)
    route_of_flat_slot[route_slot] = torch.arange(R_send, device=device)
    slot_route = route_of_flat_slot.view(T, k).gather(1, first_TK)
    slot_route_flat = slot_route * k + torch.arange(k, device=device)

    # each route's slot -> local expert table (-1: slot not served by this route), to owners
    table = torch.full((R_send * k,), -1, dtype=torch.int64, device=device)
    table[slot_route_flat.flatten()] = local_expert_TK.flatten()
    send_rank_major = block_transpose_index(send_counts, device)
    recv_src_major = [[recv_counts[w][s] for w in range(W)] for s in range(n)]
    recv_wave_major = block_transpose_index(recv_src_major, device)
    recv_table_rows = torch.empty(R_recv, k, dtype=torch.int64, device=device)
    transport.all_to_all(
        recv_table_rows,
        table.view(R_send, k)[send_rank_major].contiguous(),
        [sum(recv_counts[w][s] for w in range(W)) for s in range(n)],
        [sum(send_counts[w][r] for w in range(W)) for r in range(n)],
    ).wait()
    slot_expert = recv_table_rows[recv_wave_major].flatten()  # [R_recv * k], wave-major rows

    # items: received (row, slot) pairs with an expert here, sorted by expert (stable)
    I = sum(items_per_expert)
    ekey = torch.where(slot_expert >= 0, slot_expert, torch.full_like(slot_expert, E_local))
    item_slot_flat = torch.sort(ekey, stable=True).indices[:I]
    expert_off = _offsets(items_per_expert)
    recv_off = _offsets([sum(c) for c in recv_counts])
    items_per_wave = [expert_off[bounds[w + 1]] - expert_off[bounds[w]] for w in range(W)]
    wave_row_start = torch.repeat_interleave(
        torch.tensor(recv_off[:W], dtype=torch.int64),
        torch.tensor(items_per_wave, dtype=torch.int64),
        output_size=I,
    ).to(device)
    item_row = item_slot_flat // k - wave_row_start

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
        recv_counts=recv_counts,
        item_row=item_row,
        item_slot_flat=item_slot_flat,
        items_per_expert=items_per_expert,
        send_rank_major=send_rank_major,
        recv_wave_major=recv_wave_major,
        recv_rank_major=block_transpose_index(recv_counts, device),
        send_wave_major=block_transpose_index(
            [[send_counts[w][r] for w in range(W)] for r in range(n)], device
        ),
    )
