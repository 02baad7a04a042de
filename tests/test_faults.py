"""A rank that raises, dies or stalls, in the middle of a layer or before it: the others
stop within `MoEConfig.timeout_s` with an error that names what they were waiting for
(stage and wave), although the group was made with torch's default timeout (30 minutes)."""
import os
import re
import time

import pytest
import torch

import ep
from ep.transport import CommunicationError
from tests.world import run_world

TIMEOUT_S = 5.0


class Injected(RuntimeError):
    pass


def check_fault(rank, n, mode, stage):
    cfg = ep.MoEConfig(hidden=8, ffn_hidden=6, num_experts=4 * n, top_k=3, num_waves=4, timeout_s=TIMEOUT_S)
    layer = ep.ExpertParallelMoE(cfg).double()
    x = torch.randn(16, 8, dtype=torch.float64, requires_grad=True)
    layer(x).sum().backward()  # a good step first
    if rank == 1:
        original = getattr(ep.stages, stage)

        def faulty(*args, **kwargs):
            wave = args[3] if stage == "linear1" else args[7]
            if wave == 1:
                if mode == "kill":
                    os._exit(17)
                raise Injected(f"injected fault in {stage}, wave 1")
            return original(*args, **kwargs)

        setattr(ep.stages, stage, faulty)
    t0 = time.monotonic()
    try:
        layer(x).sum().backward()
    except Injected as e:
        time.sleep(TIMEOUT_S + 3)  # stay alive: the others must stop on the layer's timeout
        return ("injected", time.monotonic() - t0, str(e))
    except CommunicationError as e:
        return ("stopped", time.monotonic() - t0, str(e))
    raise AssertionError(f"rank {rank}: the layer finished although rank 1 failed")


@pytest.mark.parametrize("mode", ["raise", "kill"])
@pytest.mark.parametrize("stage", ["linear1", "experts_backward"])
def test_fault_stops_every_rank(mode, stage):
    t0 = time.monotonic()
    out = run_world(3, check_fault, mode, stage, timeout_s=TIMEOUT_S, may_die=(1,) if mode == "kill" else (),
                    barrier=False, default_group_timeout=True)
    wall = time.monotonic() - t0
    if mode == "raise":
        assert out[1][0] == "injected"
    else:
        assert out[1] is None  # it died
    for rank in (0, 2):
        what, seconds, msg = out[rank]
        assert what == "stopped", out[rank]
        assert seconds < TIMEOUT_S + 5, f"rank {rank} took {seconds:.1f} s to stop"
        direction = "forward" if stage == "linear1" else "backward"
        assert re.search(rf"rank {rank} failed waiting for .*{direction}.* of wave \d", msg), msg
    print(f"{mode} in {stage}: others stopped after "
          f"{max(out[r][1] for r in (0, 2)):.2f} s (world {wall:.1f} s)")


STALL_S = 3.0


def check_stall_outside(rank, n):
    """Rank 1 is alive but never enters the layer (it sleeps); the others must raise."""
    cfg = ep.MoEConfig(hidden=8, ffn_hidden=6, num_experts=2 * n, top_k=2, num_waves=2, timeout_s=STALL_S)
    layer = ep.ExpertParallelMoE(cfg).double()
    x = torch.randn(10, 8, dtype=torch.float64)
    layer(x)  # a good step first
    if rank == 1:
        time.sleep(STALL_S + 4)
        return ("stalled", 0.0, "")
    t0 = time.monotonic()
    try:
        layer(x)
    except CommunicationError as e:
        return ("stopped", time.monotonic() - t0, str(e))
    raise AssertionError(f"rank {rank}: the layer finished although rank 1 never entered it")


def test_stalled_rank_outside_the_layer():
    out = run_world(3, check_stall_outside, timeout_s=30, barrier=False, default_group_timeout=True)
    assert out[1][0] == "stalled"
    for rank in (0, 2):
        what, seconds, msg = out[rank]
        assert what == "stopped" and STALL_S - 0.5 < seconds < STALL_S + 2, out[rank]
        assert f"rank {rank} failed waiting for plan: count exchange" in msg, msg
