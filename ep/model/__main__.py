"""`python -m ep.model`: predict one MoE layer's time with the schedule model and draw its timeline."""
from __future__ import annotations

import argparse
from dataclasses import replace

from .profiles import PROFILES
from .sim import DEFAULT_PROFILES, SHAPES, WAVE_SPLITS, Layer, TokenCall, best_waves, draw, simulate, token_traffic


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m ep.model", description="Predict one MoE layer's time with the wave-pipeline model.")
    p.add_argument("--shape", default="dsv3", help=f"one of {sorted(SHAPES)}, or H,F,E,k,T")
    p.add_argument("--ranks", type=int, default=8)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--inter-GBps", type=float, default=45.0, help="per GPU between nodes")
    p.add_argument("--wave-split", default="tokens", choices=WAVE_SPLITS, help="the layer's engine (default: tokens)")
    p.add_argument("--profile", default=None,
                   help=f"measured rates, one of {sorted(PROFILES)} (default: {DEFAULT_PROFILES})")
    p.add_argument("--waves", default="1,2,4,8")
    p.add_argument("--dedup", default="rank", choices=("rank", "wave"), help="expert waves only")
    p.add_argument("--graph", action="store_true", help="token waves: replayed from a CUDA graph (else eager)")
    p.add_argument("--carveout", type=int, default=0, help="token waves: MoEConfig.sm_carveout")
    p.add_argument("--capacity-factor", type=float, default=1.0, help="token waves: MoEConfig.capacity_factor")
    p.add_argument("--rows-in-use-only", action="store_true",
                   help="token waves: the transport sends only each region's rows in use (device_put), not its padding")
    p.add_argument("--skew", type=float, default=1.0)
    p.add_argument("--backward", action="store_true", help="forward + backward")
    p.add_argument("--dispatch-fp8", action="store_true", help="token waves: FP8 rows on the wire (dispatch_dtype)")
    p.add_argument("--expert-fp8", default=None, choices=("blocks", "rows"),
                   help="token waves: FP8 forward products with this fp8_scaling (needs the profile's FP8 rate, "
                        "or --fp8-tflops)")
    p.add_argument("--fp8-held", action="store_true", help="the FP8 experts held (hold_fp8_experts), not quantized per call")
    p.add_argument("--fp8-tflops", type=float, default=None,
                   help="the FP8 products' TFLOP/s for --expert-fp8 (e.g. measured by benchmarks/fp8_gemm_sweep.py)")
    p.add_argument("--png", default=None, help="draw the best W's timeline here")
    a = p.parse_args(argv)
    fp8 = dict(dispatch_fp8=a.dispatch_fp8, expert_fp8=a.expert_fp8, fp8_held=a.fp8_held)
    if a.shape in SHAPES:
        layer = Layer(**SHAPES[a.shape], skew=a.skew, **fp8)
    else:
        H, F, E, k, T = (int(v) for v in a.shape.split(","))
        layer = Layer(H, F, E, k, T, skew=a.skew, **fp8)
    profile = a.profile or DEFAULT_PROFILES[a.wave_split]
    rates, topo = PROFILES[profile]
    if a.fp8_tflops is not None and a.expert_fp8:
        rates = replace(rates, fp8_tflops=((a.expert_fp8, a.fp8_tflops),))
    topo = replace(topo, ranks=a.ranks, gpus_per_node=a.gpus_per_node, inter_GBps=a.inter_GBps)
    call = TokenCall(graph=a.graph, sm_carveout=a.carveout, capacity_factor=a.capacity_factor,
                     rows_in_use_only=a.rows_in_use_only)
    waves = [int(w) for w in a.waves.split(",")]
    best, times = best_waves(layer, topo, rates, waves, a.dedup, a.backward, a.wave_split, call)
    how = f"dedup {a.dedup}" if a.wave_split == "experts" else (
        f"{'CUDA graph' if a.graph else 'eager'}, carveout {a.carveout}, capacity factor {a.capacity_factor:g}")
    print(f"{a.shape} on {a.ranks} ranks ({a.gpus_per_node}/node), {a.wave_split} waves, profile {profile}, "
          f"{'forward+backward' if a.backward else 'forward'}, {how}")
    base = times[min(times)]
    for w, ms in times.items():
        pred = simulate(layer, topo, rates, w, a.dedup, a.backward, wave_split=a.wave_split, call=call)
        extra = ""
        if a.wave_split == "tokens":
            tr = token_traffic(layer, a.ranks, w, a.capacity_factor)
            extra = f"  padding {tr.padding:4.0%}" + (" (not sent)" if a.rows_in_use_only else "")
        print(f"  W={w}: {ms:7.3f} ms  ({base / ms:4.2f}x W=1)  compute {pred.compute_ms:6.3f}  "
              f"comm {pred.comm_ms:6.3f}  exposed comm {pred.exposed_comm_ms:6.3f}{extra}"
              + ("   <- best" if w == best else ""))
    if a.png:
        pred = simulate(layer, topo, rates, best, a.dedup, a.backward, wave_split=a.wave_split, call=call)
        draw(pred, a.png, f"{a.shape}, {a.ranks} ranks, {a.wave_split} waves, W={best}")
        print(f"wrote {a.png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
