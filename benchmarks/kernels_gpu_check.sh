#!/usr/bin/env bash
# Short GPU check after the launch-plan and graph-timed-tuning changes (one ~3 min call):
# a subset of the CUDA tests, M = 1/16 timings on one shape, compute-sanitizer.
set -u
export PYTHONPATH=src PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/kernels_gpu}; mkdir -p "$OUT"
echo "== pytest tests/test_kernels.py -k 'cuda and (capture or dispatch or w8a8 or smollm2 or real_sizes)'" | tee "$OUT/check_tests.txt"
timeout 80 python3 -m pytest -q -p no:cacheprovider --maxfail=3 tests/test_kernels.py -k "cuda and (capture or dispatch or w8a8 or smollm2 or real_sizes)" 2>&1 | tail -8 | tee -a "$OUT/check_tests.txt"
echo "== python3 benchmarks/kernels_bench.py --shapes 14336x4096 --m 1,16 --formats int4_g64,nf4_g64,int3_g64 --no-w8a8 --reps 30 --name kernels_h100_plans" | tee "$OUT/check_bench.txt"
timeout 70 python3 benchmarks/kernels_bench.py --shapes 14336x4096 --m 1,16 --formats int4_g64,nf4_g64,int3_g64 --no-w8a8 --reps 30 --name kernels_h100_plans 2>/dev/null | tee -a "$OUT/check_bench.txt"
cp benchmarks/results/kernels_h100_plans.json "$OUT/" 2>/dev/null
echo "== compute-sanitizer --tool memcheck --error-exitcode 1 python3 benchmarks/kernels_sanitize.py" | tee "$OUT/sanitizer.txt"
timeout 45 compute-sanitizer --tool memcheck --error-exitcode 1 python3 benchmarks/kernels_sanitize.py 2>&1 | tail -4 | tee -a "$OUT/sanitizer.txt"
echo "sanitizer exit: ${PIPESTATUS[0]}" | tee -a "$OUT/sanitizer.txt"
