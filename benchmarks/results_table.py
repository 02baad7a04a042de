"""Markdown tables for `benchmarks/results/README.md`, made from `benchmarks/results/summary.json`.

    python benchmarks/results_table.py r16_h200x2 [more runs]

One table per (run, regime, preset): every measured row of the whole call
`layer(x, topk_idx=..., topk_weights=...)`, forward and forward+backward, with the expert
part alone ("plan given"), the host's issue time, and overlap efficiency.
"""
from __future__ import annotations

import os
import sys
from collections import defaultdict

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from summary import load  # noqa: E402


def _f(v, fmt="{:.2f}") -> str:
    return "-" if v is None else fmt.format(v)


def tables(runs) -> str:
    groups = defaultdict(list)
    for r in load():
        if r["run"] in runs:
            groups[(r["run"], r["regime"], r["preset"])].append(r)
    out = []
    for (run, regime, preset), rows in groups.items():
        first = rows[0]
        out += [f"**{preset}**, {regime}, run {run} ({first['gpus']} x {first['device']}, torch {first['torch']}, "
                f"NCCL {first['nccl']}, commit {first['commit'][:12]}): comm {first['comm_ms']:.2f}, "
                f"compute {first['compute_ms']:.2f}, ideal {first['ideal_ms']:.2f} ms", "",
                "| split | transport | W | carveout | graph | fwd | host | b2b fwd | plan given | overlap eff | fwd+bwd |",
                "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            w = f"auto -> {r['num_waves']}" if r["auto_from"] else str(r["num_waves"])
            split = r["wave_split"] + (f" ({r['dedup']})" if r.get("dedup") and r["dedup"] != "rank" else "")
            out.append(f"| {split} | {r['transport']} | {w} | {r['sm_carveout']} | {'yes' if r['graph'] else ''} | "
                       f"{_f(r['fwd_ms'])} | {_f(r['host_ms'])} | {_f(r['b2b_fwd_ms'])} | {_f(r['plan_given_fwd_ms'])} | "
                       f"{_f(r['overlap_efficiency'])} | {_f(r['fwd_bwd_ms'])} |")
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    print(tables(sys.argv[1:]))
