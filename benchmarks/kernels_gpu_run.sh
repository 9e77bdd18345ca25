#!/usr/bin/env bash
# The GPU session for issue #8 (fused kernels), as run on the lent H100 (one call, ~10 min):
# CUDA tests, the kernel benchmark, the end-to-end decode benchmark and compute-sanitizer.
# Usage: OUT=/some/dir bash benchmarks/kernels_gpu_run.sh   (logs and JSON copied to $OUT)
# Environment: SKIP_TESTS=1 (no CUDA tests), T_WARM/T_SAN (benchmarks/kernels_sanitize.sh), BENCH_ARGS (kernels_bench.py's arguments, default
# "--reps 30", every M), BENCH_NAME (its JSON name, default kernels_h100), T_* (time limits, s).
set -u
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/kernels_gpu}; mkdir -p "$OUT"
BENCH_ARGS=${BENCH_ARGS:---reps 30}; BENCH_NAME=${BENCH_NAME:-kernels_h100}
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/device.txt"
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/device.txt"
if [ -z "${SKIP_TESTS:-}" ]; then
  echo "== python3 -m pytest -q tests/test_kernels.py -k cuda" | tee "$OUT/kernels_gpu_tests.txt"
  timeout "${T_TESTS:-120}" python3 -m pytest -q -p no:cacheprovider --maxfail=5 tests/test_kernels.py -k cuda 2>&1 | tail -15 | tee -a "$OUT/kernels_gpu_tests.txt"
fi
echo "== python3 benchmarks/kernels_bench.py $BENCH_ARGS --name $BENCH_NAME" | tee "$OUT/kernels_bench.txt"
timeout "${T_BENCH:-270}" python3 benchmarks/kernels_bench.py $BENCH_ARGS --name "$BENCH_NAME" 2>>"$OUT/kernels_bench.err" | tee -a "$OUT/kernels_bench.txt"
cp "benchmarks/results/$BENCH_NAME.json" "$OUT/" 2>/dev/null
echo "== python3 benchmarks/decode_e2e.py --reps 30" | tee "$OUT/decode_e2e.txt"
timeout "${T_E2E:-170}" python3 benchmarks/decode_e2e.py --reps 30 2>&1 | grep -v Warning | tee -a "$OUT/decode_e2e.txt"
cp benchmarks/results/decode_e2e.json "$OUT/" 2>/dev/null
OUT="$OUT" bash benchmarks/kernels_sanitize.sh
