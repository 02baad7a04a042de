"""Train a tiny DeepSeek-V4-shaped model whose MoE blocks are `ep` layers, on N ranks.

    launch/cpu_sim.sh 4 examples/train_deepseek_v4.py      # inside .venv; 4 Gloo ranks on this CPU

The model is `transformers`' own `DeepseekV4ForCausalLM` (hyper-connections, compressed
attention, a hash-routed first MoE layer, shared experts, clamped SwiGLU), built tiny from
its config, in float64. Every rank builds it alike, then `ep.hf.replace_moe_blocks` swaps
each MoE block for an `ep.ExpertParallelMoE` over the group, loaded with the block's
weights (each rank keeps its own experts). Each step, every rank takes its share of the
batch (uneven: sequences 2, 1, 2, 1 of 6 on 4 ranks), runs forward and backward, and
all-reduces the gradients of every replicated parameter (attention, norms, embeddings, the
routers and the shared experts) as DDP would; the routed experts' gradients are already
whole on their owner (every rank's tokens reached them). The loss of a rank is its tokens'
summed cross-entropy over the batch's token count, so the all-reduced sum is the gradient
of the batch's mean loss, and the optimizer's step is the single-process model's.

Rank 0 also trains the unchanged single-process model on the whole batch and prints both
losses per step; the script fails if they differ by more than 1e-6 relative.
"""
from __future__ import annotations

import argparse
import sys
from typing import List

import torch
import torch.distributed as dist
import torch.nn.functional as F

import ep
import ep.hf

VOCAB, SEQ, BATCH, STEPS, LR = 64, 16, 6, 20, 1e-2
TOLERANCE = 1e-6


def build_model(seed: int = 0):
    """The tiny DeepSeek-V4 model in float64, the same on every rank (its own seed)."""
    from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

    cfg = DeepseekV4Config(
        vocab_size=VOCAB, hidden_size=32, moe_intermediate_size=16, n_routed_experts=8, num_experts_per_tok=2,
        num_hidden_layers=3, mlp_layer_types=["hash_moe", "moe", "moe"],
        layer_types=["heavily_compressed_attention", "compressed_sparse_attention", "heavily_compressed_attention"],
        num_attention_heads=2, head_dim=16, q_lora_rank=16, o_groups=2, o_lora_rank=16, index_n_heads=2,
        index_head_dim=8, index_topk=4, sliding_window=8, hc_mult=2, max_position_embeddings=64,
        compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 8},
        swiglu_limit=2.0, routed_scaling_factor=1.5,
        experts_implementation="eager", attn_implementation="eager",
    )
    torch.manual_seed(seed)
    model = DeepseekV4ForCausalLM(cfg).double()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for layer in model.model.layers:
            gate = layer.mlp.gate
            if hasattr(gate, "tid2eid"):  # hash routing: each token id's k distinct experts
                gate.tid2eid.copy_(torch.stack([torch.randperm(cfg.n_routed_experts, generator=g)[:cfg.num_experts_per_tok]
                                                for _ in range(VOCAB)]))
            else:  # a selection bias, as a balanced checkpoint has (float32 values)
                gate.e_score_correction_bias.copy_((torch.rand(cfg.n_routed_experts, generator=g) * 0.1).float())
    return model


def batch(step: int) -> torch.Tensor:
    """`[BATCH, SEQ]` token ids of a step, the same on every rank: counting sequences
    (`start, start + stride, ...` mod VOCAB, stride 1..3), something to learn."""
    g = torch.Generator().manual_seed(100 + step)
    start = torch.randint(0, VOCAB, (BATCH, 1), generator=g)
    stride = torch.randint(1, 4, (BATCH, 1), generator=g)
    return (start + stride * torch.arange(SEQ)) % VOCAB


def rows_of(rank: int, world_size: int) -> slice:
    """This rank's sequences: an uneven split (2, 1, 2, 1 of 6 on 4 ranks)."""
    sizes = [BATCH // world_size] * world_size
    for r in (list(range(0, world_size, 2)) + list(range(1, world_size, 2)))[:BATCH % world_size]:
        sizes[r] += 1  # the remainder to the even ranks first
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])


def summed_loss(model, ids: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy of `ids`, summed over its tokens (float64)."""
    logits = model(input_ids=ids, use_cache=False).logits
    return F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1), reduction="sum")


def train_expert_parallel(steps: int = STEPS, group=None) -> List[float]:
    """Train with the MoE blocks replaced by `ep` layers over `group`; the batch's mean loss per step."""
    rank, n = dist.get_rank(group), dist.get_world_size(group)
    model = build_model()
    ep.hf.replace_moe_blocks(model, group)
    routed = {p for m in model.modules() if isinstance(m, ep.ExpertParallelMoE) for p in m.experts.parameters()}
    replicated = [p for p in model.parameters() if p not in routed]
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    tokens = BATCH * (SEQ - 1)
    losses = []
    for step in range(steps):
        ids = batch(step)[rows_of(rank, n)]
        loss = summed_loss(model, ids) / tokens
        loss.backward()
        for p in replicated:  # DDP's job: replicated gradients summed over the ranks' tokens
            if p.grad is not None:  # None on every rank alike: the CSA indexer chooses by top-k, no gradient
                dist.all_reduce(p.grad, group=group)
        opt.step()
        opt.zero_grad()
        total = loss.detach().clone()
        dist.all_reduce(total, group=group)
        losses.append(total.item())
    return losses


def train_single_process(steps: int = STEPS) -> List[float]:
    """The unchanged `transformers` model on the whole batch: the reference."""
    model = build_model()
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    tokens = BATCH * (SEQ - 1)
    losses = []
    for step in range(steps):
        loss = summed_loss(model, batch(step)) / tokens
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--no-reference", action="store_true", help="skip the single-process model on rank 0")
    args = parser.parse_args()
    torch.set_num_threads(1)
    group = ep.init_distributed(backend="gloo")
    if group is None:
        raise SystemExit("run it on several ranks: launch/cpu_sim.sh 4 examples/train_deepseek_v4.py")
    losses = train_expert_parallel(args.steps, group)
    if dist.get_rank() != 0:
        dist.destroy_process_group()
        return 0
    reference = None if args.no_reference else train_single_process(args.steps)
    print(f"tiny DeepSeek-V4, float64, {dist.get_world_size()} ranks (gloo), MoE blocks: ep.ExpertParallelMoE")
    print("step   ep loss              transformers loss    rel diff")
    worst = 0.0
    for step, loss in enumerate(losses):
        if reference is None:
            print(f"{step:4d}   {loss:.15f}")
            continue
        diff = abs(loss - reference[step]) / abs(reference[step])
        worst = max(worst, diff)
        print(f"{step:4d}   {loss:.15f}    {reference[step]:.15f}    {diff:.1e}")
    dist.destroy_process_group()
    if reference is not None:
        print(f"largest relative difference {worst:.1e} (tolerance {TOLERANCE:.0e})")
        return 0 if worst <= TOLERANCE else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
