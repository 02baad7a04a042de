"""The layer's correctness check under a real launcher (torchrun, mpirun, Slurm, ep.launch).

    <launcher> python tests/launch_check.py [--sockets] [--backend nccl]

Every rank runs the layer (float64, Gloo) against the float64 reference on a problem
every rank builds alike, and exits non-zero on a mismatch. With --sockets, rank 0 also
checks that every TCP socket the runtime opened for listening (on any rank) is on loopback
(sockets the MPI library itself opened before are not the runtime's and are left out). Prints one line per
rank: "launch_check OK rank R/N launcher L".
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import ep  # noqa: E402
from ep.dist import detect_launch  # noqa: E402
from tests.cases import make_problem, rel_err  # noqa: E402
from tests.test_layer import build_layer, run_layer, run_reference  # noqa: E402


def listening_sockets(pids):
    """(address, port) of every TCP socket in LISTEN state owned by one of `pids`."""
    inodes = set()
    for pid in pids:
        fd_dir = f"/proc/{pid}/fd"
        for fd in os.listdir(fd_dir):
            try:
                target = os.readlink(os.path.join(fd_dir, fd))
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            next(f)
            for line in f:
                cols = line.split()
                local, state, inode = cols[1], cols[3], cols[9]
                if state == "0A" and inode in inodes:  # 0A: LISTEN
                    addr, port = local.split(":")
                    found.append((addr, int(port, 16)))
    return found


def is_loopback(hex_addr):
    if len(hex_addr) == 8:  # IPv4, little-endian hex
        return hex_addr.endswith("7F")
    return hex_addr in ("00000000000000000000000001000000",) or hex_addr.startswith("0000000000000000FFFF0000") and hex_addr.endswith("7F")


def main():
    info = detect_launch()  # under mpirun this initialises MPI (mpi4py): its sockets come first
    before = set(listening_sockets([os.getpid()]))
    backend = sys.argv[sys.argv.index("--backend") + 1] if "--backend" in sys.argv else "gloo"
    ep.init_distributed(backend=backend, timeout_s=60)
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    rank, n = dist.get_rank(), dist.get_world_size()
    assert (rank, n) == (info.rank, info.world_size), (rank, n, info)
    torch.manual_seed(1000 + rank)
    p = make_problem(n, k=2, local_experts=2, seed=7)
    ref = run_reference(p, n, rank)
    if device.type == "cuda":  # the same float64 problem, computed on the GPU
        for f in ("x", "dy", "router", "w1", "w2"):
            setattr(p, f, getattr(p, f).to(device))
    got = run_layer(build_layer(p, n, rank, 2).to(device), p, rank)
    got = {k: (v.cpu() if v is not None else None) for k, v in got.items()}
    for name, want in ref.items():
        if want is not None:
            err = rel_err(got[name], want)
            assert err <= 1e-10, f"rank {rank}: {name} rel err {err}"
    if "--sockets" in sys.argv:
        opened = [None] * n
        dist.all_gather_object(opened, sorted(set(listening_sockets([os.getpid()])) - before))
        if rank == 0:
            socks = [s for per_rank in opened for s in per_rank]
            assert socks, "no listening sockets found: the check would be empty"
            bad = [s for s in socks if not is_loopback(s[0])]
            assert not bad, f"sockets listening beyond loopback: {bad} (all: {socks})"
            print(f"launch_check sockets: the runtime listens on {len(socks)} sockets, all on loopback", flush=True)
        dist.barrier()
    print(f"launch_check OK rank {rank}/{n} launcher {info.launcher} local_rank {info.local_rank} "
          f"backend {backend} device {device}", flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
