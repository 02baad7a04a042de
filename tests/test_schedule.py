"""The wave schedule's issue order (`ep.pipeline.run_waves`) and what the plan tells the transport."""
import pytest
import torch

from ep.pipeline import run_waves
from ep.plan_exchange import make_plan
from ep.transport import Done, LocalTransport


class _Flight:
    def __init__(self, log, name):
        self.log, self.name = log, name

    def wait(self):
        self.log.append(f"wait {self.name}")


def _order(W, math_first):
    log = []

    def start_in(w):
        log.append(f"in{w}")
        return _Flight(log, f"in{w}")

    def compute(w):
        log.append(f"math{w}")

        def send():
            log.append(f"out{w}")
            return _Flight(log, f"out{w}")

        return send

    run_waves(W, start_in, compute, math_first)
    return log


def test_math_first_issues_wave0_before_the_other_inbound_transfers():
    assert _order(3, math_first=True) == [
        "in0", "wait in0", "math0", "in1", "in2", "out0",
        "wait in1", "math1", "out1", "wait in2", "math2", "out2",
        "wait out0", "wait out1", "wait out2",
    ]


def test_inbound_first_on_cpu():
    assert _order(3, math_first=False) == [
        "in0", "in1", "in2", "wait in0", "math0", "out0",
        "wait in1", "math1", "out1", "wait in2", "math2", "out2",
        "wait out0", "wait out1", "wait out2",
    ]


@pytest.mark.parametrize("math_first", [True, False])
def test_every_inbound_transfer_is_issued_before_any_outbound(math_first):
    # the transport runs transfers in issue order: an outbound transfer (which waits for
    # its wave's math) ahead of a later wave's inbound rows would stall that wave (r08)
    for W in (1, 2, 5):
        log = [e for e in _order(W, math_first) if not e.startswith(("wait", "math"))]
        assert log == [f"in{w}" for w in range(W)] + [f"out{w}" for w in range(W)]


class _RecordingTransport(LocalTransport):
    def __init__(self):
        self.reserved = []
        self.moved = []

    def reserve(self, rows_per_peer):
        self.reserved.append(rows_per_peer)

    def all_to_all(self, out, inp, out_splits, in_splits, label="all-to-all"):
        self.moved.append((label, max(in_splits), max(out_splits)))
        out.copy_(inp)
        return Done()


@pytest.mark.parametrize("across", [True, False])
def test_plan_reserves_a_bound_on_every_transfer(across):
    # one rank: the largest token count is this rank's; without the deduplication a token
    # may reach a rank once per wave, and the slot-table exchange carries them all at once
    g = torch.Generator().manual_seed(3)
    T, E, k, W = 40, 8, 3, 4
    idx = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    tr = _RecordingTransport()
    plan = make_plan(idx, E, W, tr, torch.rand(T, k, generator=g), dedup_across_waves=across)
    bound = T * (1 if across else min(W, k))
    assert tr.reserved == [bound]
    assert tr.moved and all(max(a, b) <= bound for _, a, b in tr.moved)
    if not across:  # the bound is needed: some token reaches this rank in several waves
        assert plan.num_routes_sent > T
