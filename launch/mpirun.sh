#!/usr/bin/env bash
# N ranks under MPI (Open MPI or MPICH; mpi4py must be installed):
#   launch/mpirun.sh N script.py [args...]
# ep.init_distributed() reads the rank and local rank through mpi4py; rank 0 picks a free
# port and broadcasts it. On one host the rendezvous stays on 127.0.0.1; across hosts set
# MASTER_ADDR (or EP_MASTER_ADDR) to the address rank 0 should listen on, or leave it to
# rank 0's host name. Open MPI as root also needs --allow-run-as-root.
set -euo pipefail
n=${1:?usage: launch/mpirun.sh N script.py [args...]}; shift
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0} TORCH_SYMM_MEM_DISABLE_MULTICAST=${TORCH_SYMM_MEM_DISABLE_MULTICAST:-1} NVSHMEM_DISABLE_NVLS=${NVSHMEM_DISABLE_NVLS:-1}
exec mpirun ${MPIRUN_ARGS:-} -np "$n" python "$@"
