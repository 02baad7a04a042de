"""The blockwise FP8 grouped product (`ep.kernels.triton_fp8`) at dsv3's per-rank shapes on one
GPU: its tile configs, with the weights N-major (as quantized) and K-major (as the layer now
holds them), against bf16 `torch._grouped_mm` on the same rows.

    python3 benchmarks/fp8_gemm_sweep.py --json fp8_sweep.json

32 experts x 1024 rows each (balanced), linear1 (K 7168, N 4096) and linear2 (K 2048, N 7168);
device ms per product (median of 10 after 3 warm-ups, `host_launches.timed`).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import provenance  # noqa: E402
from benchmarks.host_launches import timed  # noqa: E402
from ep.kernels.fp8 import quantize_rows, quantize_weight_blocks  # noqa: E402
from ep.kernels.triton_fp8 import fp8_grouped_mm_triton  # noqa: E402

CONFIGS = [(64, 128, 4, 3), (128, 128, 8, 3), (128, 128, 4, 3), (128, 128, 8, 4), (64, 128, 4, 5), (128, 64, 4, 4)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", default="fp8_sweep.json")
    args = ap.parse_args()
    dev = torch.device("cuda", 0)
    E, rows = 32, 1024
    out = []
    for name, K, N in (("linear1", 7168, 4096), ("linear2", 2048, 7168)):
        x = torch.randn(E * rows, K, device=dev, dtype=torch.bfloat16)
        w = torch.randn(E, K, N, device=dev, dtype=torch.bfloat16) / K ** 0.5
        offs = torch.arange(1, E + 1, device=dev, dtype=torch.int32) * rows
        flops = 2 * E * rows * K * N
        _, ms = timed(lambda: torch._grouped_mm(x, w, offs=offs))
        out.append(dict(product=name, kind="bf16 _grouped_mm", ms=ms, tflops=flops / ms / 1e9))
        print(f"{name} bf16 torch._grouped_mm: {ms:.3f} ms {flops / ms / 1e9:.0f} TFLOP/s", flush=True)
        xq, xs = quantize_rows(x)
        wq, ws = quantize_weight_blocks(w)
        wk = wq.transpose(1, 2).contiguous().transpose(1, 2)
        for major, b in (("N-major", wq), ("K-major", wk)):
            for cfg in CONFIGS:
                try:
                    _, ms = timed(lambda: fp8_grouped_mm_triton(xq, xs, b, ws, offs, torch.bfloat16, cfg))
                    row = dict(product=name, kind=f"fp8 triton {major}", config=cfg, ms=ms, tflops=flops / ms / 1e9)
                    print(f"{name} fp8 triton {major} {cfg}: {ms:.3f} ms {flops / ms / 1e9:.0f} TFLOP/s", flush=True)
                except Exception as e:  # noqa: BLE001 - a config that does not compile here, reported
                    row = dict(product=name, kind=f"fp8 triton {major}", config=cfg, error=str(e)[:300])
                    print(f"{name} fp8 triton {major} {cfg}: {type(e).__name__} {str(e)[:200]}", flush=True)
                out.append(row)
        del x, w, xq, wq, wk
        torch.cuda.empty_cache()
    provenance.dump(args.json, rows=out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
