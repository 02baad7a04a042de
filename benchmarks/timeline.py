"""Turn a torch.profiler Chrome trace into a PNG: one row per GPU stream, kernels as bars.

    python benchmarks/timeline.py trace.json trace.png

Colours: NCCL kernels (communication) red, matrix kernels (GEMM/CUTLASS) blue, copies
and other kernels grey; the pipeline's `ep.*` ranges (per wave) are drawn above.
"""
from __future__ import annotations

import json
import sys
from collections import defaultdict


def _kind(name: str) -> str:
    low = name.lower()
    if "nccl" in low:
        return "comm"
    if any(s in low for s in ("gemm", "cutlass", "sm90", "matmul", "grouped")):
        return "gemm"
    return "other"


COLORS = {"comm": "#d62728", "gemm": "#1f77b4", "other": "#9a9a9a"}


def draw_timeline(trace_path: str, png_path: str, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(trace_path) as f:
        events = json.load(f)["traceEvents"]
    kernels = [e for e in events if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    ranges = [e for e in events if e.get("ph") == "X" and e.get("cat") == "gpu_user_annotation"
              and str(e.get("name", "")).startswith("ep.")]
    if not kernels:
        raise ValueError(f"no GPU kernels in {trace_path}")
    t0 = min(e["ts"] for e in kernels)
    by_stream = defaultdict(list)
    for e in kernels:
        by_stream[(e["pid"], e["tid"])].append(e)
    streams = sorted(by_stream, key=lambda s: (str(s[0]), str(s[1])))
    fig, ax = plt.subplots(figsize=(14, 1.2 + 0.6 * (len(streams) + 1)))
    for row, s in enumerate(streams):
        for e in by_stream[s]:
            ax.barh(row, e["dur"] / 1e3, left=(e["ts"] - t0) / 1e3, height=0.7,
                    color=COLORS[_kind(e["name"])], linewidth=0)
    top = len(streams)
    for e in ranges:
        ax.barh(top, e["dur"] / 1e3, left=(e["ts"] - t0) / 1e3, height=0.5, color="none", edgecolor="k", linewidth=0.6)
        ax.text((e["ts"] - t0 + e["dur"] / 2) / 1e3, top, e["name"][3:], ha="center", va="center", fontsize=6)
    ax.set_yticks(range(top + 1))
    ax.set_yticklabels([f"stream {s[1]}" for s in streams] + ["ep ranges"])
    ax.set_xlabel("ms")
    ax.set_title(title or trace_path)
    from matplotlib.patches import Patch

    ax.legend(handles=[Patch(color=c, label=k) for k, c in COLORS.items()], loc="upper right", fontsize=7)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    draw_timeline(sys.argv[1], sys.argv[2])
