"""The layer in a training stack (issue 23), on Gloo ranks: a `DeviceMesh` dimension as its
group, teardown after a failure, `torch.autocast`, `torch.compile`."""
from __future__ import annotations

import multiprocessing as mp
import os
import queue
import tempfile
import time
import traceback
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

import ep
from ep.transport import CommunicationError, make_transport
from tests.cases import load_weights, make_problem, rel_err
from tests.reference import reference_moe, reference_routing
from tests.world import run_world

TOL = 1e-10


def _config(p, W=2, **options):
    return ep.MoEConfig(hidden=p.H, ffn_hidden=p.F, num_experts=p.E, top_k=p.k, num_waves=W, **options)


def _reference(p, rank, n, bf16_inputs=False, shared=None):
    """The float64 reference on all of the problem's tokens, this rank's share of its results.
    `bf16_inputs`: x and the expert weights rounded to bf16 first (what autocast computes from);
    `shared`: the shared expert's (w1, w2)."""
    r = (lambda t: t.bfloat16().double()) if bf16_inputs else (lambda t: t)
    x = p.x.clone().requires_grad_(True)
    router, w1, w2 = (t.clone().requires_grad_(True) for t in (p.router, p.w1, p.w2))
    s1, s2 = (None, None) if shared is None else (t.clone().requires_grad_(True) for t in shared)
    if p.topk_idx is None:
        idx, tw = reference_routing(r(x), router, p.k)
    else:
        idx, tw = p.topk_idx, p.topk_weights.clone().requires_grad_(True)
    y = reference_moe(r(x), r(w1), r(w2), idx, tw, None, *((r(s1), r(s2)) if shared else ()))
    y.backward(p.dy)
    rows, El = p.rows(rank), p.E // n
    mine = slice(rank * El, (rank + 1) * El)
    out = dict(y=y.detach()[rows], dx=x.grad[rows], dw1=w1.grad[mine], dw2=w2.grad[mine])
    if shared is not None:
        out.update(dshared1=s1.grad, dshared2=s2.grad)
    if p.topk_idx is None:
        out["drouter"] = router.grad
    else:
        out["dweights"] = tw.grad[rows]
    return out


def _run(layer, p, rank, dtype=torch.float64, group=None, autocast=None):
    """Forward and backward of this rank's share (in `dtype`, under `autocast` when given)."""
    rows = p.rows(rank)
    x = p.x[rows].to(dtype).requires_grad_(True)
    tw = None if p.topk_idx is None else p.topk_weights[rows].to(dtype).requires_grad_(True)
    with torch.autocast("cpu", autocast, enabled=autocast is not None):
        y = layer(x) if tw is None else layer(x, topk_idx=p.topk_idx[rows], topk_weights=tw)
    y.backward(p.dy[rows].to(y.dtype))
    out = dict(y=y.detach(), dx=x.grad, dw1=layer.experts.w1.grad, dw2=layer.experts.w2.grad)
    replicated = [("drouter", layer.router.weight)] if tw is None else []
    if layer.shared_experts is not None:
        replicated += [("dshared1", layer.shared_experts.w1), ("dshared2", layer.shared_experts.w2)]
    for name, t in replicated:
        out[name] = t.grad.clone()
        dist.all_reduce(out[name], group=group)  # replicated: each rank's gradient is from its tokens
    if tw is not None:
        out["dweights"] = tw.grad
    return out


def _compare(got, want, tol, what):
    return [f"{what} {name}: rel err {rel_err(got[name], w):.2e}" for name, w in want.items()
            if not rel_err(got[name], w) <= tol]


# ---- 1. a DeviceMesh dimension as the group ------------------------------------------------
def check_mesh(rank, n):
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "ep"))
    ep_mesh, dp, me = mesh["ep"], rank // 2, rank % 2  # ranks {0, 1} and {2, 3} are the EP groups
    group = ep_mesh.get_group()
    failures = []
    for routing in ("router", "skewed"):
        p = make_problem(2, k=2, routing=routing, seed=40 + dp)  # each EP group its own problem
        for W in (1, 2):
            for split in ("tokens", "experts"):
                layer = load_weights(ep.ExpertParallelMoE(_config(p, W, wave_split=split), ep_mesh).double(), p, me, 2)
                assert (layer.rank, layer.world_size) == (me, 2)
                if me == 1:  # the first forward must give it EP rank 0's router (global rank 2 * dp)
                    with torch.no_grad():
                        layer.router.weight.mul_(-3)
                got = _run(layer, p, me, group=group)
                failures += _compare(got, _reference(p, me, 2), TOL, f"dp={dp} {routing} W={W} {split}")
    # make_transport takes the mesh dimension too
    tr = make_transport(mesh["ep"], "nccl", 10.0)
    assert (tr.rank, tr.world_size) == (me, 2)
    assert tr.host_exchange([rank], "ranks") == [[2 * dp], [2 * dp + 1]]
    # a 2-D mesh is refused, naming the argument
    cfg = ep.MoEConfig(hidden=8, ffn_hidden=6, num_experts=4, top_k=2)
    for make, arg in ((lambda: ep.ExpertParallelMoE(cfg, mesh), "ExpertParallelMoE(group=...)"),
                      (lambda: make_transport(mesh), "make_transport(group=...)")):
        with pytest.raises(ValueError, match=r"must have one dimension, got one of 2 dimensions \('dp', 'ep'\)") as e:
            make()
        assert str(e.value).startswith(arg), str(e.value)
    assert not failures, "\n".join(failures)
    return True


def test_device_mesh_dimension_as_group():
    assert run_world(4, check_mesh, timeout_s=120) == [True] * 4


# ---- 2. teardown after a failure -------------------------------------------------------------
TEARDOWN_TIMEOUT_S = 3.0
STALL_S = 90.0  # far longer than the bound: a rank held by its stalled peer would miss it


def _teardown_rank(rank, n, store, results):
    """A plain `init_process_group` (torch's default timeout, 30 minutes for Gloo); rank 1
    stalls before the first forward; the others must raise, destroy the group and exit."""
    try:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=n)
        cfg = ep.MoEConfig(hidden=8, ffn_hidden=6, num_experts=2 * n, top_k=2, num_waves=2,
                           timeout_s=TEARDOWN_TIMEOUT_S)
        layer = ep.ExpertParallelMoE(cfg).double()
        if rank == 1:
            results.put((rank, "stalling", time.time(), None))
            time.sleep(STALL_S)
            return
        try:
            layer(torch.randn(6, 8, dtype=torch.float64))
            results.put((rank, "no error", time.time(), None))
            return
        except CommunicationError as e:
            raised = time.time()
            results.put((rank, "raised", raised, str(e)))
        dist.destroy_process_group()
        results.put((rank, "destroyed", time.time(), time.time() - raised))
    except BaseException:  # noqa: BLE001 - reported to the parent
        results.put((rank, "failed", time.time(), traceback.format_exc()))


def test_teardown_after_a_stalled_peer_returns_within_the_timeout():
    n = 3
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    bound = TEARDOWN_TIMEOUT_S + 10
    with tempfile.TemporaryDirectory() as tmp:
        procs = [ctx.Process(target=_teardown_rank, args=(r, n, os.path.join(tmp, "store"), results), daemon=True)
                 for r in range(n)]
        for p in procs:
            p.start()
        events, exited = {}, {}
        deadline = time.monotonic() + 60 + bound  # start-up, then the bound
        try:
            while time.monotonic() < deadline and len(exited) < n - 1:
                try:
                    rank, what, when, info = results.get(timeout=0.1)
                    events[(rank, what)] = (when, info)
                except queue.Empty:
                    pass
                for r in (0, 2):
                    if r not in exited and procs[r].exitcode is not None:
                        exited[r] = time.time()
            while True:  # what was put before the exits
                try:
                    rank, what, when, info = results.get(timeout=0.2)
                    events[(rank, what)] = (when, info)
                except queue.Empty:
                    break
        finally:
            for p in procs:
                if p.is_alive():
                    p.kill()
                p.join()
    assert (1, "stalling") in events, events
    for r in (0, 2):
        assert (r, "raised") in events, (r, events)
        raised, msg = events[(r, "raised")]
        assert f"rank {r} failed waiting for config check (first forward)" in msg, msg
        assert (r, "destroyed") in events, f"rank {r}: destroy_process_group did not return: {events}"
        assert events[(r, "destroyed")][1] < bound, events[(r, "destroyed")]
        assert r in exited, f"rank {r} did not exit within {bound} s of its error"
        assert exited[r] - raised < bound, f"rank {r} exited {exited[r] - raised:.1f} s after its error"
        assert procs[r].exitcode == 0, procs[r].exitcode


class _Group:
    def __init__(self):
        self.aborts = 0

    def abort(self):
        self.aborts += 1


class _FailingWork:
    def wait(self, timeout=None):
        raise RuntimeError("Connection closed by peer")


@pytest.mark.parametrize("backend,aborts", [("nccl", 1), ("gloo", 0)])
def test_a_failure_aborts_an_nccl_group_once(backend, aborts):
    """On NCCL a CommunicationError aborts the group's communicators (once, however many
    waits fail); Gloo's operations are bounded by their own timeouts instead."""
    from ep.transport.torch_dist import TorchDistTransport, _WorkPending

    tr = TorchDistTransport.__new__(TorchDistTransport)
    tr.group, tr.backend, tr.rank, tr._aborted = _Group(), backend, 0, False
    for wave in range(2):
        with pytest.raises(CommunicationError, match=f"rank 0 failed waiting for dispatch, wave {wave}"):
            _WorkPending(_FailingWork(), f"dispatch, wave {wave}", 0, timedelta(seconds=1), tr.abort).wait()
    assert tr.group.aborts == aborts


# ---- 3. autocast -------------------------------------------------------------------------------
BF16_TOL = 3e-2  # bf16 has 8 bits of mantissa: ~4e-3 per rounding, a few roundings deep


def check_autocast(rank, n):
    failures = []
    # given routing: the same layer in float32 with and without autocast
    p = make_problem(n, k=2, routing="skewed", seed=61)
    for split in ("tokens", "experts"):
        layer = load_weights(ep.ExpertParallelMoE(_config(p, 2, wave_split=split)), p, rank, n)  # float32
        plain = _run(layer, p, rank, torch.float32)
        layer.zero_grad()
        cast = _run(layer, p, rank, torch.float32, autocast=torch.bfloat16)
        assert cast["y"].dtype == torch.bfloat16, cast["y"].dtype
        for name in ("dx", "dw1", "dw2", "dweights"):
            assert cast[name].dtype == torch.float32, (name, cast[name].dtype)
        assert layer.experts.w1.dtype == torch.float32 and isinstance(layer.experts.w1, torch.nn.Parameter)
        failures += _compare(cast, plain, BF16_TOL, f"{split} autocast vs float32")
        err = rel_err(cast["y"], plain["y"])
        if not err > 1e-5:  # computed in bf16, not in fp32
            failures.append(f"{split}: autocast output within {err:.1e} of float32: not computed in bf16")
    # the router (fp32 logits from the bf16 input) and shared experts: against the float64
    # reference computed from bf16-rounded inputs
    p = make_problem(n, k=2, seed=62)
    g = torch.Generator().manual_seed(3)
    shared = (torch.randn(p.H, 2 * p.F, generator=g, dtype=torch.float64) / p.H ** 0.5,
              torch.randn(p.F, p.H, generator=g, dtype=torch.float64) / p.F ** 0.5)
    layer = load_weights(ep.ExpertParallelMoE(_config(p, 2, num_shared_experts=1)), p, rank, n)
    with torch.no_grad():
        layer.shared_experts.w1.copy_(shared[0])
        layer.shared_experts.w2.copy_(shared[1])
    cast = _run(layer, p, rank, torch.float32, autocast=torch.bfloat16)
    assert cast["y"].dtype == torch.bfloat16
    for name in ("dx", "dw1", "dw2", "drouter", "dshared1", "dshared2"):
        assert cast[name].dtype == torch.float32, (name, cast[name].dtype)
    want = _reference(p, rank, n, bf16_inputs=True, shared=shared)
    failures += _compare(cast, want, BF16_TOL, "router autocast vs float64 of bf16 inputs")
    # float64 is left alone, as autocast leaves it
    p = make_problem(n, k=2, routing="skewed", seed=63)
    layer = load_weights(ep.ExpertParallelMoE(_config(p, 2)).double(), p, rank, n)
    got = _run(layer, p, rank, torch.float64, autocast=torch.bfloat16)
    assert got["y"].dtype == torch.float64
    failures += _compare(got, _reference(p, rank, n), TOL, "float64 under autocast")
    assert not failures, "\n".join(failures)
    return True


def test_autocast_computes_in_the_autocast_dtype():
    assert run_world(2, check_autocast, timeout_s=120) == [True, True]


# ---- 4. torch.compile -------------------------------------------------------------------------
class _Model(torch.nn.Module):
    """Two ep layers with a dense layer between (no bias, no activation: small graphs for
    Inductor to compile on 2 cores)."""

    def __init__(self, first, second, H):
        super().__init__()
        self.first, self.dense, self.second = first, torch.nn.Linear(H, H, bias=False), second

    def forward(self, x):
        return self.second(self.dense(self.first(x)))


def _fwd_bwd(module, x, dy):
    x = x.clone().requires_grad_(True)
    module.zero_grad()
    y = module(x)
    y.backward(dy)
    return [y.detach(), x.grad] + [t.grad.clone() for t in module.parameters()]


def traced(run):
    """`run(backend)` with a Dynamo backend that records the graphs (after a reset): the
    graphs, and the targets of their call_function and call_module nodes."""
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    run(record)
    ops = [str(node.target) for gm in graphs for node in gm.graph.nodes if node.op in ("call_function", "call_module")]
    return graphs, ops


def check_compile(rank, n):
    torch._dynamo.reset()
    p = make_problem(n, k=2, seed=71)
    rows = p.rows(rank)
    x, dy = p.x[rows], p.dy[rows]
    failures = []
    first = load_weights(ep.ExpertParallelMoE(_config(p, 2, num_shared_experts=1)).double(), p, rank, n)
    second = load_weights(ep.ExpertParallelMoE(_config(p, 2, wave_split="experts")).double(), p, rank, n)
    torch.manual_seed(5)  # the same dense layer on every rank
    model = _Model(first, second, p.H).double()
    for name, module in (("layer", first), ("layer", second), ("model", model)):
        eager = _fwd_bwd(module, x, dy)
        compiled = torch.compile(module)  # default mode: Inductor
        for step in range(2):
            got = _fwd_bwd(compiled, x, dy)
            for i, (a, b) in enumerate(zip(got, eager)):
                if not rel_err(a, b) <= 1e-12:
                    failures.append(f"{name} step {step} tensor {i}: rel err {rel_err(a, b):.2e}")
    # what Dynamo traced: the dense layer, never an ep layer's ops (without MoEConfig.max_tokens
    # they run eagerly behind a graph break; tests/test_compile.py traces them with it)
    graphs, ops = traced(lambda backend: _fwd_bwd(torch.compile(model, backend=backend), x, dy))
    if sum("linear" in op or "dense" in op for op in ops) != 1 or any("silu" in op or "topk" in op for op in ops):
        failures.append(f"Dynamo traced {ops}")
    with pytest.raises(Exception, match="max_tokens"):  # fullgraph=True without max_tokens: refused, never wrong
        torch.compile(first, fullgraph=True)(x)
    torch._dynamo.reset()
    assert not failures, "\n".join(failures)
    return True


def test_compile_equals_eager():
    assert run_world(2, check_compile, timeout_s=240) == [True, True]


# ---- the README's "In a training stack" block, verbatim ------------------------------------------
def _readme_block() -> str:
    import re

    text = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")).read()
    match = re.search(r"```python\n(.*?)```", text[text.index("## In a training stack"):], re.S)
    assert match is not None, "README.md: no python block under '## In a training stack'"
    return match.group(1)


def check_readme_block(rank, n):
    names: dict = {"__name__": "__readme__"}
    exec(compile(_readme_block(), "README.md (In a training stack)", "exec"), names)  # noqa: S102 - our README
    moe, model, y = names["moe"], names["model"], names["y"]
    assert (moe.rank, moe.world_size, moe.num_local_experts) == (rank % 2, 2, 4)
    assert y.dtype == torch.bfloat16 and y.shape == (128, 64)
    for name, t in model.named_parameters():
        assert t.dtype == torch.float32 and t.grad is not None and t.grad.dtype == torch.float32, name
    torch._dynamo.reset()
    return True


def test_readme_training_stack_block():
    assert run_world(4, check_readme_block, timeout_s=240) == [True] * 4
