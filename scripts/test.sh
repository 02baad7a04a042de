#!/usr/bin/env bash
# Set up, then run the whole test suite (Gloo ranks on the CPU; GPU-only tests skip).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
exec python -m pytest -q tests "$@"
