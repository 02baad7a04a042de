#!/usr/bin/env bash
# N Gloo ranks on this CPU host: launch/cpu_sim.sh [N] script.py [args...]   (N defaults to 4)
set -euo pipefail
n=4
if [[ "${1:-}" =~ ^[0-9]+$ ]]; then n=$1; shift; fi
exec python -m ep.launch -n "$n" "$@"
