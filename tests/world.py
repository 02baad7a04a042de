"""Start a Gloo world of N CPU ranks in one call, run a function on every rank, tear down.

    results = run_world(4, my_check, arg1, arg2)

`my_check(rank, world_size, *args)` must be a module-level function (it is pickled into
spawned processes). Each rank is seeded with `1000 + rank`, runs with one intra-op thread,
and always ends with a barrier and `destroy_process_group`. An exception on any rank, or a
rank that does not finish within `timeout_s`, fails the caller with every rank's error.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import queue
import tempfile
import time
import traceback
from datetime import timedelta
from typing import Any, Callable, List


def _rank_main(rank, world_size, store_path, timeout_s, fn, args, results):
    try:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)
        torch.manual_seed(1000 + rank)
        dist.init_process_group(
            "gloo",
            init_method=f"file://{store_path}",
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=timeout_s),
        )
        try:
            out = fn(rank, world_size, *args)
            dist.barrier()
        finally:
            dist.destroy_process_group()
        results.put((rank, True, out))
    except BaseException:  # noqa: BLE001 - reported to the parent, which fails the test
        results.put((rank, False, traceback.format_exc()))


def run_world(world_size: int, fn: Callable[..., Any], *args: Any, timeout_s: float = 120.0) -> List[Any]:
    """Run `fn(rank, world_size, *args)` on `world_size` Gloo ranks; return each rank's result."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        procs = [
            ctx.Process(target=_rank_main, args=(r, world_size, store, timeout_s, fn, args, results), daemon=True)
            for r in range(world_size)
        ]
        for p in procs:
            p.start()
        got, errors = {}, []
        deadline = time.monotonic() + timeout_s + 60
        try:
            while len(got) + len(errors) < world_size:
                try:
                    rank, ok, payload = results.get(timeout=max(0.1, deadline - time.monotonic()))
                except queue.Empty:
                    errors.append(f"timed out: ranks {sorted(set(range(world_size)) - set(got))} did not finish")
                    break
                if ok:
                    got[rank] = payload
                else:
                    errors.append(f"rank {rank}:\n{payload}")
                    deadline = min(deadline, time.monotonic() + 20)  # the others may hang now
        finally:
            for p in procs:
                p.join(timeout=5 if not errors else 0.5)
                if p.is_alive():
                    p.kill()
                    p.join()
        if errors:
            raise AssertionError("\n".join(errors))
        return [got[r] for r in range(world_size)]
