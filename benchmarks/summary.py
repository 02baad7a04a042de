"""Append overlap-benchmark records to `benchmarks/results/summary.json`, the file the results
README's tables are made from (`benchmarks/results_table.py`).

    python benchmarks/summary.py --run r16_h200x2 out/gpu/overlap_n2_nvlink.json out/gpu/overlap_n2_no_p2p.json

`summary.json` is a list of records, one per measured row (`benchmarks/overlap.py`'s
`records`: run, commit, gpus, preset, regime, transport, wave_split, num_waves, auto_from,
sm_carveout, graph, fwd_ms, fwd_bwd_ms, plan_given_fwd_ms, host_ms, comm_ms, compute_ms,
...). New runs are appended; old records are kept. A run name already in the file is
refused (pass another name), so a run is never counted twice.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List

SUMMARY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "summary.json")


def load(path: str = SUMMARY) -> List[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return json.load(f)


def append(run: str, result_paths: List[str], path: str = SUMMARY) -> int:
    records = load(path)
    if any(r["run"] == run for r in records):
        raise SystemExit(f"{path} already holds run {run!r}: give the new run another name")
    new = []
    for p in result_paths:
        with open(p) as f:
            for rec in json.load(f)["records"]:
                new.append(dict(rec, run=run))
    with open(path, "w") as f:
        json.dump(records + new, f, indent=1)
        f.write("\n")
    return len(new)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="the run's name, e.g. r16_h200x2")
    ap.add_argument("results", nargs="+", help="overlap.py JSON files of this run")
    args = ap.parse_args(argv)
    print(f"appended {append(args.run, args.results)} records of {args.run} to {SUMMARY}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
