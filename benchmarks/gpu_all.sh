#!/bin/bash
# Every GPU measurement of issue 13 item 4 in one go (about 8 minutes on an H100/H200), logs and JSON into
# ${OUT:-gpu_out}: card, fused decode step (parity first), q8 GEMV, the fp16 GEMV of session 5, and the
# session-5 2-bit decode crash (blocking launches, then compute-sanitizer over every launch configuration).
# Run from the repository root (or a copy holding benchmarks/ and backends/cuda/) with a python3 that has CuPy.
cd "$(dirname "$0")/.." || exit 1
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 LOWBIT_CUDA_CACHE=${LOWBIT_CUDA_CACHE:-/tmp/lowbit-cuda}
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader | tee "$OUT/card.txt"
timeout 170 python3 benchmarks/gpu_step.py --json "$OUT/step.json" 2>&1 | tee "$OUT/step.log"
timeout 130 python3 benchmarks/gpu_gemv_q8.py --json "$OUT/q8.json" 2>&1 | tee "$OUT/q8.log"
CUDA_LAUNCH_BLOCKING=1 timeout 80 python3 benchmarks/gpu_decode.py --bits 2 > "$OUT/old2.log" 2>&1
echo "gpu_decode --bits 2 (blocking launches): rc=$?" | tee -a "$OUT/old2.log"
timeout 80 compute-sanitizer --tool memcheck --print-limit 5 python3 benchmarks/gpu_decode.py --bits 2 --check-configs \
  > "$OUT/sanitize_old2.log" 2>&1
echo "compute-sanitizer check-configs: rc=$?" | tee -a "$OUT/sanitize_old2.log"
timeout 70 python3 benchmarks/gpu_gemv.py --json "$OUT/fp16.json" > "$OUT/fp16.log" 2>&1
tail -n 4 "$OUT/old2.log" "$OUT/sanitize_old2.log"
grep -E "best|read band" "$OUT/fp16.log"
