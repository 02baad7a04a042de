"""How a GPU figure was made, written beside it: the commit, the device, torch's version.

The GPU machine runs a copy of the working tree whose `.git` may be stale or absent, so
`EP_COMMIT` (set by `scripts/gpu_bench.sh`; when launching by hand, write the hash into the
command itself: a `$(git rev-parse HEAD)` in it runs on the GPU machine, in the stale copy)
wins over what git says here.
"""
from __future__ import annotations

import json
import os
import subprocess

import torch


def commit() -> str:
    """EP_COMMIT when set, else git's HEAD here (+dirty when ep/ or benchmarks/ differ), else "unknown"."""
    if os.environ.get("EP_COMMIT"):
        return os.environ["EP_COMMIT"]
    top = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=top, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "ep", "benchmarks"], cwd=top,
                               capture_output=True, text=True).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def dump(path: str, **fields) -> None:
    """Write `fields` as JSON to `path`, with the device, torch's version and the commit first."""
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    with open(path, "w") as f:
        json.dump(dict(device=device, torch=torch.__version__, commit=commit(), **fields), f, indent=1)
