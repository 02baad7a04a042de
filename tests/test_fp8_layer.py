"""The layer with FP8 expert products (`MoEConfig(expert_dtype=torch.float8_e4m3fn)`) on Gloo
CPU ranks: against a float64 emulation of the same quantization written here (1x128 tiles of
each token's row and of SwiGLU's output, 128x128 weight blocks), and against the unquantized
float64 reference within what FP8 costs; gradients are the straight-through bf16/float64 ones."""
from __future__ import annotations

import pytest
import torch

import ep
from ep.config import FP8_PRODUCT_FLAGS
from ep.kernels.fp8 import (dequantize_rows, dequantize_weight_blocks, quantize_rows_torch, quantize_rowwise_torch,
                            quantize_weight_blocks, quantize_weight_columns)
from tests.cases import make_problem, rel_err
from tests.reference import reference_moe
from tests.test_layer import build_layer, run_layer, run_reference
from tests.world import run_world


def _q_rows(x):
    """A float64 row through 1x128 tiles (the emulation's own: quantize, then dequantize in float64)."""
    return dequantize_rows(*quantize_rows_torch(x.float()), torch.float64)


def _q_rowwise(x):
    """A float64 row through one scale for the whole row."""
    q, s = quantize_rowwise_torch(x.float())
    return q.double() * s.double()[:, None]


def _q_weights(w, scaling):
    if scaling == "rows":
        q, s = quantize_weight_columns(w.float())
        return q.double() * s.double()[:, None, :]
    return dequantize_weight_blocks(*quantize_weight_blocks(w.float()), torch.float64)


def emulated_fp8_moe(x, w1, w2, idx, weights, h_dtype=None, scaling="blocks", fp8_dispatch=False,
                     products=(True, True)):
    """The FP8 forward in float64: each token's row quantized once (its items share it), the
    weights per 128x128 block, SwiGLU's output per 1x128 tile before linear2 (`h_dtype`, the
    layer's: linear1's output rounded to it first, as a bf16 layer stores it, and FP8
    dispatch's rows dequantized into it before a linear1 in it). `scaling="rows"`: one
    scale per row of x and of SwiGLU's output, one per column of each expert's weights; with
    `fp8_dispatch` the row is quantized in 1x128 tiles first (the wire), then per row.
    `products`: whether linear1 and linear2 are quantized (the other stays float64, after
    the wire's quantization when there is one)."""
    q_act = _q_rowwise if scaling == "rows" else _q_rows

    def unquantized(t):
        return t

    q1, q2 = (q_act if on else unquantized for on in products)
    w1q, w2q = (_q_weights(w, scaling) if on else w for w, on in zip((w1, w2), products))
    xq = _q_rows(x) if fp8_dispatch and (scaling == "rows" or not products[0]) else x
    if fp8_dispatch and not products[0] and h_dtype is not None:  # the wire's rows dequantized into the layer's dtype
        xq = xq.to(h_dtype).double()
    xq = q1(xq)
    y = torch.zeros_like(x)
    F = w2.shape[1]
    for j in range(idx.shape[1]):
        h = torch.einsum("th,thf->tf", xq, w1q[idx[:, j]])
        if h_dtype is not None:
            h = h.to(h_dtype).double()
        if products[1]:  # SwiGLU in fp32 before its quantization, as the kernels compute it
            a = q2(torch.nn.functional.silu(h[:, :F].float()).double() * h[:, F:].float().double())
        else:
            a = torch.nn.functional.silu(h[:, :F]) * h[:, F:]
        y += weights[:, j:j + 1] * torch.einsum("tf,tfh->th", a, w2q[idx[:, j]])
    return y


def check_fp8_layer(rank, n, split, W, scaling="blocks"):
    p = make_problem(n, k=3, local_experts=2, H=128, F=128, routing="skewed", seed=7, tokens_range=(10, 20))
    p.w1 *= 3  # wider activations: SwiGLU's output spans several e4m3 binades
    layer = build_layer(p, n, rank, W, wave_split=split, expert_dtype=torch.float8_e4m3fn, fp8_scaling=scaling)
    got = run_layer(layer, p, rank)
    rows = p.rows(rank)
    want = emulated_fp8_moe(p.x, p.w1, p.w2, p.topk_idx, p.topk_weights, scaling=scaling)[rows]
    plain = run_reference(p, n, rank)
    return rel_err(got["y"], want), rel_err(got["y"], plain["y"]), rel_err(got["dw1"], plain["dw1"]), \
        rel_err(got["dx"], plain["dx"])


@pytest.mark.parametrize("split, W, scaling", [("tokens", 1, "blocks"), ("tokens", 2, "blocks"),
                                               ("experts", 2, "blocks"), ("tokens", 2, "rows"), ("experts", 2, "rows")])
def test_fp8_experts_match_the_emulation_and_stay_within_fp8_error(split, W, scaling):
    for emulated, plain, dw1, dx in run_world(2, check_fp8_layer, split, W, scaling):
        assert emulated < 1e-3, f"vs the float64 emulation of the same quantization: {emulated:.2e}"
        # measured 0.026 per operand in norm (README, Precision): three quantized operands
        assert 0.005 < plain < 0.08, f"vs the unquantized reference: {plain:.2e}"
        # the backward runs from the FP8 forward's activations with unquantized weights
        assert dw1 < 0.1 and dx < 0.1, (dw1, dx)


def check_fp8_products(rank, n, products, scaling, fp8_dispatch):
    """One product in FP8, the other in the layer's dtype (`MoEConfig.fp8_products`)."""
    p = make_problem(n, k=3, local_experts=2, H=128, F=128, routing="skewed", seed=7, tokens_range=(10, 20))
    p.w1 *= 3
    layer = build_layer(p, n, rank, 2, expert_dtype=torch.float8_e4m3fn, fp8_scaling=scaling, fp8_products=products,
                        dispatch_dtype=torch.float8_e4m3fn if fp8_dispatch else None)
    got = run_layer(layer, p, rank)
    on = FP8_PRODUCT_FLAGS[products]
    want = emulated_fp8_moe(p.x, p.w1, p.w2, p.topk_idx, p.topk_weights, scaling=scaling, fp8_dispatch=fp8_dispatch,
                            products=on)[p.rows(rank)]
    both = emulated_fp8_moe(p.x, p.w1, p.w2, p.topk_idx, p.topk_weights, scaling=scaling,
                            fp8_dispatch=fp8_dispatch)[p.rows(rank)]
    return rel_err(got["y"], want), rel_err(got["y"], both), rel_err(got["dw1"], run_reference(p, n, rank)["dw1"])


@pytest.mark.parametrize("products, scaling, fp8_dispatch", [("linear1", "blocks", False), ("linear2", "rows", False),
                                                             ("linear2", "blocks", True)])
def test_one_product_in_fp8_matches_its_emulation(products, scaling, fp8_dispatch):
    for emulated, both, dw1 in run_world(2, check_fp8_products, products, scaling, fp8_dispatch):
        assert emulated < 1e-3, f"vs the float64 emulation of one quantized product: {emulated:.2e}"
        assert both > 3 * emulated, "the other product must not be quantized"
        assert dw1 < 0.1, dw1


def check_fp8_products_auto(rank, n, scaling):
    """`fp8_products="auto"`: every rank keeps the same choice per key (eval and training are
    two), the call equals a layer pinned to that choice bit for bit, and a second call of the
    key times nothing."""
    import ep.auto

    p = make_problem(n, k=3, local_experts=2, H=128, F=128, routing="skewed", seed=7, tokens_range=(10, 20))
    layer = build_layer(p, n, rank, 2, expert_dtype=torch.float8_e4m3fn, fp8_scaling=scaling, fp8_products="auto")
    x, rows = p.x, p.rows(rank)
    chosen = {}
    for mode in ("eval", "train"):
        layer.train(mode == "train")
        with torch.no_grad() if mode == "eval" else torch.enable_grad():
            y = layer(x[rows], topk_idx=p.topk_idx[rows], topk_weights=p.topk_weights[rows])
            chosen[mode] = layer.fp8_products
            kept = len(ep.auto._CHOSEN)
            again = layer(x[rows], topk_idx=p.topk_idx[rows], topk_weights=p.topk_weights[rows])
            assert len(ep.auto._CHOSEN) == kept and layer.fp8_products == chosen[mode]
        named = {flags: name for name, flags in FP8_PRODUCT_FLAGS.items()}
        pinned = build_layer(p, n, rank, 2, expert_dtype=torch.float8_e4m3fn if any(chosen[mode]) else None,
                             fp8_scaling=scaling, fp8_products=named.get(chosen[mode], "both"))
        pinned.train(mode == "train")
        want = pinned(x[rows], topk_idx=p.topk_idx[rows], topk_weights=p.topk_weights[rows])
        assert torch.equal(y, again) and torch.equal(y, want), mode
    return chosen


@pytest.mark.parametrize("scaling", ["blocks", "rows"])
def test_fp8_products_auto_keeps_one_choice_on_every_rank(scaling):
    results = run_world(2, check_fp8_products_auto, scaling)
    assert results[0] == results[1], results
    assert all(c in ((True, True), (True, False), (False, True), (False, False)) for c in results[0].values())


class _EmulatedProduct(torch.autograd.Function):
    """`x @ w` per token (`x [T, K]`, `w [T, K, N]`: each token's expert gathered), times the
    routing weight where one is given (linear2), as the FP8 layer computes it, in float64:
    forward from the forward's quantized operands `xq`, `wq`; backward with
    `fp8_backward="data"`'s data product, the incoming gradient's rows through one scale
    each (linear2's before the routing weight, as the layer's) times `wt` (w through one
    scale per row of each expert), or unquantized (`wt` = w); the weight's gradient from the
    unquantized x (straight through), the routing weight's from the data product, as the
    layer's. `g_dtype`: the gradients rounded to it where a layer in that dtype stores them
    (before a quantization, a bf16 rounding moves some elements a whole e4m3 step)."""

    @staticmethod
    def forward(ctx, x, w, xq, wq, wt, quantized_grad, g_dtype, weight=None):
        ctx.save_for_backward(x, wt, weight)
        ctx.quantized_grad, ctx.g_dtype = quantized_grad, g_dtype
        out = torch.einsum("tk,tkn->tn", xq, wq)
        return out if weight is None else weight[:, None] * out

    @staticmethod
    def backward(ctx, g):
        x, wt, weight = ctx.saved_tensors
        rounded = (lambda t: t.to(ctx.g_dtype).double()) if ctx.g_dtype is not None else (lambda t: t)  # noqa: E731
        g = rounded(g)
        data = rounded(torch.einsum("tn,tkn->tk", _q_rowwise(g) if ctx.quantized_grad else g, wt))
        if weight is None:
            return data, torch.einsum("tk,tn->tkn", x, g), None, None, None, None, None, None
        dw = torch.einsum("tk,tn->tkn", weight[:, None] * x, g)
        return weight[:, None] * data, dw, None, None, None, None, None, (data * x).sum(1)


def _q_weight_rows(w):
    """A float64 weight `[E, K, N]` through one scale per row of each expert (over N)."""
    E, K, N = w.shape
    return _q_rowwise(w.reshape(E * K, N)).view(E, K, N)


def emulated_fp8_grads(p, products, fp8_backward, h_dtype=None):
    """The rowwise FP8 layer's forward and backward in float64 by autograd through
    `_EmulatedProduct` (no FP8 dispatch): y and the gradients of x, w1, w2 for `p.dy`, all
    tokens and experts, and of the routing weights. `h_dtype`: the layer's dtype where it is
    not float64 (linear1's output and the gradients rounded to it, as the layer stores them)."""
    x, w1, w2, tw = (t.clone().requires_grad_(True) for t in (p.x, p.w1, p.w2, p.topk_weights))
    F = p.w2.shape[1]
    fwd = [_q_weights(w.detach(), "rows") if on else w.detach() for w, on in zip((w1, w2), products)]
    bwd = [_q_weight_rows(w.detach()) if on and fp8_backward else w.detach() for w, on in zip((w1, w2), products)]
    xq = _q_rowwise(x.detach()) if products[0] else x.detach()
    y = torch.zeros_like(x)
    for j in range(p.topk_idx.shape[1]):
        e = p.topk_idx[:, j]
        h = _EmulatedProduct.apply(x, w1[e], xq, fwd[0][e], bwd[0][e], products[0] and fp8_backward, h_dtype)
        if h_dtype is not None:  # rounded as the layer stores it (straight through for the gradient)
            h = h + (h.detach().to(h_dtype).double() - h.detach())
        a = torch.nn.functional.silu(h[:, :F]) * h[:, F:]
        gate, up = h[:, :F].detach().float(), h[:, F:].detach().float()  # SwiGLU in fp32 before its quantization
        aq = _q_rowwise(torch.nn.functional.silu(gate).double() * up.double()) if products[1] else a.detach()
        y = y + _EmulatedProduct.apply(a, w2[e], aq, fwd[1][e], bwd[1][e], products[1] and fp8_backward, h_dtype,
                                       tw[:, j])
    y.backward(p.dy)
    return dict(y=y.detach(), dx=x.grad, dw1=w1.grad, dw2=w2.grad, dweights=tw.grad)


def check_fp8_backward(rank, n, products, split, W):
    """`fp8_backward="data"`: the data gradients in FP8 (rowwise), against the emulation."""
    p = make_problem(n, k=3, local_experts=2, H=128, F=128, routing="skewed", seed=11, tokens_range=(10, 20))
    p.w1 *= 3
    layer = build_layer(p, n, rank, W, wave_split=split, expert_dtype=torch.float8_e4m3fn, fp8_scaling="rows",
                        fp8_products=products, fp8_backward="data")
    got = run_layer(layer, p, rank)
    on = FP8_PRODUCT_FLAGS[products]
    rows, El = p.rows(rank), p.E // n
    mine = dict(y=rows, dx=rows, dw1=slice(rank * El, (rank + 1) * El), dw2=slice(rank * El, (rank + 1) * El),
                dweights=rows)
    want = emulated_fp8_grads(p, on, True)
    straight = emulated_fp8_grads(p, on, False)  # the same forward, the backward in float64
    plain = run_reference(p, n, rank)
    return ({k: rel_err(got[k], want[k][r]) for k, r in mine.items()},
            {k: rel_err(got[k], straight[k][r]) for k, r in mine.items()},
            {k: rel_err(got[k], plain[k]) for k in mine})


@pytest.mark.parametrize("products, split, W", [("both", "tokens", 2), ("both", "experts", 2), ("linear1", "tokens", 1),
                                                ("linear2", "experts", 2)])
def test_fp8_backward_matches_its_emulation(products, split, W):
    for emulated, straight, plain in run_world(2, check_fp8_backward, products, split, W):
        assert max(emulated.values()) < 1e-4, f"vs the float64 emulation of the FP8 backward: {emulated}"
        # the data gradients were quantized: far from the same forward's float64 backward
        assert straight["dx"] > 5e-3 and straight["y"] < 1e-3, straight
        assert max(plain.values()) < 0.15, f"vs the unquantized reference: {plain}"


def check_fp8_backward_keeps_weights(rank, n):
    """With `weight_cache="always"` the backward's transposed FP8 weights are quantized once
    while the weights are unchanged (two training steps: once per weight), and again after
    an optimizer's step changed them; with the default cache, once per weight every step."""
    import ep.layer

    made = []
    quantize = ep.layer.quantize_transposed_weight
    ep.layer.quantize_transposed_weight = lambda w: made.append(w.shape) or quantize(w)
    try:
        p = make_problem(n, k=2, local_experts=2, H=128, F=128, routing="skewed", seed=13, tokens_range=(8, 12))
        counts = {}
        for cache in ("always", "eval"):
            layer = build_layer(p, n, rank, 1, expert_dtype=torch.float8_e4m3fn, fp8_scaling="rows",
                                fp8_backward="data", weight_cache=cache)
            opt = torch.optim.SGD(layer.parameters(), lr=0.1)
            made.clear()
            for _ in range(2):
                run_layer(layer, p, rank)
            counts[cache] = [len(made)]
            opt.step()
            run_layer(layer, p, rank)
            counts[cache].append(len(made))
    finally:
        ep.layer.quantize_transposed_weight = quantize
    return counts


def test_fp8_backward_keeps_its_weights_while_unchanged():
    for counts in run_world(2, check_fp8_backward_keeps_weights):
        assert counts == {"always": [2, 4], "eval": [4, 6]}, counts


def check_fast_accum_reaches_the_forward_products(rank, n):
    """`fp8_fast_accum` where `torch._scaled_grouped_mm` would run (it and the device check
    stood in for by a recorder that runs the fp32 emulation): per layer (promoted, fast
    accumulation, the fast one under `torch.compile(fullgraph=True)`) the `use_fast_accum` of
    the forward's and the backward's FP8 products; and whether all gave the same y and dx."""
    import ep.kernels.fp8 as fp8

    calls = []

    def scaled(xq, wq, xs, ws, offs=None, out_dtype=None, use_fast_accum=False):
        calls.append(use_fast_accum)
        return fp8.fp8_grouped_mm_emulated(xq, xs, wq, ws, offs, out_dtype)

    available, product = fp8.scaled_grouped_mm_available, getattr(torch, "_scaled_grouped_mm", None)
    fp8.scaled_grouped_mm_available, torch._scaled_grouped_mm = (lambda x: True), scaled
    p = make_problem(n, k=2, local_experts=2, H=128, F=128, routing="skewed", seed=19, tokens_range=(8, 12))
    rows, out, got = p.rows(rank), {}, {}
    torch._dynamo.reset()
    try:
        for name, fast in (("promoted", False), ("fast", True), ("fast compiled", True), ("all", "all"),
                           ("all compiled", "all")):
            layer = build_layer(p, n, rank, 2, expert_dtype=torch.float8_e4m3fn, fp8_scaling="rows",
                                fp8_backward="data", fp8_fast_accum=fast, max_tokens=12).to(torch.bfloat16)
            call = torch.compile(layer, fullgraph=True, backend="aot_eager") if "compiled" in name else layer
            x = p.x[rows].to(torch.bfloat16).requires_grad_(True)
            calls.clear()
            y = call(x, topk_idx=p.topk_idx[rows], topk_weights=p.topk_weights[rows].to(torch.bfloat16))
            forward = list(calls)
            calls.clear()
            y.backward(p.dy[rows].to(torch.bfloat16))
            out[name] = dict(forward=forward, backward=list(calls))
            got[name] = (y.detach(), x.grad)
    finally:
        torch._dynamo.reset()
        fp8.scaled_grouped_mm_available = available
        if product is None:
            del torch._scaled_grouped_mm
        else:
            torch._scaled_grouped_mm = product
    out["same"] = all(torch.equal(a, b) for name in got for a, b in zip(got[name], got["promoted"]))
    return out


def test_fp8_fast_accum_reaches_the_forward_products_only_or_all():
    for out in run_world(2, check_fast_accum_reaches_the_forward_products, timeout_s=300):
        # two waves, two products each, forward and backward (the data gradients)
        for name in ("fast", "fast compiled"):
            assert out[name]["forward"] == [True] * 4 and out[name]["backward"] == [False] * 4, (name, out[name])
        for name in ("all", "all compiled"):
            assert out[name]["forward"] == [True] * 4 and out[name]["backward"] == [True] * 4, (name, out[name])
        assert out["promoted"]["forward"] == [False] * 4 and out["promoted"]["backward"] == [False] * 4, out
        # the emulation is exact fp32 either way: the knob changed nothing else
        assert out["same"]


@pytest.mark.parametrize("knobs", [dict(fp8_fast_accum=True),
                                   dict(fp8_fast_accum=True, expert_dtype=torch.float8_e4m3fn),
                                   dict(fp8_fast_accum="all", expert_dtype=torch.float8_e4m3fn, fp8_backward="data")])
def test_fp8_fast_accum_needs_rowwise_fp8_experts(knobs):
    with pytest.raises(ValueError, match=f"fp8_fast_accum={knobs['fp8_fast_accum']!r} needs "
                                         "expert_dtype=torch.float8_e4m3fn and fp8_scaling='rows'"):
        ep.MoEConfig(hidden=128, ffn_hidden=128, num_experts=4, top_k=2, **knobs)
    for unknown in (1, "forward", None):
        with pytest.raises(ValueError, match=r"fp8_fast_accum must be one of \(False, True, 'all'\)"):
            ep.MoEConfig(hidden=128, ffn_hidden=128, num_experts=4, top_k=2, fp8_fast_accum=unknown)


def test_fp8_fast_accum_all_needs_fp8_data_gradients():
    with pytest.raises(ValueError, match="fp8_fast_accum='all' needs fp8_backward='data'"):
        ep.MoEConfig(hidden=128, ffn_hidden=128, num_experts=4, top_k=2, expert_dtype=torch.float8_e4m3fn,
                     fp8_scaling="rows", fp8_fast_accum="all")


@pytest.mark.parametrize("knob, named, unknown", [("fp8_products", "linear1", "fastest"), ("fp8_backward", "data", "all")])
def test_fp8_knobs_need_fp8_experts_and_known_names(knob, named, unknown):
    with pytest.raises(ValueError, match=f"{knob}='{named}' needs expert_dtype"):
        ep.MoEConfig(hidden=128, ffn_hidden=128, num_experts=4, top_k=2, **{knob: named})
    with pytest.raises(ValueError, match=f"{knob} must be one of"):
        ep.MoEConfig(hidden=128, ffn_hidden=128, num_experts=4, top_k=2, expert_dtype=torch.float8_e4m3fn,
                     **{knob: unknown})


def test_fp8_experts_need_whole_scale_blocks():
    with pytest.raises(ValueError, match="multiples of 128"):
        ep.MoEConfig(hidden=96, ffn_hidden=128, num_experts=4, top_k=2, expert_dtype=torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="expert_dtype must be None or torch.float8_e4m3fn"):
        ep.MoEConfig(hidden=128, ffn_hidden=128, num_experts=4, top_k=2, expert_dtype=torch.float16)


# ---- FP8 dispatch (`MoEConfig(dispatch_dtype=torch.float8_e4m3fn)`) --------------------------------
def emulated_dispatch_reference(p, n, rank):
    """The float64 MoE of each token's row quantized once in 1x128 tiles (as FP8 dispatch sends
    it), straight through: x's gradient is the quantized row's, linear1's weight gradient is
    taken from the quantized rows."""
    x = p.x.clone().requires_grad_(True)
    xq = x + (_q_rows(x.detach()) - x).detach()
    w1, w2 = p.w1.clone().requires_grad_(True), p.w2.clone().requires_grad_(True)
    tw = p.topk_weights.clone().requires_grad_(True)
    y = reference_moe(xq, w1, w2, p.topk_idx, tw)
    y.backward(p.dy)
    rows, El = p.rows(rank), p.E // n
    experts = slice(rank * El, (rank + 1) * El)
    return dict(y=y.detach()[rows], dx=x.grad[rows], dw1=w1.grad[experts], dw2=w2.grad[experts],
                dweights=tw.grad[rows])


def check_fp8_dispatch(rank, n, split, W, dedup, fp8_experts, scaling="blocks"):
    p = make_problem(n, k=3, local_experts=2, H=256, F=128, routing="skewed", seed=11, tokens_range=(10, 20))
    p.x *= 5  # tiles of several binades
    layer = build_layer(p, n, rank, W, wave_split=split, dedup_across_waves=dedup,
                        dispatch_dtype=torch.float8_e4m3fn, fp8_scaling=scaling,
                        expert_dtype=torch.float8_e4m3fn if fp8_experts else None)
    got = run_layer(layer, p, rank)
    if fp8_experts:  # blocks: the experts' own quantization of x is the dispatch's; rows: quantized again per row
        want = emulated_fp8_moe(p.x, p.w1, p.w2, p.topk_idx, p.topk_weights, scaling=scaling,
                                fp8_dispatch=True)[p.rows(rank)]
        return {"y": rel_err(got["y"], want)}
    want = emulated_dispatch_reference(p, n, rank)
    errors = {name: rel_err(got[name], want[name]) for name in want}
    errors["y vs unquantized"] = rel_err(got["y"], run_reference(p, n, rank)["y"])
    return errors


@pytest.mark.parametrize("split, W, dedup", [("tokens", 1, True), ("tokens", 2, True), ("experts", 2, True),
                                             ("experts", 2, False)])
def test_fp8_dispatch_matches_the_emulation(split, W, dedup):
    for errors in run_world(2, check_fp8_dispatch, split, W, dedup, False):
        unquantized = errors.pop("y vs unquantized")
        assert all(e < 1e-10 for e in errors.values()), errors  # float64 products of the same FP8 rows
        assert 0.002 < unquantized < 0.05, unquantized  # one quantized operand: about 2.6% per operand


@pytest.mark.parametrize("scaling", ["blocks", "rows"])
def test_fp8_dispatch_with_fp8_experts(scaling):
    for errors in run_world(2, check_fp8_dispatch, "experts", 2, True, True, scaling):
        assert errors["y"] < 1e-3, errors


def test_fp8_dispatch_row_bytes():
    """At H=7168 (k=8) a dispatched row is at most 0.53x of bf16's: 7,168 bytes and 56 fp32
    scales against 14,336, the slot tables and status alike in both."""
    from ep.layout import RowLayout

    bf16 = RowLayout(7168, 8, torch.bfloat16)
    fp8 = RowLayout(7168, 8, torch.bfloat16, torch.float8_e4m3fn)
    ratio = fp8.width / bf16.width
    assert ratio <= 0.53, ratio
    rows = fp8.empty(2, "cpu")
    assert fp8.data(rows).dtype == torch.float8_e4m3fn and fp8.scales(rows).shape == (2, 56)
    with pytest.raises(ValueError, match="dispatch_dtype.*multiple of 128"):
        ep.MoEConfig(hidden=96, ffn_hidden=64, num_experts=4, top_k=2, dispatch_dtype=torch.float8_e4m3fn)
