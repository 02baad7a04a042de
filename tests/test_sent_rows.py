"""Token waves over a transport that leaves each region's padding out, as the device-put
transport does given `sent_rows` (`ep.transport.base.Transport.all_to_all`): the receiver
finds all-ones bytes past the rows in use of each split, and the combine returns only the
rows that arrived. On Gloo ranks, against the float64 reference, forward and every gradient.
"""
from __future__ import annotations

import itertools

import torch

import ep
from ep.transport import Pending, TorchDistTransport
from tests.cases import make_problem, rel_err
from tests.test_layer import run_layer, run_reference
from tests.world import run_world

TOL = 1e-10


class LeavesPaddingOut(TorchDistTransport):
    """Gloo's all-to-all, then what a transport that sends only `sent_rows` leaves at the
    receiver: every row past the sender's count overwritten with all-ones bytes, and the
    counts in `arrived_rows` (the counts travel in a second, small all-to-all)."""

    padding_rows = 0
    """Rows this rank received as padding (all-ones bytes), over all calls."""

    def all_to_all(self, out, inp, out_splits, in_splits, label="all-to-all", rows_bound=None, sent_rows=None):
        flight = super().all_to_all(out, inp, out_splits, in_splits, label, rows_bound)
        if sent_rows is None:
            return flight
        told = torch.empty_like(sent_rows)
        ones = [1] * self.world_size
        counts = super().all_to_all(told, sent_rows.clone(), ones, ones, f"{label} (rows in use)")
        return _LeftOut(self, flight, counts, told, out, list(out_splits))


class _LeftOut(Pending):
    def __init__(self, transport, flight, counts, told, out, splits):
        self._transport, self._flight, self._counts, self._told, self._out = transport, flight, counts, told, out
        self._splits = splits
        self.arrived_rows = torch.empty_like(told)

    def wait(self) -> None:
        self._flight.wait()
        self._counts.wait()
        at = 0
        for p, rows in enumerate(self._splits):
            kept = min(max(int(self._told[p]), 0), rows)
            self._out[at + kept:at + rows].view(torch.uint8).fill_(255)
            self._transport.padding_rows += rows - kept
            self.arrived_rows[p] = kept
            at += rows


def check_padding_left_out(rank, n):
    transport = LeavesPaddingOut()
    failures, cases = [], 0
    for k, tokens, routing in itertools.product((1, 2), ("uneven", "one_empty"), ("router", "skewed", "starve")):
        p = make_problem(n, k=k, tokens=tokens, routing=routing, seed=100 * n + 7 * k + len(routing))
        ref = run_reference(p, n, rank)
        for W in (1, 2, 4):
            cfg = ep.MoEConfig(hidden=p.H, ffn_hidden=p.F, num_experts=p.E, top_k=p.k, num_waves=W)
            layer = ep.ExpertParallelMoE(cfg, transport=transport).double()
            El = p.E // n
            with torch.no_grad():
                layer.router.weight.copy_(p.router)
                layer.experts.w1.copy_(p.w1[rank * El:(rank + 1) * El])
                layer.experts.w2.copy_(p.w2[rank * El:(rank + 1) * El])
            got = run_layer(layer, p, rank)
            cases += 1
            for name, want in ref.items():
                if want is not None and not rel_err(got[name], want) <= TOL:
                    failures.append(f"k={k} {tokens} {routing} W={W} {name}: rel err {rel_err(got[name], want):.3e}")
    assert not failures, "\n".join(failures)
    return cases, transport.padding_rows


def test_the_layer_is_exact_when_the_padding_never_arrives():
    """k in {1, 2} (most regions part empty), uneven and empty-rank tokens, router, skewed and
    starved-rank routing, W in {1, 2, 4}, on 2 and 4 ranks."""
    for n in (2, 4):
        out = run_world(n, check_padding_left_out, timeout_s=300)
        assert all(cases == 36 for cases, _ in out)
        assert sum(padding for _, padding in out) > 0  # rows did go missing, and nothing read them
