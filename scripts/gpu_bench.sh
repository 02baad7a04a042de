#!/usr/bin/env bash
# The GPU run, in one device call: environment, GPU correctness against the float64
# reference (both wave splits, every transport and W; a sync-free training step; CUDA-graph
# replays), before it the device-put transport's kernels on GPU 0 (p2p_check: every rank
# in one process; correctness, graphs, timeouts, rates), the README's example as a plain
# one-process python3 run, the launchers, and the
# overlap benchmark in both regimes: NVLink (dsv3, wide, decode; token and expert
# waves; NCCL, the copy engines and the device puts; CUDA graphs) and NCCL without peer access (dsv3, the
# comm-bound regime; SM carveouts). Everything lands under $OUT (default out/gpu):
#   log_nN.txt, check_nN.json, overlap_nN_nvlink.json, overlap_nN_no_p2p.json, traces_nN.tgz,
#   and side_nN.tgz holding env.txt, p2p_n1.json, readme_n1.json (with one GPU also
#   host_launches_n1.json, few_rows_n1.json, compile_n1.json): six files at most, the device call returns eight
# usage: scripts/gpu_bench.sh [NGPUS] [--quick]
#   --quick: dsv3 and decode only, fewer variants (a development run of ~4 minutes)
#   EP_PRESETS, EP_WAVES, EP_EXPERT_WAVES: the NVLink run's presets, token-wave and expert-wave W
#   values (default dsv3,wide,decode, 1,2,auto and 1, or 1,2 on one GPU); EP_PRECISIONS: dtype
#   (the preset's) and/or fp8 expert products (default dtype, both on one GPU); EP_RUN: the run's name in the records
set -uo pipefail
cd "$(dirname "$0")/.."
. scripts/gpu_env.sh  # NVLink multicast off, PYTHONPATH, $OUT, EP_COMMIT
n=${1:-$(python3 -c 'import torch; print(torch.cuda.device_count())')}
shift || true
quick=0; [ "${1:-}" = "--quick" ] && quick=1
RUN=${EP_RUN:-h200x$n}
log="$OUT/log_n$n.txt"
{
  date -u; nvidia-smi; nvidia-smi topo -m
  python3 -c 'import torch, triton; print("torch", torch.__version__, "cuda", torch.version.cuda, "nccl", torch.cuda.nccl.version(), "triton", triton.__version__)'
  echo "commit $EP_COMMIT"
} > "$OUT/env.txt" 2>&1
run() { torchrun --standalone --nproc-per-node "$n" "$@"; }
rc=0
echo "== the device-put transport's kernels: every rank in one process on GPU 0 (first: its figures come back even if a check below fails)" | tee -a "$log"
CUDA_VISIBLE_DEVICES=0 python3 benchmarks/p2p_check.py --json "$OUT/p2p_n1.json" 2>&1 | tee -a "$log" || rc=1
if [ "$n" -eq 1 ]; then  # one GPU: the layer with device_put between two processes that share it,
  # what an eager call issues, and the few-rows product against torch._grouped_mm
  echo "== the layer with device_put, two processes on GPU 0 (CUDA IPC)" | tee -a "$log"
  CUDA_VISIBLE_DEVICES=0 timeout 300 torchrun --standalone --nproc-per-node 2 benchmarks/p2p_procs_check.py 2>&1 \
    | grep -E "device_put, |passed|Error|rank [0-9] " | tee -a "$log" || rc=1
  echo "== launches of one eager call, device work, graph replay (one GPU)" | tee -a "$log"
  python3 benchmarks/host_launches.py --preset decode,dsv3 --waves 1 --expert-waves 2 --json "$OUT/host_launches_n1.json" 2>&1 \
    | grep -E "host |Error" | tee -a "$log" || rc=1
  echo "== torch.compile (fullgraph; default, reduce-overhead) and autocast against eager (one GPU)" | tee -a "$log"
  timeout 240 python3 benchmarks/compile_bench.py --preset issue23,dsv3 --json "$OUT/compile_n1.json" 2>&1 \
    | grep -vi warn | tail -40 | tee -a "$log" || rc=1
  echo "== autocast's kernels against the bf16 layer's (dsv3, fresh process)" | tee -a "$log"
  timeout 120 python3 benchmarks/autocast_probe.py 2>&1 | grep -vi warn | tee -a "$log" || rc=1
  echo "== NCCL teardown after a failure: the transport's abort, then destroy_process_group (one GPU)" | tee -a "$log"
  timeout 60 torchrun --standalone --nproc-per-node 1 benchmarks/teardown_check.py --json "$OUT/teardown_n1.json" 2>&1 \
    | grep -E "teardown|Error" | tee -a "$log" || rc=1
  echo "== the few-rows grouped product (decode widths) against torch._grouped_mm" | tee -a "$log"
  python3 benchmarks/few_rows_gemm.py --means 32 --json "$OUT/few_rows_n1.json" 2>&1 | grep -v Warn | tee -a "$log" || rc=1
fi
echo "== correctness (bf16 vs float64 reference; sync-free step; CUDA graphs), $n GPUs" | tee -a "$log"
skip_dp=0
only_dp_failed() {  # the check's JSON says every failed case was device_put's
  python3 -c 'import json, sys; c = json.load(open(sys.argv[1]))["cases"]
sys.exit(0 if all(x.get("transport") == "device_put" for x in c if not x["ok"]) else 1)' "$1" 2>/dev/null
}
if ! timeout 300 torchrun --standalone --nproc-per-node "$n" benchmarks/gpu_check.py --json "$OUT/check_n$n.json" 2>&1 \
    | tee -a "$log"; then
  # device_put has not run on two GPUs yet: when only its cases failed (or the check hung and
  # the others pass alone), measure the others
  if [ -f "$OUT/check_n$n.json" ] && only_dp_failed "$OUT/check_n$n.json"; then
    echo "correctness failed for device_put only: the benchmark runs without it" | tee -a "$log"
    skip_dp=1; rc=1
  elif [ ! -f "$OUT/check_n$n.json" ] && [ "$n" -gt 1 ] && run benchmarks/gpu_check.py --transports nccl,copy_engine \
      --json "$OUT/check_n${n}_without_device_put.json" 2>&1 | tee -a "$log"; then
    echo "the check did not finish with device_put, and passed without it: the benchmark runs without it" | tee -a "$log"
    skip_dp=1; rc=1
  else
    echo "correctness failed: no benchmark of a wrong layer" | tee -a "$log"
    exit 1
  fi
fi
echo "== the README's example: one process, no launcher, one GPU" | tee -a "$log"
CUDA_VISIBLE_DEVICES=0 python3 tests/readme_example.py --json "$OUT/readme_n1.json" 2>&1 | tee -a "$log" || rc=1
echo "== launchers on the GPUs: torchrun and mpirun, NCCL, the layer against the reference" | tee -a "$log"
run tests/launch_check.py --backend nccl 2>&1 | grep -E "launch_check|Error" | tee -a "$log" || rc=1
if command -v mpirun >/dev/null; then
  flags=""; mpirun --version 2>&1 | grep -qi "open mpi" && flags="--allow-run-as-root --oversubscribe"
  mpirun $flags -np "$n" python3 tests/launch_check.py --backend nccl 2>&1 | grep -E "launch_check|rror" | tee -a "$log" || rc=1
else
  echo "mpirun: no mpirun binary on this machine (mpi4py $(python3 -c 'import mpi4py; print(mpi4py.__version__)' 2>&1))" | tee -a "$log"
fi
transports=nccl; [ "$n" -gt 1 ] && transports=nccl,copy_engine,device_put  # the copy engines and device puts need peers
[ "$skip_dp" = 1 ] && transports=${transports%,device_put}
if [ $quick = 1 ]; then
  nvlink=(--preset dsv3,decode --waves 1,2,auto --expert-waves 1 --carveouts 0)
  no_p2p=(--preset dsv3 --waves 1,2,4,auto --expert-waves 1,4 --carveouts 0,16)
else
  # three transports in every row: the presets and W that decide something (v4flash's shared
  # expert: r19; W=4 at NVLink was slower than W=2 in every r16 row), to stay in one 10-minute call
  # one GPU: expert waves at W=2 beside token waves (the one engine's two maps; every call is a copy)
  # and FP8 expert products beside bf16 ones
  ew=1; pr=dtype; [ "$n" -eq 1 ] && ew=1,2 && pr=dtype,fp8,fp8_rows
  nvlink=(--preset "${EP_PRESETS:-dsv3,wide,decode}" --waves "${EP_WAVES:-1,2,auto}" --expert-waves "${EP_EXPERT_WAVES:-$ew}"
          --carveouts 0 --precisions "${EP_PRECISIONS:-$pr}")
  no_p2p=(--preset dsv3 --waves 1,2,4,8,auto --expert-waves 1,4 --carveouts 0,16)
fi
echo "== overlap benchmark, NVLink, $n GPUs" | tee -a "$log"
run benchmarks/overlap.py "${nvlink[@]}" --splits tokens,experts --transports $transports --graphs --run-name "$RUN" \
    --trace-dir "$OUT/traces" --json "$OUT/overlap_n${n}_nvlink.json" 2>&1 | tee -a "$log" || rc=1
if [ "$n" -gt 1 ]; then
  echo "== overlap benchmark, NCCL without peer access (the comm-bound regime), $n GPUs" | tee -a "$log"
  run benchmarks/overlap.py --no-p2p "${no_p2p[@]}" --splits tokens,experts --transports nccl --graphs --run-name "$RUN" \
      --trace-waves 4 --trace-dir "$OUT/traces" --json "$OUT/overlap_n${n}_no_p2p.json" 2>&1 | tee -a "$log" || rc=1
fi
if [ -d "$OUT/traces" ]; then
  tar -czf "$OUT/traces_n$n.tgz" -C "$OUT" traces && rm -rf "$OUT/traces"
fi
# the device call returns at most 8 files (r36 lost its timelines to that): the side results in one archive
side=$(cd "$OUT" && ls env.txt p2p_n1.json readme_n1.json host_launches_n1.json few_rows_n1.json compile_n1.json teardown_n1.json \
  check_n*_without_device_put.json 2>/dev/null)
if [ -n "$side" ]; then
  (cd "$OUT" && tar -czf "side_n$n.tgz" $side && rm -f $side)
fi
exit $rc
