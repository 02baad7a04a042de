#!/usr/bin/env bash
# Issue 23's rows on one GPU, in one device call: gpu_check's compiled cases (a fresh layer's
# first call compiled in reduce-overhead, keeping FP8 weights: eval, and training with
# weight_cache="always"), compile_bench's issue23 preset (compiled against eager and the hand
# CUDA graph, training steps of a fresh layer in reduce-overhead, autocast), and the layer with
# device_put between two processes on GPU 0 (compiled too). Writes env.txt, log.txt,
# check_compiled_n1.json, compile_n1.json under $OUT (default out/gpu).
set -uo pipefail
cd "$(dirname "$0")/.."
. scripts/gpu_env.sh  # NVLink multicast off, PYTHONPATH, $OUT, EP_COMMIT
write_env
rc=0
echo "== gpu_check: reduce-overhead, a fresh layer keeping FP8 weights (eval; training, always)" | tee -a "$log"
timeout 240 torchrun --standalone --nproc-per-node 1 benchmarks/gpu_check.py --checks compiled \
  --json "$OUT/check_compiled_n1.json" 2>&1 | grep -vi warn | tee -a "$log" || rc=1
echo "== torch.compile (fullgraph; default, reduce-overhead) and autocast against eager (issue23 preset)" | tee -a "$log"
timeout 240 python3 benchmarks/compile_bench.py --preset issue23 --json "$OUT/compile_n1.json" 2>&1 \
  | grep -vi "warn" | tail -40 | tee -a "$log" || rc=1
echo "== the layer with device_put, two processes on GPU 0 (compiled too)" | tee -a "$log"
CUDA_VISIBLE_DEVICES=0 timeout 80 torchrun --standalone --nproc-per-node 2 benchmarks/p2p_procs_check.py 2>&1 \
  | grep -E "device_put, |passed|Error|rank [0-9] " | tee -a "$log" || rc=1
exit $rc
