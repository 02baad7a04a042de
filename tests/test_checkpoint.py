"""Distributed checkpoints that reshard: `torch.distributed.checkpoint` (DCP) saves a model with
an EP layer at EP=4 through its own `state_dict()`, and it loads at EP=2, at 2 dp x 2 ep (a
2-D mesh, the layer on the "ep" group), at EP=1 groups (two one-rank groups) and in a single
process with no process group; every load computes the saved model's outputs for the same
tokens (float64, within 1e-12) and holds the saved experts, every one of them. Experts that
do not fit the layer (E differs) raise, naming E."""
from __future__ import annotations

import io
import os

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch import nn

import ep
import ep.checkpoint
from tests.world import run_world

H, F, E, K, T = 12, 10, 8, 3, 40
TOL = 1e-12


class Net(nn.Module):
    """A dense layer, then an EP layer (the state dict's keys carry the prefix `moe.`)."""

    def __init__(self, group=None, num_experts=E):
        super().__init__()
        self.inp = nn.Linear(H, H)
        self.moe = ep.ExpertParallelMoE(ep.MoEConfig(hidden=H, ffn_hidden=F, num_experts=num_experts, top_k=K,
                                                     num_waves=2, num_shared_experts=1), group)

    def forward(self, x):
        return self.moe(torch.tanh(self.inp(x)))


def _portable(obj):
    """Tensors as bytes, to leave a rank's process (tensors themselves travel as shared memory
    that ends with the process)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _unpack(out):
    return [torch.load(io.BytesIO(b)) for b in out]


def _tokens():
    return torch.randn(T, H, generator=torch.Generator().manual_seed(3), dtype=torch.float64)


def _share(x, parts, i):
    """Part i of `parts` nearly equal slices of x's tokens (uneven sizes)."""
    bounds = [round(j * x.shape[0] / parts) + (j % 2 if 0 < j < parts else 0) for j in range(parts + 1)]
    return x[bounds[i]:bounds[i + 1]]


def _build(group, seed, num_experts=E):
    """The dense layer drawn alike on every rank (as data parallelism keeps it), the EP layer
    with `seed + 1 + rank` (its own experts; a router the first forward replaces with rank 0's):
    nothing matches the checkpoint before a load."""
    torch.manual_seed(seed)
    model = Net(group, num_experts).double()
    torch.manual_seed(seed + 1 + (dist.get_rank() if dist.is_initialized() else 0))
    model.moe.reset_parameters()
    return model


def save_at_ep4(rank, n, path):
    model = _build(None, 100)  # replicated parts differ per rank until the first forward broadcasts rank 0's
    y = model(_share(_tokens(), n, rank))
    dcp.save(model.state_dict(), checkpoint_id=path)
    experts = (model.moe.experts.w1.detach().clone(), model.moe.experts.w2.detach().clone())
    return _portable((y.detach(), experts, _replicated(model)))


def _replicated(model):
    """The state dict's replicated tensors (all but the routed experts), copied."""
    return {k: v.clone() for k, v in model.state_dict().items() if k not in ("moe.experts.w1", "moe.experts.w2")}


def _load(model, path):
    state = model.state_dict()
    dcp.load(state, checkpoint_id=path)
    model.load_state_dict(state)
    return model


def _run_loaded(model, rank_tokens):
    replicated = _replicated(model)
    y = model(rank_tokens).detach()  # (the first forward broadcasts the replicas: checked before it)
    return y, (model.moe.experts.w1.detach().clone(), model.moe.experts.w2.detach().clone()), replicated


def load_at_ep2_and_ep1_groups(rank, n, path):
    """EP=2 over the world, then EP=1 groups (each rank its own one-rank group)."""
    at_ep2 = _run_loaded(_load(_build(None, 200), path), _share(_tokens(), n, rank))
    singles = [dist.new_group([r]) for r in range(n)]
    at_ep1 = _run_loaded(_load(_build(singles[rank], 300), path), _tokens())  # every rank all tokens
    return _portable((at_ep2, at_ep1))


def load_at_2dp_2ep(rank, n, path):
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "ep"))
    model = _load(_build(mesh.get_group("ep"), 400), path)
    return _portable(_run_loaded(model, _share(_tokens(), n, rank)))


def fsdp2_load_step_save(rank, n, path, path2):
    """2 dp x 2 ep under FSDP2 (examples/fsdp2_ep.py's recipe): load the EP=4 checkpoint, run
    it, take one SGD step, save; return the outputs and this rank's experts (gathered over dp)."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "ep"))
    model = _fsdp2_example().parallelize(_build(mesh.get_group("ep"), 700), mesh)
    ep.checkpoint.load(model, path)
    x = _share(_tokens(), n, rank)
    y = model(x)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    y.square().sum().backward()
    opt.step()
    dcp.save(model.state_dict(), checkpoint_id=path2)
    y2 = model(x).detach()
    experts = tuple(w.full_tensor().detach().clone() for w in (model.moe.experts.w1, model.moe.experts.w2))
    return _portable((y.detach(), y2, experts))


def _fsdp2_example():
    import importlib.util

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location("fsdp2_ep", os.path.join(root, "examples", "fsdp2_ep.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _whole(experts_of_ranks):
    return [torch.cat([e[i] for e in experts_of_ranks]) for i in (0, 1)]


def _close(a, b):
    return (a - b).abs().max().item() <= TOL * max(1.0, b.abs().max().item())


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("ckpt") / "ep4")
    out = _unpack(run_world(4, save_at_ep4, path))
    y = torch.cat([o[0] for o in out])
    return path, y, _whole([o[1] for o in out]), out[0][2]


def _check_replicated(replicated_of_ranks, want):
    for got in replicated_of_ranks:
        assert set(got) == set(want)
        for key, value in want.items():
            assert torch.equal(got[key], value), key


def test_saved_at_ep4_loads_at_ep2_and_ep1_groups(saved):
    path, y, experts, replicated = saved
    out = _unpack(run_world(2, load_at_ep2_and_ep1_groups, path))
    at_ep2, at_ep1 = [o[0] for o in out], [o[1] for o in out]
    for got, want in zip(_whole([o[1] for o in at_ep2]), experts):
        assert torch.equal(got, want)  # every expert, in its place
    _check_replicated([o[2] for o in at_ep2], replicated)
    assert _close(torch.cat([o[0] for o in at_ep2]), y)
    for o in at_ep1:  # a one-rank group holds all E experts
        assert all(torch.equal(g, w) for g, w in zip(o[1], experts))
        _check_replicated([o[2]], replicated)
        assert _close(o[0], y)


def test_saved_at_ep4_loads_at_2dp_x_2ep(saved):
    path, y, experts, replicated = saved
    out = _unpack(run_world(4, load_at_2dp_2ep, path))
    for dp in (0, 1):  # ranks 2 dp, 2 dp + 1 form one EP group, each with all E experts between them
        for got, want in zip(_whole([out[2 * dp][1], out[2 * dp + 1][1]]), experts):
            assert torch.equal(got, want)
    _check_replicated([o[2] for o in out], replicated)
    assert _close(torch.cat([o[0] for o in out]), y)


def test_saved_at_ep4_loads_in_one_process(saved):
    path, y, experts, replicated = saved
    assert not dist.is_initialized()
    torch.manual_seed(500)
    model = _load(Net().double(), path)
    assert all(not hasattr(v, "device_mesh") for v in model.state_dict().values())  # plain tensors here
    got_y, got_experts, got_replicated = _run_loaded(model, _tokens())
    assert all(torch.equal(g, w) for g, w in zip(got_experts, experts))
    _check_replicated([got_replicated], replicated)
    assert _close(got_y, y)


def test_experts_that_do_not_fit_raise(saved):
    path = saved[0]
    torch.manual_seed(0)
    model = Net(num_experts=2 * E).double()
    with pytest.raises(ValueError, match=rf"moe\.experts\.w1 holds {E} experts.*'moe' has E={2 * E}"):
        ep.checkpoint.load(model, path)
    with pytest.raises(CheckpointException, match=r"Size mismatch .*\[8, 12, 20\].*\[16, 12, 20\].*moe\.experts\.w1"):
        dcp.load(model.state_dict(), checkpoint_id=path)  # DCP's own check names the tensor and both sizes
    # a plain state dict with the wrong E: the layer names it
    small = Net().double().state_dict()
    with pytest.raises(ValueError, match=rf"moe\.experts\.w1 .*\[{E}, {H}, {2 * F}\] \({E} experts\).*E={2 * E}"):
        model.load_state_dict(small)
    ep.checkpoint.load(_build(None, 600), path)  # the helper loads what fits


def plain_state_dicts(rank, n):
    """What `state_dict()` without DCP is used for: a whole single-process state dict loads
    (each rank takes its rows), a layer's own state dict round-trips, a rank's `[E_local, ...]`
    experts (the earlier layout) load as its own, and a wrong shape raises."""
    torch.manual_seed(7)
    whole = Net().double()  # its dense layer, router and shared experts (the same on every rank: one seed)
    torch.manual_seed(8 + rank)
    model = Net(None).double()
    state = {k: v.clone() for k, v in whole.state_dict().items()}
    w1_full = torch.randn(E, H, 2 * F, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    state["moe.experts.w1"] = w1_full
    state["moe.experts.w2"] = torch.randn(E, F, H, generator=torch.Generator().manual_seed(10), dtype=torch.float64)
    model.load_state_dict(state)
    El = E // n
    assert torch.equal(model.moe.experts.w1, w1_full[rank * El:(rank + 1) * El])
    dt = model.state_dict()["moe.experts.w1"]
    assert tuple(dt.shape) == (E, H, 2 * F) and torch.equal(dt.to_local(), w1_full[rank * El:(rank + 1) * El])
    assert torch.equal(dt.full_tensor(), w1_full)  # collective: every rank's rows in place
    twin = Net(None).double()
    twin.load_state_dict(model.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(twin.parameters(), model.parameters()))
    own = {k: (v.to_local() if hasattr(v, "to_local") else v) for k, v in model.state_dict().items()}
    twin.moe.experts.reset_parameters()
    twin.load_state_dict(own)
    assert torch.equal(twin.moe.experts.w1, model.moe.experts.w1)
    bad = dict(own, **{"moe.experts.w2": torch.zeros(El + 1, F, H, dtype=torch.float64)})
    with pytest.raises(ValueError, match=rf"moe\.experts\.w2 .*\[{El + 1}, {F}, {H}\].*E={E}.*\[{El}, {F}, {H}\]"):
        twin.load_state_dict(bad)
    return True


def test_plain_state_dicts_still_load():
    run_world(2, plain_state_dicts)



def test_fsdp2_model_loads_and_saves(saved, tmp_path):
    """Under FSDP2 (2 dp x 2 ep) the EP=4 checkpoint loads (same outputs); what it saves after a
    step loads in one process with every expert of the step (each EP rank's rows gathered over dp)."""
    path, y, experts, _ = saved
    path2 = str(tmp_path / "fsdp2")
    out = _unpack(run_world(4, fsdp2_load_step_save, path, path2))
    assert _close(torch.cat([o[0] for o in out]), y)
    stepped = [torch.cat([out[0][2][i], out[1][2][i]]) for i in (0, 1)]  # ep ranks 0, 1 of dp 0
    assert all(torch.equal(torch.cat([out[2][2][i], out[3][2][i]]), stepped[i]) for i in (0, 1))  # dp 1 alike
    assert not torch.equal(stepped[0], experts[0])  # the step moved them
    torch.manual_seed(800)
    model = Net().double()
    ep.checkpoint.load(model, path2)
    assert all(torch.equal(g, w) for g, w in zip((model.moe.experts.w1, model.moe.experts.w2), stepped))
    assert _close(model(_tokens()).detach(), torch.cat([o[1] for o in out]))
