#!/usr/bin/env bash
# The GPU calls of the M = 1 kernel rework (issue #8), each well inside one 10-minute device call.
#   OUT=/some/dir bash benchmarks/kernels_gpu_session.sh check   # CUDA tests, A/B against the previous kernel, SVDQuant overhead
#     (TEST_K: pytest -k expression, default "cuda"; AB_ARGS: kernels_m1_ab.py arguments; T_*: time limits in s)
#   OUT=/some/dir bash benchmarks/kernels_gpu_session.sh bench   # kernel table (M = 1, 16), end-to-end decode, compute-sanitizer
#   OUT=/some/dir bash benchmarks/kernels_gpu_session.sh fused   # CUDA tests, host overhead by layer, SVDQuant's fused branch, M = 1 table
#   OUT=/some/dir bash benchmarks/kernels_gpu_session.sh sanitize   # compute-sanitizer memcheck of every kernel
#   OUT=/some/dir bash benchmarks/kernels_gpu_session.sh lut        # CUDA tests (+ torch.compile), host overhead (W8A8 plans), M = 1 table int4 vs NF4
#   OUT=/some/dir bash benchmarks/kernels_gpu_session.sh e2e        # end-to-end decode, uncompiled and torch.compile'd (E2E_FORMATS)
#   OUT=/some/dir bash benchmarks/kernels_gpu_session.sh configs    # CUDA tests (TESTS=0: none), then every tuner candidate
#       timed per case (CFG_ARGS: kernels_configs.py arguments)
#   OUT=/some/dir bash benchmarks/kernels_gpu_session.sh m16        # CUDA tests, every M = 16 candidate, the M = 16 table
#   OUT=/some/dir bash benchmarks/kernels_gpu_session.sh nf16       # the same for NF4's half-word steps, + sanitizer, batch-16 decode
#   OUT=/some/dir bash benchmarks/kernels_gpu_session.sh m1         # the M = 1 kernel's wider search (M1_SHAPES), a profiled decode step
#   OUT=/some/dir bash benchmarks/kernels_gpu_session.sh pdl        # CUDA tests, linears back to back and compiled decode, PDL on / off
#   OUT=/some/dir bash benchmarks/kernels_gpu_session.sh svd        # CUDA tests, SVDQuant's branch overhead, ncu on the small-M kernels
#   OUT=/some/dir bash benchmarks/kernels_gpu_session.sh tc         # the tensor-core kernel's wider search at M = 16
#   OUT=/some/dir bash benchmarks/kernels_gpu_session.sh overlap    # CUDA tests, SVDQuant's overlapped branch, M = 16 chain
#   OUT=/some/dir bash benchmarks/kernels_gpu_session.sh fragment   # the fragment layout's CUDA tests and every config timed (gluon_fragment_probe.py)
#   OUT=/some/dir bash benchmarks/kernels_gpu_session.sh fragment_on   # BITSMITH_FRAGMENT=1: kernel table (M = 1, 16) and compiled decode
#   OUT=/some/dir bash benchmarks/kernels_gpu_session.sh layouts   # fragment CUDA tests, rows vs fragment kernel table (M = 1, 16, 2048)
#   OUT=/some/dir bash benchmarks/kernels_gpu_session.sh layouts_e2e   # rows vs fragment, compiled decode at batch 1
#   OUT=/some/dir bash benchmarks/kernels_gpu_session.sh siblings   # sibling-group and fragment CUDA tests, compiled decode with
#       q/k/v and gate/up stacked (SIB_FORMATS, SIB_NAME; BITSMITH_FRAGMENT as set; TESTS=0: no tests)
#   OUT=/some/dir bash benchmarks/kernels_gpu_session.sh ceiling    # CUDA test of the read-only kernel, then the stacked decoder's
#       linears back to back beside a read-only kernel over the same bytes (how far M = 1 is from any one-pass reader)
#   OUT=/some/dir bash benchmarks/kernels_gpu_session.sh frag_pdl   # the fragment kernel as a programmatic dependent
#       (BITSMITH_FRAGMENT_PDL=1): its CUDA tests and the siblings', the stacked layers' linears back to back
#       (PDL on/off), compiled batch-1 decode with int4/int3/NF4 all in the fragment layout; compute-sanitizer in its own call:
#       BITSMITH_FRAGMENT_PDL=1 OUT=/some/dir bash benchmarks/kernels_gpu_session.sh sanitize
#   OUT=/some/dir bash benchmarks/kernels_gpu_session.sh order      # fragment CUDA tests (group-major words among them),
#       then every config with the words block-major and group-major (gluon_fragment_probe.py --orders block,group)
#   OUT=/some/dir bash benchmarks/kernels_gpu_session.sh ra_gemm    # the register-operand GEMM (int4 and NF4: BITSMITH_FRAGMENT_RA_GEMM=1)
#       at M = 2048: its CUDA tests (TESTS=0: none), every config beside dequantize + cuBLAS (RA_FORMATS, RA_SHAPES,
#       RA_MS); RA_MID_MS: also below 513 tokens (offered from RA_MIN_M, default 129; RA_MID_FORMATS, RA_MID_SHAPES)
#   OUT=/some/dir bash benchmarks/kernels_gpu_session.sh ra_pair    # ra_gemm (int4 g64, NF4), then the library's M = 2048 table
#       with NF4 offered the register-operand GEMM, then every config at 256 and 512 tokens (offered from 129)
#   OUT=/some/dir bash benchmarks/kernels_gpu_session.sh rest_ab    # the M = 2048 table without, with and without a rest
#       after each case's warm-up (kernels_bench.py --rest; REST_RUNS="0 a,2 b,0 c": rest and label of each run), SM clocks
#       sampled; every config at 256 and 512 tokens (MID=0: not)
#   OUT=/some/dir bash benchmarks/kernels_gpu_session.sh planes     # the codebook's byte planes built in the kernels (in
#       vector registers): the fragment layout's CUDA tests, every register-operand GEMM config at M = 2048 (NF4, int4 g64
#       as the control), then the M = 1 and 16 table (kernels_defaults_m1m16_planes)
#   OUT=/some/dir bash benchmarks/kernels_gpu_session.sh pattern    # the fragment kernel's M = 1 reads without its math
#       (benchmarks/fragment_pattern_probe.py: words only, + scales and zeros, + activations, + its split-K ending) beside it
#       and a streaming reader (PATTERN_MS: token counts, default 1; PATTERN_SHAPES)
#   OUT=/some/dir bash benchmarks/kernels_gpu_session.sh cluster    # split-K reduced in thread-block clusters: the fragment
#       layout's CUDA tests, then every M = 1 and 16 config (CL_MS, CL_FORMATS, CL_SHAPES), each split both ways
#   OUT=/some/dir bash benchmarks/kernels_gpu_session.sh sum_after  # split-K partials added up by a second kernel: the
#       fragment layout's CUDA tests, every M = 16 config (SA_MS, SA_FORMATS, SA_SHAPES), the M = 1 and 16 table
#   OUT=/some/dir bash benchmarks/kernels_gpu_session.sh sum_after_check  # compute-sanitizer over the fragment kernel
#       with the second-kernel ending, the library's M = 16 table with it, batch-16 decode
#   OUT=/some/dir bash benchmarks/kernels_gpu_session.sh zsub       # the fragment kernel's zeros (and scales) applied to its
#       A operand in 16 bits (BITSMITH_FRAGMENT_ZSUB=0,1,2) and the second kernel with the wide tiles: CUDA tests, every
#       M = 16 config (ZS_MS, ZS_FORMATS, ZS_SHAPES)
#   OUT=/some/dir bash benchmarks/kernels_gpu_session.sh zsub_wide  # zsub's configs at 32 and 64 tokens, compute-sanitizer
#       over the fragment kernel, then the library's M = 16 table
#   OUT=/some/dir bash benchmarks/kernels_gpu_session.sh sixteenths # int4 in sixteenths against the shifted codes: every
#       ZSUB 1 and 2 config at 16 and 64 tokens, once each way (after zsub's CUDA tests have passed)
#   OUT=/some/dir bash benchmarks/kernels_gpu_session.sh ra_ncu     # Nsight Compute on the register-operand GEMM (RA_TILE)
#   OUT=/some/dir bash benchmarks/kernels_gpu_session.sh wide       # the fragment layout's kernels for more tokens:
#       the Gluon kernel at 17..64 tokens and the Hopper wgmma kernel (both on by default since they passed this):
#       their CUDA tests and the fragment GEMM's, then M = 16..128 (WIDE_MS) with every format in the fragment layout (the
#       tuner picks among all of them, the GEMM and dequantize + cuBLAS; which won is in the JSON's "tuned") and in rows
#   OUT=/some/dir bash benchmarks/kernels_gpu_session.sh suite      # every CUDA test with this release's defaults (int4 in the
#       fragment layout, the wide tiles, the wgmma kernel and the TMA W8A8 GEMM on), the Gluon W8A8 GEMM and W8A8's PDL switched on
#   OUT=/some/dir bash benchmarks/kernels_gpu_session.sh w8a8       # where W8A8's time goes at M = 2048: quantization,
#       every GEMM config, torch._int_mm, the library call beside fp16, and the product in 2 and 4 token chunks with the
#       quantization on a second stream (benchmarks/w8a8_probe.py --overlap); W8A8_TMA=1: the W8A8 CUDA tests first and
#       the Gluon GEMM's configs timed too (BITSMITH_W8A8_WGMMA=1)
#   OUT=/some/dir bash benchmarks/kernels_gpu_session.sh w8a8_check # W8A8's CUDA tests (the persistent TMA GEMM at N = 336
#       among them), compute-sanitizer over every kernel, then the M = 2048 table the README prints (kernels_m2048_w8a8)
#   OUT=/some/dir bash benchmarks/kernels_gpu_session.sh gluon      # the warp-specialized Gluon W8A8 GEMM (cooperative and
#       ping-pong): W8A8's CUDA tests, compute-sanitizer with BITSMITH_W8A8_WGMMA=1, every Gluon config and TMA tile timed
#   OUT=/some/dir bash benchmarks/kernels_gpu_session.sh pingpong   # the ping-pong GEMM in the tuner: w8a8_probe.py on the four
#       shapes, the README's M = 2048 table, Nsight Compute on the per-token quantization
#   OUT=/some/dir bash benchmarks/kernels_gpu_session.sh cvt        # W8A8's CUDA tests, w8a8_probe.py on the four shapes, the
#       README's M = 2048 table, the per-token quantization alone at 4, 8 and 16 warps
#   OUT=/some/dir bash benchmarks/kernels_gpu_session.sh k256       # the int8 GEMM with 256-wide K steps beside the
#       library's 4096x4096 pick (w8a8_variants.py --tma),
#       then the SM clock and power while fp16, torch._int_mm and bitsmith's int8 GEMM each run back to back (gpu_clocks_probe.py)
#   OUT=/some/dir bash benchmarks/kernels_gpu_session.sh evict      # the quantization's L2 eviction hints (w8a8.QUANT_CACHE):
#       W8A8's CUDA tests (TESTS=0: none), then the library call with them off and on in rounds on 4096x4096 and
#       14336x4096 (w8a8_switch_probe.py)
#   OUT=/some/dir bash benchmarks/kernels_gpu_session.sh one        # one call for all of it when device time is short:
#       CUDA tests, M = 1 table int4 vs NF4, compiled end-to-end decode, host overhead
# The CUDA tests run with pytest-xdist when it is importable (carried as wheels: .whl/, see the device notes).
set -u
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/kernels_gpu}; mkdir -p "$OUT"
shown() {  # the command line as one would type it: arguments with spaces or shell characters in single quotes
  local a line=
  for a in "$@"; do
    [[ -z $a || $a == *[!A-Za-z0-9_./:=,+@%-]* ]] && a="'$a'"
    line+="${line:+ }$a"
  done
  echo "$line"
}
step() {  # step TXT SECONDS SHOW RESULT CMD...: one measurement. Appends "== CMD" and CMD's output (warnings dropped) to
  # $OUT/TXT, runs CMD under `timeout SECONDS`, shows the console what the filter SHOW lets through ("cat", "tail -8",
  # a grep; a pipeline is fine; the log still gets every line when SHOW stops reading early, as head does), then
  # copies benchmarks/results/RESULT.json into $OUT (RESULT "": nothing to copy). Its exit status is CMD's (124: timed out)
  local txt="$OUT/$1" secs=$2 show=$3 result=$4; shift 4
  echo "== $(shown "$@")" | tee -a "$txt"
  timeout "$secs" "$@" 2>&1 | grep -v -i warn | tee -p -a "$txt" | eval "$show"
  local status=${PIPESTATUS[0]}
  [ -z "$result" ] || cp "benchmarks/results/$result.json" "$OUT/" 2>/dev/null || echo "(no benchmarks/results/$result.json)" | tee -a "$txt"
  return "$status"
}
tests_or_stop() {  # tests_or_stop [TESTS ARGS...]: cuda_tests (or TESTS ARGS..., e.g. w8a8_tests), and the session ends
  # there when one fails (no benchmark of a wrong kernel)
  "${@:-cuda_tests}" || { echo "CUDA tests failed: no benchmarks"; exit 1; }
}
cuda_tests() {  # CUDA tests of the kernels and SVDQuant's module; exit status 0 when all pass
  nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/device.txt"
  if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=$PYTHONPATH:/tmp/site
  fi
  XDIST=$(python3 -c "import xdist" 2>/dev/null && echo "-n 14")
  TEST_K=${TEST_K:-cuda}
  echo "== pytest ${TEST_FILES:-tests/test_kernels.py tests/test_svdquant.py} -k '$TEST_K' $XDIST" | tee "$OUT/gpu_tests.txt"
  timeout "${T_TESTS:-200}" python3 -m pytest -p no:cacheprovider -rfE $XDIST ${TEST_FILES:-tests/test_kernels.py tests/test_svdquant.py} -k "$TEST_K" 2>&1 \
    | tail -40 | tee -a "$OUT/gpu_tests.txt" | tail -3
  return "${PIPESTATUS[0]}"
}
w8a8_tests() {  # W8A8's CUDA tests, pytest -k "$1" (TEST_K overrides), at most $2 s (T_TESTS); exit status 0 when all pass
  TEST_FILES="tests/test_kernels.py tests/test_w8a8.py" TEST_K=${TEST_K:-$1} T_TESTS=${T_TESTS:-$2} cuda_tests
}
m2048_table() {  # the README's M = 2048 table (int4, tinygemm, W8A8; kernels_m2048_w8a8), its last $1 lines shown
  step kernels_bench.txt "${T_BENCH:-150}" "tail -$1" kernels_m2048_w8a8 \
    python3 benchmarks/kernels_bench.py --m 2048 --formats int4_g64 --reps 10 --name kernels_m2048_w8a8
}
w8a8_m2048() {  # W8A8 part by part at M = 2048 on the four shapes (w8a8_probe_$1), then the README's M = 2048 table
  step probe.txt "${T_PROBE:-200}" "tail -8" "w8a8_probe_$1" python3 benchmarks/w8a8_probe.py --m 2048 --reps 20 --name "w8a8_probe_$1"
  m2048_table 12
}
host_overhead() {  # host_overhead SECONDS N: python time per eager call, layer by layer; its first N lines shown
  step host_overhead.txt "$1" "head -$2" host_overhead_h100 python3 benchmarks/host_overhead.py
}
svdquant_overhead() {  # svdquant_overhead REPS SECONDS SHOW: SVDQuant's low-rank branch on top of the W4 matmul
  step svdquant_overhead.txt "$2" "$3" svdquant_overhead_h100 python3 benchmarks/svdquant_overhead.py --reps "$1"
}
ra_mid_configs() {  # ra_mid_configs SECONDS FORMATS: every config at RA_MID_MS tokens (256,512) with the register-operand
  # GEMM offered from RA_MIN_M (129) rows; T_MID, RA_MID_FORMATS (else FORMATS) and RA_MID_SHAPES override
  step configs_mid.txt "${T_MID:-$1}" "grep -E 'fp16|x[0-9]|WRONG|fail'" kernels_configs_ra_mid \
    python3 benchmarks/kernels_configs.py --layout fragment --m "${RA_MID_MS:-256,512}" --formats "${RA_MID_FORMATS:-$2}" \
    --shapes "${RA_MID_SHAPES:-14336x4096,28672x8192}" --reps 10 --top 6 --name kernels_configs_ra_mid --ra-min-m "${RA_MIN_M:-129}"
}
ncu_step() {  # ncu_step TXT SECONDS SHOW NCU-ARGS...: Nsight Compute into $OUT/TXT (its ==PROF== lines dropped), then SHOW of it
  local txt=$1 secs=$2 show=$3; shift 3
  echo "== $(shown ncu "$@")" > "$OUT/$txt"
  timeout "$secs" ncu "$@" 2>&1 | grep -v "^==PROF==" >> "$OUT/$txt"
  local status=${PIPESTATUS[0]}
  eval "$show" < "$OUT/$txt"
  return "$status"
}
case "${1:-check}" in
check)
  cuda_tests
  step ab.txt "${T_AB:-230}" cat kernels_m1_ab python3 benchmarks/kernels_m1_ab.py --prev .cache/ab/small_m_prev.py ${AB_ARGS:---reps 15}
  svdquant_overhead 20 "${T_SVD:-90}" cat
  ;;
fused)
  # FUSED_TABLE=0: SVDQuant's overhead only (no host-overhead breakdown, no M = 1 table)
  tests_or_stop
  [ "${FUSED_TABLE:-1}" = 0 ] || host_overhead "${T_HOST:-90}" 12
  svdquant_overhead 20 "${T_SVD:-120}" cat
  [ "${FUSED_TABLE:-1}" = 0 ] || step kernels_bench.txt "${T_BENCH:-200}" cat kernels_h100_m1v3 \
    python3 benchmarks/kernels_bench.py --m 1 --reps 20 --name kernels_h100_m1v3
  ;;
lut)
  TEST_FILES="tests/test_kernels.py tests/test_svdquant.py tests/test_compile.py" cuda_tests
  host_overhead "${T_HOST:-90}" 12
  step kernels_bench.txt "${T_BENCH:-240}" cat kernels_m1_lut \
    python3 benchmarks/kernels_bench.py --m 1 --formats int4_g64,nf4_g64 --reps 20 --name kernels_m1_lut
  ;;
one)
  TEST_FILES="tests/test_kernels.py tests/test_svdquant.py tests/test_compile.py" T_TESTS=${T_TESTS:-140} cuda_tests
  step kernels_bench.txt "${T_BENCH:-160}" "tail -14" kernels_m1_lut \
    python3 benchmarks/kernels_bench.py --m 1 --formats int4_g64,nf4_g64 --reps 20 --name kernels_m1_lut
  step decode_e2e.txt "${T_E2E:-220}" "tail -8" decode_e2e_b1_compiled \
    python3 benchmarks/decode_e2e.py --batch 1 --formats fp16,int4_g64,nf4_g64 --reps 30 --compile --name decode_e2e_b1_compiled
  host_overhead "${T_HOST:-40}" 10
  ;;
e2e)
  for c in "--compile" ""; do  # compiled first: the new measurement
    name=decode_e2e_b1${c:+_compiled}
    step decode_e2e.txt "${T_E2E:-290}" cat "$name" \
      python3 benchmarks/decode_e2e.py --batch 1 --formats "${E2E_FORMATS:-fp16,int4_g64,nf4_g64}" --reps 30 $c --name "$name"
  done
  ;;
configs)
  if [ "${TESTS:-1}" = 1 ]; then
    TEST_FILES=${TEST_FILES:-"tests/test_kernels.py tests/test_svdquant.py tests/test_compile.py tests/test_cuda.py tests/test_w8a8.py"} cuda_tests
  fi
  step configs.txt "${T_CFG:-300}" "tail -40" "" python3 benchmarks/kernels_configs.py ${CFG_ARGS:---m 16 --formats int4_g64}
  cp benchmarks/results/kernels_configs*.json "$OUT/" 2>/dev/null
  ;;
m16)  # CUDA tests of the kernels, every M = 16 candidate timed, then the M = 16 table
  TEST_FILES=${TEST_FILES:-tests/test_kernels.py} T_TESTS=${T_TESTS:-150} cuda_tests
  step configs.txt "${T_CFG:-260}" "tail -40" kernels_configs_m16 \
    python3 benchmarks/kernels_configs.py --m 16 --formats int4_g64,int4_g128 --reps 10 --top 4 --name kernels_configs_m16
  step kernels_bench.txt "${T_BENCH:-150}" "tail -30" kernels_m16 \
    python3 benchmarks/kernels_bench.py --m 16 --formats int4_g64,int4_g128,nf4_g64,int3_g64 --reps 20 --name kernels_m16
  ;;
nf16)  # CUDA tests, every M = 16 NF4 candidate, the M = 16 table (NF4, int4), compute-sanitizer, batch-16 decode
  TEST_FILES=${TEST_FILES:-tests/test_kernels.py} T_TESTS=${T_TESTS:-150} cuda_tests
  step configs.txt "${T_CFG:-150}" "tail -40" kernels_configs_nf4_m16 \
    python3 benchmarks/kernels_configs.py --m 16 --formats nf4_g64 --reps 10 --top 4 --name kernels_configs_nf4_m16
  step kernels_bench.txt "${T_BENCH:-120}" "tail -16" kernels_m16_nf4 \
    python3 benchmarks/kernels_bench.py --m 16 --formats int4_g64,nf4_g64 --no-w8a8 --reps 20 --name kernels_m16_nf4
  OUT="$OUT" T_WARM=100 T_SAN=200 bash benchmarks/kernels_sanitize.sh | tail -4
  step decode_e2e.txt "${T_E2E:-150}" "tail -5" decode_e2e_b16_nf4 \
    python3 benchmarks/decode_e2e.py --batch 16 --formats fp16,nf4_g64 --reps 20 --name decode_e2e_b16_nf4
  ;;
m1)  # the M = 1 kernel's wider search (prefetch depth, tiles) on the Llama shapes, then where a decode step's time goes
  echo "== ncu: $(command -v ncu || echo none)" | tee "$OUT/m1.txt"
  step m1.txt "${T_CFG:-240}" "tail -60" "" python3 benchmarks/kernels_configs.py --m 1 --m1-sweep --formats int4_g64 \
    --shapes "${M1_SHAPES:-1024x4096,4096x4096,6144x4096,14336x4096,28672x4096,4096x14336,28672x8192}" --reps 10 --top 6 --name kernels_configs_m1
  step m1.txt "${T_CFG2:-120}" "tail -30" "" python3 benchmarks/kernels_configs.py --m 1 --m1-sweep --formats int3_g64,nf4_g64,int4_g128 \
    --shapes 14336x4096,4096x14336 --reps 10 --top 4 --name kernels_configs_m1_more
  cp benchmarks/results/kernels_configs_m1*.json "$OUT/" 2>/dev/null
  step decode_e2e.txt "${T_E2E:-200}" "tail -70" decode_e2e_b1_profile \
    python3 benchmarks/decode_e2e.py --batch 1 --formats fp16,int4_g64 --reps 20 --compile --profile 5 --name decode_e2e_b1_profile
  ;;
pdl)  # CUDA tests, the decoder's linears back to back with and without PDL, compiled batch-1 decode with and without
  TEST_FILES=${TEST_FILES:-"tests/test_kernels.py tests/test_compile.py"} T_TESTS=${T_TESTS:-150} cuda_tests
  step chain.txt "${T_CHAIN:-100}" "tail -10" kernels_chain_m1 \
    python3 benchmarks/kernels_chain.py --m 1 --layers 8 --formats int4_g64,nf4_g64,int3_g64 --name kernels_chain_m1
  step chain.txt "${T_CHAIN:-100}" "tail -6" kernels_chain_m16 \
    python3 benchmarks/kernels_chain.py --m 16 --layers 8 --formats int4_g64,nf4_g64 --name kernels_chain_m16
  svdquant_overhead 10 "${T_SVD:-90}" "tail -12"
  for p in "" "--no-pdl"; do
    name=decode_e2e_b1_compiled${p:+_nopdl}
    fmts=fp16,int4_g64; [ -n "$p" ] && fmts=int4_g64
    step decode_e2e.txt "${T_E2E:-150}" "tail -4" "$name" \
      python3 benchmarks/decode_e2e.py --batch 1 --formats $fmts --reps 30 --compile $p --name "$name"
  done
  ;;
svd)  # CUDA tests, SVDQuant's branch overhead, Nsight Compute on the small-M kernels
  TEST_FILES=${TEST_FILES:-"tests/test_svdquant.py tests/test_kernels.py"} T_TESTS=${T_TESTS:-130} cuda_tests
  svdquant_overhead 10 "${T_SVD:-100}" "tail -13"
  ncu_step ncu.txt "${T_NCU:-150}" "grep -E '_kernel|Duration|Memory Throughput|DRAM Throughput|Issue Slots|Warp Cycles Per Issued|No Eligible|Achieved Occupancy|Registers Per|Waves' | head -60" \
    --section SpeedOfLight --section WarpStateStats --section SchedulerStats --section Occupancy --section LaunchStats \
    -k "regex:_tc_kernel|_fma_kernel" python3 benchmarks/kernels_ncu_probe.py --m16
  ;;
overlap)  # CUDA tests; SVDQuant's branch beside the matmul (three smoothing modes); M = 16 chain (prep as PDL)
  TEST_FILES="tests/test_kernels.py tests/test_svdquant.py" T_TESTS=${T_TESTS:-200} tests_or_stop
  svdquant_overhead 10 "${T_SVD:-140}" "tail -37"
  step chain.txt "${T_CHAIN:-80}" "tail -8" kernels_chain_m16_prep \
    python3 benchmarks/kernels_chain.py --m 16 --layers 8 --formats int4_g64,nf4_g64 --name kernels_chain_m16_prep
  ;;
fragment)  # the fragment layout (default for int3 and NF4): its CUDA tests, then every config of its kernel against fp16 and the rows layout
  TEST_FILES="tests/test_fragment.py" TEST_K=cuda T_TESTS=${T_TESTS:-150} tests_or_stop
  step fragment.txt "${T_FRAG:-330}" "grep -E 'fp16|WRONG'" gluon_fragment_probe \
    python3 benchmarks/gluon_fragment_probe.py --shapes "${FRAG_SHAPES:-14336x4096,4096x14336}" --m 1,16 --reps 10
  ;;
fragment_on)  # the library with BITSMITH_FRAGMENT=1: the kernel table at M = 1 and 16, and the compiled decode step
  export BITSMITH_FRAGMENT=1
  step kernels_bench.txt "${T_BENCH:-250}" "tail -24" kernels_fragment env BITSMITH_FRAGMENT=1 \
    python3 benchmarks/kernels_bench.py --m 1,16 --formats int4_g64,int4_g128,nf4_g64,int3_g64 --no-w8a8 --reps 20 --name kernels_fragment
  step decode_e2e.txt "${T_E2E:-300}" "tail -8" decode_e2e_b1_fragment env BITSMITH_FRAGMENT=1 \
    python3 benchmarks/decode_e2e.py --batch 1 --formats fp16,int4_g64,nf4_g64,int3_g64 --reps 30 --compile --name decode_e2e_b1_fragment
  ;;
layouts)  # fragment CUDA tests; rows vs fragment layout, both tuned with a cold L2: kernel table (M = 1, 16, 2048)
  TEST_FILES="tests/test_fragment.py tests/test_svdquant.py" TEST_K=cuda T_TESTS=${T_TESTS:-90} tests_or_stop
  for f in 0 1; do
    step kernels_bench.txt "${T_BENCH:-220}" "grep -v tinygemm | tail -25" "kernels_layout$f" env BITSMITH_FRAGMENT=$f \
      python3 benchmarks/kernels_bench.py --shapes "${LAYOUT_SHAPES:-4096x4096,14336x4096,4096x14336,28672x8192}" \
      --m 1,16,2048 --formats int4_g64,nf4_g64,int3_g64 --no-w8a8 --reps 20 --name "kernels_layout$f"
  done
  ;;
layouts_e2e)  # the compiled decode step at batch 1 in both layouts (after 'layouts'; its own call)
  for f in 0 1; do
    step decode_e2e.txt "${T_E2E:-270}" "tail -6" "decode_e2e_b1_layout$f" env BITSMITH_FRAGMENT=$f \
      python3 benchmarks/decode_e2e.py --batch 1 --formats "${E2E_FORMATS:-fp16,int4_g64,nf4_g64,int3_g64}" --reps 30 --compile \
      --name "decode_e2e_b1_layout$f"
  done
  ;;
siblings)  # CUDA tests of the sibling groups and the fragment layout; compiled batch-1 decode, stacked projections
  [ "${TESTS:-1}" = 0 ] || TEST_FILES="tests/test_siblings.py tests/test_fragment.py" TEST_K=cuda T_TESTS=${T_TESTS:-100} tests_or_stop
  name=${SIB_NAME:-decode_e2e_b1_siblings}  # by name: two runs in one call keep both
  echo "BITSMITH_FRAGMENT=${BITSMITH_FRAGMENT-unset}" >> "$OUT/decode_e2e.txt"
  step decode_e2e.txt "${T_E2E:-400}" "grep -E 'B=|x fp16|^ *(fp16|int|nf)'" "$name" \
    python3 benchmarks/decode_e2e.py --batch 1 --formats "${SIB_FORMATS:-fp16,int4_g64+fused+head8,int4_g64+fused,nf4_g64+fused+head8,int3_g64+fused+head8}" \
    --reps 30 --compile --name "$name"
  ;;
frag_pdl)  # the fragment kernel launched as a programmatic dependent: tests, chain, decode
  export BITSMITH_FRAGMENT_PDL=1
  TEST_FILES="tests/test_fragment.py tests/test_siblings.py" TEST_K=cuda T_TESTS=${T_TESTS:-100} tests_or_stop
  step chain.txt "${T_CHAIN:-120}" "tail -8" kernels_chain_frag_pdl env BITSMITH_FRAGMENT_PDL=1 \
    python3 benchmarks/kernels_chain.py --m 1 --layers 8 --stacked --formats int3_g64,nf4_g64 --reps 20 --name kernels_chain_frag_pdl
  # every 3/4-bit format in the fragment layout (int4 too: without PDL it trailed the rows layout in the step)
  step decode_e2e.txt "${T_E2E:-300}" "tail -7" decode_e2e_b1_frag_pdl env BITSMITH_FRAGMENT=all BITSMITH_FRAGMENT_PDL=1 \
    python3 benchmarks/decode_e2e.py --batch 1 --formats "${PDL_FORMATS:-fp16,int4_g64+fused+head8,int3_g64+fused+head8,nf4_g64+fused+head8}" \
    --reps 30 --compile --name decode_e2e_b1_frag_pdl
  ;;
order)  # the fragment words block-major against group-major: CUDA tests, then every config in both orders
  TEST_FILES="tests/test_fragment.py" TEST_K=cuda T_TESTS=${T_TESTS:-120} tests_or_stop
  step fragment.txt "${T_FRAG:-330}" "grep -E 'fp16|WRONG'" gluon_fragment_probe_order \
    python3 benchmarks/gluon_fragment_probe.py --orders block,group --shapes "${FRAG_SHAPES:-14336x4096,28672x8192}" \
    --m 1,16 --formats "${FRAG_FORMATS:-int4_g64,int3_g64,nf4_g64}" --reps 10 --name gluon_fragment_probe_order
  ;;
ra_gemm)  # the register-operand GEMM (int4 and NF4: BITSMITH_FRAGMENT_RA_GEMM=1): its tests,
  # every config beside dequantize + cuBLAS
  export BITSMITH_FRAGMENT_RA_GEMM=1
  [ "${TESTS:-1}" = 0 ] || TEST_FILES="tests/test_fragment.py" \
    TEST_K=${TEST_K:-"cuda and ra_gemm"} T_TESTS=${T_TESTS:-200} tests_or_stop
  step configs.txt "${T_CFG:-300}" "grep -E 'fp16|x[0-9]|WRONG|fail'" kernels_configs_ra_gemm \
    python3 benchmarks/kernels_configs.py --layout fragment --m "${RA_MS:-2048}" --formats "${RA_FORMATS:-int4_g64,int4_g128,nf4_g64}" \
    --shapes "${RA_SHAPES:-4096x4096,14336x4096,4096x14336,28672x8192}" --reps 10 --top 8 --name kernels_configs_ra_gemm \
    ${RA_MIN_M:+--ra-min-m "$RA_MIN_M"}
  [ -z "${RA_MID_MS:-}" ] || ra_mid_configs 200 int4_g64,nf4_g64
  ;;
ra_pair)  # the register-operand GEMM with its paired steps: ra_gemm's tests and configs (int4 g64, NF4), the library's
  # M = 2048 table with NF4 offered too (kernels_m2048_ra_pair), then every config at 256 and 512 tokens
  RA_FORMATS=${RA_FORMATS:-int4_g64,nf4_g64} T_CFG=${T_CFG:-220} T_TESTS=${T_TESTS:-150} RA_MID_MS= bash "$0" ra_gemm
  export BITSMITH_FRAGMENT_RA_GEMM=1
  step bench_m2048.txt "${T_BENCH:-150}" "tail -22" kernels_m2048_ra_pair \
    python3 benchmarks/kernels_bench.py --m 2048 --formats int4_g64,int4_g128,int3_g64,nf4_g64 --reps 10 --name kernels_m2048_ra_pair
  ra_mid_configs 90 int4_g64
  ;;
rest_ab)  # the M = 2048 table three times, without a rest after each case's warm-up, with one (--rest 2), without,
  # the SM clock, power and throttle reasons sampled every 100 ms throughout (clocks.csv, run marks in marks.txt);
  # then every config at 256 and 512 tokens (register-operand GEMM offered from 129)
  nvidia-smi --query-gpu=timestamp,clocks.sm,power.draw,clocks_throttle_reasons.active --format=csv,noheader -lms 100 \
    > "$OUT/clocks.csv" 2>&1 &
  smi=$!
  IFS=, read -ra runs <<< "${REST_RUNS:-0 a,2 b,0 c}"
  for run in "${runs[@]}"; do
    set -- $run
    echo "$(date '+%Y/%m/%d %H:%M:%S.%3N') start rest $1 ($2)" >> "$OUT/marks.txt"
    step "bench_rest$1$2.txt" "${T_BENCH:-120}" "grep -E '2048 (fp16|int4|nf4|int3|w8a8 )'" "kernels_m2048_rest$1$2" \
      python3 benchmarks/kernels_bench.py --m 2048 --formats int4_g64,int4_g128,int3_g64,nf4_g64 --reps 10 --rest "$1" \
      --name "kernels_m2048_rest$1$2"
  done
  echo "$(date '+%Y/%m/%d %H:%M:%S.%3N') end" >> "$OUT/marks.txt"
  kill "$smi"
  [ "${MID:-1}" = 0 ] || ra_mid_configs 120 int4_g64,nf4_g64
  ;;
planes)  # NF4's lookup planes in vector registers: the fragment tests, the M = 2048 configs, the M = 1 and 16 table
  RA_FORMATS=${RA_FORMATS:-int4_g64,nf4_g64} TEST_K=cuda T_CFG=${T_CFG:-200} T_TESTS=${T_TESTS:-170} RA_MID_MS= bash "$0" ra_gemm \
    || exit 1
  step bench_m1m16.txt "${T_BENCH:-200}" "grep -E '^ +[0-9]+x[0-9]+ +(1|16) '" kernels_defaults_m1m16_planes \
    python3 benchmarks/kernels_bench.py --shapes 4096x4096,14336x4096,4096x14336,28672x8192 --m 1,16 \
    --formats int4_g64,int4_g128,int3_g64,nf4_g64 --no-w8a8 --reps 20 --name kernels_defaults_m1m16_planes
  ;;
cluster)  # split-K reduced in thread-block clusters: the fragment tests, every M = 1 and 16 config (CL_FORMATS, CL_SHAPES)
  TEST_FILES=tests/test_fragment.py TEST_K=cuda T_TESTS=${T_TESTS:-200} tests_or_stop
  step configs.txt "${T_CFG:-300}" "grep -E 'fp16|x[0-9]|WRONG|fail|best split'" kernels_configs_cluster \
    python3 benchmarks/kernels_configs.py --layout fragment --m "${CL_MS:-1,16}" --formats "${CL_FORMATS:-int4_g64,nf4_g64}" \
    --shapes "${CL_SHAPES:-4096x4096,14336x4096,4096x14336,28672x8192}" --reps 10 --top 3 --name kernels_configs_cluster
  ;;
sum_after)  # split-K partials added up by a second kernel: the fragment tests, every M = 16 config, the M = 1/16 table
  TEST_FILES=tests/test_fragment.py TEST_K=cuda T_TESTS=${T_TESTS:-220} tests_or_stop
  step configs.txt "${T_CFG:-150}" "grep -E 'fp16|WRONG|fail|best split'" kernels_configs_sum_after \
    python3 benchmarks/kernels_configs.py --layout fragment --m "${SA_MS:-16}" --formats "${SA_FORMATS:-int4_g64,nf4_g64}" \
    --shapes "${SA_SHAPES:-4096x4096,14336x4096,4096x14336,28672x8192}" --reps 10 --top 2 --name kernels_configs_sum_after
  step bench_m1m16.txt "${T_BENCH:-200}" "grep -E '^ +[0-9]+x[0-9]+ +(1|16) '" kernels_defaults_m1m16_sum_after \
    python3 benchmarks/kernels_bench.py --shapes 4096x4096,14336x4096,4096x14336,28672x8192 --m "${SA_BENCH_MS:-1,16}" \
    --formats int4_g64,int4_g128,int3_g64,nf4_g64 --no-w8a8 --reps 20 --name kernels_defaults_m1m16_sum_after
  ;;
sum_after_check)  # what the second-kernel ending still waits for: compute-sanitizer over the fragment kernel (the
  # second kernel included), the library's M = 16 table, batch-16 decode
  OUT="$OUT" SAN_ARGS=--fragment T_WARM=${T_WARM:-80} T_SAN=${T_SAN:-170} bash benchmarks/kernels_sanitize.sh | tail -4
  step bench_m16.txt "${T_BENCH:-150}" "grep -E '^ +[0-9]+x[0-9]+ +16 '" kernels_defaults_m16_sum_after \
    python3 benchmarks/kernels_bench.py --shapes 4096x4096,14336x4096,4096x14336,28672x8192 --m 16 \
    --formats int4_g64,int4_g128,int3_g64,nf4_g64 --no-w8a8 --reps 20 --name kernels_defaults_m16_sum_after
  step decode_e2e.txt "${T_E2E:-150}" "tail -5" decode_e2e_b16_sum_after \
    python3 benchmarks/decode_e2e.py --batch 16 --formats fp16,int4_g64,nf4_g64 --reps 20 --name decode_e2e_b16_sum_after
  ;;
zsub)  # zeros (and scales) taken off the fragment kernel's A operand in 16 bits (ZSUB 1, 2) beside the float32 path
  # (0), and the second-kernel ending offered with the 32- and 64-token tiles too: the fragment CUDA tests, then every
  # M = 16 config in all three modes (ZS_MS, ZS_FORMATS, ZS_SHAPES)
  export BITSMITH_FRAGMENT_ZSUB=0,1,2 BITSMITH_FRAGMENT_SUM_TOKENS=16,32,64 BITSMITH_FRAGMENT_SIXTEENTHS=${BITSMITH_FRAGMENT_SIXTEENTHS:-0}
  TEST_FILES=tests/test_fragment.py TEST_K="${TEST_K:-cuda and (zsub or every_config or wide or cluster_sum or wgmma)}" \
    T_TESTS=${T_TESTS:-200} tests_or_stop
  step configs.txt "${T_CFG:-330}" "grep -E 'fp16|WRONG|fail|best'" kernels_configs_zsub \
    python3 benchmarks/kernels_configs.py --layout fragment --m "${ZS_MS:-16}" --formats "${ZS_FORMATS:-int4_g64,nf4_g64}" \
    --shapes "${ZS_SHAPES:-14336x4096,4096x14336,28672x8192}" --reps 10 --top 2 --name kernels_configs_zsub
  ;;
zsub_wide)  # zsub's configs at 32 and 64 tokens (int4 g64), compute-sanitizer over the fragment kernel (ZSUB and the
  # second kernel included), then the library's table at 16 tokens with every mode offered to its tuner (ZS_BENCH_MS)
  export BITSMITH_FRAGMENT_ZSUB=${BITSMITH_FRAGMENT_ZSUB:-0,1,2} BITSMITH_FRAGMENT_SUM_TOKENS=${BITSMITH_FRAGMENT_SUM_TOKENS:-16,32,64}
  export BITSMITH_FRAGMENT_SIXTEENTHS=${BITSMITH_FRAGMENT_SIXTEENTHS:-0}
  step configs.txt "${T_CFG:-150}" "grep -E 'fp16|WRONG|fail|best'" kernels_configs_zsub_wide \
    python3 benchmarks/kernels_configs.py --layout fragment --m "${ZS_MS:-32,64}" --formats "${ZS_FORMATS:-int4_g64}" \
    --shapes "${ZS_SHAPES:-14336x4096,28672x8192}" --reps 10 --top 2 --name kernels_configs_zsub_wide
  OUT="$OUT" SAN_ARGS=--fragment T_WARM=${T_WARM:-80} T_SAN=${T_SAN:-170} bash benchmarks/kernels_sanitize.sh | tail -4
  step bench.txt "${T_BENCH:-150}" "grep -E '^ +[0-9]+x[0-9]+ +[0-9]+ '" kernels_defaults_zsub \
    python3 benchmarks/kernels_bench.py --shapes 4096x4096,14336x4096,4096x14336,28672x8192 --m "${ZS_BENCH_MS:-16}" \
    --formats int4_g64,int4_g128,int3_g64,nf4_g64 --no-w8a8 --reps 20 --name kernels_defaults_zsub
  ;;
sixteenths)  # int4 converted in sixteenths (BITSMITH_FRAGMENT_SIXTEENTHS=1) against the shifted codes: every ZSUB 1
  # and 2 config at 16 and 64 tokens (SX_MS, SX_SHAPES), once each way, paired by config in kernels_configs' JSONs
  export BITSMITH_FRAGMENT_ZSUB=1,2
  for sx in 0 1; do
    step "configs_sixteenths$sx.txt" "${T_CFG:-140}" "grep -E 'fp16|WRONG|fail|best'" "kernels_configs_sixteenths$sx" \
      env BITSMITH_FRAGMENT_SIXTEENTHS=$sx python3 benchmarks/kernels_configs.py --layout fragment --m "${SX_MS:-16,64}" \
      --formats int4_g64 --shapes "${SX_SHAPES:-14336x4096,28672x8192}" --reps 10 --top 2 --name "kernels_configs_sixteenths$sx"
  done
  ;;
pattern)  # where the fragment kernel's M = 1 time goes, by subtraction (fragment_pattern_probe.py)
  step pattern.txt "${T_PATTERN:-150}" cat fragment_pattern_probe \
    python3 benchmarks/fragment_pattern_probe.py --shapes "${PATTERN_SHAPES:-14336x4096,4096x14336,28672x8192}" \
    --m "${PATTERN_MS:-1}" --reps 20
  ;;
ra_ncu)  # Nsight Compute on the register-operand GEMM (RA_TILE: the probe's --tile), its SASS with stall samples
  ncu_step ncu_ra_gemm.txt "${T_NCU:-200}" "grep -E '^  [a-zA-Z_].*\\(|Duration|Compute \\(SM\\) Throughput|L1/TEX Cache|highest-utilized' | head -40" \
    --set full --import-source yes -o "$OUT/ra_gemm" -k "regex:_ra_gemm_kernel" -c 1 \
    python3 benchmarks/ws_gemm_ncu_probe.py --tile "${RA_TILE:-256x128x4x2x1}" --shapes "${RA_SHAPES:-4096x4096}" \
    --formats "${RA_FORMATS:-int4_g64}"
  ncu -i "$OUT/ra_gemm.ncu-rep" --page source --csv --print-source sass > "$OUT/ra_gemm_sass.csv" 2>&1
  ;;
wide)  # the wide Gluon tiles and the wgmma kernel: tests, then M = 16..128 in both layouts
  TEST_FILES=tests/test_fragment.py TEST_K="cuda and (wide or gemm or wgmma)" T_TESTS=${T_TESTS:-180} tests_or_stop
  for lay in all 0; do
    step kernels_wide.txt "${T_BENCH:-170}" "grep -E '^ +[0-9]+x[0-9]+ +[0-9]+ [a-z]'" "kernels_wide_layout_$lay" env BITSMITH_FRAGMENT=$lay \
      python3 benchmarks/kernels_bench.py --shapes "${WIDE_SHAPES:-14336x4096,28672x8192}" --m "${WIDE_MS:-16,32,64,128}" \
      --formats int4_g64,int3_g64,nf4_g64 --no-w8a8 --reps 20 --name "kernels_wide_layout_$lay"
  done
  ;;
suite)  # every CUDA test, this release's defaults, the Gluon W8A8 GEMM and W8A8's PDL switched on
  export BITSMITH_W8A8_WGMMA=1 BITSMITH_W8A8_PDL=1
  TEST_FILES=${TEST_FILES:-"tests/test_cuda.py tests/test_siblings.py tests/test_compile.py tests/test_fragment.py tests/test_svdquant.py tests/test_kernels.py tests/test_w8a8.py"} \
    T_TESTS=${T_TESTS:-500} cuda_tests
  ;;
w8a8)  # W8A8 at M = 2048, part by part (W8A8_TMA=1: the W8A8 CUDA tests first, and the Gluon GEMM timed too)
  if [ "${W8A8_TMA:-0}" = 1 ]; then
    export BITSMITH_W8A8_WGMMA=1
    TEST_FILES=tests/test_kernels.py TEST_K="cuda and w8a8" T_TESTS=${T_TESTS:-120} tests_or_stop
  fi
  echo "BITSMITH_W8A8_WGMMA=${BITSMITH_W8A8_WGMMA-unset} BITSMITH_W8A8_PDL=${BITSMITH_W8A8_PDL-unset}" >> "$OUT/w8a8.txt"
  step w8a8.txt "${T_W8A8:-200}" cat w8a8_probe_m2048 \
    python3 benchmarks/w8a8_probe.py --m 2048 --reps 20 --overlap 2,4 --name w8a8_probe_m2048
  ;;
w8a8_check)  # W8A8's CUDA tests (TESTS=0: none), the sanitizer, the README's M = 2048 table
  [ "${TESTS:-1}" = 0 ] || tests_or_stop w8a8_tests "cuda and w8a8" 120
  OUT="$OUT" T_WARM=${T_WARM:-100} T_SAN=${T_SAN:-220} bash benchmarks/kernels_sanitize.sh | tail -4
  m2048_table 24
  ;;
gluon)  # the warp-specialized Gluon W8A8 GEMM: CUDA tests (both schedules), compute-sanitizer with it, every config timed
  tests_or_stop w8a8_tests "cuda and w8a8" 150
  BITSMITH_W8A8_WGMMA=1 OUT="$OUT" T_WARM=${T_WARM:-100} T_SAN=${T_SAN:-200} bash benchmarks/kernels_sanitize.sh | tail -4
  step variants.txt "${T_VAR:-150}" cat w8a8_variants_gluon \
    python3 benchmarks/w8a8_variants.py --shapes 4096x4096,14336x4096 --warps 8 --reps 20 --name w8a8_variants_gluon
  ;;
pingpong)  # the Gluon GEMM's ping-pong schedule in the tuner: W8A8 part by part at M = 2048 on the four shapes, the
  # README's M = 2048 table, then Nsight Compute on the per-token quantization (4096x4096)
  w8a8_m2048 pingpong
  ncu_step ncu_quant.txt "${T_NCU:-120}" "grep -E 'Duration|Throughput|Issue Slots|Warp Cycles Per Issued|No Eligible|Achieved Occupancy|Registers Per|Waves|Stall' | head -30" \
    --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats --section SchedulerStats --section Occupancy \
    --section LaunchStats -k regex:_quant_rows_kernel -c 1 python3 benchmarks/w8a8_variants.py --shapes 4096x4096 --warps 8 --no-wgmma --reps 2 --name ncu_tmp
  ;;
cvt)  # the quantization's one-instruction conversion (CVT_RNI): W8A8's CUDA tests, then the quantization alone
  # (4, 8 and 16 warps, either conversion; a 32-register cap at 8 warps spills, compiled for sm_90), W8A8 part by part at M = 2048 on the four
  # shapes and the README's M = 2048 table, both with BITSMITH_W8A8_CVT=1 (the CUDA tests run both conversions)
  tests_or_stop w8a8_tests "cuda and w8a8 and not every_config" 120
  step variants.txt "${T_VAR:-120}" "grep -v '^  tma'" w8a8_quant_cvt \
    python3 benchmarks/w8a8_variants.py --shapes 4096x4096,4096x14336 --warps 4,8,16 --cvt 1,0 --quant-only --reps 20 --name w8a8_quant_cvt
  BITSMITH_W8A8_CVT=1 w8a8_m2048 cvt
  ;;
k256)  # the int8 GEMM with 256-wide K steps (eight wgmma a warpgroup between waits, two stages) beside the library's
  # 4096x4096 pick, then the SM clock and power under back-to-back matmuls (as run at bf3e625 its first part also timed
  # the persistent quantization, since removed: w8a8_quant_persist_h100.txt)
  # the SM clock, power and throttle reasons every 50 ms while the GEMMs run: is a compute-bound int8 GEMM power-capped?
  nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.max.sm,power.draw,power.limit,clocks_throttle_reasons.active \
    --format=csv -lms 50 > "$OUT/clocks_k256.csv" 2>&1 &
  SMI=$!
  step k256.txt "${T_K256:-240}" cat w8a8_variants_k256 python3 benchmarks/w8a8_variants.py --shapes 4096x4096 --warps 8 --no-wgmma \
    --tma 'x256 w,128x256x128 w8 s4 g8 persistent' --reps 20 --name w8a8_variants_k256
  kill "$SMI" 2>/dev/null
  step clocks.txt 60 cat gpu_clocks_probe python3 benchmarks/gpu_clocks_probe.py --shape 4096x4096 --m 2048 --seconds 2
  ;;
evict)  # the quantization's activations loaded evict_first and codes stored evict_last (w8a8.QUANT_CACHE), off/on
  [ "${TESTS:-1}" = 0 ] || tests_or_stop w8a8_tests "cuda and w8a8 and not every_config" "${T_TESTS:-150}"
  for shape in 4096x4096 14336x4096; do
    step evict.txt "${T_PROBE:-120}" cat "w8a8_switch_probe_$shape" \
      python3 benchmarks/w8a8_switch_probe.py --shape "$shape" --m 2048 --rounds 3 --name "w8a8_switch_probe_$shape"
  done
  ;;
ceiling)  # the read ceiling: the stacked layer's M = 1 matmuls vs a kernel that only reads the same bytes, one graph each
  TEST_FILES=tests/test_kernels.py TEST_K=read_kernel T_TESTS=${T_TESTS:-60} tests_or_stop
  step chain.txt "${T_CHAIN:-200}" "tail -12" kernels_chain_ceiling python3 benchmarks/kernels_chain.py --m 1 --layers 8 --stacked \
    --read-ceiling --formats int4_g64,nf4_g64,int3_g64 --name kernels_chain_ceiling
  ;;
tc)  # the tensor-core kernel's wider search at M = 16 (warps, tiles, stages, register cap)
  step tc.txt "${T_CFG:-330}" "grep -v '^  fail' | tail -60" kernels_configs_tc_m16 \
    python3 benchmarks/kernels_configs.py --m 16 --tc-sweep --formats int4_g64,nf4_g64 --reps 10 --top 5 --name kernels_configs_tc_m16
  ;;
sanitize)  # compute-sanitizer memcheck over every kernel
  OUT="$OUT" bash benchmarks/kernels_sanitize.sh
  ;;
bench)
  SKIP_TESTS=1 BENCH_ARGS="--m 1,16 --reps 20" BENCH_NAME=kernels_h100_m1v2 T_BENCH=${T_BENCH:-300} bash benchmarks/kernels_gpu_run.sh
  ;;
*)
  echo "unknown mode '$1': see the list at the top of $0" >&2; exit 2
  ;;
esac
