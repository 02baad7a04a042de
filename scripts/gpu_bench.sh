#!/usr/bin/env bash
# The GPU run, in one device call: environment, GPU correctness against the float64
# reference, the overlap benchmark (dsv3, wide, decode; W 1..8 and auto; carveouts; both dedup
# modes; the naive baseline), and timelines. Everything lands under $OUT (default out/gpu):
#   env.txt, check_nN.json, host_probe_nN.json, overlap_nN.json, log_nN.txt, traces_nN.tgz
# usage: scripts/gpu_bench.sh [NGPUS] [extra overlap.py args...]
set -uo pipefail
cd "$(dirname "$0")/.."
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
n=${1:-$(python3 -c 'import torch; print(torch.cuda.device_count())')}
shift || true
# the device copy may carry no (or a stale) .git: pass EP_COMMIT=$(git rev-parse HEAD) from the checkout
export EP_COMMIT=${EP_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}
log="$OUT/log_n$n.txt"
{
  date -u; nvidia-smi; nvidia-smi topo -m
  python3 -c 'import torch, triton; print("torch", torch.__version__, "cuda", torch.version.cuda, "nccl", torch.cuda.nccl.version(), "triton", triton.__version__)'
  echo "commit $EP_COMMIT"
} > "$OUT/env.txt" 2>&1
run() { torchrun --standalone --nproc-per-node "$n" "$@"; }
rc=0
echo "== correctness (bf16 vs float64 reference), $n GPUs" | tee -a "$log"
run benchmarks/gpu_check.py --json "$OUT/check_n$n.json" 2>&1 | tee -a "$log" || rc=1
echo "== launchers on the GPUs: torchrun and mpirun, NCCL, the layer against the reference" | tee -a "$log"
run tests/launch_check.py --backend nccl 2>&1 | grep -E "launch_check|Error" | tee -a "$log" || rc=1
if command -v mpirun >/dev/null; then
  mpirun --version 2>&1 | head -2 | tee -a "$log"
  flags=""; mpirun --version 2>&1 | grep -qi "open mpi" && flags="--allow-run-as-root --oversubscribe"
  mpirun $flags -np "$n" python3 tests/launch_check.py --backend nccl 2>&1 | grep -E "launch_check|rror" | tee -a "$log" || rc=1
else
  echo "mpirun: no mpirun binary on this machine (mpi4py $(python3 -c 'import mpi4py; print(mpi4py.__version__)' 2>&1))" | tee -a "$log"
fi
echo "== host time per call of a wave's ops" | tee -a "$log"
run benchmarks/host_probe.py --json "$OUT/host_probe_n$n.json" 2>&1 | grep -E "host_probe|rror" | tee -a "$log" || rc=1
echo "== overlap benchmark, $n GPUs" | tee -a "$log"
transports=nccl; [ "$n" -gt 1 ] && transports=nccl,copy_engine  # the copy engines need peers
run benchmarks/overlap.py --preset dsv3,wide,decode --waves 1,2,4,8,auto --carveouts 0,4 --dedup rank,wave \
    --transports $transports --naive --trace-dir "$OUT/traces" --json "$OUT/overlap_n$n.json" "$@" 2>&1 \
    | tee -a "$log" || rc=1
if [ -d "$OUT/traces" ]; then
  tar -czf "$OUT/traces_n$n.tgz" -C "$OUT" traces && rm -rf "$OUT/traces"
fi
exit $rc
