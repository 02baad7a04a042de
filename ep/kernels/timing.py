"""Device time of a CUDA call, without the host's launch time in it (`ep.auto`'s choices)."""
from __future__ import annotations

from typing import Callable

import torch


def queued_device_ms(fn: Callable[[], object], reps: int, launch_ms: float) -> float:
    """The device time in ms of one `fn()`: `reps` calls queued behind a device-side sleep
    long enough (`launch_ms` of host time a call, at most) that the host has queued them all
    before the device starts, timed by events around them (the host's pace is not in it)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(int(2e6 * (reps + 1) * launch_ms))  # cycles at ~2 GHz
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / reps
