"""FSDP2 and EP together on 4 Gloo ranks = 2 dp x 2 ep (the recipe of examples/fsdp2_ep.py):
a few SGD (momentum) and Adam steps in float64 equal a plain single-process float64 model
trained on the global batch, every parameter compared on every rank after each step; and the
example itself runs under torchrun."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from tests.reference import reference_moe, reference_routing
from tests.world import run_world

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "examples", "fsdp2_ep.py")
TOL = 1e-10
COUNTS = [9, 14, 5, 12]  # tokens per rank: uneven, so the loss scaling matters
STEPS = 3


def _example():
    spec = importlib.util.spec_from_file_location("fsdp2_ep", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Reference(nn.Module):
    """The example's model in one process, all E experts, written with `tests/reference.py`
    (no `ep` code); its parameter names are the EP model's, with whole expert tensors."""

    def __init__(self, H, F, E, K, g):
        super().__init__()
        self.K = K
        def r(*shape):
            return nn.Parameter(torch.randn(*shape, generator=g, dtype=torch.float64) / shape[-2] ** 0.5)

        self.inp = nn.Linear(H, H, dtype=torch.float64)
        self.out = nn.Linear(H, H, dtype=torch.float64)
        for lin in (self.inp, self.out):
            with torch.no_grad():
                lin.weight.copy_(torch.randn(H, H, generator=g, dtype=torch.float64) / H ** 0.5)
                lin.bias.copy_(torch.randn(H, generator=g, dtype=torch.float64) * 0.1)
        self.moe = nn.Module()
        self.moe.router = nn.Module()
        self.moe.router.weight = r(E, H)
        self.moe.router.register_buffer("e_score_correction_bias", torch.zeros(E, dtype=torch.float32))
        self.moe.experts = nn.Module()
        self.moe.experts.w1, self.moe.experts.w2 = r(E, H, 2 * F), r(E, F, H)
        self.moe.shared_experts = nn.Module()
        self.moe.shared_experts.w1, self.moe.shared_experts.w2 = r(H, 2 * F), r(F, H)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        m = self.moe
        idx, w = reference_routing(h, m.router.weight, self.K)
        return self.out(reference_moe(h, m.experts.w1, m.experts.w2, idx, w, None, m.shared_experts.w1,
                                      m.shared_experts.w2))


def _optimizer(kind, params):
    if kind == "sgd":  # plain SGD sees a wrong gradient scale; Adam would hide most of it
        return torch.optim.SGD(params, lr=0.05, momentum=0.9)
    return torch.optim.Adam(params, lr=0.02)


def train_both(rank, n, compiled=False):
    """`compiled`: the FSDP2 model under `torch.compile` (Dynamo traces the EP layer, with
    `max_tokens`; FSDP2's own hooks are graph breaks of torch's, so not `fullgraph`)."""
    from torch.distributed.device_mesh import init_device_mesh

    ex = _example()
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "ep"))
    ep_rank = mesh["ep"].get_local_rank()
    worst = {}
    for kind in ("adam",) if compiled else ("sgd", "adam"):
        ref = Reference(ex.H, ex.F, ex.E, ex.K, torch.Generator().manual_seed(11))
        torch.manual_seed(50 + rank)  # nothing but the load gives the EP model its values
        model = ex.Model(mesh.get_group("ep"), **(dict(max_tokens=max(COUNTS)) if compiled else {})).double()
        model.load_state_dict(ref.state_dict())  # whole experts: each EP rank takes its rows
        model = ex.parallelize(model, mesh)
        call = torch.compile(model) if compiled else model
        opt, ref_opt = _optimizer(kind, model.parameters()), _optimizer(kind, ref.parameters())
        El = ex.E // mesh["ep"].size()
        errs = []
        for step in range(STEPS):
            x, target = ex.batch(step, COUNTS, rank, "cpu")
            loss = ex.rank_loss(call, x, target, n, sum(COUNTS))
            opt.zero_grad()
            loss.backward()
            opt.step()
            xs, ts = zip(*(ex.batch(step, COUNTS, r, "cpu") for r in range(n)))
            ref_loss = ((ref(torch.cat(xs)) - torch.cat(ts)) ** 2).sum() / sum(COUNTS)
            ref_opt.zero_grad()
            ref_loss.backward()
            ref_opt.step()
            want = dict(ref.named_parameters())
            step_err = 0.0
            for name, p in model.named_parameters():
                got = p.full_tensor() if hasattr(p, "full_tensor") else p  # FSDP2's shards: gathered over their mesh
                w = want[name]
                if name in ("moe.experts.w1", "moe.experts.w2"):
                    w = w[ep_rank * El:(ep_rank + 1) * El]
                assert got.shape == w.shape, (name, got.shape, w.shape)
                step_err = max(step_err, ((got - w).abs().max() / w.abs().max()).item())
            start = Reference(ex.H, ex.F, ex.E, ex.K, torch.Generator().manual_seed(11))
            moved = max(((p - q).abs().max()).item() for p, q in zip(ref.parameters(), start.parameters()))
            assert moved > 1e-3, f"{kind}: the reference did not train"
            errs.append(step_err)
        worst[kind] = errs
    return worst


@pytest.mark.parametrize("compiled", [False, True])
def test_fsdp2_and_ep_train_as_one_process(compiled):
    out = run_world(4, train_both, compiled, timeout_s=300)
    for rank, worst in enumerate(out):
        for kind, errs in worst.items():
            print(f"rank {rank} {kind}: largest relative parameter difference per step {errs}")
            assert len(errs) == STEPS and max(errs) <= TOL, (rank, kind, errs)


def test_example_runs_under_torchrun():
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_", "MASTER_", "TORCHELASTIC"))}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4", EXAMPLE,
           "--steps", "4"]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, f"{' '.join(cmd)} exited {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    assert [line.split()[:2] for line in p.stdout.splitlines() if line.startswith("step ")] == \
        [["step", str(s)] for s in range(4)]  # rank 0 printed every step once (the loss fell: exit 0)
