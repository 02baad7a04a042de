"""GPU correctness (not in CI): the layer in bf16 on NCCL ranks against the float64 reference.

    torchrun --standalone --nproc-per-node N benchmarks/gpu_check.py --json check.json

For every transport (NCCL; on 2+ GPUs also the copy engines), every W in {1, 2, 4, 8},
both deduplication modes, router-made and caller-given
routing: forward output and every gradient (x, router, w1, w2, and the routing weights
when given) within 1e-2 relative of `tests/reference.py` run in float64 on the same
(bf16-rounded) inputs. Also probes `torch._grouped_mm` layouts (which weight layout is
fastest) so the results say what the kernels ran with. Exits non-zero on any failure.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ep  # noqa: E402
from tests.cases import make_problem, rel_err  # noqa: E402
from tests.reference import reference_moe, reference_routing  # noqa: E402

TOL = 1e-2


def check_case(n, rank, device, W, dedup, routing, seed, transport="nccl"):
    p = make_problem(n, k=4, local_experts=8, H=256, F=128, routing=routing, seed=seed, tokens_range=(200, 400))
    bf = lambda t: t.to(device=device, dtype=torch.bfloat16)  # noqa: E731
    cfg = ep.MoEConfig(hidden=p.H, ffn_hidden=p.F, num_experts=p.E, top_k=p.k, num_waves=W, dedup_across_waves=dedup,
                       transport=transport, sm_carveout=4 if transport == "copy_engine" else 0)
    layer = ep.ExpertParallelMoE(cfg).to(device=device, dtype=torch.bfloat16)
    El = p.E // n
    with torch.no_grad():
        layer.router.weight.copy_(bf(p.router))
        layer.experts.w1.copy_(bf(p.w1[rank * El:(rank + 1) * El]))
        layer.experts.w2.copy_(bf(p.w2[rank * El:(rank + 1) * El]))
    rows = p.rows(rank)
    x = bf(p.x[rows]).requires_grad_(True)
    if routing == "router":
        y = layer(x)
        tw = None
    else:
        tw = p.topk_weights[rows].to(device=device, dtype=torch.float32).requires_grad_(True)
        y = layer(x, topk_idx=p.topk_idx[rows].to(device), topk_weights=tw)
    y.backward(bf(p.dy[rows]))
    g = layer.router.weight.grad  # None when routing was given
    drouter = torch.zeros_like(layer.router.weight, dtype=torch.float32) if g is None else g.float().clone()
    dist.all_reduce(drouter)
    got = dict(y=y.detach(), dx=x.grad, dw1=layer.experts.w1.grad, dw2=layer.experts.w2.grad, drouter=drouter,
               dweights=None if tw is None else tw.grad)

    d64 = lambda t: t.to(device=device, dtype=torch.bfloat16).double()  # noqa: E731  same rounding as the layer's inputs
    xr, rr, w1r, w2r = (d64(t).requires_grad_(True) for t in (p.x, p.router, p.w1, p.w2))
    if routing == "router":
        idx, twr = reference_routing(xr, rr, p.k)
    else:
        idx, twr = p.topk_idx.to(device), p.topk_weights.to(device=device, dtype=torch.float32).double().requires_grad_(True)
    yr = reference_moe(xr, w1r, w2r, idx, twr)
    yr.backward(d64(p.dy))
    experts = slice(rank * El, (rank + 1) * El)
    want = dict(y=yr.detach()[rows], dx=xr.grad[rows], dw1=w1r.grad[experts], dw2=w2r.grad[experts],
                drouter=rr.grad if routing == "router" else torch.zeros_like(rr),
                dweights=None if tw is None else twr.grad[rows])
    errs = {}
    for name, w in want.items():
        if w is not None:
            errs[name] = rel_err(got[name].double(), w)
    worst = torch.tensor([max(errs.values())], dtype=torch.float64, device=device)
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    return errs, worst.item()


def probe_grouped_mm(device):
    """Time `torch._grouped_mm` at the dsv3 shape with each weight layout."""
    if not hasattr(torch, "_grouped_mm"):
        return {"error": "torch._grouped_mm missing"}
    E, m, H, F = 32, 1024, 7168, 2048
    x = torch.randn(E * m, H, device=device, dtype=torch.bfloat16)
    offs = torch.arange(1, E + 1, device=device, dtype=torch.int32) * m
    out = {}
    for name, w in (
        ("w1 [E,H,2F] row-major (public layout)", torch.randn(E, H, 2 * F, device=device, dtype=torch.bfloat16)),
        ("w1 as [E,2F,H].transpose (column-major)", torch.randn(E, 2 * F, H, device=device, dtype=torch.bfloat16).transpose(1, 2)),
    ):
        try:
            for _ in range(3):
                torch._grouped_mm(x, w, offs=offs)
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            for _ in range(10):
                torch._grouped_mm(x, w, offs=offs)
            e.record()
            e.synchronize()
            ms = s.elapsed_time(e) / 10
            out[name] = {"ms": ms, "tflops": 2 * E * m * H * 2 * F / ms / 1e9}
        except RuntimeError as err:
            out[name] = {"error": str(err)[:200]}
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default="gpu_check.json")
    args = ap.parse_args()
    ep.init_distributed()
    rank, n = dist.get_rank(), dist.get_world_size()
    cuda = torch.cuda.is_available()  # the CPU run is a dry run of this script, with Gloo
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    results, failed = [], 0
    # every transport this world can run: the copy engines need CUDA ranks of one host
    transports = ["nccl"] + (["copy_engine"] if cuda and n > 1 else [])
    for transport in transports:
        for W in (1, 2, 4, 8):
            for dedup in (True, False):
                for routing in ("router", "skewed"):
                    try:
                        errs, worst = check_case(n, rank, device, W, dedup, routing,
                                                 seed=W * 7 + int(dedup) * 3 + (routing == "router"), transport=transport)
                    except Exception as e:  # noqa: BLE001 - a failing transport is a failed case, not a dead run
                        errs, worst = {"error": repr(e)[:300]}, float("inf")
                    ok = worst < TOL
                    failed += not ok
                    results.append(dict(transport=transport, W=W, dedup_across_waves=dedup, routing=routing,
                                        worst_rel_err=worst, rank0_errs=errs, ok=ok))
                    if rank == 0:
                        print(f"{transport:11} W={W} dedup_across_waves={dedup!s:5} routing={routing:6}  worst rel err "
                              f"{worst:.2e}  {'ok' if ok else 'FAIL'}  "
                              + " ".join(f"{k}={v:.1e}" if isinstance(v, float) else f"{k}={v}" for k, v in errs.items()),
                              flush=True)
    probe = probe_grouped_mm(device) if rank == 0 and cuda else None
    if rank == 0:
        print("grouped_mm layout probe:", json.dumps(probe, indent=1), flush=True)
        with open(args.json, "w") as f:
            json.dump({"world_size": n, "tolerance": TOL, "torch": torch.__version__,
                       "nccl": ".".join(map(str, torch.cuda.nccl.version())) if cuda else None,
                       "device": torch.cuda.get_device_name() if cuda else "cpu",
                       "cases": results, "grouped_mm_probe": probe, "failed": failed}, f, indent=2)
        print(f"{len(results) - failed} passed, {failed} failed", flush=True)
    dist.barrier()
    dist.destroy_process_group()
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
