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

With `--fp8` the model is built with hidden and expert widths of 128 (FP8's scale blocks) and
trained twice with `ep` layers: FP8 expert products and FP8 dispatch (`--fp8-scaling` blocks
or rows; on CPU the same quantization, products in fp32), and unquantized; it prints both
loss curves and fails if FP8's departs from the unquantized one by more than `FP8_TOLERANCE`
(`fp8_distance`: at the first step, and in the mean loss of the last half of the steps; the
backward is the unquantized one, from the FP8 forward's activations). Step by step the two
runs drift apart as any two training runs whose numbers differ do (a few percent after ten
steps here), so the distance is stated on the curve's start and its level, not per step.
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
FP8_WIDTH = 128  # hidden and moe_intermediate sizes of the --fp8 model: whole 128-wide scale blocks
FP8_TOLERANCE = {"first step": 0.01, "mean of the last half": 0.03}
"""How far the FP8 loss curve may lie from the unquantized one (`--fp8`, `fp8_distance`),
relative (measured: README, Precision)."""


def build_model(seed: int = 0, hidden: int = 32, moe_ffn: int = 16):
    """The tiny DeepSeek-V4 model in float64, the same on every rank (its own seed)."""
    from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

    cfg = DeepseekV4Config(
        vocab_size=VOCAB, hidden_size=hidden, moe_intermediate_size=moe_ffn, n_routed_experts=8, num_experts_per_tok=2,
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


def train_expert_parallel(steps: int = STEPS, group=None, width: int = 0, **overrides) -> List[float]:
    """Train with the MoE blocks replaced by `ep` layers over `group` (`overrides`: `MoEConfig`
    fields, e.g. FP8; `width`: hidden and expert widths, else the default tiny ones); the
    batch's mean loss per step."""
    rank, n = dist.get_rank(group), dist.get_world_size(group)
    model = build_model(**(dict(hidden=width, moe_ffn=width) if width else {}))
    ep.hf.replace_moe_blocks(model, group, **overrides)
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


def fp8_loss_curves(steps: int, group, scaling: str = "blocks"):
    """(FP8 losses, unquantized losses) of the model at `FP8_WIDTH`, both through `ep` layers."""
    fp8 = torch.float8_e4m3fn
    quantized = train_expert_parallel(steps, group, FP8_WIDTH, expert_dtype=fp8, dispatch_dtype=fp8,
                                      fp8_scaling=scaling)
    return quantized, train_expert_parallel(steps, group, FP8_WIDTH)


def fp8_distance(quantized: List[float], plain: List[float]) -> dict:
    """The FP8 curve's relative distance from the unquantized one: at the first step (the
    forward's FP8 error alone, before the runs' weights differ) and in the mean loss of the
    last half of the steps (the level training reaches)."""
    half = len(plain) // 2
    mean_q, mean_p = sum(quantized[half:]) / (len(plain) - half), sum(plain[half:]) / (len(plain) - half)
    return {"first step": abs(quantized[0] - plain[0]) / plain[0], "mean of the last half": abs(mean_q - mean_p) / mean_p}


def compare_fp8(steps: int, group, scaling: str) -> int:
    quantized, plain = fp8_loss_curves(steps, group, scaling)
    if dist.get_rank() != 0:
        dist.destroy_process_group()
        return 0
    print(f"tiny DeepSeek-V4 at width {FP8_WIDTH}, {dist.get_world_size()} ranks (gloo): FP8 experts and dispatch "
          f"({scaling}) against unquantized ep layers, float64 elsewhere")
    print("step   fp8 loss     unquantized  rel diff")
    for step, (a, b) in enumerate(zip(quantized, plain)):
        print(f"{step:4d}   {a:.6f}     {b:.6f}     {abs(a - b) / abs(b):.1e}")
    dist.destroy_process_group()
    distance = fp8_distance(quantized, plain)
    print("distance: " + ", ".join(f"{k} {v:.1e} (tolerance {FP8_TOLERANCE[k]:.0e})" for k, v in distance.items()))
    return 0 if all(v <= FP8_TOLERANCE[k] for k, v in distance.items()) else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--no-reference", action="store_true", help="skip the single-process model on rank 0")
    parser.add_argument("--fp8", action="store_true", help="FP8 experts and dispatch against unquantized ep layers")
    parser.add_argument("--fp8-scaling", default="blocks", choices=("blocks", "rows"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    group = ep.init_distributed(backend="gloo")
    if group is None:
        raise SystemExit("run it on several ranks: launch/cpu_sim.sh 4 examples/train_deepseek_v4.py")
    if args.fp8:
        return compare_fp8(args.steps, group, args.fp8_scaling)
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
