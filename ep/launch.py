"""Start N local ranks of a Python program on one host (the CPU simulation).

    python -m ep.launch -n 4 path/to/script.py [args...]
    python -m ep.launch -n 4 -m some.module [args...]

Each rank is a process with torchrun's variables set (RANK, LOCAL_RANK, WORLD_SIZE,
LOCAL_WORLD_SIZE, MASTER_ADDR=127.0.0.1, MASTER_PORT: a free loopback port), so
`ep.init_distributed()` inside it forms one Gloo group. Intra-op threads default to
one per rank. If a rank fails, the others are stopped and the launcher exits non-zero.
"""
from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
from typing import List, Optional, Sequence


def free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_local(nproc: int, argv: Sequence[str], grace_s: float = 10.0) -> int:
    """Run `python argv...` as `nproc` ranks on this host; return the first non-zero exit code."""
    if nproc < 1:
        raise ValueError(f"nproc must be >= 1, got {nproc}")
    port = free_loopback_port()
    procs: List[subprocess.Popen] = []
    for rank in range(nproc):
        env = dict(os.environ)
        env.update(
            RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc),
            MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
        )
        env.setdefault("OMP_NUM_THREADS", "1")
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
        procs.append(subprocess.Popen([sys.executable, *argv], env=env))
    code = 0
    try:
        pending = set(range(nproc))
        while pending:
            for rank in sorted(pending):
                rc = procs[rank].poll()
                if rc is None:
                    continue
                pending.discard(rank)
                if rc != 0 and code == 0:
                    code = rc
                    print(f"ep.launch: rank {rank} exited with {rc}; stopping the others", file=sys.stderr)
                    deadline = time.monotonic() + grace_s
                    for p in procs:
                        while p.poll() is None and time.monotonic() < deadline:
                            time.sleep(0.05)
                        if p.poll() is None:
                            p.kill()
            time.sleep(0.02)
    except KeyboardInterrupt:
        for p in procs:
            p.kill()
        raise
    return code


def main(args: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", "--nproc", type=int, default=4, help="ranks to start (default 4)")
    parser.add_argument("-m", dest="module", help="run a module, as python -m does")
    parser.add_argument("rest", nargs=argparse.REMAINDER, help="script and its arguments")
    ns = parser.parse_args(args)
    if ns.module:
        argv = ["-m", ns.module, *ns.rest]
    elif ns.rest:
        argv = list(ns.rest)
    else:
        parser.error("name a script or -m module")
    return spawn_local(ns.nproc, argv)


if __name__ == "__main__":
    sys.exit(main())
