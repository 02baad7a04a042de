"""The whole layer with the device-put transport between processes that share one GPU (not in CI).

    CUDA_VISIBLE_DEVICES=0 torchrun --standalone --nproc-per-node 2 benchmarks/p2p_procs_check.py

For machines with one GPU: torch's symmetric memory refuses ranks on one device (r20) and
ranks that are threads of one process cannot wait for each other (r22-r23: in one CUDA
context an allocation waits for every kernel in flight). Processes have contexts of their
own, so here each rank is a process on GPU 0, the arenas are shared by CUDA IPC (the handles
travel through a Gloo group), and the GPU's time slices let one process's kernels run while
another's wait. The layer (token waves, given routing; W = 1, 2) runs forward and backward
with `transport=DevicePutTransport(...)`, its host side over Gloo, against the float64
reference (`tests/reference.py`), every output and gradient within 1e-2 (bf16). The ranks'
token counts are below `max_tokens`, so the regions have padding, which the transport leaves
out (`sent_rows`). Slow by design (the processes take turns on the GPU): correctness only,
no timing. Any number of processes (`--nproc-per-node 3`: three ranks on the GPU).
Prints "N passed, M failed" on rank 0; exits non-zero on any failure. First run in r25.
"""
from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ep  # noqa: E402
from ep.transport.device_put import DevicePutTransport  # noqa: E402
from ep.transport.torch_dist import TorchDistTransport  # noqa: E402
from tests.cases import make_problem, rel_err  # noqa: E402
from tests.reference import reference_moe  # noqa: E402

DEV = torch.device("cuda", 0)


class IpcMesh:
    """Every rank's arena mapped into every process on this GPU by CUDA IPC."""

    def __init__(self, group) -> None:
        self.group, self.device = group, DEV
        self._keep = []  # this rank's arena and the peers' mappings

    def allocate(self, rank: int, nbytes: int):
        torch.cuda.synchronize(DEV)  # nothing may still use the old arenas
        mine = torch.zeros(nbytes, dtype=torch.uint8, device=DEV)
        torch.cuda.synchronize(DEV)  # zeroed before any peer writes into it
        handles = [None] * dist.get_world_size(self.group)
        dist.all_gather_object(handles, (mine.untyped_storage()._share_cuda_(), mine.storage_offset()),
                               group=self.group)
        arenas = []
        for r, (handle, offset) in enumerate(handles):
            if r == rank:
                arenas.append(mine)
            else:
                storage = torch.UntypedStorage._new_shared_cuda(*handle)
                arenas.append(torch.empty(0, dtype=torch.uint8, device=DEV).set_(storage, offset, (nbytes,)))
        dist.barrier(group=self.group)  # every mapping is made before anyone writes
        self._keep = arenas
        return mine, [a.data_ptr() for a in arenas]


def check(n, rank, W, seed):
    p = make_problem(n, k=4, local_experts=4, H=128, F=64, routing="skewed", seed=seed, tokens_range=(60, 120))
    tr = DevicePutTransport(rank, n, IpcMesh(dist.group.WORLD), TorchDistTransport(), timeout_s=30.0)
    cfg = ep.MoEConfig(hidden=p.H, ffn_hidden=p.F, num_experts=p.E, top_k=p.k, num_waves=W,
                       transport="device_put", max_tokens=120)
    bf = lambda t: t.to(device=DEV, dtype=torch.bfloat16)  # noqa: E731
    layer = ep.ExpertParallelMoE(cfg, transport=tr).to(device=DEV, dtype=torch.bfloat16)
    El = p.E // n
    with torch.no_grad():
        layer.router.weight.copy_(bf(p.router))
        layer.experts.w1.copy_(bf(p.w1[rank * El:(rank + 1) * El]))
        layer.experts.w2.copy_(bf(p.w2[rank * El:(rank + 1) * El]))
    rows = p.rows(rank)
    x = bf(p.x[rows]).requires_grad_(True)
    tw = p.topk_weights[rows].to(device=DEV, dtype=torch.float32).requires_grad_(True)
    y = layer(x, topk_idx=p.topk_idx[rows].to(DEV), topk_weights=tw)
    y.backward(bf(p.dy[rows]))
    layer.check_errors()
    d64 = lambda t: t.to(torch.bfloat16).double().requires_grad_(True)  # noqa: E731  the layer's rounding
    xr, w1r, w2r = d64(p.x), d64(p.w1), d64(p.w2)
    twr = p.topk_weights.float().double().requires_grad_(True)
    yr = reference_moe(xr, w1r, w2r, p.topk_idx, twr)
    yr.backward(p.dy.to(torch.bfloat16).double())
    experts = slice(rank * El, (rank + 1) * El)
    pairs = ((y, yr[rows]), (x.grad, xr.grad[rows]), (layer.experts.w1.grad, w1r.grad[experts]),
             (layer.experts.w2.grad, w2r.grad[experts]), (tw.grad, twr.grad[rows]))
    return max(rel_err(got.detach().double().cpu(), want.detach()) for got, want in pairs)


def main():
    torch.cuda.set_device(DEV)
    dist.init_process_group("gloo")
    rank, n = dist.get_rank(), dist.get_world_size()
    results = []
    for W, seed in ((1, 1), (2, 2)):
        try:
            worst = check(n, rank, W, seed)
        except Exception as e:  # noqa: BLE001 - a failed case, reported
            worst = float("inf")
            print(f"rank {rank} W={W}: {type(e).__name__}: {str(e)[:300]}", flush=True)
        every = [None] * n
        dist.all_gather_object(every, worst)
        results.append(max(every) < 1e-2)
        if rank == 0:
            print(f"layer fwd+bwd, device_put, {n} processes on one GPU, W={W}: worst rel err {max(every):.1e} "
                  f"{'ok' if results[-1] else 'FAIL'}", flush=True)
    if rank == 0:
        print(f"{sum(results)} passed, {len(results) - sum(results)} failed", flush=True)
    dist.barrier()
    dist.destroy_process_group()
    sys.exit(0 if all(results) else 1)


if __name__ == "__main__":
    main()
