"""Two processes on one GPU through the device-put transport's real symmetric memory (not in CI).

    torchrun --standalone --nproc-per-node 2 benchmarks/p2p_two_procs.py

Both ranks use GPU 0 (a Gloo group for the rendezvous: NCCL refuses two ranks on one
GPU), so `SymmetricMesh`'s arenas are mapped across processes as between GPUs of one host,
and the kernels of the two processes wait for each other through the GPU's time slices. Each
rank sends its rows tagged with its rank; every call is checked against the rows as sent.
Prints "N passed, M failed" on rank 0.
"""
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ep.transport.device_put import DevicePutTransport, SymmetricMesh  # noqa: E402


def main():
    torch.cuda.set_device(0)
    dist.init_process_group("gloo")
    rank, n = dist.get_rank(), dist.get_world_size()
    dev = torch.device("cuda", 0)
    tr = DevicePutTransport(rank, n, SymmetricMesh(dist.group.WORLD, dev), timeout_s=20.0)
    g = torch.Generator().manual_seed(5)  # the same splits on every rank
    ok = bad = 0
    for call in range(6):
        splits = torch.randint(1, 65, (n, n), generator=g).tolist()
        rows = 64
        inp = torch.randn(sum(splits[rank]), 1024, device=dev).to(torch.bfloat16)
        out = torch.empty(sum(splits[p][rank] for p in range(n)), 1024, device=dev, dtype=torch.bfloat16)
        tr.all_to_all(out, inp, [splits[p][rank] for p in range(n)], splits[rank], f"call {call}", rows).wait()
        # what each peer sent: gather every rank's input on the host (Gloo) and cut rank's share
        ins = [torch.empty(sum(splits[p]), 1024, dtype=torch.bfloat16) for p in range(n)]
        dist.all_gather(ins, inp.cpu())
        want = torch.cat([ins[p][sum(splits[p][:rank]):sum(splits[p][:rank + 1])] for p in range(n)])
        torch.cuda.synchronize()
        good = torch.equal(out.cpu(), want)
        ok, bad = ok + good, bad + (not good)
    tr.raise_errors()
    counts = torch.tensor([ok, bad])
    dist.all_reduce(counts)
    if rank == 0:
        print(f"two processes on one GPU, symmetric memory: {counts[0].item()} passed, {counts[1].item()} failed",
              flush=True)
    dist.barrier()
    dist.destroy_process_group()
    sys.exit(1 if counts[1] else 0)


if __name__ == "__main__":
    main()
