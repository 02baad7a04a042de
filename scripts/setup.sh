#!/usr/bin/env bash
# Set up a fresh machine (Python 3.11, nothing else) for the CPU simulation and the tests:
# a virtual environment in .venv with the CPU build of torch 2.13.0, pytest, hypothesis,
# triton (for its CPU interpreter), MPICH and mpi4py, transformers, and this package (editable).
# Safe to run again: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
. .venv/bin/activate
if ! python -c 'import torch' 2>/dev/null; then
  echo "setup: installing torch 2.13.0 (CPU build)"
  # torch 2.13.0 pinned: on these machines pip takes the CPU build that lies on disk.
  # Elsewhere add: --index-url https://download.pytorch.org/whl/cpu
  python -m pip install -q ${TORCH_PIP_ARGS:-} "torch==2.13.0"
fi
# triton: its interpreter runs the GPU kernels' tests on the CPU;
# mpich + mpi4py: MPICH from PyPI, for the real mpirun launch in the tests;
# matplotlib: the timeline pictures (ep.model, benchmarks);
# transformers: the public MoE blocks the layer is checked against (tests/test_hf.py), the
# checkpoint loading (ep.hf) and the training example; it needs no torch of its own (pip keeps 2.13.0)
python -m pip install -q "pytest>=8" "hypothesis>=6" "numpy" "triton==3.6.0" "mpich" "mpi4py>=4" "matplotlib" \
  "transformers==5.24.0"
python -m pip install -q --no-deps --no-build-isolation -e .
echo "setup: ready ($(python -c 'import torch; print("torch", torch.__version__)'))"
