"""Weights derived from the parameters and kept between calls (`ep.weight_cache`,
`MoEConfig.weight_cache`): kept while the parameters are unchanged, made again after any
change torch tracks, never kept where the config or the mode says not to; a layer that keeps
them computes bit for bit what a layer that never keeps them computes (one process, CPU)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import ep
from ep.weight_cache import DerivedWeights, given_cast, write_into

FP8 = torch.float8_e4m3fn


def test_derived_weights_follow_the_sources_versions():
    cache, made = DerivedWeights(), []
    p = nn.Parameter(torch.randn(4, 4))

    def make():
        made.append(1)
        return p.detach() * 2

    first = cache.get("w", (p,), make)
    assert cache.get("w", (p,), make) is first and len(made) == 1
    with torch.no_grad():
        p.add_(1)  # a tracked in-place change: made again, from the new values
    assert torch.equal(cache.get("w", (p,), make), p.detach() * 2) and len(made) == 2
    for foreach in (False, True):  # both optimizer code paths bump the version
        p.grad = torch.ones_like(p)
        torch.optim.SGD([p], lr=0.5, foreach=foreach).step()
        assert torch.equal(cache.get("w", (p,), make), p.detach() * 2)
    assert len(made) == 4
    p.data.add_(1)  # not tracked by torch: the documented case for clear()
    assert cache.get("w", (p,), make) is not None and len(made) == 4
    cache.clear()
    assert torch.equal(cache.get("w", (p,), make), p.detach() * 2) and len(made) == 5
    assert cache.get("other", (p,), make) is not None and len(made) == 6 and len(cache) == 2
    with torch.inference_mode():
        t = torch.randn(3)  # no version counter: never kept
    cache.get("t", (t,), make)
    cache.get("t", (t,), make)
    assert len(made) == 8 and len(cache) == 2


def test_only_kept_values_are_made_through_allocate():
    """A kept value outlives its call: it is made through the cache's `allocate` (the layer's:
    outside cudagraph trees' pool), with the sources' device; one that is not kept (a source
    without a version counter) is made on the spot."""
    through = []

    def allocate(device, make):
        through.append(device)
        return make()

    cache, p = DerivedWeights(allocate), nn.Parameter(torch.randn(4, 4))
    kept = cache.get("w", (p,), lambda: p.detach() * 2)
    assert through == [p.device] and cache.get("w", (p,), lambda: None) is kept and len(through) == 1
    with torch.no_grad():
        p.mul_(3)
    assert torch.equal(cache.get("w", (p,), lambda: p.detach() * 2), p.detach() * 2) and len(through) == 2
    with torch.inference_mode():
        t = torch.randn(3)
    assert torch.equal(cache.get("t", (t,), lambda: t + 1), t + 1) and len(through) == 2 and len(cache) == 1


def test_the_layer_makes_what_it_keeps_outside_graph_pools(monkeypatch):
    """The layer's kept FP8 experts and casts are made through `ep.pipeline.outside_graph_pools`
    (on CUDA: on a thread of its own, so a compiled first call in reduce-overhead keeps nothing in
    cudagraph trees' pool; gpu_check's "compiled, kept weights" cases run that on a GPU)."""
    import ep.layer

    made = []

    def recorded(device, make):
        value = make()
        made.append(value)
        return value

    monkeypatch.setattr(ep.layer, "outside_graph_pools", recorded)
    keeps, _ = _layers(expert_dtype=FP8, fp8_scaling="rows")
    keeps.eval()
    _call(keeps, torch.randn(12, 128), True)
    kept = [entry.value for entry in keeps._derived._entries.values()]
    assert len(kept) == 4 and all(any(v is m for m in made) for v in kept)  # w1's and w2's casts and FP8 copies


def test_a_given_cast_is_differentiable_like_to():
    p = nn.Parameter(torch.randn(3, 5, dtype=torch.float32))
    value = p.detach().to(torch.bfloat16)
    (given_cast(p, value).float() * torch.arange(15.).view(3, 5)).sum().backward()
    want = nn.Parameter(p.detach().clone())
    (want.to(torch.bfloat16).float() * torch.arange(15.).view(3, 5)).sum().backward()
    assert p.grad.dtype == torch.float32 and torch.equal(p.grad, want.grad)
    with torch.no_grad():
        assert given_cast(p, value) is value


def _layers(**knobs):
    """Two layers with the same fp32 parameters: one keeps derived weights, one never does."""
    cfg = dict(hidden=128, ffn_hidden=128, num_experts=4, top_k=2, max_tokens=16, **knobs)
    torch.manual_seed(0)
    keeps = ep.ExpertParallelMoE(ep.MoEConfig(**cfg))
    never = ep.ExpertParallelMoE(ep.MoEConfig(**{**cfg, "weight_cache": "never"}))
    never.load_state_dict(keeps.state_dict())
    return keeps, never


def _call(layer, x, autocast):
    with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        return layer(x)


@pytest.mark.parametrize("fp8, autocast", [(False, True), (True, False), (True, True)])
def test_eval_keeps_what_it_derives_and_computes_the_same(fp8, autocast):
    keeps, never = _layers(**(dict(expert_dtype=FP8, fp8_scaling="rows") if fp8 else {}))
    keeps.eval(), never.eval()
    x = torch.randn(12, 128)
    want = _call(never, x, autocast)
    assert len(never._derived) == 0
    got = [_call(keeps, x, autocast) for _ in range(2)]
    assert len(keeps._derived) == (2 if autocast else 0) + (2 if fp8 else 0)  # w1's and w2's casts, FP8 w1 and w2
    assert got[0].dtype == (torch.bfloat16 if autocast else torch.float32)
    assert torch.equal(got[0], want) and torch.equal(got[1], want)

    with torch.no_grad():  # a tracked change (as load_state_dict or an optimizer makes): derived again
        for layer in (keeps, never):
            layer.experts.w1.mul_(-0.5)
    want = _call(never, x, autocast)
    assert torch.equal(_call(keeps, x, autocast), want)

    keeps.train()  # training under "eval": nothing kept, and eval's copies are dropped
    assert torch.equal(_call(keeps, x, autocast), want) and len(keeps._derived) == 0


def test_kept_casts_train_like_per_call_casts():
    """weight_cache="always" under autocast: microbatches share the casts, an optimizer step
    makes them again, and the fp32 parameters' gradients and values stay bit for bit those
    of casting per call."""
    keeps, never = _layers(weight_cache="always")
    opts = [torch.optim.SGD(layer.parameters(), lr=0.1) for layer in (keeps, never)]
    made = []
    for step in range(2):
        for layer, opt in zip((keeps, never), opts):
            opt.zero_grad()
            for micro in range(2):
                x = torch.randn(12, 128, generator=torch.Generator().manual_seed(10 * step + micro))
                _call(layer, x, True).float().square().sum().backward()
                if layer is keeps:
                    made.append([entry.value for entry in keeps._derived._entries.values()])
            assert layer.experts.w1.grad.dtype == torch.float32
        for a, b in zip(keeps.parameters(), never.parameters()):
            assert torch.equal(a.grad, b.grad)
        for opt in opts:
            opt.step()
        for a, b in zip(keeps.parameters(), never.parameters()):
            assert torch.equal(a, b)
    assert len(keeps._derived) == 2
    same = [all(a is b for a, b in zip(made[i], made[i + 1])) for i in range(3)]
    assert same == [True, False, True]  # shared within a step, made again after the step


def test_weight_cache_is_checked():
    with pytest.raises(ValueError, match="weight_cache must be one of"):
        ep.MoEConfig(hidden=8, ffn_hidden=8, num_experts=2, top_k=1, weight_cache="yes")
    with pytest.raises(ValueError, match="fp8_scaling must be one of"):
        ep.MoEConfig(hidden=128, ffn_hidden=128, num_experts=2, top_k=1, fp8_scaling="tiles")


def _weight_copies(layer, x) -> int:
    """Copies (dtype casts) of tensors of the expert weights' shapes in one autocast call."""
    from torch.utils._python_dispatch import TorchDispatchMode

    shapes = {tuple(layer.experts.w1.shape), tuple(layer.experts.w2.shape)}
    seen = []

    class Copies(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default) and \
                    tuple(args[-1].shape) in shapes:
                seen.append(func)
            return func(*args, **(kwargs or {}))

    with Copies():
        _call(layer, x, True)
    return len(seen)


def test_autocast_casts_each_weight_once_per_call_and_not_at_all_when_kept():
    """r39a: finding out whether a weight needs a cast cast it (a full copy per weight per
    call, 1.8 ms at dsv3 on an H100): per call one cast per weight, kept casts none."""
    keeps, never = _layers()
    x = torch.randn(12, 128)
    keeps.eval()
    _call(keeps, x, True)  # makes and keeps the casts
    assert _weight_copies(keeps, x) == 0
    assert _weight_copies(never, x) == 2  # training mode and "never": w1 and w2, once each


def _capturing(monkeypatch, on: bool) -> None:
    """Make `ep.weight_cache` see a CUDA graph capture in progress (or none): the CPU stand-in
    for `torch.cuda.graph` (gpu_check's "graphs, kept weights" cases capture for real)."""
    import ep.weight_cache

    monkeypatch.setattr(ep.weight_cache, "capturing", lambda device: on)


def test_captures_read_pinned_values_refreshed_in_their_own_storage(monkeypatch):
    """`in_captures`: a capture reads the kept value of unchanged sources (no derivation in the
    graph) and pins it; a pinned value is derived again into its own storage, by the next
    eager call after a tracked change, or by `refresh()` (replays after an optimizer step,
    untracked changes); `clear()` keeps it (a graph reads it); without `in_captures` a capture
    derives its own, as before."""
    cache, made = DerivedWeights(), []
    p = nn.Parameter(torch.randn(4, 4))

    def make():
        made.append(1)
        return (p.detach() * 2, p.detach().sum(0))

    kept = cache.get("w", (p,), make)
    _capturing(monkeypatch, True)
    inside = cache.get("w", (p,), make)  # a capture without in_captures: derived inside
    assert inside is not kept and len(made) == 2
    assert cache.get("w", (p,), make, in_captures=True) is kept and len(made) == 2
    _capturing(monkeypatch, False)
    storage = [t.data_ptr() for t in kept]
    with torch.no_grad():
        p.add_(1)  # an optimizer's step: the next eager call refreshes in place
    assert cache.get("w", (p,), make, in_captures=True) is kept and len(made) == 3
    assert [t.data_ptr() for t in kept] == storage and torch.equal(kept[0], p.detach() * 2)
    p.data.mul_(3)  # not tracked: refresh() is how a replay gets it
    assert cache.refresh() == 1 and torch.equal(kept[0], p.detach() * 2) and torch.equal(kept[1], p.detach().sum(0))
    assert [t.data_ptr() for t in kept] == storage
    q = nn.Parameter(torch.randn(4, 4))
    cache.get("unpinned", (q,), lambda: q.detach() + 1)
    p.data.add_(1)
    cache.clear()  # drops the unpinned value, refreshes the pinned one
    assert len(cache) == 1 and torch.equal(kept[0], p.detach() * 2) and [t.data_ptr() for t in kept] == storage
    p = nn.Parameter(torch.randn(3, 4))  # a source of another shape cannot go into the pinned storage
    with pytest.raises(ValueError, match="capture the graphs that read it again"):
        cache.get("w", (p,), make, in_captures=True)
    dst = (torch.zeros(2), torch.zeros(3))  # checked whole first: a later leaf that does not fit writes nothing
    with pytest.raises(ValueError, match="capture the graphs that read it again"):
        write_into(dst, (torch.ones(2), torch.ones(4)))
    assert not dst[0].any()
    write_into(dst, (torch.ones(2), torch.ones(3)))
    assert dst[0].all() and dst[1].all()


def test_graphs_mode_captures_read_the_kept_fp8_weights(monkeypatch):
    """weight_cache="graphs" in training (FP8 rows, FP8 data gradients): a (simulated) capture of
    forward+backward quantizes no weight, where "always" quantizes all four inside; after an
    optimizer step `refresh_weight_cache()` makes the four again in their own storage, and
    the capture's call then computes bit for bit what a layer that never keeps them computes."""
    import ep.layer

    counts = {"fwd": 0, "t": 0}

    def counted(name, fn):
        def run(*args, **kwargs):
            counts[name] += 1
            return fn(*args, **kwargs)
        return run

    monkeypatch.setattr(ep.layer, "quantize_expert_weight", counted("fwd", ep.layer.quantize_expert_weight))
    monkeypatch.setattr(ep.layer, "quantize_transposed_weight", counted("t", ep.layer.quantize_transposed_weight))
    knobs = dict(expert_dtype=FP8, fp8_scaling="rows", fp8_backward="data")
    keeps, never = _layers(weight_cache="graphs", **knobs)
    always, _ = _layers(weight_cache="always", **knobs)
    x = torch.randn(12, 128)
    for layer in (keeps, always):
        layer(x).square().sum().backward()  # eager warm-up: keeps w1, w2 and their transposes
    assert counts == {"fwd": 4, "t": 4}
    _capturing(monkeypatch, True)
    always(x).square().sum().backward()
    assert counts == {"fwd": 6, "t": 6}  # "always": the capture quantizes inside
    keeps(x).square().sum().backward()
    assert counts == {"fwd": 6, "t": 6}  # "graphs": it reads the kept ones
    _capturing(monkeypatch, False)
    storage = [t.data_ptr() for e in keeps._derived._entries.values() for t in (e.value.q, e.value.scale)]
    never.load_state_dict(keeps.state_dict())
    for a, b in zip(never.parameters(), keeps.parameters()):
        a.grad = None if b.grad is None else b.grad.clone()
    for layer in (keeps, never):
        torch.optim.SGD(layer.parameters(), lr=0.1).step()
        layer.zero_grad(set_to_none=True)
    assert keeps.refresh_weight_cache() == 4 and counts == {"fwd": 8, "t": 8}
    assert [t.data_ptr() for e in keeps._derived._entries.values() for t in (e.value.q, e.value.scale)] == storage
    xg = [x.clone().requires_grad_(True) for _ in range(2)]
    _capturing(monkeypatch, True)
    got = keeps(xg[0])
    got.square().sum().backward()
    _capturing(monkeypatch, False)
    want = never(xg[1])
    want.square().sum().backward()
    assert counts["fwd"] == 8 + 2 and counts["t"] == 8 + 2  # only `never`'s own quantizations
    assert torch.equal(got, want) and torch.equal(xg[0].grad, xg[1].grad)
    assert torch.equal(keeps.experts.w1.grad, never.experts.w1.grad)
