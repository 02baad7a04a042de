"""The layer under `torch.compile(fullgraph=True)` (issue 23, item 1), on 2 Gloo ranks against
the float64 reference: forward and every gradient, both wave splits, router and given
routing, shared experts, a model of two layers, autocast, and the errors that stay clear."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import ep
from ep.checks import InputError
from tests.cases import load_weights, make_problem, rel_err
from tests.test_stack import _config, _reference, traced
from tests.world import run_world

TOL = 1e-10


def _grads(layer, idx_given):
    out = dict(dw1=layer.experts.w1.grad, dw2=layer.experts.w2.grad)
    replicated = [] if idx_given else [("drouter", layer.router.weight)]
    if layer.shared_experts is not None:
        replicated += [("dshared1", layer.shared_experts.w1), ("dshared2", layer.shared_experts.w2)]
    for name, t in replicated:  # each rank's gradient is from its tokens: summed as data parallelism would
        out[name] = t.grad.clone()
        dist.all_reduce(out[name])
    return out


def _step(module, layer, p, rank, shared=False):
    """One forward and backward of `module` on this rank's share of `p`: y and every gradient."""
    rows = p.rows(rank)
    x = p.x[rows].clone().requires_grad_(True)
    module.zero_grad(set_to_none=True)
    if p.topk_idx is None:
        y = module(x)
    else:
        tw = p.topk_weights[rows].clone().requires_grad_(True)
        y = module(x, topk_idx=p.topk_idx[rows], topk_weights=tw)
    y.backward(p.dy[rows])
    out = dict(y=y.detach(), dx=x.grad, **_grads(layer, p.topk_idx is not None))
    if p.topk_idx is not None:
        out["dweights"] = tw.grad
    return out


def _compare(got, want, label, failures, tol=TOL):
    for name, ref in want.items():
        if name not in got:
            continue
        err = rel_err(got[name], ref)
        if not err <= tol:
            failures.append(f"{label}: {name} rel err {err:.2e}")


CASES = [  # (label, layer options, routing)
    ("tokens W=2, router, shared expert", dict(num_waves=2, num_shared_experts=1), "router"),
    ("experts W=2 dedup, given routing", dict(num_waves=2, wave_split="experts"), "skewed"),
    ("experts W=4 no dedup, given routing", dict(num_waves=4, wave_split="experts", dedup_across_waves=False),
     "skewed"),
]


def check_layers(rank, n):
    torch._dynamo.reset()
    failures = []
    for label, options, routing in CASES:
        p = make_problem(n, k=2, seed=73, routing=routing)  # uneven tokens: T < max_tokens on some rank
        bound = max(p.tokens_per_rank)
        shared = None
        if options.get("num_shared_experts"):
            g = torch.Generator().manual_seed(9)
            shared = (torch.randn(p.H, 2 * p.F, generator=g, dtype=torch.float64) / p.H ** 0.5,
                      torch.randn(p.F, p.H, generator=g, dtype=torch.float64) / p.F ** 0.5)
        W = options.pop("num_waves")
        cfg = _config(p, W, max_tokens=bound + 3, **options)
        layer = load_weights(ep.ExpertParallelMoE(cfg).double(), p, rank, n)
        if shared is not None:
            with torch.no_grad():
                layer.shared_experts.w1.copy_(shared[0])
                layer.shared_experts.w2.copy_(shared[1])
        want = _reference(p, rank, n, shared=shared)
        compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
        for step in range(2):  # the first traces the replicas' sync, the second a graph without it
            _compare(_step(compiled, layer, p, rank), want, f"{label}, step {step}", failures)
    assert not failures, "\n".join(failures)
    return True


def test_fullgraph_layers_equal_reference():
    assert run_world(2, check_layers, timeout_s=300) == [True, True]


class _Model(torch.nn.Module):
    def __init__(self, first, second, H):
        super().__init__()
        self.first, self.dense, self.second = first, torch.nn.Linear(H, H, bias=False), second

    def forward(self, x):
        return self.second(self.dense(self.first(x)))


def check_model_inductor(rank, n):
    """Two layers and a dense one between, fullgraph, Inductor (default and reduce-overhead
    modes), against the same model run eagerly; what Dynamo traced: everything, in one graph."""
    torch._dynamo.reset()
    p = make_problem(n, k=2, seed=79, tokens_per_rank=[11] * n)
    failures = []
    first = load_weights(ep.ExpertParallelMoE(_config(p, 2, max_tokens=11)).double(), p, rank, n)
    second = load_weights(ep.ExpertParallelMoE(_config(p, 2, wave_split="experts", max_tokens=11)).double(), p, rank, n)
    torch.manual_seed(5)  # the same dense layer on every rank
    model = _Model(first, second, p.H).double()
    rows = p.rows(rank)
    x, dy = p.x[rows], p.dy[rows]

    def run(module):
        xg = x.clone().requires_grad_(True)
        model.zero_grad(set_to_none=True)
        y = module(xg)
        y.backward(dy)
        return [y.detach(), xg.grad] + [t.grad.clone() for t in model.parameters()]

    eager = run(model)
    for mode in (None, "reduce-overhead"):
        torch._dynamo.reset()
        compiled = torch.compile(model, fullgraph=True, mode=mode)
        for step in range(2):
            for i, (a, b) in enumerate(zip(run(compiled), eager)):
                if not rel_err(a, b) <= 1e-12:
                    failures.append(f"mode {mode} step {step} tensor {i}: rel err {rel_err(a, b):.2e}")
    graphs, ops = traced(lambda backend: run(torch.compile(model, fullgraph=True, backend=backend)))
    if len(graphs) != 1 or sum("ep.waves" in op for op in ops) != 2 or not any("topk" in op for op in ops):
        failures.append(f"Dynamo traced {len(graphs)} graphs: {ops}")
    torch._dynamo.reset()
    assert not failures, "\n".join(failures)
    return True


def test_fullgraph_model_inductor_equals_eager():
    assert run_world(2, check_model_inductor, timeout_s=600) == [True, True]


def check_errors(rank, n):
    """A bad input raises InputError on every rank, as in eager (here: one rank's dtype, one
    rank's T over max_tokens); without max_tokens, or with "auto" W before its first call,
    the layer runs eagerly behind a graph break: right results, and fullgraph=True refuses
    it naming the reason."""
    torch._dynamo.reset()
    p = make_problem(n, k=2, seed=83, tokens_per_rank=[9, 12][:n])
    layer = load_weights(ep.ExpertParallelMoE(_config(p, 2, max_tokens=12)).double(), p, rank, n)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    x = p.x[p.rows(rank)]
    with pytest.raises(InputError, match="rank 1: x: dtype"):
        compiled(x if rank == 0 else x.float())
    with pytest.raises(InputError, match="rank 0: x: 13 tokens, more than MoEConfig.max_tokens=12"):
        compiled(torch.cat([x, x[:13 - len(x)]]) if rank == 0 else x)
    want = layer(x)
    for W, bound in ((2, None), ("auto", 12)):  # no max_tokens; "auto" W before its first call

        def fresh():
            return load_weights(ep.ExpertParallelMoE(_config(p, W, max_tokens=bound)).double(), p, rank, n)

        torch._dynamo.reset()
        assert rel_err(torch.compile(fresh(), backend="aot_eager")(x), want) <= TOL
        torch._dynamo.reset()
        with pytest.raises(Exception, match="max_tokens"):
            torch.compile(fresh(), fullgraph=True, backend="aot_eager")(x)
    torch._dynamo.reset()
    return True


def test_fullgraph_errors_stay_clear():
    assert run_world(2, check_errors, timeout_s=200) == [True, True]


def check_autocast(rank, n):
    """Under autocast (CPU bf16) the compiled layer returns bf16 and fp32 parameters get fp32
    gradients, equal to the eager layer under autocast."""
    torch._dynamo.reset()
    p = make_problem(n, k=2, seed=89, tokens_per_rank=[10] * n, dtype=torch.float32)
    layer = load_weights(ep.ExpertParallelMoE(_config(p, 2, num_shared_experts=1, max_tokens=10)), p, rank, n)
    rows = p.rows(rank)

    def run(module):
        x = p.x[rows].clone().requires_grad_(True)
        layer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = module(x)
        y.float().backward(p.dy[rows])
        return [y, x.grad] + [t.grad for t in layer.parameters()]

    eager = run(layer)
    got = run(torch.compile(layer, fullgraph=True, backend="aot_eager"))
    assert got[0].dtype == torch.bfloat16 and all(t.dtype == torch.float32 for t in got[1:])
    for i, (a, b) in enumerate(zip(got, eager)):
        assert rel_err(a.float(), b.float()) <= 1e-2, (i, rel_err(a.float(), b.float()))
    torch._dynamo.reset()
    return True


def test_fullgraph_autocast():
    assert run_world(2, check_autocast, timeout_s=200) == [True, True]


def check_fp8_backward(rank, n):
    """FP8 experts with the data gradients in FP8 (`fp8_backward="data"`, rows) compiled: the
    compiled op's backward quantizes the weights' transposes as the eager layer's does (y and
    every gradient equal the eager layer's), and differs from a layer with a bf16 backward."""
    torch._dynamo.reset()
    p = make_problem(n, k=2, H=128, F=128, seed=83, routing="skewed", tokens_per_rank=[12] * n)
    fp8 = dict(expert_dtype=torch.float8_e4m3fn, fp8_scaling="rows", max_tokens=12)
    layer = load_weights(ep.ExpertParallelMoE(_config(p, 2, fp8_backward="data", **fp8)).double(), p, rank, n)
    straight = load_weights(ep.ExpertParallelMoE(_config(p, 2, **fp8)).double(), p, rank, n)
    eager = _step(layer, layer, p, rank)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    failures = []
    for step in range(2):
        _compare(_step(compiled, layer, p, rank), eager, f"fp8_backward compiled, step {step}", failures, tol=1e-12)
    if not rel_err(_step(straight, straight, p, rank)["dx"], eager["dx"]) > 1e-2:
        failures.append("the data gradients were not quantized")
    torch._dynamo.reset()
    assert not failures, "\n".join(failures)
    return True


def test_fullgraph_fp8_backward():
    assert run_world(2, check_fp8_backward, timeout_s=300) == [True, True]


def test_a_copy_gets_its_own_handle():
    """A deep copy of a layer is found by its own handle (compiled graphs call the copy's engine)."""
    import copy

    from ep import compiled

    layer = ep.ExpertParallelMoE(ep.MoEConfig(hidden=8, ffn_hidden=4, num_experts=2, top_k=1, num_waves=1))
    twin = copy.deepcopy(layer)
    assert twin._compile_handle != layer._compile_handle
    assert compiled._LAYERS[layer._compile_handle] is layer and compiled._LAYERS[twin._compile_handle] is twin
