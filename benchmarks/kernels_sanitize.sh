#!/usr/bin/env bash
# compute-sanitizer memcheck over every fused kernel (benchmarks/kernels_sanitize.py). A plain run
# first fills Triton's cache: compiling under the sanitizer alone ran past 80 s on the H100.
# Usage: OUT=/some/dir bash benchmarks/kernels_sanitize.sh   (log: $OUT/sanitizer.txt; T_WARM, T_SAN: time limits in s;
#   SAN_ARGS=--fused-gemms: the fragment layout's large-M fused GEMMs only)
set -u
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/kernels_gpu}; mkdir -p "$OUT"
{ echo "== warm-up (fills the Triton cache)"; timeout "${T_WARM:-150}" python3 benchmarks/kernels_sanitize.py ${SAN_ARGS:-}
  echo "== compute-sanitizer --tool memcheck --error-exitcode 1 python3 benchmarks/kernels_sanitize.py ${SAN_ARGS:-}"
  timeout "${T_SAN:-380}" compute-sanitizer --tool memcheck --error-exitcode 1 python3 benchmarks/kernels_sanitize.py ${SAN_ARGS:-} 2>&1 | tail -8
  echo "sanitizer exit: ${PIPESTATUS[0]}"; } 2>&1 | tee "$OUT/sanitizer.txt"
