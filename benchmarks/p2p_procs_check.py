"""The whole layer with the device-put transport between processes that share one GPU (not in CI).

    CUDA_VISIBLE_DEVICES=0 torchrun --standalone --nproc-per-node 2 benchmarks/p2p_procs_check.py

For machines with one GPU: torch's symmetric memory refuses ranks on one device (r20) and
ranks that are threads of one process cannot wait for each other (r22-r23: in one CUDA
context an allocation waits for every kernel in flight). Processes have contexts of their
own, so here each rank is a process on GPU 0, the arenas are shared by CUDA IPC (the handles
travel through a Gloo group), and the GPU's time slices let one process's kernels run while
another's wait. The layer (given routing; token waves W = 1, 2; expert waves W = 2 with and
without dedup across waves) runs forward and backward with `transport=DevicePutTransport(...)`,
its host side over Gloo, against the float64 reference (`tests/reference.py`), every output
and gradient within 1e-2 (bf16). Then, per wave split at W = 2: after two warm-up steps a
forward and a training step under `torch.cuda.set_sync_debug_mode("error")`, and the forward
and the training step captured in CUDA graphs, replayed with new inputs of the same shape
(each replay against the reference). Then `torch.compile(layer, fullgraph=True)` (default
and "reduce-overhead", both splits), forward and backward, three calls each against the
reference (issue 23: compile with every transport where it runs). The ranks'
token counts are below `max_tokens`, so the regions have padding, which the transport leaves
out (`sent_rows`). Slow by design (the processes take turns on the GPU): correctness only,
no timing. Any number of processes (`--nproc-per-node 3`: three ranks on the GPU).
Prints "N passed, M failed" on rank 0; exits non-zero on any failure. First run in r25.
`EP_CASES=compile` runs only the cases whose names hold that string.
"""
from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ep  # noqa: E402
from ep.pipeline import outside_graph_pools  # noqa: E402
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
        # outside any graph pool (cudagraph trees' warm-up), as torch's symmetric memory is
        mine = outside_graph_pools(DEV, lambda: torch.zeros(nbytes, dtype=torch.uint8, device=DEV))
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


def _layer(p, n, rank, W, split, dedup):
    tr = DevicePutTransport(rank, n, IpcMesh(dist.group.WORLD), TorchDistTransport(), timeout_s=30.0)
    cfg = ep.MoEConfig(hidden=p.H, ffn_hidden=p.F, num_experts=p.E, top_k=p.k, num_waves=W, wave_split=split,
                       dedup_across_waves=dedup, transport="device_put", max_tokens=120)
    layer = ep.ExpertParallelMoE(cfg, transport=tr).to(device=DEV, dtype=torch.bfloat16)
    El = p.E // n
    with torch.no_grad():
        layer.router.weight.copy_(_bf(p.router))
        layer.experts.w1.copy_(_bf(p.w1[rank * El:(rank + 1) * El]))
        layer.experts.w2.copy_(_bf(p.w2[rank * El:(rank + 1) * El]))
    return layer


def _bf(t):
    return t.to(device=DEV, dtype=torch.bfloat16)


def _worst(p, n, rank, y, dx, dw1, dw2, dtw) -> float:
    """The largest relative error of y and every gradient against the float64 reference."""
    rows, El = p.rows(rank), p.E // n
    d64 = lambda t: t.to(torch.bfloat16).double().requires_grad_(True)  # noqa: E731  the layer's rounding
    xr, w1r, w2r = d64(p.x), d64(p.w1), d64(p.w2)
    twr = p.topk_weights.float().double().requires_grad_(True)
    yr = reference_moe(xr, w1r, w2r, p.topk_idx, twr)
    yr.backward(p.dy.to(torch.bfloat16).double())
    experts = slice(rank * El, (rank + 1) * El)
    pairs = ((y, yr[rows]), (dx, xr.grad[rows]), (dw1, w1r.grad[experts]), (dw2, w2r.grad[experts]),
             (dtw, twr.grad[rows]))
    return max(rel_err(got.detach().double().cpu(), want.detach()) for got, want in pairs)


def check(n, rank, W, seed, split="tokens", dedup=True):
    p = make_problem(n, k=4, local_experts=4, H=128, F=64, routing="skewed", seed=seed, tokens_range=(60, 120))
    layer = _layer(p, n, rank, W, split, dedup)
    rows = p.rows(rank)
    x = _bf(p.x[rows]).requires_grad_(True)
    tw = p.topk_weights[rows].to(device=DEV, dtype=torch.float32).requires_grad_(True)
    y = layer(x, topk_idx=p.topk_idx[rows].to(DEV), topk_weights=tw)
    y.backward(_bf(p.dy[rows]))
    layer.check_errors()
    return _worst(p, n, rank, y, x.grad, layer.experts.w1.grad, layer.experts.w2.grad, tw.grad)


def check_sync_free_and_graphs(n, rank, split, dedup, W=2):
    """A forward and a training step under sync debug mode "error", then both captured in CUDA
    graphs and replayed with two new inputs (tokens fixed per rank: a graph's shapes are)."""
    tokens = [80 + 8 * r for r in range(n)]
    p0 = make_problem(n, k=4, local_experts=4, H=128, F=64, routing="skewed", seed=31, tokens_per_rank=tokens)
    layer = _layer(p0, n, rank, W, split, dedup)
    rows = p0.rows(rank)
    static = dict(x=_bf(p0.x[rows]).requires_grad_(True), idx=p0.topk_idx[rows].to(DEV),
                  tw=p0.topk_weights[rows].to(device=DEV, dtype=torch.float32).requires_grad_(True),
                  dy=_bf(p0.dy[rows]))

    def fwd():
        return layer(static["x"], topk_idx=static["idx"], topk_weights=static["tw"])

    def step():
        y = fwd()
        y.backward(static["dy"])
        return y

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the default stream, as torch.cuda.graph wants
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    dist.barrier()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.no_grad():
            fwd()
        step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    layer.check_errors()
    g_fwd, g_step = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(g_fwd):
        y_fwd = fwd()
    with torch.cuda.graph(g_step):
        y_step = step()
    worst = 0.0
    params = (static["x"], layer.experts.w1, layer.experts.w2, static["tw"])  # _worst's order: dx, dw1, dw2, dweights
    for trial in range(2):
        p = make_problem(n, k=4, local_experts=4, H=128, F=64, routing="skewed", seed=40 + trial, tokens_per_rank=tokens)
        p.router, p.w1, p.w2 = p0.router, p0.w1, p0.w2  # new inputs, the layer's weights
        with torch.no_grad():
            static["x"].copy_(_bf(p.x[rows]))
            static["idx"].copy_(p.topk_idx[rows].to(DEV))
            static["tw"].copy_(p.topk_weights[rows].to(device=DEV, dtype=torch.float32))
            static["dy"].copy_(_bf(p.dy[rows]))
            for t in params:
                t.grad.zero_()
        dist.barrier()
        g_fwd.replay()
        g_step.replay()
        torch.cuda.synchronize()
        worst = max(worst, _worst(p, n, rank, y_step, *(t.grad for t in params)))
        fwd_err = _worst(p, n, rank, y_fwd, *(t.grad for t in params))  # the forward graph's y (grads as above)
        worst = max(worst, fwd_err)
    layer.check_errors()
    return worst


def check_compiled(n, rank, split, W, mode=None):
    """`torch.compile(layer, fullgraph=True, mode=mode)` with the device-put transport (issue 23):
    forward and backward, three calls with new inputs (the first traces, with the replicas'
    sync; the later ones run the graph without it: in "reduce-overhead", the second warms up
    cudagraph trees (or records) and the third replays), each against the float64 reference."""
    p0 = make_problem(n, k=4, local_experts=4, H=128, F=64, routing="skewed", seed=50 + W, tokens_range=(60, 120))
    layer = _layer(p0, n, rank, W, split, True)
    if mode == "reduce-overhead":  # a failure names where what it found in the pool was allocated
        import torch._inductor.config as inductor_config

        inductor_config.triton.cudagraph_trees_history_recording = True
    compiled = torch.compile(layer, fullgraph=True, mode=mode)
    rows = p0.rows(rank)
    worst = 0.0
    for call in range(3):
        p = make_problem(n, k=4, local_experts=4, H=128, F=64, routing="skewed", seed=60 + call,
                         tokens_per_rank=p0.tokens_per_rank)
        p.router, p.w1, p.w2 = p0.router, p0.w1, p0.w2  # new inputs, the layer's weights
        x = _bf(p.x[rows]).requires_grad_(True)
        tw = p.topk_weights[rows].to(device=DEV, dtype=torch.float32).requires_grad_(True)
        layer.zero_grad(set_to_none=True)
        y = compiled(x, topk_idx=p.topk_idx[rows].to(DEV), topk_weights=tw)
        y.backward(_bf(p.dy[rows]))
        worst = max(worst, _worst(p, n, rank, y, x.grad, layer.experts.w1.grad, layer.experts.w2.grad, tw.grad))
    layer.check_errors()
    return worst


def release_case() -> None:
    """Drop what a case left: compiled graphs (Dynamo's caches hold the layer), the layer and
    its transport's CUDA-IPC mappings, on every process while all of them live, so no case
    runs beside another's arenas. (r42a: an intermittent abort at process exit after every
    case passed, "corrupted double-linked list", 3 of 5 full runs, 0 of 4 runs of one kind of
    case each; not in Python code: faulthandler printed no stack. This release did not stop it.
    Session 15, untested yet: then every process frees the blocks its peers had mapped and
    have let go (`torch.cuda.ipc_collect`), so none is left for torch's IPC bookkeeping to free
    during the interpreter's teardown, the suspect for the heap corruption.)"""
    import gc

    torch._dynamo.reset()
    gc.collect()
    torch.cuda.synchronize(DEV)
    dist.barrier()  # every process has dropped its mappings of the peers' arenas
    torch.cuda.ipc_collect()
    dist.barrier()


def main():
    torch.cuda.set_device(DEV)
    dist.init_process_group("gloo")
    rank, n = dist.get_rank(), dist.get_world_size()
    results = []
    cases = [(f"layer fwd+bwd, tokens W={W}", lambda W=W: check(n, rank, W, W)) for W in (1, 2)]
    cases += [(f"layer fwd+bwd, experts W=2 dedup={d}", lambda d=d: check(n, rank, 2, 5 + d, "experts", d))
              for d in (True, False)]
    cases += [(f"sync-free step and CUDA graphs, {s} W=2 dedup={d}",
               lambda s=s, d=d: check_sync_free_and_graphs(n, rank, s, d))
              for s, d in (("tokens", True), ("experts", True), ("experts", False))]
    cases += [(f"torch.compile fullgraph {m or 'default'}, {s} W=2 fwd+bwd",
               lambda s=s, m=m: check_compiled(n, rank, s, 2, m))
              for s in ("tokens", "experts") for m in (None, "reduce-overhead")]
    only = os.environ.get("EP_CASES")  # a substring: run only the cases whose names hold it
    for name, case in cases if only is None else [c for c in cases if only in c[0]]:
        try:
            worst = case()
        except Exception as e:  # noqa: BLE001 - a failed case, reported
            worst = float("inf")
            said = str(e)
            print(f"rank {rank} {name}: {type(e).__name__}: {said[:4000 if 'cudagraph pool' in said else 300]}",
                  flush=True)
        release_case()
        every = [None] * n
        dist.all_gather_object(every, worst)
        results.append(max(every) < 1e-2)
        if rank == 0:
            print(f"{name}, device_put, {n} processes on one GPU: worst rel err {max(every):.1e} "
                  f"{'ok' if results[-1] else 'FAIL'}", flush=True)
    if rank == 0:
        print(f"{sum(results)} passed, {len(results) - sum(results)} failed", flush=True)
    dist.barrier()
    dist.destroy_process_group()
    sys.exit(0 if all(results) else 1)


if __name__ == "__main__":
    main()
