"""The expert-wave plan's two exchanges: the one place where the plan meets the transport.

`make_plan` runs the pure steps of `ep.plan` with the transport between them: the count
exchange (`ep.count_table`), read on the host once with what this rank sent (the layer's
only host sync), then the exchange of the routes' slot tables.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .checks import raise_on_problems
from .config import MoEConfig
from .count_table import per_rank
from .plan import DispatchPlan, receiver_side, sender_routes, sender_side
from .transport import Transport


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
    """Plan one layer's dispatch and combine from the routing (collective: every rank calls it).

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
    sender = sender_side(
        topk_idx_TK, topk_weights_TK, num_experts, transport.world_size, num_waves, dedup_across_waves, host_status
    )
    received = transport.exchange(sender.count_table, "plan: count exchange")
    sent_host, received_host = torch.stack([sender.count_table, received]).tolist()  # the one host sync
    counts = sender.layout.parse(sent_host, received_host)
    raise_on_problems(counts.status_by_rank, config or _bare_config(num_experts, topk_idx_TK.shape[1]), num_experts)
    transport.reserve(sender.rows_per_peer_bound(counts.max_tokens))
    routes = sender_routes(sender, counts)
    recv_rows = torch.empty(counts.num_rows_received, topk_idx_TK.shape[1], 2, dtype=torch.float64,
                            device=topk_idx_TK.device)
    transport.all_to_all(
        recv_rows, routes.slot_tables, per_rank(counts.recv_counts), per_rank(counts.send_counts),
        "plan: slot-table exchange",
    ).wait()
    return receiver_side(sender, routes, counts, recv_rows)
