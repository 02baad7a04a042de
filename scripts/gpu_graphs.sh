#!/usr/bin/env bash
# Issue 24's training rows with CUDA graphs that read the kept FP8 weights, in one device call:
# gpu_check's FP8 cases (forward; FP8 data gradients against their emulation) and graphs_kept
# cases (weight_cache="graphs": a captured forward+backward reads the kept FP8 weights, a
# replay before refresh_weight_cache() repeats the last, one after it follows the change), the
# layer at dsv3 in training mode (W=1, routing given, CUDA graphs) for bf16 and the FP8 rows
# with FP8 data gradients kept for graphs (promoted; fast accumulation everywhere), the FP8
# training step's kernel list (autocast_probe --fp8), and the per-group column quantizer's
# Triton-vs-torch diagnosis. Writes env.txt, log.txt,
# check_graphs_kept_n1.json, overlap_graphs_train_n1.json, quantizer_diag.json under $OUT
# (default out/gpu). EP_PRESETS, EP_PRECISIONS, EP_ITERS choose the layer's rows.
set -uo pipefail
cd "$(dirname "$0")/.."
. scripts/gpu_env.sh  # NVLink multicast off, PYTHONPATH, $OUT, EP_COMMIT
write_env
rc=0
echo "== gpu_check: CUDA graphs reading kept FP8 weights (weight_cache='graphs', training); the FP8 cases" | tee -a "$log"
timeout 240 torchrun --standalone --nproc-per-node 1 benchmarks/gpu_check.py --checks graphs_kept,fp8 \
  --json "$OUT/check_graphs_kept_n1.json" 2>&1 | grep -vi warn | tee -a "$log" || rc=1
precisions=${EP_PRECISIONS:-dtype,fp8_rows_bwd_graphs,fp8_rows_bwd_graphs_fast_all}
echo "== the layer, training mode: ${EP_PRESETS:-dsv3}, W=1, $precisions, CUDA graphs" | tee -a "$log"
timeout 300 torchrun --standalone --nproc-per-node 1 benchmarks/overlap.py --preset "${EP_PRESETS:-dsv3}" --waves 1 \
  --expert-waves 1 --splits tokens --carveouts 0 --precisions "$precisions" --graphs --iters "${EP_ITERS:-20}" \
  --run-name "${EP_RUN:-gpu1}_graphs_train" --json "$OUT/overlap_graphs_train_n1.json" 2>&1 | tee -a "$log" || rc=1
echo "== the FP8 training step's kernels (kept weights, eager; the fused dz/dh quantizations), against bf16's" | tee -a "$log"
timeout 150 python3 benchmarks/autocast_probe.py --fp8 2>&1 | grep -vi warn | tee -a "$log" || rc=1
echo "== the per-group column quantizer: Triton against its torch path (dsv3's x rows)" | tee -a "$log"
timeout 120 python3 benchmarks/fp8_quantizer_diag.py --rows 32768 --cols 7168 --experts 32 \
  --json "$OUT/quantizer_diag.json" 2>&1 | grep -vi warn | tee -a "$log" || rc=1
exit $rc
