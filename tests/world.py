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


def _rank_main(rank, world_size, store_path, timeout_s, fn, args, results, barrier, default_group_timeout=False):
    try:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)
        torch.manual_seed(1000 + rank)
        timeout = {} if default_group_timeout else dict(timeout=timedelta(seconds=timeout_s))
        dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world_size,
                                **timeout)
        try:
            out = fn(rank, world_size, *args)
            if barrier:
                dist.barrier()
            results.put((rank, None, None))  # the check returned: what follows is the teardown
        finally:
            dist.destroy_process_group()
        results.put((rank, True, out))
    except BaseException:  # noqa: BLE001 - reported to the parent, which fails the test
        results.put((rank, False, traceback.format_exc()))


def run_world(
    world_size: int, fn: Callable[..., Any], *args: Any, timeout_s: float = 120.0, may_die: tuple = (),
    barrier: bool = True, default_group_timeout: bool = False,
) -> List[Any]:
    """Run `fn(rank, world_size, *args)` on `world_size` Gloo ranks; return each rank's result.

    `timeout_s` is also the process group's timeout, unless `default_group_timeout`: then
    the group is made as a user would, with torch's default (30 minutes for Gloo). Ranks in
    `may_die` may end without a result (a fault test kills them); their result is None.
    `barrier=False` skips the closing barrier (for tests that leave the group broken on purpose).
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        procs = [
            ctx.Process(target=_rank_main, args=(r, world_size, store, timeout_s, fn, args, results, barrier,
                                                 default_group_timeout), daemon=True)
            for r in range(world_size)
        ]
        for p in procs:
            p.start()
        got, errors, failed, returned = {}, [], set(), set()
        deadline = time.monotonic() + timeout_s + 60
        try:
            while True:
                dead = {r for r in may_die if procs[r].exitcode is not None and r not in got}
                if len(got) + len(failed) + len(dead - failed) >= world_size:
                    break
                try:
                    rank, ok, payload = results.get(timeout=0.2)
                except queue.Empty:
                    if time.monotonic() > deadline:
                        missing = sorted(set(range(world_size)) - set(got) - failed - dead)
                        where = {r: "its check returned; destroying the process group" if r in returned else "in its check"
                                 for r in missing}
                        errors.append(f"timed out: ranks {missing} did not finish ({where})")
                        break
                    continue
                if ok is None:
                    returned.add(rank)
                elif ok:
                    got[rank] = payload
                else:
                    failed.add(rank)
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
        return [got.get(r) for r in range(world_size)]


def _pool_rank_main(rank, world_size, store_path, timeout_s, tasks, results):
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=timeout_s))
    try:
        while True:
            task = tasks.get()
            if task is None:
                break
            fn, args = task
            torch.manual_seed(1000 + rank)
            try:
                results.put((rank, True, fn(rank, world_size, *args)))
            except BaseException:  # noqa: BLE001 - reported to the parent
                results.put((rank, False, traceback.format_exc()))
        dist.barrier()
    finally:
        dist.destroy_process_group()


class WorldPool:
    """A Gloo world of N CPU ranks that stays up and runs one task after another
    (for property-based tests, where starting a world per example would dominate)."""

    def __init__(self, world_size: int, timeout_s: float = 60.0) -> None:
        ctx = mp.get_context("spawn")
        self.world_size, self.timeout_s = world_size, timeout_s
        self._tmp = tempfile.TemporaryDirectory()
        self._tasks = [ctx.Queue() for _ in range(world_size)]
        self._results = ctx.Queue()
        store = os.path.join(self._tmp.name, "store")
        self._procs = [
            ctx.Process(target=_pool_rank_main, args=(r, world_size, store, timeout_s, self._tasks[r], self._results),
                        daemon=True)
            for r in range(world_size)
        ]
        for p in self._procs:
            p.start()

    def run(self, fn: Callable[..., Any], *args: Any) -> List[Any]:
        for q in self._tasks:
            q.put((fn, args))
        got, errors = {}, []
        deadline = time.monotonic() + self.timeout_s + 30
        while len(got) + len(errors) < self.world_size:
            try:
                rank, ok, payload = self._results.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                self.close(kill=True)
                raise AssertionError("world pool: a task timed out; the pool is closed")
            if ok:
                got[rank] = payload
            else:
                errors.append(f"rank {rank}:\n{payload}")
        if errors:
            raise AssertionError("\n".join(errors))
        return [got[r] for r in range(self.world_size)]

    def close(self, kill: bool = False) -> None:
        if not kill:
            for q in self._tasks:
                q.put(None)
        for p in self._procs:
            p.join(timeout=0 if kill else 10)
            if p.is_alive():
                p.kill()
                p.join()
        self._tmp.cleanup()
