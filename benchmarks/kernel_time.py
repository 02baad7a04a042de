"""A kernel's own time on the GPU, with CUDA events, without the host's time to issue it.

An event recorded on an idle stream fires at once, before the host has even issued the
kernel that follows it, so the interval between two events around one launch includes the
host's launch time: 0.2-0.3 ms for a device-put call on these machines (r34), as long as the
59 MB copy it starts. `hold()` first queues a spin kernel that keeps the stream busy while
the host issues, so the start event fires just before the kernel and the interval is the
kernel's (the GPU runs the spin, the event and the kernel back to back).
"""
from __future__ import annotations

import statistics
from typing import Callable

import torch

HOLD_CYCLES = 4_000_000
"""The spin's length in GPU clock cycles: about 2 ms at the H200's 1.98 GHz, longer than any
issue measured here (up to ~0.4 ms for a Triton launch with its Python), and longer at lower clocks."""


def hold() -> None:
    """Keep the current stream busy for HOLD_CYCLES (issue this, then the start event)."""
    torch.cuda._sleep(HOLD_CYCLES)


def kernel_ms(fn: Callable[[], object], iters: int = 20, warmup: int = 5) -> float:
    """Median over `iters` (after `warmup` calls) of the device time of what `fn` issues on
    the current stream, each call alone and without its issue time."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(iters):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        hold()
        s.record()
        fn()
        e.record()
        e.synchronize()
        ts.append(s.elapsed_time(e))
    return statistics.median(ts)
