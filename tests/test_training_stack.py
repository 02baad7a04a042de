"""The layer inside a training stack, on Gloo ranks: built on the meta device (no collective
in `__init__`), activation checkpointing (non-reentrant) and saved-tensor hooks
(`save_on_cpu`), and the real-model options (sqrtsoftplus, selection bias, groups, scaling,
swiglu_limit, shared experts) against the independent float64 reference."""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch.utils.checkpoint import checkpoint

import ep
from tests.cases import make_problem, rel_err
from tests.reference import reference_moe, reference_routing
from tests.world import run_world

TOL = 1e-10
OPTIONS = dict(score_func="sqrtsoftplus", n_group=4, topk_group=2, routed_scaling_factor=2.5, swiglu_limit=0.6,
               num_shared_experts=2, norm_topk=True)


def _config(p, W, **options):
    return ep.MoEConfig(hidden=p.H, ffn_hidden=p.F, num_experts=p.E, top_k=p.k, num_waves=W, **options)


def _shared(p, g):
    Fs = p.F * OPTIONS["num_shared_experts"]
    return (torch.randn(p.H, 2 * Fs, generator=g, dtype=torch.float64) / p.H ** 0.5,
            torch.randn(Fs, p.H, generator=g, dtype=torch.float64) / Fs ** 0.5)


def _load(layer, p, rank, n, bias, shared):
    El = p.E // n
    with torch.no_grad():
        layer.router.weight.copy_(p.router * 3)  # wider logits: the groups and the clamp matter
        layer.router.e_score_correction_bias.copy_(bias)
        layer.experts.w1.copy_(p.w1[rank * El:(rank + 1) * El] * 2)
        layer.experts.w2.copy_(p.w2[rank * El:(rank + 1) * El])
        layer.shared_experts.w1.copy_(shared[0])
        layer.shared_experts.w2.copy_(shared[1])


def _grads(layer, x, y, dy):
    y.backward(dy)
    out = dict(y=y.detach(), dx=x.grad, w1=layer.experts.w1.grad, w2=layer.experts.w2.grad)
    for name, t in (("router", layer.router.weight), ("shared_w1", layer.shared_experts.w1),
                    ("shared_w2", layer.shared_experts.w2)):
        out[name] = t.grad.clone()
        dist.all_reduce(out[name])
    return out


def check_options_and_stack(rank, n):
    p = make_problem(n, k=3, seed=21)
    g = torch.Generator().manual_seed(5)
    bias = (torch.rand(p.E, generator=g) * 0.3).float()
    shared = _shared(p, g)
    rows = p.rows(rank)
    El = p.E // n

    # the reference, on all tokens
    x = p.x.clone().requires_grad_(True)
    router, w1, w2 = (p.router * 3).requires_grad_(True), (p.w1 * 2).requires_grad_(True), p.w2.clone().requires_grad_(True)
    s1, s2 = shared[0].clone().requires_grad_(True), shared[1].clone().requires_grad_(True)
    idx, w = reference_routing(x, router, p.k, "sqrtsoftplus", True, bias, 4, 2, 2.5)
    y = reference_moe(x, w1, w2, idx, w, OPTIONS["swiglu_limit"], s1, s2)
    y.backward(p.dy)
    mine = slice(rank * El, (rank + 1) * El)
    want = dict(y=y.detach()[rows], dx=x.grad[rows], w1=w1.grad[mine], w2=w2.grad[mine], router=router.grad,
                shared_w1=s1.grad, shared_w2=s2.grad)

    failures = []
    for mode in ("plain", "checkpoint", "save_on_cpu"):
        for W in (1, 2, 4):
            layer = ep.ExpertParallelMoE(_config(p, W, **OPTIONS)).double()
            _load(layer, p, rank, n, bias, shared)
            xl = p.x[rows].clone().requires_grad_(True)
            packed = []
            if mode == "plain":
                def pack(t):  # record what autograd saves (the pipeline's buffers must be among it)
                    packed.append(tuple(t.shape))
                    return t

                with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                    yl = layer(xl)
            elif mode == "checkpoint":
                yl = checkpoint(layer, xl, use_reentrant=False)
            else:
                with torch.autograd.graph.save_on_cpu():
                    yl = layer(xl)
            got = _grads(layer, xl, yl, p.dy[rows])
            for name in want:
                err = rel_err(got[name], want[name])
                if not err <= TOL:
                    failures.append(f"{mode} W={W} {name}: rel err {err:.2e}")
            if mode == "plain":  # the expert pipeline's activations go through autograd's hooks
                F2 = 2 * p.F
                if not any(len(s) == 2 and s[1] == F2 for s in packed):
                    failures.append(f"W={W}: the hooks saw no linear1 output [I, 2F]: {packed}")
    assert not failures, "\n".join(failures)
    return True


def check_meta_construction(rank, n):
    """Rank 0 builds layers on the meta device while rank 1 builds nothing: a collective in
    __init__ would hang here (and fail on the timeout). Materialised and reset with a seed,
    the layer equals one built directly with that seed; then both train alike."""
    cfg = ep.MoEConfig(hidden=8, ffn_hidden=6, num_experts=4 * n, top_k=2, num_waves=2, num_shared_experts=1,
                       timeout_s=10)
    if rank == 0:
        for _ in range(3):
            with torch.device("meta"):
                ep.ExpertParallelMoE(cfg)
    with torch.device("meta"):
        meta = ep.ExpertParallelMoE(cfg)
    assert all(t.is_meta for t in meta.state_dict().values())
    meta.to_empty(device="cpu")
    torch.manual_seed(42)
    meta.reset_parameters()
    torch.manual_seed(42)
    direct = ep.ExpertParallelMoE(cfg)
    assert meta.router.e_score_correction_bias.dtype == torch.float32
    for (name, a), (_, b) in zip(meta.state_dict().items(), direct.state_dict().items()):
        assert torch.equal(a, b), name
    x = torch.randn(7 + rank, 8)
    ya, yb = meta(x), direct(x)
    assert torch.equal(ya, yb)
    # the first forward made the replicas rank 0's: equal everywhere
    got = [t.detach().clone() for t in meta.replicated_tensors()]
    for t in got:
        ref = t.clone()
        dist.broadcast(ref, 0)
        assert torch.equal(t, ref)
    return True


def test_real_model_options_checkpointing_and_saved_tensor_hooks():
    assert run_world(2, check_options_and_stack, timeout_s=120) == [True, True]


def test_meta_device_construction():
    assert run_world(2, check_meta_construction, timeout_s=60) == [True, True]


def test_selection_bias_stays_float32():
    cfg = ep.MoEConfig(hidden=8, ffn_hidden=6, num_experts=4, top_k=2)
    layer = ep.ExpertParallelMoE(cfg)
    with torch.no_grad():
        layer.router.e_score_correction_bias.copy_(torch.tensor([0.1, 1e-8, 3.0, 0.7]))
    want = layer.router.e_score_correction_bias.clone()
    for cast in (torch.nn.Module.double, torch.nn.Module.bfloat16, torch.nn.Module.half, torch.nn.Module.float):
        cast(layer)
        assert layer.router.e_score_correction_bias.dtype == torch.float32
        assert torch.equal(layer.router.e_score_correction_bias, want)
