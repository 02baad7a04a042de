#!/usr/bin/env bash
# The main job: set up, then the overlap benchmark on a 4-rank Gloo simulation of this CPU
# host. Extra arguments go to benchmarks/overlap.py (try --help).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
exec python benchmarks/overlap.py "$@"
