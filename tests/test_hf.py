"""The layer against `transformers`' own MoE blocks (DeepSeek-V4, DeepSeek-V3, Mixtral,
Qwen3-MoE) on Gloo ranks: weights loaded from the block (each rank its experts), tokens
split unevenly over the ranks (one rank with none), every wave count; output and every
gradient against the block run on all tokens in one process, in float64.

DeepSeek-V4's block computes in float64 throughout: within 1e-9. DeepSeek-V3's router
scores in float32 (`hidden_states.type(torch.float32)`), Mixtral's and Qwen3-MoE's softmax
in float32 (`.float()`, `dtype=torch.float`): their routing weights carry float32 rounding
(~6e-8 relative), so the outputs and gradients agree within FP32_TOL.
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from tests.cases import rel_err
from tests.world import run_world

H, F, E, K = 16, 8, 16, 4
FP64_TOL = 1e-9
FP32_TOL = 5e-6  # float32 routing weights: measured up to 9.5e-7 (DeepSeek-V3 router grad)
TOKENS = {1: [13], 2: [6, 11], 4: [5, 9, 0, 7]}


def make_block(kind: str):
    """A tiny block of `kind` with random float64 weights (the same on every rank) -> (block, its config)."""
    import transformers as tf
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE
    from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4SparseMoeBlock
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    common = dict(hidden_size=H, num_experts_per_tok=K, experts_implementation="eager")
    if kind == "deepseek_v4":
        cfg = tf.DeepseekV4Config(moe_intermediate_size=F, n_routed_experts=E, num_hidden_layers=1,
                                  mlp_layer_types=["moe"], swiglu_limit=0.7, routed_scaling_factor=1.5, **common)
        block = DeepseekV4SparseMoeBlock(cfg, 0)
    elif kind == "deepseek_v3":
        cfg = tf.DeepseekV3Config(moe_intermediate_size=F, n_routed_experts=E, n_group=4, topk_group=2,
                                  n_shared_experts=2, routed_scaling_factor=2.5, **common)
        block = DeepseekV3MoE(cfg)
    elif kind == "mixtral":
        cfg = tf.MixtralConfig(intermediate_size=F, num_local_experts=E, **common)
        block = MixtralSparseMoeBlock(cfg)
    else:
        cfg = tf.Qwen3MoeConfig(moe_intermediate_size=F, num_experts=E, norm_topk_prob=False, **common)
        block = Qwen3MoeSparseMoeBlock(cfg)
    g = torch.Generator().manual_seed(7)
    block = block.double()
    with torch.no_grad():
        for name, p in block.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * (1.0 if name == "gate.weight" else 0.4))
        if hasattr(block.gate, "e_score_correction_bias"):  # float32 values, as checkpoints hold them
            block.gate.e_score_correction_bias.copy_((torch.rand(E, generator=g) * 0.2).float())
    return block, cfg


def check_blocks(rank, n):
    import ep
    import ep.hf

    errors = {}
    counts = TOKENS[n]
    T = sum(counts)
    start = sum(counts[:rank])
    mine = slice(start, start + counts[rank])
    El = E // n
    experts = slice(rank * El, (rank + 1) * El)
    for kind in ("deepseek_v4", "deepseek_v3", "mixtral", "qwen3_moe"):
        block, hf_cfg = make_block(kind)
        g = torch.Generator().manual_seed(11)
        x = torch.randn(1, T, H, generator=g, dtype=torch.float64)
        dy = torch.randn(1, T, H, generator=g, dtype=torch.float64)
        xb = x.clone().requires_grad_(True)
        yb = block(xb)
        yb.backward(dy)
        want = dict(y=yb.detach()[0, mine], dx=xb.grad[0, mine], router=block.gate.weight.grad,
                    w1=block.experts.gate_up_proj.grad[experts].transpose(1, 2),
                    w2=block.experts.down_proj.grad[experts].transpose(1, 2))
        if hasattr(block, "shared_experts"):
            s = block.shared_experts
            want["shared_w1"] = torch.cat([s.gate_proj.weight.grad.T, s.up_proj.weight.grad.T], dim=1)
            want["shared_w2"] = s.down_proj.weight.grad.T
        for W in sorted({1, 2, 4} & set(range(1, El + 1))):
            layer = ep.ExpertParallelMoE(ep.hf.moe_config(hf_cfg, num_waves=W)).double()
            ep.hf.load_block(layer, block)
            xl = x[0, mine].clone().requires_grad_(True)
            yl = layer(xl)
            yl.backward(dy[0, mine])
            got = dict(y=yl.detach(), dx=xl.grad, router=layer.router.weight.grad,
                       w1=layer.experts.w1.grad, w2=layer.experts.w2.grad)
            if layer.shared_experts is not None:
                got["shared_w1"], got["shared_w2"] = layer.shared_experts.w1.grad, layer.shared_experts.w2.grad
            for name in ("router", "shared_w1", "shared_w2"):  # replicated: sum over ranks, as DDP would
                if name in got:
                    got[name] = got[name].clone()
                    dist.all_reduce(got[name])
            assert set(got) == set(want), (kind, set(got) ^ set(want))
            for name in want:
                err = rel_err(got[name], want[name])
                errors[(kind, name)] = max(errors.get((kind, name), 0.0), err)
        # written back, gathered on rank 0: the block's own tensors again
        assert (ep.hf.block_state_dict(layer, dst=n - 1) is None) == (rank != n - 1)
        fresh = make_block(kind)[0] if rank == 0 else None
        if fresh is not None:
            with torch.no_grad():
                for p in fresh.parameters():
                    p.zero_()
        ep.hf.save_block(layer, fresh, dst=0)
        if fresh is not None:
            for key, value in block.state_dict().items():
                assert torch.equal(fresh.state_dict()[key], value), f"{kind}: {key} not written back as loaded"
    return errors


@pytest.mark.parametrize("n", [1, 2, 4])
def test_layer_matches_transformers_blocks(n):
    pytest.importorskip("transformers")
    per_rank = run_world(n, check_blocks, timeout_s=300)
    worst = {}
    for errors in per_rank:
        for key, err in errors.items():
            worst[key] = max(worst.get(key, 0.0), err)
    failures = []
    for (kind, name), err in sorted(worst.items()):
        tol = FP64_TOL if kind == "deepseek_v4" else FP32_TOL
        print(f"n={n} {kind:12s} {name:10s} max rel err {err:.2e} (tol {tol:.0e})")
        if not err <= tol:
            failures.append(f"{kind} {name}: {err:.3e} > {tol:.0e}")
    assert not failures, "\n".join(failures)
