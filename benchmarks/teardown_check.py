"""NCCL teardown after a failure, on one GPU (issue 23, item 6): what a `CommunicationError`
does to an NCCL group (`TorchDistTransport.abort`: `ProcessGroup.abort()`), then
`dist.destroy_process_group()`, timed; the interpreter's exit follows.

    torchrun --standalone --nproc-per-node 1 benchmarks/teardown_check.py --json teardown_n1.json

A world of one cannot stall a peer (that case runs on Gloo CPU ranks in `tests/test_faults.py`):
this checks the NCCL half that only a GPU has. The group's communicator is made first (an
all-reduce), the layer runs a forward and a training step on it, collectives are left queued
on the device behind a long kernel, and then the abort, which must return while they are
queued, and the destroy, which must return within seconds.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ep  # noqa: E402
from benchmarks import provenance  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", default="teardown_n1.json")
    args = ap.parse_args()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", device_id=device)
    t = torch.ones(1, device=device)
    dist.all_reduce(t)  # the communicator exists
    cfg = ep.MoEConfig(hidden=256, ffn_hidden=128, num_experts=8, top_k=2, timeout_s=10.0)
    layer = ep.ExpertParallelMoE(cfg).to(device=device, dtype=torch.bfloat16)
    x = torch.randn(64, 256, device=device, dtype=torch.bfloat16, requires_grad=True)
    layer(x).float().square().mean().backward()
    torch.cuda.synchronize()
    a = torch.randn(8192, 8192, device=device)
    for _ in range(20):  # ~0.5 s of device work, then collectives queued behind it
        a = a @ a / 8192 ** 0.5
    queued = [dist.all_reduce(torch.ones(1 << 20, device=device), async_op=True) for _ in range(4)]
    t0 = time.perf_counter()
    layer.transport.abort()  # the transport's failure path
    abort_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    dist.destroy_process_group()
    destroy_s = time.perf_counter() - t0
    ok = abort_s < 10 and destroy_s < 10 and len(queued) == 4
    print(f"teardown after abort on NCCL: abort {abort_s:.3f} s, destroy_process_group {destroy_s:.3f} s  "
          f"{'ok' if ok else 'FAIL'}", flush=True)
    provenance.dump(args.json, rows=[dict(check="nccl_teardown", abort_s=abort_s, destroy_s=destroy_s, ok=ok)])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
