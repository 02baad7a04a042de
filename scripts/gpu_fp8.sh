#!/usr/bin/env bash
# The FP8 and kept-weights rows on one GPU, in one device call (issues 23 and 24): gpu_check's
# FP8 cases (both recipes, FP8 dispatch, eval mode keeping the FP8 experts), the products and
# quantizers alone (fp8_gemm_sweep, at each preset's shapes), and the layer at dsv3, decode and
# wide, W=1, CUDA graphs: bf16 against FP8 blocks, FP8 rows, FP8 rows with FP8 dispatch and FP8
# rows where they time faster per product (fp8_products="auto"), in training mode (derived
# weights made per call, forward and forward+backward) and in eval mode (kept between calls,
# forward). Writes env.txt, log.txt, check_fp8_n1.json, fp8_sweep_n1.json,
# overlap_fp8_train_n1.json, overlap_fp8_eval_n1.json under $OUT (default out/gpu).
# EP_PRESETS, EP_PRECISIONS (overlap.py's names; EP_PRECISIONS_EVAL / EP_PRECISIONS_TRAIN per mode),
# EP_MODES ("eval train"), EP_ITERS choose the rows.
set -uo pipefail
cd "$(dirname "$0")/.."
. scripts/gpu_env.sh  # NVLink multicast off, PYTHONPATH, $OUT, EP_COMMIT
write_env
rc=0
presets=${EP_PRESETS:-dsv3,decode,wide}
precisions=${EP_PRECISIONS:-dtype,fp8,fp8_rows,fp8_rows_dispatch,fp8_rows_auto}
echo "== gpu_check: FP8 experts (blocks, rows), FP8 dispatch, eval keeping the FP8 experts" | tee -a "$log"
timeout 120 torchrun --standalone --nproc-per-node 1 benchmarks/gpu_check.py --checks fp8 \
  --json "$OUT/check_fp8_n1.json" 2>&1 | tee -a "$log" || rc=1
echo "== FP8 products and quantizers alone, against bf16 ($presets shapes)" | tee -a "$log"
timeout 120 python3 benchmarks/fp8_gemm_sweep.py --shapes "$presets" --json "$OUT/fp8_sweep_n1.json" 2>&1 | grep -vi warn | tee -a "$log" || rc=1
for mode in ${EP_MODES:-eval train}; do  # eval first: inference's rows (FP8 experts held) decide the targets
  extra=(); [ $mode = eval ] && extra=(--eval --no-backward)
  per_mode=EP_PRECISIONS_${mode^^}; mode_precisions=${!per_mode:-$precisions}
  echo "== the layer, $mode mode: $presets, W=1, $mode_precisions, CUDA graphs" | tee -a "$log"
  timeout 200 torchrun --standalone --nproc-per-node 1 benchmarks/overlap.py --preset "$presets" --waves 1 \
    --expert-waves 1 --splits tokens --carveouts 0 --precisions "$mode_precisions" --graphs --iters "${EP_ITERS:-20}" \
    "${extra[@]}" --run-name "${EP_RUN:-gpu1}_$mode" --json "$OUT/overlap_fp8_${mode}_n1.json" 2>&1 | tee -a "$log" || rc=1
done
exit $rc
