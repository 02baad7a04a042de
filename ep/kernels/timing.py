"""Device time of a CUDA call, without the host's launch time in it (`ep.auto`'s choices,
`benchmarks/fp8_gemm_sweep.py`)."""
from __future__ import annotations

import time
from typing import Callable

import torch


def device_ms(fn: Callable[[], object], reps: int = 3, warmup: int = 1,
              agree: Callable[[float], float] = lambda ms: ms) -> float:
    """The device time in ms of one `fn()` after `warmup` calls: `reps` calls queued behind a
    device-side sleep long enough (from one synchronised call's wall time, `agree`d on: e.g.
    the ranks' largest, so every rank sleeps as long) that the host has queued them all before
    the device starts, timed by events around them (the host's pace is not in it)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    bound_ms = agree((time.perf_counter() - t0) * 1e3)  # an upper bound of one call's launch time
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(int(2e6 * (reps + 1) * bound_ms))  # cycles at ~2 GHz
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / reps
