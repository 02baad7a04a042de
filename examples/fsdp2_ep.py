"""FSDP2 and expert parallelism together, as torchtitan trains: a 2-D mesh dp x ep.

    torchrun --nproc-per-node 4 examples/fsdp2_ep.py            # 2 dp x 2 ep; Gloo on CPUs, NCCL on GPUs
    launch/cpu_sim.sh 4 examples/fsdp2_ep.py --ep 4 --steps 10  # 1 dp x 4 ep

The model is dense -> EP MoE (with a shared expert) -> dense. Every rank has its own tokens
(the global batch is split over all dp x ep ranks). `parallelize` applies FSDP2:

- the routed experts (`experts.w1`, `experts.w2`) are already split over the "ep" ranks (each
  EP rank holds E/ep of them); `fully_shard(moe, mesh=mesh["dp"])` shards each rank's share
  further over "dp". Their gradient on an EP rank already sums what every rank of its EP
  group's tokens contributed, so the reduce over dp must divide by dp x ep, not dp:
  `moe.set_gradient_divide_factor(dp * ep)`;
- the dense layers, the router and the shared experts are replicated over all dp x ep
  ranks, each seeing its own tokens: they are sharded over the flattened (dp, ep) mesh, so
  their gradients are averaged over every rank that holds them (sharding them over "dp"
  alone would average over dp only and let the EP ranks' copies drift apart);
- `moe.sync_replicas()` runs before sharding: the layer's first forward broadcasts the
  router and shared experts from the EP group's rank 0 into plain tensors, which FSDP2 has
  replaced with shards by then.

Each rank's loss is its tokens' summed squared error times (ranks / global tokens), so the
averaged gradients are those of the global batch's mean loss. Rank 0 prints the loss per
step; the script exits non-zero if the loss did not fall.
"""
from __future__ import annotations

import argparse
import gc
import sys
from typing import List, Optional

import torch
import torch.distributed as dist
from torch import nn

import ep

H, F, E, K = 16, 8, 8, 2
TOKENS_PER_RANK, STEPS, LR = 24, 5, 3e-2


class Model(nn.Module):
    """`out(moe(tanh(inp(x))))`: dense, an EP layer over `group`, dense."""

    def __init__(self, group: Optional[dist.ProcessGroup] = None, num_experts: int = E, **knobs) -> None:
        super().__init__()
        self.inp = nn.Linear(H, H)
        self.moe = ep.ExpertParallelMoE(ep.MoEConfig(hidden=H, ffn_hidden=F, num_experts=num_experts, top_k=K,
                                                     num_waves=2, num_shared_experts=1, **knobs), group)
        self.out = nn.Linear(H, H)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.moe(torch.tanh(self.inp(x))))


def parallelize(model: nn.Module, mesh) -> nn.Module:
    """FSDP2 over a `("dp", "ep")` mesh whose "ep" group every EP layer of `model` runs on."""
    from torch.distributed.fsdp import fully_shard

    dp_ep = mesh["dp", "ep"]._flatten("dp_ep")  # every rank holding the replicated parameters
    world = dp_ep.size()
    for moe in [m for m in model.modules() if isinstance(m, ep.ExpertParallelMoE)]:
        moe.sync_replicas()  # (collective over ep) before FSDP2 replaces the replicas with shards
        fully_shard(moe.router, mesh=dp_ep)
        if moe.shared_experts is not None:
            fully_shard(moe.shared_experts, mesh=dp_ep)
        fully_shard(moe, mesh=mesh["dp"])  # what is left in it: the routed experts
        moe.set_gradient_divide_factor(world)  # they sum every token of the EP group already
    for child in model.children():
        if not isinstance(child, ep.ExpertParallelMoE) and any(True for _ in child.parameters()):
            fully_shard(child, mesh=dp_ep)
    return fully_shard(model, mesh=dp_ep)


def batch(step: int, tokens_per_rank: List[int], rank: int, device) -> tuple:
    """This rank's `(x, target)` of step `step`'s global batch (the same global batch on
    every rank, from its own generator): `target = sin(2 x @ teacher)`."""
    g = torch.Generator().manual_seed(1000 + step)
    teacher = torch.randn(H, H, generator=torch.Generator().manual_seed(7), dtype=torch.float64) / H ** 0.5
    x = torch.randn(sum(tokens_per_rank), H, generator=g, dtype=torch.float64)
    start = sum(tokens_per_rank[:rank])
    mine = slice(start, start + tokens_per_rank[rank])
    return x[mine].to(device), torch.sin(2 * x[mine] @ teacher).to(device)


def rank_loss(model: nn.Module, x: torch.Tensor, target: torch.Tensor, ranks: int, global_tokens: int) -> torch.Tensor:
    """This rank's share of the global mean loss, scaled by `ranks` for FSDP2's averaging."""
    return ((model(x) - target) ** 2).sum() * (ranks / global_tokens)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ep", type=int, default=2, help="EP size (the rest of the ranks is dp)")
    parser.add_argument("--steps", type=int, default=STEPS)
    args = parser.parse_args(argv)
    ep.init_distributed()
    if not dist.is_initialized():
        raise SystemExit("fsdp2_ep.py: start it with torchrun (or launch/cpu_sim.sh), several ranks")
    n, rank = dist.get_world_size(), dist.get_rank()
    if n % args.ep:
        raise SystemExit(f"fsdp2_ep.py: --ep {args.ep} does not divide the {n} ranks")
    from torch.distributed.device_mesh import init_device_mesh

    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    mesh = init_device_mesh(device.type, (n // args.ep, args.ep), mesh_dim_names=("dp", "ep"))
    torch.manual_seed(0)  # the replicated parts alike on every rank
    model = Model(mesh.get_group("ep")).to(device, torch.float64)
    torch.manual_seed(1 + mesh["ep"].get_local_rank())  # each EP rank its own experts (alike over dp)
    model.moe.experts.reset_parameters()
    model = parallelize(model, mesh)
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    counts = [TOKENS_PER_RANK] * n
    losses = []
    for step in range(args.steps):
        x, target = batch(step, counts, rank, device)
        loss = rank_loss(model, x, target, n, sum(counts))
        opt.zero_grad()
        loss.backward()
        opt.step()
        total = loss.detach().clone()
        dist.all_reduce(total)
        losses.append(total.item() / n)
        if rank == 0:
            print(f"step {step} loss {losses[-1]:.6f}", flush=True)
    dist.barrier()  # every rank done with the groups' last work before any tears them down
    del model, opt
    gc.collect()  # the FSDP2 and DTensor state that holds the sub-groups, before they go
    dist.destroy_process_group()
    if args.steps > 1 and not losses[-1] < losses[0]:
        print(f"fsdp2_ep.py: the loss did not fall ({losses[0]:.6f} -> {losses[-1]:.6f})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
