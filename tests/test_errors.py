"""Bad input and disagreeing ranks: a clear error on every rank, never a hang."""
import pytest
import torch

import ep
from ep.checks import InputError
from tests.cases import make_problem
from tests.world import run_world


def _layer(n, **overrides):
    cfg = dict(hidden=8, ffn_hidden=6, num_experts=2 * n, top_k=2, num_waves=2)
    cfg.update(overrides)
    return ep.ExpertParallelMoE(ep.MoEConfig(**cfg)).double()


def _expect_error(fn, *needles):
    try:
        fn()
    except InputError as e:
        msg = str(e)
        missing = [s for s in needles if s not in msg]
        assert not missing, f"message lacks {missing}: {msg}"
        return msg
    raise AssertionError("no InputError raised")


BAD_INPUTS = {
    # name: (what rank 1 passes, words the message on every rank must contain)
    "hidden": (lambda n: (torch.randn(5, 7, dtype=torch.float64), None, None), ["rank 1", "x", "hidden=8", "got 7"]),
    "dtype": (lambda n: (torch.randn(5, 8, dtype=torch.float32), None, None), ["rank 1", "x: dtype", "torch.float32"]),
    "idx_range": (lambda n: (torch.randn(3, 8, dtype=torch.float64), torch.tensor([[0, 1], [2, 2 * n], [1, -1]]),
                             torch.ones(3, 2, dtype=torch.float64)), ["rank 1", "topk_idx", "2 entries", "[0, num_experts="]),
    "idx_repeat": (lambda n: (torch.randn(3, 8, dtype=torch.float64), torch.tensor([[0, 1], [1, 1], [0, 0]]),
                              torch.ones(3, 2, dtype=torch.float64)), ["rank 1", "2 tokens pick the same expert"]),
    "weights_nan": (lambda n: (torch.randn(3, 8, dtype=torch.float64), torch.tensor([[0, 1], [1, 2], [0, 3]]),
                               torch.tensor([[1.0, float("nan")], [1.0, 1.0], [float("inf"), 0.0]], dtype=torch.float64)),
                    ["rank 1", "topk_weights", "2 tokens have NaN or Inf"]),
    "weights_shape": (lambda n: (torch.randn(3, 8, dtype=torch.float64), torch.tensor([[0, 1], [1, 2], [0, 3]]),
                                 torch.ones(3, 3, dtype=torch.float64)), ["rank 1", "shape must be [T, k=2]"]),
    "only_idx": (lambda n: (torch.randn(3, 8, dtype=torch.float64), torch.tensor([[0, 1], [1, 2], [0, 3]]), None),
                 ["rank 1", "give both or neither"]),
    "router_nan": (lambda n: (torch.full((4, 8), float("nan"), dtype=torch.float64), None, None),
                   ["rank 1", "NaN or Inf weights", "router"]),
}


def check_bad_input_everywhere(rank, n, case):
    layer = _layer(n)
    good_x = torch.randn(6, 8, dtype=torch.float64)
    make, needles = BAD_INPUTS[case]
    x, idx, w = make(n) if rank == 1 else (good_x, None, None)  # the others route with the router
    _expect_error(lambda: layer(x, topk_idx=idx, topk_weights=w), *needles)
    # the group is still usable: the next good call on every rank works
    y = layer(good_x)
    assert y.shape == good_x.shape and torch.isfinite(y).all()
    return True


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_raises_on_every_rank(case):
    assert run_world(3, check_bad_input_everywhere, case, timeout_s=30) == [True] * 3


def check_config_mismatch(rank, n):
    kwargs = dict(num_waves=1, swiglu_limit=7.5) if rank == 2 else dict(swiglu_limit=None)
    layer = _layer(n, **kwargs)  # construction makes no collective: the first forward checks
    x = torch.randn(4, 8, dtype=torch.float64)
    msg = _expect_error(lambda: layer(x), "disagree", "num_waves=1" if rank != 2 else "num_waves=2")
    return msg


def test_ranks_that_disagree_on_config():
    msgs = run_world(3, check_config_mismatch, timeout_s=30)
    for m in msgs[:2]:
        assert "rank 2: num_waves=1" in m and "rank 2: swiglu_limit=7.5 where" in m, m
    assert "num_waves=2 where rank 2 has 1" in msgs[2] and "swiglu_limit=None where rank 2 has 7.5" in msgs[2]


@pytest.mark.parametrize("field, value, needle", [
    ("num_experts", 0, "num_experts must be a positive int"),
    ("top_k", 9, "top_k must be <= num_experts"),
    ("score_func", "relu", "score_func must be one of"),
    ("num_waves", 0, "num_waves must be a positive int"),
    ("norm_topk", 1, "norm_topk must be a bool"),
    ("transport", "mpi", "transport must be one of"),
    ("num_waves", "fast", "num_waves must be a positive int or 'auto'"),
    ("score_func", "softplus", "score_func must be one of"),
    ("n_group", 3, "n_group must divide num_experts"),
    ("n_group", 8, "n_group must leave at least 2 experts per group"),
    ("topk_group", 2, r"topk_group must be <= n_group \(1\)"),
    ("routed_scaling_factor", 0.0, "routed_scaling_factor must be a finite number > 0"),
    ("swiglu_limit", float("inf"), "swiglu_limit must be None or a finite number > 0"),
    ("num_shared_experts", -1, "num_shared_experts must be an int >= 0"),
    ("timeout_s", -3, "timeout_s must be a finite number > 0"),
])
def test_config_rejects(field, value, needle):
    cfg = dict(hidden=8, ffn_hidden=6, num_experts=8, top_k=2)
    cfg[field] = value
    with pytest.raises(ValueError, match=needle):
        ep.MoEConfig(**cfg)


def test_layer_rejects_shapes_it_cannot_split():
    # one process: 6 experts over 1 rank is fine, but 7 expert waves over 6 local experts is not
    with pytest.raises(ValueError, match=r"num_waves \(7\) must be <= the local experts per rank \(6"):
        ep.ExpertParallelMoE(ep.MoEConfig(hidden=8, ffn_hidden=6, num_experts=6, top_k=2, num_waves=7,
                                          wave_split="experts"))
    # token waves cut the tokens, not the experts: 7 waves are fine there
    ep.ExpertParallelMoE(ep.MoEConfig(hidden=8, ffn_hidden=6, num_experts=6, top_k=2, num_waves=7))


def check_copy_engines_need_cuda(rank, n):
    with pytest.raises(ValueError, match=r"CopyEngineTransport needs CUDA ranks .* got backend 'gloo'"):
        ep.ExpertParallelMoE(ep.MoEConfig(hidden=8, ffn_hidden=6, num_experts=4, top_k=2, transport="copy_engine"))
    return True


def test_copy_engine_transport_on_gloo_ranks_says_why():
    assert run_world(2, check_copy_engines_need_cuda) == [True, True]


def check_experts_not_divisible(rank, n):
    with pytest.raises(ValueError, match=r"num_experts \(7\) must be divisible by the world size \(2\)"):
        ep.ExpertParallelMoE(ep.MoEConfig(hidden=8, ffn_hidden=6, num_experts=7, top_k=2))
    return True


def test_num_experts_not_divisible_by_world():
    assert run_world(2, check_experts_not_divisible, timeout_s=30) == [True, True]


def check_uneven_waves(rank, n):
    """5 local experts in 2 waves (3 + 2): allowed, and the same answer as one wave."""
    p = make_problem(n, k=2, local_experts=5, seed=3)
    from tests.test_layer import build_layer, run_layer

    a = run_layer(build_layer(p, n, rank, 1), p, rank)
    b = run_layer(build_layer(p, n, rank, 2), p, rank)
    for name in a:
        if a[name] is not None:
            torch.testing.assert_close(a[name], b[name], rtol=1e-10, atol=1e-12)
    return True


def test_uneven_waves_allowed():
    assert run_world(2, check_uneven_waves, timeout_s=60) == [True, True]


def test_config_rejects_more_experts_than_the_groups_allow():
    with pytest.raises(ValueError, match=r"top_k \(5\) must be <= the experts of the topk_group best groups \(2 x 2\)"):
        ep.MoEConfig(hidden=8, ffn_hidden=6, num_experts=8, top_k=5, n_group=4, topk_group=2)
