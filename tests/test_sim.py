"""The schedule model (`ep.model.sim`) on small cases worked out by hand, and num_waves="auto"."""
from dataclasses import replace
import math
import subprocess
import sys
import time

import pytest
import torch

import ep
from ep.layout import RowLayout
from ep.model.sim import (Layer, Op, Rates, TokenCall, Topology, best_waves, gemm_slowdown, gemm_tile_rows, overlap_shares,
                    p_avoids, padded_rows, play, row_width, simulate, token_launches, token_traffic, traffic)
from ep.plan import WaveMap, sender_plan, wave_capacity
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
    from ep.model.profiles import PROFILES

    rates, topo = PROFILES["h200-nccl"]
    t0 = time.perf_counter()
    best, times = best_waves(layer, Topology(ranks=256), rates)
    assert time.perf_counter() - t0 < 1.0  # a 256-rank prediction in well under a second
    assert best == 1 and list(times) == [1]  # one expert per rank: no waves to make
    best, times = best_waves(layer, Topology(ranks=8), rates, backward=True)
    assert best in times and times[best] == min(times.values()) and set(times) == {1, 2, 4, 8}
    assert all(math.isfinite(t) and t > 0 for t in times.values())


# ---- token waves ------------------------------------------------------------------------


def test_token_traffic_is_the_padded_regions():
    # T=10 tokens in W=4 waves (3, 2, 3, 2 tokens): regions of ceil(10/4) = 3 rows, n=4
    layer = Layer(hidden=64, ffn_hidden=8, num_experts=8, top_k=2, tokens=10)
    tr = token_traffic(layer, ranks=4, num_waves=4)
    assert tr.capacity == 3 == wave_capacity(10, 4) and tr.tokens == (3, 2, 3, 2)
    width = RowLayout(64, 2, torch.bfloat16).width  # hidden vector, slot table, status
    assert row_width(layer) == width and width > 64
    # on the wire per wave: the n-1 other regions, whole: (n-1) x capacity rows each way
    assert tr.wire_bytes(4) == (3 * 3 * width * 2, 3 * 3 * 64 * 2)
    # a token misses a rank's 2 experts of 8 with k=2: C(6,2)/C(8,2) = 15/28
    assert tr.miss == pytest.approx(15 / 28)
    assert tr.real_rows(0) == pytest.approx(3 * 13 / 28)
    assert tr.padding == pytest.approx(1 - 10 * 13 / 28 / 12)
    assert tr.items == (6, 4, 6, 2 * 2)  # t tokens x k slots arrive at each rank per wave
    # a transport that sends only the rows in use moves a 3-token wave's expected routes
    assert tr.wire_rows() == 3 and tr.wire_rows(in_use_only=True) == pytest.approx(3 * 13 / 28)


def test_token_traffic_matches_the_engines_buffers():
    torch.manual_seed(0)
    n, E, k, T, W = 4, 16, 3, 37, 3
    idx = torch.stack([torch.randperm(E)[:k] for _ in range(T)])
    plan = sender_plan(idx, None, E, n, WaveMap(W), wave_capacity(T, W), T)
    tr = token_traffic(Layer(hidden=32, ffn_hidden=8, num_experts=E, top_k=k, tokens=T, elem_bytes=4), n, W)
    assert plan.capacity == tr.capacity and plan.rows_per_wave == n * tr.capacity
    assert tr.dispatch_row_bytes == RowLayout(32, k, torch.float32).width * 4


def _token_rates(**kw) -> Rates:
    # 1e-5 TFLOP/s = 10,000 FLOP per ms; weights, row copies, kernels and the host free
    base = dict(gemm_tflops=((1.0, 1e-5),), hbm_GBps=1e15, permute_GBps=1e15, stage_ms=0.0, host_ms=0.0,
                backward_factor=2.0, wave_split="tokens")
    base.update(kw)
    return Rates(**base)


# 2 ranks, 1 expert each, k=1, T=1000, H=4, F=1, bf16. A dispatched row (`RowLayout`) is 64
# bytes, a returned one 8; at 0.032 GB/s a region of 500 rows (W=2) dispatches in 1 ms and
# returns in 0.125 ms. A wave's 500 items: linear1 2*500*4*2 = 8000 FLOP (0.8 ms), linear2 0.4 ms.
_LAYER = Layer(hidden=4, ffn_hidden=1, num_experts=2, top_k=1, tokens=1000)
_TOPO = Topology(ranks=2, gpus_per_node=2, intra_GBps=0.032, latency_ms=0.0, local_GBps=1e15)


def test_token_wave_forward_by_hand():
    assert token_traffic(_LAYER, 2, 2).dispatch_row_bytes == 64
    # W=1: dispatch [0, 2], linear1 [2, 3.6], linear2 [3.6, 4.4], combine [4.4, 4.65]
    assert simulate(_LAYER, _TOPO, _token_rates(), 1).layer_ms == pytest.approx(4.65)
    # W=2, every dispatch first: d0 [0, 1], d1 [1, 2]; wave 0 [1, 2.2]; c0 [2.2, 2.325];
    # wave 1 [2.2, 3.4]; c1 [3.4, 3.525]
    p = simulate(_LAYER, _TOPO, _token_rates(), 2, call=TokenCall(graph=True))
    ends = {op.name: op.end for op in p.ops}
    assert p.layer_ms == pytest.approx(3.525)
    assert ends["dispatch[1]"] == pytest.approx(2.0) and ends["combine[0]"] == pytest.approx(2.325)
    assert p.comm_ms == pytest.approx(2.25) and p.compute_ms == pytest.approx(2.4)
    # r16-dev's order: dispatch(1) issued after wave 0's math on its stream waits for it:
    # d1 [2.2, 3.2], wave 1 [3.2, 4.4], c0 [3.2, 3.325], c1 [4.4, 4.525]
    dev = TokenCall(graph=True, dispatch_first=False, dispatch_after_math=True)
    assert simulate(_LAYER, _TOPO, _token_rates(), 2, call=dev).layer_ms == pytest.approx(4.525)
    # the all-to-all at half speed beside a GEMM: d1 does 0.6 ms of its work beside wave 0's
    # 1.2 ms of GEMMs, the rest alone: [1, 2.6]; wave 1 [2.6, 3.8]; c0 beside it at half
    # speed [2.6, 2.85]; c1 [3.8, 3.925]
    slow = simulate(_LAYER, _TOPO, _token_rates(comm_share=0.5), 2)
    assert slow.layer_ms == pytest.approx(3.925)
    # a carveout of 10 SMs at 0.0016 GB/s each gives the transfer half of its link back (share
    # 0.75) and makes the GEMMs 1.1x (1.32 ms a wave): d1 does 0.99 ms beside wave 0 [1, 2.32],
    # ends at 2.33; wave 1 [2.33, 3.65]; c0 [2.33, 2.33 + 0.125 / 0.75]; c1 [3.65, 3.775]
    carved = _token_rates(comm_share=0.5, comm_GBps_per_sm=0.0016, carveout_slowdown=((0, 1.0), (10, 1.1)))
    p = simulate(_LAYER, _TOPO, carved, 2, call=TokenCall(sm_carveout=10))
    ends = {op.name: op.end for op in p.ops}
    assert ends["dispatch[1]"] == pytest.approx(2.33) and ends["combine[0]"] == pytest.approx(2.33 + 0.125 / 0.75)
    assert p.layer_ms == pytest.approx(3.775)
    # W=1 applies no carveout (`ep.pipeline`): as without one
    assert simulate(_LAYER, _TOPO, carved, 1, call=TokenCall(sm_carveout=10)).layer_ms == pytest.approx(4.65)
    # only the rows in use on the wire: a token misses the other rank half the time (k=1 of 2
    # experts), so the region of 1000 rows carries 500: dispatch [0, 1], the math [1, 3.4],
    # combine [3.4, 3.525]
    used = TokenCall(graph=True, rows_in_use_only=True)
    assert simulate(_LAYER, _TOPO, _token_rates(), 1, call=used).layer_ms == pytest.approx(3.525)


def test_token_wave_backward_by_hand():
    # forward as above (3.525); backward, backward_factor 2: per wave the data gradients
    # (linear2's 0.4 ms, then linear1's 0.8), the weight gradients once (2.4 ms); dy goes out
    # in returned-row size (0.125 ms a wave), dx comes back in dispatched rows (1 ms):
    # bd0 [3.525, 3.65], bd1 [3.65, 3.775]; wave 0 [3.65, 4.85]; bc0 [4.85, 5.85];
    # wave 1 [4.85, 6.05]; bc1 [6.05, 7.05]; weight gradients [6.05, 8.45]
    p = simulate(_LAYER, _TOPO, _token_rates(), 2, backward=True, call=TokenCall(graph=True))
    ends = {op.name: op.end for op in p.ops}
    assert ends["bwd combine[1]"] == pytest.approx(7.05) and ends["weight grads"] == pytest.approx(8.45)
    assert p.layer_ms == pytest.approx(8.45)


def test_eager_call_paced_by_its_launches():
    # a host that needs 1 ms per launch and per all-to-all, 0.5 per call: with the GPU's work
    # free, the call lasts its host time, the launches counted from the engine
    rates = _token_rates(gemm_tflops=((1.0, 1e9),), host_ms=1.0, a2a_host_ms=1.0, call_host_ms=0.5,
                         backward_host_ms=0.25, backward_launch_ms=2.0)
    big = Topology(ranks=2, gpus_per_node=2, intra_GBps=1e15, latency_ms=0.0, local_GBps=1e15)
    for W in (1, 2, 4):
        kernels, a2a = token_launches(W)
        assert simulate(_LAYER, big, rates, W).layer_ms == pytest.approx(0.5 + kernels + a2a)
        both, both_a2a = token_launches(W, backward=True)
        assert simulate(_LAYER, big, rates, W, backward=True).layer_ms == pytest.approx(
            0.5 + kernels + a2a + 0.25 + 2.0 * (both - kernels) + (both_a2a - a2a))
        # a CUDA-graph replay: host time per launch `replay_host_ms` (here 0), nothing per call
        assert simulate(_LAYER, big, rates, W, call=TokenCall(graph=True)).layer_ms == pytest.approx(0.0, abs=1e-9)
    assert token_launches(2) == (42, 4)  # r17's trace of dsv3 W=2: 42 kernels on the compute stream


def test_carveout_shares_and_slowdown_by_hand():
    rates = Rates(gemm_tflops=((1.0, 1.0),), comm_share=0.2, compute_share=0.5, comm_GBps_per_sm=1.0,
                  carveout_slowdown=((0, 1.0), (8, 1.1), (16, 1.2)))
    topo = Topology(ranks=2, gpus_per_node=2, intra_GBps=10.0)
    assert overlap_shares(rates, topo, 5) == pytest.approx((0.6, 0.75))  # half the link's speed on free SMs
    assert overlap_shares(rates, topo, 20) == pytest.approx((1.0, 1.0))
    assert overlap_shares(rates, Topology(ranks=16, gpus_per_node=8, inter_GBps=40.0), 20)[0] == pytest.approx(0.6)
    assert gemm_slowdown(rates, 4) == pytest.approx(1.05) and gemm_slowdown(rates, 64) == pytest.approx(1.2)


def test_grouped_gemm_tiles_by_hand():
    # torch's rule: 64-row tiles while the buffer's rows per expert are at most 128
    assert gemm_tile_rows(128) == 64 and gemm_tile_rows(129) == 128
    assert padded_rows(10.0, 0) == 10.0
    # Poisson(1) rows in 4-row tiles: 4 P(1 <= X <= 4) + 8 P(5 <= X <= 8) + ...
    e = math.exp(-1)
    assert padded_rows(1.0, 4) == pytest.approx(4 * (1 - e) + 4 * (1 - e * (1 + 1 + 1 / 2 + 1 / 6 + 1 / 24)), rel=1e-4)


def test_token_wave_prediction_at_256_ranks_is_fast():
    from ep.model.profiles import PROFILES

    rates, topo = PROFILES["h200-nccl-tokens"]
    layer = Layer(hidden=7168, ffn_hidden=2048, num_experts=256, top_k=8, tokens=4096)
    t0 = time.perf_counter()
    best, times = best_waves(layer, replace_ranks(topo, 256), rates, backward=True, call=TokenCall(graph=True))
    assert time.perf_counter() - t0 < 1.0
    assert set(times) == {1, 2, 4, 8} and all(math.isfinite(t) and t > 0 for t in times.values())
    # one expert per rank: a token misses a rank with probability 1 - 8/256, all of it padding on the wire
    assert token_traffic(layer, 256, 1).miss == pytest.approx(1 - 8 / 256)


def replace_ranks(topo: Topology, ranks: int) -> Topology:
    from dataclasses import replace

    return replace(topo, ranks=ranks)


def test_expert_wave_profiles_keep_their_schedule():
    from ep.model.profiles import PROFILES

    layer = Layer(hidden=7168, ffn_hidden=2048, num_experts=64, top_k=8, tokens=4096)
    for name in ("h200-nccl", "h200-copy-engine"):  # the expert-wave profiles of the retired engine's runs
        rates, topo = PROFILES[name]
        t = replace_ranks(topo, 2)
        assert simulate(layer, t, rates, 2).layer_ms == simulate(layer, t, rates, 2, wave_split="experts").layer_ms
        assert simulate(layer, t, rates, 2, wave_split="tokens").layer_ms != simulate(layer, t, rates, 2).layer_ms


def test_the_runtime_does_not_import_the_model():
    code = ("import sys, torch, ep, ep.auto, ep.hf, ep.launch; "
            "assert not [m for m in sys.modules if m.startswith('ep.model')], 'the runtime imported ep.model'; "
            "import ep.model.sim; assert 'matplotlib' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


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


def test_fp8_in_the_token_wave_model():
    """FP8 dispatch shrinks the dispatched rows to RowLayout's FP8 width (the combine keeps its
    dtype); FP8 products run at the profile's FP8 rate on 1-byte weights, plus the experts'
    quantization once per call unless they are held; a profile without the rate says so."""
    from ep.model.profiles import PROFILES
    from ep.model.sim import fp8_quantize_ms, simulate

    base = Layer(hidden=7168, ffn_hidden=2048, num_experts=256, top_k=8, tokens=4096)
    fp8_rows = replace(base, dispatch_fp8=True)
    assert row_width(fp8_rows) == RowLayout(7168, 8, torch.bfloat16, torch.float8_e4m3fn).width
    assert row_width(fp8_rows) / row_width(base) <= 0.53
    t_plain, t_fp8 = token_traffic(base, 8, 1), token_traffic(fp8_rows, 8, 1)
    assert t_fp8.dispatch_row_bytes < 0.53 * t_plain.dispatch_row_bytes
    assert t_fp8.combine_row_bytes == t_plain.combine_row_bytes
    rates, topo = PROFILES["h200-nccl-tokens"]
    topo = replace(topo, ranks=8)
    with pytest.raises(ValueError, match="no FP8 rate"):
        simulate(replace(base, expert_fp8="rows"), topo, rates, 1)
    fast = replace(rates, fp8_tflops=(("rows", 2 * rates.gemm_rate(128)),))
    plain = simulate(base, topo, fast, 1, call=TokenCall(graph=True))
    wire = simulate(fp8_rows, topo, fast, 1, call=TokenCall(graph=True))
    assert wire.comm_ms < plain.comm_ms and wire.compute_ms == pytest.approx(plain.compute_ms, rel=0.05)
    per_call = simulate(replace(base, expert_fp8="rows"), topo, fast, 1, call=TokenCall(graph=True))
    held = simulate(replace(base, expert_fp8="rows", fp8_held=True), topo, fast, 1, call=TokenCall(graph=True))
    assert held.compute_ms < 0.75 * plain.compute_ms  # twice the rate: the products' half of the math
    quantize = fp8_quantize_ms(replace(base, expert_fp8="rows"), 32, fast)
    assert per_call.compute_ms - held.compute_ms == pytest.approx(quantize + fast.stage_ms, rel=1e-6)
    assert fp8_quantize_ms(replace(base, expert_fp8="blocks"), 32, fast) == pytest.approx(quantize * 3 / 5)
    with pytest.raises(ValueError, match="token waves only"):
        simulate(fp8_rows, topo, fast, 1, wave_split="experts")
