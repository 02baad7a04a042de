"""Markdown tables from an overlap benchmark JSON (for `benchmarks/results/README.md`).

    python benchmarks/results_table.py benchmarks/results/runs/r11_h200x2_overlap.json
"""
from __future__ import annotations

import json
import sys


def tables(path: str) -> str:
    with open(path) as f:
        d = json.load(f)
    out = []
    for r in d["runs"]:
        st = r["stages_ms"]
        stages = ", ".join(f"{k} {v:.2f}" for k, v in st.items())
        naive = f"; naive layer {r['naive_fwd_ms']:.2f}" if r.get("naive_fwd_ms") else ""
        out += [f"**{r['preset']}** (T={r['T']}/rank, H={r['H']}, F={r['F']}, {r['local_experts']} experts/rank, "
                f"k={r['k']}): {stages}; comm {r['comm_ms']:.2f}, compute {r['compute_ms']:.2f}, "
                f"ideal {r['ideal_ms']:.2f}{naive}", "",
                "| transport | W | carveout | fwd | host | vs W=1 | / ideal | fwd+bwd | vs W=1 | vs naive | rows/token |",
                "|---|---|---|---|---|---|---|---|---|---|---|"]
        for row in r["layers"]:
            w = f"auto -> {row['W']}" if row.get("auto") else str(row["W"])
            naive_x = f"{row['speedup_vs_naive']:.2f}x" if "speedup_vs_naive" in row else "-"
            out.append(
                f"| {row.get('transport', 'nccl')} | {w} | {row['carveout']} | {row['fwd_ms']:.2f} | "
                f"{row.get('fwd_host_ms', float('nan')):.2f} | {row['speedup_vs_w1']:.2f}x | {row['over_ideal']:.2f}x | "
                f"{row.get('fwdbwd_ms', float('nan')):.2f} | {row.get('fwdbwd_speedup_vs_w1', float('nan')):.2f}x | "
                f"{naive_x} | {row['rows_per_token_max_rank']:.2f} |")
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    for p in sys.argv[1:]:
        print(tables(p))
