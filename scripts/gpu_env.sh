# Sourced by gpu_bench.sh, gpu_focus.sh and gpu_fp8.sh (from the checkout's root): the environment every GPU
# run keeps (NVLink multicast off), the checkout on PYTHONPATH, $OUT made, and EP_COMMIT (the
# device copy may carry no or a stale .git: pass EP_COMMIT=$(git rev-parse HEAD) from the checkout).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
export EP_COMMIT=${EP_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}
log="$OUT/log.txt"


write_env() {  # $OUT/env.txt: the date, the GPUs, torch/CUDA/NCCL/Triton versions, the commit
  { date -u; nvidia-smi; python3 -c 'import torch, triton; print("torch", torch.__version__, "cuda", torch.version.cuda,
"nccl", torch.cuda.nccl.version(), "triton", triton.__version__)'; echo "commit $EP_COMMIT"; } > "$OUT/env.txt" 2>&1
}
