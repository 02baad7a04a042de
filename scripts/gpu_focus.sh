#!/usr/bin/env bash
# A shorter GPU run than gpu_bench.sh, for a session whose device time is short: the checks
# that only a GPU can show (gpu_check: every split, sync-free steps, CUDA graphs, FP8; the
# layer with device_put between two processes on GPU 0) and the benchmark rows of dsv3 and
# decode (token and expert waves at W = 1, 2, bf16 and FP8 experts, CUDA graphs). Writes
# env.txt, log.txt, check_n1.json, overlap_n1_nvlink.json, host_launches_n1.json,
# compile_n1.json, fp8_sweep_n1.json, teardown_n1.json under $OUT (default out/gpu).
set -uo pipefail
cd "$(dirname "$0")/.."
. scripts/gpu_env.sh  # NVLink multicast off, PYTHONPATH, $OUT, EP_COMMIT
write_env
rc=0
echo "== correctness, one GPU (both splits, sync-free steps, CUDA graphs, FP8 experts)" | tee -a "$log"
timeout 150 torchrun --standalone --nproc-per-node 1 benchmarks/gpu_check.py --json "$OUT/check_n1.json" 2>&1 \
  | tee -a "$log" || rc=1
echo "== overlap benchmark, one GPU" | tee -a "$log"
timeout 180 torchrun --standalone --nproc-per-node 1 benchmarks/overlap.py --preset "${EP_PRESETS:-dsv3,decode}" \
  --waves 1,2 --expert-waves 1,2 --carveouts 0 --precisions dtype,fp8,fp8_rows,fp8_dispatch --splits tokens,experts --graphs --iters "${EP_ITERS:-20}" \
  --run-name "${EP_RUN:-gpu1}" --json "$OUT/overlap_n1_nvlink.json" 2>&1 | tee -a "$log" || rc=1
echo "== launches of one eager call, device work, graph replay (dsv3, both splits)" | tee -a "$log"
timeout 120 python3 benchmarks/host_launches.py --preset dsv3 --waves 1,2 --expert-waves 2 --json "$OUT/host_launches_n1.json" 2>&1 \
  | grep -E "host |Error" | tee -a "$log" || rc=1
echo "== the blockwise FP8 grouped product's tile configs, N- and K-major weights, against bf16 (dsv3 shapes)" | tee -a "$log"
timeout 120 python3 benchmarks/fp8_gemm_sweep.py --json "$OUT/fp8_sweep_n1.json" 2>&1 | grep -vi warn | tee -a "$log" || rc=1
echo "== torch.compile (fullgraph; default, reduce-overhead) and autocast against eager (one GPU)" | tee -a "$log"
timeout 240 python3 benchmarks/compile_bench.py --preset issue23,dsv3 --json "$OUT/compile_n1.json" 2>&1 \
  | grep -vi "warn" | tail -40 | tee -a "$log" || rc=1
echo "== autocast's kernels against the bf16 layer's (dsv3, fresh process)" | tee -a "$log"
timeout 120 python3 benchmarks/autocast_probe.py 2>&1 | grep -vi warn | tee -a "$log" || rc=1
echo "== NCCL teardown after a failure: the transport's abort, then destroy_process_group (one GPU)" | tee -a "$log"
timeout 60 torchrun --standalone --nproc-per-node 1 benchmarks/teardown_check.py --json "$OUT/teardown_n1.json" 2>&1 \
  | grep -E "teardown|Error" | tee -a "$log" || rc=1
echo "== the layer with device_put, two processes on GPU 0 (both splits, sync-free steps, graphs)" | tee -a "$log"
CUDA_VISIBLE_DEVICES=0 timeout 80 torchrun --standalone --nproc-per-node 2 benchmarks/p2p_procs_check.py 2>&1 \
  | grep -E "device_put, |passed|Error|rank [0-9] " | tee -a "$log" || rc=1
exit $rc
