# Sourced by gpu_bench.sh and gpu_focus.sh (from the checkout's root): the environment every GPU
# run keeps (NVLink multicast off), the checkout on PYTHONPATH, $OUT made, and EP_COMMIT (the
# device copy may carry no or a stale .git: pass EP_COMMIT=$(git rev-parse HEAD) from the checkout).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
export EP_COMMIT=${EP_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}
