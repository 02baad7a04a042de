"""The naive expert-parallel MoE forward a user writes by hand (the baseline).

Per (token, slot) rows, no deduplication: sort slots by expert, exchange counts, read them
on the host, `all_to_all_single` the rows, index-gather into expert order, two grouped
GEMMs with SwiGLU, index back, `all_to_all_single` back, `index_add_` in fp32. Forward only.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ep.kernels import grouped_mm


def expert_order(counts_NE: torch.Tensor, total: int) -> torch.Tensor:
    """Gather index that puts received rows, laid out in (source rank, expert) blocks, in
    (expert, source rank) order (each block's rows keep their order).

    Args:
        counts_NE: `[n, E_local]` rows received from each source for each local expert.
        total: sum(counts_NE), known on the host.
    Returns:
        `[total]` int64: `recv[index]` is expert-major.
    """
    n, E_local = counts_NE.shape
    block = torch.arange(n * E_local, device=counts_NE.device)  # source-major, as the rows arrive
    key = (block % E_local) * n + block // E_local  # the block's place in expert-major order
    row_key = torch.repeat_interleave(key, counts_NE.flatten(), output_size=total)
    return torch.argsort(row_key, stable=True)


def naive_forward(x_TH, topk_idx_TK, topk_weights_TK, w1, w2, num_experts, group=None):
    n = dist.get_world_size(group)
    E_local = num_experts // n
    T, k = topk_idx_TK.shape
    flat = topk_idx_TK.flatten()
    order = torch.argsort(flat, stable=True)  # slots in (dest rank, expert) order
    send_counts_NE = torch.bincount(flat, minlength=num_experts).view(n, E_local)
    recv_counts_NE = torch.empty_like(send_counts_NE)
    dist.all_to_all_single(recv_counts_NE, send_counts_NE, group=group)
    host = torch.stack([send_counts_NE, recv_counts_NE]).tolist()
    in_splits = [sum(r) for r in host[0]]
    out_splits = [sum(r) for r in host[1]]
    recv = x_TH.new_empty(sum(out_splits), x_TH.shape[1])
    dist.all_to_all_single(recv, x_TH[order // k], out_splits, in_splits, group=group)
    to_expert = expert_order(recv_counts_NE, sum(out_splits))  # (src, e) -> (e, src)
    per_expert = [sum(host[1][s][e] for s in range(n)) for e in range(E_local)]
    offs = recv_counts_NE.sum(0).cumsum(0).to(torch.int32)
    h = grouped_mm(recv[to_expert], w1, per_expert, offs)
    gate, up = h.chunk(2, dim=-1)
    out = grouped_mm(F.silu(gate) * up, w2, per_expert, offs)
    back_src = torch.empty_like(out)
    back_src[to_expert] = out
    back = x_TH.new_empty(sum(in_splits), x_TH.shape[1])
    dist.all_to_all_single(back, back_src, in_splits, out_splits, group=group)
    y = torch.zeros(x_TH.shape, dtype=torch.float32 if x_TH.dtype != torch.float64 else x_TH.dtype, device=x_TH.device)
    y.index_add_(0, order // k, back.to(y.dtype) * topk_weights_TK.flatten()[order].unsqueeze(1).to(y.dtype))
    return y.to(x_TH.dtype)
