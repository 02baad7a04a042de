"""The few-rows grouped product (`ep.kernels.triton_grouped`) against `torch._grouped_mm` (one GPU).

    python3 benchmarks/few_rows_gemm.py --json few_rows.json

Decode-sized expert math of one rank (dsv3: 32 local experts, H 7168, F 2048, bf16): linear1
`[I, 7168] x [32, 7168, 4096]` and linear2 `[I, 2048] x [32, 2048, 7168]`, rows per expert
drawn as a multinomial with the given mean (32 is dsv3 decode on 2 ranks: 2 x 128 tokens x 8
slots over 64 experts), in a buffer of twice the rows (the layer's buffers are sized by a bound).
For each configuration (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages): the median device time of
20 after 5 warm-ups (CUDA events), the experts' weight bytes over it (TB/s), and the worst
relative error against `torch._grouped_mm` on the rows in use. Prints a table per shape and mean.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ep.kernels.triton_grouped import grouped_mm_few_rows  # noqa: E402
from benchmarks import provenance  # noqa: E402
from benchmarks.kernel_time import kernel_ms  # noqa: E402

CONFIGS = [(16, 64, 128, 4, 4), (16, 128, 128, 4, 4), (16, 64, 256, 4, 3), (32, 64, 128, 4, 4),
           (32, 128, 128, 4, 4), (32, 128, 128, 8, 4), (32, 64, 256, 4, 3), (32, 128, 64, 4, 5),
           (32, 256, 64, 8, 4), (64, 64, 128, 4, 4), (64, 128, 128, 8, 3), (64, 128, 64, 4, 4)]


def case(E, K, N, mean_rows, seed, configs):
    g = torch.Generator().manual_seed(seed)
    counts = torch.multinomial(torch.ones(E), E * mean_rows, replacement=True, generator=g).bincount(minlength=E)
    used = int(counts.sum())
    x = torch.randn(2 * used, K, generator=g).to("cuda", torch.bfloat16)
    w = (torch.randn(E, K, N, generator=g) / K ** 0.5).to("cuda", torch.bfloat16)
    offs = counts.cumsum(0).to(device="cuda", dtype=torch.int32)
    want = torch._grouped_mm(x, w, offs=offs)[:used].float()
    weight_bytes = sum(int(c > 0) for c in counts) * K * N * 2
    rows = [dict(kernel="torch._grouped_mm", ms=kernel_ms(lambda: torch._grouped_mm(x, w, offs=offs)), err=0.0)]
    for cfg in configs:
        try:
            got = grouped_mm_few_rows(x, w, offs, cfg)[:used].float()
            err = ((got - want).norm() / want.norm()).item()
            rows.append(dict(kernel="few_rows", config=list(cfg), ms=kernel_ms(lambda: grouped_mm_few_rows(x, w, offs, cfg)),
                             err=err))
        except Exception as e:  # noqa: BLE001 - a config that does not compile or run is reported
            rows.append(dict(kernel="few_rows", config=list(cfg), error=f"{type(e).__name__}: {str(e)[:200]}"))
    for r in rows:
        if "ms" in r:
            r["TBps"] = weight_bytes / r["ms"] / 1e9
    return dict(E=E, K=K, N=N, mean_rows=mean_rows, rows_used=used, max_rows=int(counts.max()),
                weight_GB=weight_bytes / 1e9, results=rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--means", default="16,32,64,256")
    ap.add_argument("--json", default="few_rows.json")
    args = ap.parse_args()
    torch.cuda.set_device(0)
    out = []
    for mean in map(int, args.means.split(",")):
        for name, (K, N) in (("linear1", (7168, 4096)), ("linear2", (2048, 7168))):
            c = case(32, K, N, mean, seed=mean + K, configs=CONFIGS if mean <= 64 else CONFIGS[3:6])
            c["name"] = name
            out.append(c)
            print(f"\n{name} E=32 K={K} N={N}, mean rows {mean} (max {c['max_rows']}), weights {c['weight_GB']:.2f} GB")
            for r in sorted(c["results"], key=lambda r: r.get("ms", 1e9)):
                if "error" in r:
                    print(f"  {str(r['config']):22} {r['error']}")
                else:
                    print(f"  {r['kernel']:17} {str(r.get('config', '')):22} {r['ms']:7.3f} ms  {r['TBps']:5.2f} TB/s  "
                          f"err {r['err']:.1e}", flush=True)
    provenance.dump(args.json, cases=out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
