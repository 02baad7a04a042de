#!/usr/bin/env bash
# One host, one rank per GPU: launch/torchrun.sh [NGPUS] script.py [args...]
set -euo pipefail
n=$(python -c 'import torch; print(max(torch.cuda.device_count(), 1))')
if [[ "${1:-}" =~ ^[0-9]+$ ]]; then n=$1; shift; fi
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0} TORCH_SYMM_MEM_DISABLE_MULTICAST=${TORCH_SYMM_MEM_DISABLE_MULTICAST:-1} NVSHMEM_DISABLE_NVLS=${NVSHMEM_DISABLE_NVLS:-1}
exec torchrun --standalone --nproc-per-node "$n" "$@"
