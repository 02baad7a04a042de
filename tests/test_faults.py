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


# where a fault is injected: (module, function, direction); the fault hits its second call
# in the faulty step, i.e. wave 1 (the functions run once per wave)
STAGES = {
    ("experts", "forward"): ("ep.pipeline", "linear1"),
    ("experts", "backward"): ("ep.pipeline", "linear2_backward_data"),
    ("tokens", "forward"): ("ep.pipeline", "linear1"),
    ("tokens", "backward"): ("ep.pipeline", "linear2_backward_data"),
}


def check_fault(rank, n, mode, split, direction):
    import importlib

    cfg = ep.MoEConfig(hidden=8, ffn_hidden=6, num_experts=4 * n, top_k=3, num_waves=4, wave_split=split,
                       timeout_s=TIMEOUT_S)
    layer = ep.ExpertParallelMoE(cfg).double()
    x = torch.randn(16, 8, dtype=torch.float64, requires_grad=True)
    layer(x).sum().backward()  # a good step first
    if rank == 1:
        module_name, name = STAGES[(split, direction)]
        module = importlib.import_module(module_name)
        original, calls = getattr(module, name), [0]

        def faulty(*args, **kwargs):
            calls[0] += 1
            if calls[0] == 2:  # wave 1
                if mode == "kill":
                    os._exit(17)
                raise Injected(f"injected fault in {name}, wave 1")
            return original(*args, **kwargs)

        setattr(module, name, faulty)
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
@pytest.mark.parametrize("split,direction", sorted(STAGES))
def test_fault_stops_every_rank(mode, split, direction):
    t0 = time.monotonic()
    out = run_world(3, check_fault, mode, split, direction, timeout_s=TIMEOUT_S,
                    may_die=(1,) if mode == "kill" else (), barrier=False, default_group_timeout=True)
    wall = time.monotonic() - t0
    if mode == "raise":
        assert out[1][0] == "injected"
    else:
        assert out[1] is None  # it died
    for rank in (0, 2):
        what, seconds, msg = out[rank]
        assert what == "stopped", out[rank]
        assert seconds < TIMEOUT_S + 5, f"rank {rank} took {seconds:.1f} s to stop"
        assert re.search(rf"rank {rank} failed waiting for .*{direction}.* of wave \d", msg), msg
    print(f"{mode} in the {split} split's {direction}: others stopped after "
          f"{max(out[r][1] for r in (0, 2)):.2f} s (world {wall:.1f} s)")


STALL_S = 3.0


def check_stall_outside(rank, n, split):
    """Rank 1 is alive but never enters the layer (it sleeps); the others must raise."""
    cfg = ep.MoEConfig(hidden=8, ffn_hidden=6, num_experts=2 * n, top_k=2, num_waves=2, timeout_s=STALL_S,
                       wave_split=split)
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


@pytest.mark.parametrize("split,first_wait", [("tokens", "token counts (host exchange)"),
                                              ("experts", "token counts (host exchange)")])
def test_stalled_rank_outside_the_layer(split, first_wait):
    out = run_world(3, check_stall_outside, split, timeout_s=30, barrier=False, default_group_timeout=True)
    assert out[1][0] == "stalled"
    for rank in (0, 2):
        what, seconds, msg = out[rank]
        assert what == "stopped" and STALL_S - 0.5 < seconds < STALL_S + 2, out[rank]
        assert f"rank {rank} failed waiting for {first_wait}" in msg, msg
