"""Host time per call of what one wave issues (CUDA): where do 0.3-0.7 ms per wave go?

    torchrun --standalone --nproc-per-node N benchmarks/host_probe.py --json host_probe.json

Each entry is the median host time to *issue* one call (no synchronisation inside the
timed loop; the device is synchronised between rounds so its queue never fills), at the
dsv3 wave sizes of W=8 on 2 ranks. Not a device-time benchmark.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ep  # noqa: E402
from ep.kernels import gather_rows, reduce_rows  # noqa: E402
from ep.kernels.swiglu import swiglu  # noqa: E402
from ep.transport import make_transport  # noqa: E402


def host_us(fn, calls: int = 20, rounds: int = 15) -> float:
    fn()
    torch.cuda.synchronize()
    per = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        per.append((time.perf_counter() - t0) / calls * 1e6)
        torch.cuda.synchronize()
        dist.barrier()
    return statistics.median(per)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default="host_probe.json")
    args = ap.parse_args()
    ep.init_distributed()
    n, rank = dist.get_world_size(), dist.get_rank()
    dev = torch.device("cuda", torch.cuda.current_device())
    bf = torch.bfloat16
    H, F2, E_w, tpe = 7168, 4096, 4, 1024  # a W=8 wave at dsv3: 4 experts x 1024 tokens
    I = E_w * tpe
    rows = torch.randn(2 * I, H, device=dev, dtype=bf)
    idx = torch.randint(0, 2 * I, (I,), device=dev)
    x = torch.randn(I, H, device=dev, dtype=bf)
    w1 = torch.randn(E_w, H, F2, device=dev, dtype=bf) * 0.02
    offs = torch.arange(1, E_w + 1, device=dev, dtype=torch.int32) * tpe
    h = torch.randn(I, F2, device=dev, dtype=bf)
    items = torch.randint(0, I, (I // 2, 8), device=dev)
    out = torch.empty(I // 2, H, device=dev, dtype=bf)
    wts = torch.rand(I // 2, 8, device=dev)
    small_in = torch.randn(64 * n, H, device=dev, dtype=bf)
    small_out = torch.empty_like(small_in)
    splits = [64] * n
    nccl = make_transport(None, "nccl")
    res = {
        "slice": host_us(lambda: rows[5:1000]),
        "empty [I,H]": host_us(lambda: torch.empty(I, H, device=dev, dtype=bf)),
        "index_select [I of 2I, H]": host_us(lambda: rows.index_select(0, idx)),
        "x[idx]": host_us(lambda: rows[idx]),
        "gather_rows (ours)": host_us(lambda: gather_rows(rows, idx)),
        "torch._grouped_mm [I,H]x[E,H,2F]": host_us(lambda: torch._grouped_mm(x, w1, offs=offs)),
        "swiglu (ours, Triton)": host_us(lambda: swiglu(h)),
        "silu(g)*u (torch)": host_us(lambda: F.silu(h[:, :F2 // 2]) * h[:, F2 // 2:]),
        "reduce_rows (ours, Triton)": host_us(lambda: reduce_rows(x, items, out, wts)),
        "nccl all_to_all (64 rows/peer, async)": host_us(lambda: nccl.all_to_all(small_out, small_in, splits, splits).wait()),
    }
    if n > 1:
        ce = make_transport(None, "copy_engine")
        ce.reserve(64)
        res["copy_engine all_to_all (64 rows/peer)"] = host_us(lambda: ce.all_to_all(small_out, small_in, splits, splits).wait())
    worst = {k: v for k, v in res.items()}
    t = torch.tensor(list(worst.values()), dtype=torch.float64, device=dev)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    res = dict(zip(worst, t.tolist()))
    if rank == 0:
        for k, v in res.items():
            print(f"host_probe  {k:42} {v:8.1f} us per call", flush=True)
        with open(args.json, "w") as f:
            json.dump({"world_size": n, "torch": torch.__version__, "host_us_per_call_max_over_ranks": res}, f, indent=2)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
