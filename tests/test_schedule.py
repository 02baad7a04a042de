"""The wave schedule's issue order (`ep.pipeline.run_waves`) and what the layer tells the transport."""
import pytest
import torch

import ep
from ep.pipeline import run_waves
from ep.transport import LocalTransport


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
    """A world of one that records every `reserve` and every all-to-all, in order."""

    def __init__(self):
        self.log = []

    def reserve(self, rows_per_peer):
        self.log.append(("reserve", rows_per_peer))

    def all_to_all(self, out, inp, out_splits, in_splits, label="all-to-all", rows_bound=None, sent_rows=None):
        assert inp.shape[0] == sum(in_splits) and out.shape[0] == sum(out_splits), label
        used = None if sent_rows is None else sent_rows.tolist()
        self.log.append(("a2a", label, list(in_splits), list(out_splits), rows_bound, used))
        return super().all_to_all(out, inp, out_splits, in_splits, label, rows_bound, sent_rows)


@pytest.mark.parametrize("split,dedup", [("tokens", True), ("experts", True), ("experts", False)])
def test_the_layer_reserves_a_bound_on_every_transfer(split, dedup):
    # one rank, so every route goes to it: token waves send at most a wave's tokens per
    # peer, expert waves up to every token in any wave (T_max); without dedup a token is
    # sent once per wave of its experts, so the waves' rows add up to more than T
    g = torch.Generator().manual_seed(3)
    T, E, k, W = 40, 8, 3, 4
    cfg = ep.MoEConfig(hidden=8, ffn_hidden=4, num_experts=E, top_k=k, num_waves=W, wave_split=split,
                       dedup_across_waves=dedup)
    tr = _RecordingTransport()
    layer = ep.ExpertParallelMoE(cfg, transport=tr).double()
    x = torch.randn(T, 8, dtype=torch.float64, generator=g, requires_grad=True)
    idx = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    layer(x, topk_idx=idx, topk_weights=torch.rand(T, k, generator=g, dtype=torch.float64)).sum().backward()

    bound = -(-T // W) if split == "tokens" else T
    assert [e[1] for e in tr.log if e[0] == "reserve"] == [bound]
    assert tr.log[0][0] == "reserve"  # before the first transfer
    moved = [e for e in tr.log if e[0] == "a2a"]
    assert len(moved) == 4 * W  # dispatch and combine of each wave, forward and backward
    for _, label, sent, received, rows_bound, used in moved:
        assert max(sent + received) <= bound and rows_bound == bound, label
        assert used is None or max(used) <= bound, label
    # the rows in use per wave, worked out from the routing: the tokens routed in that wave
    # (at least one row: a region without routes still sends the status row)
    slot_wave = torch.arange(T).unsqueeze(1).expand(T, k) * W // T if split == "tokens" else idx * W // E
    if dedup:
        slot_wave = slot_wave.min(dim=1, keepdim=True).values  # a token travels in its first wave
    routed = [int((slot_wave == w).any(dim=1).sum()) for w in range(W)]
    used = [e[5][0] for e in moved if e[1].startswith("dispatch (forward)")]
    assert used == [max(r, 1) for r in routed]
    if split == "experts" and not dedup:
        assert sum(routed) > T
    else:  # every token travels to this rank once
        assert sum(routed) == T
