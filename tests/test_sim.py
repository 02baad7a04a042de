"""The schedule model (`ep.sim`) on small cases worked out by hand, and num_waves="auto"."""
import math
import time

import pytest
import torch

import ep
from ep.sim import Layer, Op, Rates, Topology, best_waves, p_avoids, play, simulate, traffic
from tests.reference import reference_moe, reference_routing
from tests.world import run_world

# ---- traffic ------------------------------------------------------------------------


def test_p_avoids_by_hand():
    # k=2 of E=4: the subsets avoiding experts {0, 1} are only {2, 3}: 1 of 6
    assert p_avoids(4, 2, 2) == pytest.approx(1 / 6)
    assert p_avoids(4, 2, 1) == pytest.approx(3 / 6)  # {1,2}, {1,3}, {2,3}
    assert p_avoids(4, 2, 0) == 1.0 and p_avoids(4, 2, 3) == 0.0


def test_traffic_by_hand():
    # E=4 over 2 ranks (2 experts each), k=2, T=600, W=2 (one expert per wave)
    layer = Layer(hidden=1, ffn_hidden=1, num_experts=4, top_k=2, tokens=600)
    tr = traffic(layer, ranks=2, num_waves=2, dedup="rank")
    # first wave at a rank: wave 0 if the token has that rank's first expert (1/2 of
    # tokens); wave 1 if only the second (1/2 - 1/6): 300 and 200 rows to each rank
    assert tr.dispatch == pytest.approx((300, 200))
    # last wave: wave 1 if it has the second expert (300), wave 0 if only the first (200)
    assert tr.combine == pytest.approx((200, 300))
    # items: 2 ranks x 600 tokens x 2 slots spread over 4 experts, one expert per wave
    assert tr.items == pytest.approx((600, 600))
    per_wave = traffic(layer, ranks=2, num_waves=2, dedup="wave")
    assert per_wave.dispatch == pytest.approx((300, 300)) and per_wave.combine == per_wave.dispatch
    # W=1 sends what dedup "rank" sends over both waves: 1 - 1/6 of the tokens to each rank
    assert sum(traffic(layer, 2, 1).dispatch) == pytest.approx(500) == sum(tr.dispatch)
    assert tr.rows_per_token(600, 2) == pytest.approx(2 * 500 / 600)


# ---- the engine -----------------------------------------------------------------------


def test_play_two_streams_by_hand():
    ops = [
        Op("A", "compute", 2.0),
        Op("B", "comm", 1.0, after=(0,)),
        Op("C", "compute", 3.0, heavy=True),
    ]
    assert play(ops) == pytest.approx(5.0)
    assert (ops[1].start, ops[1].end) == pytest.approx((2.0, 3.0))
    # B runs beside heavy C at half speed: 1 ms of work takes 2
    ops = [Op("A", "compute", 2.0), Op("B", "comm", 1.0, after=(0,)), Op("C", "compute", 3.0, heavy=True)]
    assert play(ops, comm_share=0.5) == pytest.approx(5.0)
    assert ops[1].end == pytest.approx(4.0)
    # C runs beside B at half speed for 1 ms, then 2.5 ms alone
    ops = [Op("A", "compute", 2.0), Op("B", "comm", 1.0, after=(0,)), Op("C", "compute", 3.0, heavy=True)]
    assert play(ops, compute_share=0.5) == pytest.approx(5.5)


def test_play_host_issues_in_order_and_deadlock_is_reported():
    ops = [Op("issue", "host", 1.0), Op("k", "compute", 1.0, after=(0,)), Op("issue2", "host", 5.0)]
    assert play(ops) == pytest.approx(6.0)
    assert ops[1].start == pytest.approx(1.0)
    with pytest.raises(ValueError, match="deadlock"):
        play([Op("x", "compute", 1.0, after=(1,)), Op("y", "compute", 1.0)])


def _bare_rates(**kw) -> Rates:
    # expert math: 1e-6 TFLOP/s = 1000 FLOP per ms; permutes, kernels and the host free
    base = dict(gemm_tflops=((1.0, 1e-6),), hbm_GBps=1e12, permute_GBps=1e15, stage_ms=0.0, host_ms=0.0,
                wave_split="experts")
    base.update(kw)
    return Rates(**base)


def test_wave_pipeline_by_hand():
    # 2 ranks, E=4 (2 per rank), k=1, T=1000, H=F=1, bf16 rows of 2 bytes; per-(rank, wave)
    # dedup, so a wave sends T/4 = 250 rows to the other rank (500 bytes): at 5e-4 GB/s,
    # 1 ms; W=1 sends 500 rows, 2 ms. Expert math: a wave has 500 items, linear1
    # 2*500*1*2 = 2000 FLOP (2 ms), linear2 1000 (1 ms); W=1 twice that.
    layer = Layer(hidden=1, ffn_hidden=1, num_experts=4, top_k=1, tokens=1000)
    topo = Topology(ranks=2, gpus_per_node=2, intra_GBps=5e-4, latency_ms=0.0, local_GBps=1e15)
    rates = _bare_rates()
    # W=1: dispatch [0, 2], math [2, 8], combine [8, 10]
    assert simulate(layer, topo, rates, 1, "wave").layer_ms == pytest.approx(10.0)
    # W=2: d0 [0, 1], d1 [1, 2]; math0 [1, 4], math1 [4, 7]; c0 [4, 5], c1 [7, 8]
    p = simulate(layer, topo, rates, 2, "wave")
    assert p.layer_ms == pytest.approx(8.0)
    assert p.compute_ms == pytest.approx(6.0) and p.comm_ms == pytest.approx(4.0)
    assert p.exposed_comm_ms == pytest.approx(2.0)
    # with the all-to-all at half speed beside a GEMM: d1 [1, 3], c0 [4, 6], c1 [7, 8]
    slow = simulate(layer, topo, _bare_rates(comm_share=0.5), 2, "wave")
    assert slow.layer_ms == pytest.approx(8.0)
    ends = {op.name: op.end for op in slow.ops}
    assert ends["dispatch[1]"] == pytest.approx(3.0) and ends["combine[0]"] == pytest.approx(6.0)
    # a host that needs 1 ms per call: the gather is issued at 1, the dispatch at 2 (runs
    # [2, 4]), linear1's two calls end at 4 (math [4, 10]), the rest is issued meanwhile:
    # combine [10, 12]
    host = simulate(layer, topo, _bare_rates(host_ms=1.0), 1, "wave")
    assert host.layer_ms == pytest.approx(12.0)


def test_best_waves_and_speed():
    layer = Layer(hidden=7168, ffn_hidden=2048, num_experts=256, top_k=8, tokens=4096)
    from ep.sim_profiles import PROFILES

    rates, topo = PROFILES["h200-nccl"]
    t0 = time.perf_counter()
    best, times = best_waves(layer, Topology(ranks=256), rates)
    assert time.perf_counter() - t0 < 1.0  # a 256-rank prediction in well under a second
    assert best == 1 and list(times) == [1]  # one expert per rank: no waves to make
    best, times = best_waves(layer, Topology(ranks=8), rates, backward=True)
    assert best in times and times[best] == min(times.values()) and set(times) == {1, 2, 4, 8}
    assert all(math.isfinite(t) and t > 0 for t in times.values())


# ---- num_waves="auto" -----------------------------------------------------------------


def test_config_accepts_auto_only_as_word():
    assert ep.MoEConfig(hidden=8, ffn_hidden=8, num_experts=4, top_k=2, num_waves="auto").num_waves == "auto"
    with pytest.raises(ValueError, match="positive int or 'auto'"):
        ep.MoEConfig(hidden=8, ffn_hidden=8, num_experts=4, top_k=2, num_waves="fast")


def _auto_rank(rank, n, split):
    torch.manual_seed(0)
    cfg = ep.MoEConfig(hidden=16, ffn_hidden=8, num_experts=4 * n, top_k=2, num_waves="auto", wave_split=split)
    layer = ep.ExpertParallelMoE(cfg).double()
    torch.manual_seed(100 + rank)
    x = torch.randn(24 + 8 * rank, 16, dtype=torch.float64)  # ranks differ in tokens
    with torch.no_grad():
        y = layer(x)
    chosen = layer.num_waves
    with torch.no_grad():
        y2 = layer(x)  # the choice is kept: no second probe
    # the answer is the reference's, whatever W was chosen
    import torch.distributed as dist

    w1 = [torch.empty_like(layer.experts.w1) for _ in range(n)]
    w2 = [torch.empty_like(layer.experts.w2) for _ in range(n)]
    dist.all_gather(w1, layer.experts.w1.data)
    dist.all_gather(w2, layer.experts.w2.data)
    idx, wts = reference_routing(x, layer.router.weight.detach(), 2)
    ref = reference_moe(x, torch.cat(w1), torch.cat(w2), idx, wts)
    err = ((y - ref).norm() / ref.norm()).item()
    return chosen, layer.num_waves, err, torch.equal(y, y2)


@pytest.mark.parametrize("split", ["tokens", "experts"])
def test_auto_picks_one_w_on_every_rank_and_stays_correct(split):
    results = run_world(4, _auto_rank, split)
    chosen = {r[0] for r in results}
    # expert waves: 4 local experts, so W <= 4; token waves: measured among 1, 2, 4, 8
    assert len(chosen) == 1 and chosen.pop() in ((1, 2, 4) if split == "experts" else (1, 2, 4, 8))
    for c, kept, err, same in results:
        assert kept == c and err < 1e-10 and same


def test_gemm_rate_table_by_hand():
    r = Rates(gemm_tflops=((1000.0, 300.0), (10.0, 100.0)))
    assert r.gemm_rate(100.0) == pytest.approx(200.0)  # halfway in log(tokens)
    assert r.gemm_rate(1.0) == 100.0 and r.gemm_rate(1e6) == 300.0  # flat beyond the ends
