#!/usr/bin/env bash
# One command for a fresh GPU machine with no network, run from the repository root:
#
#     benchmarks/gpu_check.sh OUT_DIR            # build, compiled tests, sanitizers, benchmark
#     RMK_CHECK_STEPS="build tests" benchmarks/gpu_check.sh OUT_DIR   # a subset
#
# It uses the machine's own python3 / torch / triton (the repository's pinned CPU torch
# and its venv are not for that machine) and writes every log under OUT_DIR, then prints
# a summary table (also OUT_DIR/summary.txt). The whole run is planned to fit one
# 10-minute command; each step has its own timeout (seconds, overridable):
#
#   step      timeout  what
#   env            15  GPU, driver, torch / triton versions (env.txt)
#   build         180  pip install --no-build-isolation --no-deps --no-index -e . (build.log),
#                      nvcc --threads 0; cuobjdump -res-usage (res_usage.txt)
#   tests         140  CUDA and Triton kernel tests with TRITON_INTERPRET=0 (pytest.log,
#                      junit.xml); fails unless pytest's header says the kernels were compiled
#   split          70  the CUDA kernel tests again with RMK_CUDA_SPLIT_ELEMS=0: the split
#                      selection on every matrix (pytest_split.log, junit_split.xml)
#   sanitize       85  compute-sanitizer memcheck, racecheck, synccheck, initcheck on a small
#                      merge (benchmarks/gpu_sanitize_case.py: one-block and split selection),
#                      PYTORCH_NO_CUDA_MEMORY_CACHING=1, --error-exitcode (sanitize.log)
#   bench          80  benchmarks/gpu_bench.py, llava-7b T = 8 and 32, bf16 and fp32 (bench.log,
#                      gpu_bench.csv)
#                 ---
#                 570  worst case, under the 600 s a device command may run
#
# Exit status: 0 when every step that ran passed.
set -u -o pipefail

OUT=${1:?usage: benchmarks/gpu_check.sh OUT_DIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
STEPS=${RMK_CHECK_STEPS:-env build tests split sanitize bench}
T_ENV=${RMK_T_ENV:-15} T_BUILD=${RMK_T_BUILD:-180} T_TESTS=${RMK_T_TESTS:-140} T_SPLIT=${RMK_T_SPLIT:-70}
T_SANITIZE=${RMK_T_SANITIZE:-85} T_BENCH=${RMK_T_BENCH:-80}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PIP_NO_INDEX=1 TRITON_INTERPRET=0
START=$SECONDS
SUMMARY=()
FAILED=0

record() {  # step, status, seconds, log
  SUMMARY+=("$(printf '%-9s %-7s %5ss  %s' "$1" "$2" "$3" "$4")")
  [ "$2" = ok ] || FAILED=1
}

run_step() {  # name, timeout, log, command...
  local name=$1 limit=$2 log=$3 t0=$SECONDS rc
  shift 3
  echo "== $name (timeout ${limit}s) -> $log"
  timeout --kill-after=10 "$limit" "$@" > "$OUT/$log" 2>&1
  rc=$?
  local status=ok
  [ $rc -eq 124 ] || [ $rc -eq 137 ] && status=timeout
  [ $rc -ne 0 ] && [ $status = ok ] && status="rc=$rc"
  record "$name" "$status" $((SECONDS - t0)) "$log"
  tail -3 "$OUT/$log"
  return $rc
}

want() { [[ " $STEPS " == *" $1 "* ]]; }

if want env; then
  run_step env "$T_ENV" env.txt bash -c "nvidia-smi -L; nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total --format=csv; \
    $PY -c 'import torch, triton; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"triton\", triton.__version__); print(\"capability\", torch.cuda.get_device_capability())'; \
    nvcc --version | tail -2; command -v compute-sanitizer"
fi

if want build; then
  # The default architectures (80-real, 86-real, 90: tests/test_cuda_backend.py checks the
  # list), compiled in parallel by nvcc (--threads 0) on all cores.
  export RMK_CMAKE_ARGS="${RMK_CMAKE_ARGS:--DCMAKE_CUDA_FLAGS=--threads=0}"
  export RMK_BUILD_JOBS=${RMK_BUILD_JOBS:-$(nproc)}
  if run_step build "$T_BUILD" build.log $PY -m pip install --no-build-isolation --no-deps --no-index -e .; then
    SO=$(ls robustmerge_kernels/_cuda*.so 2>/dev/null | head -1)
    if [ -n "$SO" ]; then cuobjdump -res-usage "$SO" > "$OUT/res_usage.txt" 2>&1 || true; fi
    $PY -c 'from robustmerge_kernels import _cuda; print("ARCHITECTURES", _cuda.ARCHITECTURES, "devices", _cuda.device_count())' \
      >> "$OUT/build.log" 2>&1 || { record build-check "no _cuda" 0 build.log; }
  fi
fi

gpu_skips() {  # step, log: GPU tests that skipped on a GPU machine fail the check
  if grep -q "SKIPPED.*\(no CUDA device\|backend unavailable\|not built\)" "$OUT/$2"; then
    record "$1-skips" "skipped" 0 "$2 (GPU tests skipped on a GPU machine)"
  fi
}

if want tests; then
  TESTS="tests/test_cuda_backend.py tests/test_cuda_split.py tests/test_triton_backend.py tests/test_triton_modes.py tests/test_gpu_host.py"
  [ -f tests/test_kernels.py ] && TESTS="$TESTS tests/test_kernels.py"
  run_step tests "$T_TESTS" pytest.log $PY -m pytest -q -rs -p no:cacheprovider $TESTS --junitxml="$OUT/junit.xml"
  if ! grep -q "triton kernels: compiled" "$OUT/pytest.log"; then
    record tests-mode "interp" 0 "pytest.log (header does not say compiled)"
  fi
  gpu_skips tests pytest.log
fi

if want split; then
  # Every CUDA test with the split selection forced on every matrix (one slice or several),
  # so both selection paths are proven against the reference and the cpu kernel.
  run_step split "$T_SPLIT" pytest_split.log env RMK_CUDA_SPLIT_ELEMS=0 $PY -m pytest -q -rs -p no:cacheprovider \
    tests/test_cuda_backend.py tests/test_cuda_split.py tests/test_kernels.py -k cuda --junitxml="$OUT/junit_split.xml"
  gpu_skips split pytest_split.log
fi

if want sanitize; then
  san() {
    export PYTORCH_NO_CUDA_MEMORY_CACHING=1
    local rc=0
    for tool in memcheck racecheck synccheck initcheck; do
      for backend in ${RMK_SANITIZE_BACKENDS:-cuda}; do
        timeout 60 compute-sanitizer --tool "$tool" --error-exitcode 9 --print-limit 50 \
          $PY benchmarks/gpu_sanitize_case.py --backend "$backend"
        local r=$?
        echo "$tool $backend rc=$r"
        [ $r -eq 0 ] || rc=1
      done
    done
    return $rc
  }
  export -f san
  export PY
  run_step sanitize "$T_SANITIZE" sanitize.log bash -c san
fi

if want bench; then
  run_step bench "$T_BENCH" bench.log bash -c "$PY benchmarks/gpu_bench.py --cases llava-7b:8:bf16,llava-7b:8:fp32 \
      --rounds 5 --out '$OUT/gpu_bench.csv' && $PY benchmarks/gpu_bench.py --cases llava-7b:32:bf16,llava-7b:32:fp32 \
      --rounds 3 --no-reference --out '$OUT/gpu_bench_t32.csv'"
fi

{
  echo "gpu_check summary ($((SECONDS - START)) s in all; logs in $OUT)"
  printf '%-9s %-7s %6s  %s\n' step status time log
  for line in "${SUMMARY[@]}"; do echo "$line"; done
  if [ -f "$OUT/bench.log" ]; then
    echo
    echo "benchmark (median; ratio to a flat device copy of the same bytes):"
    grep -E "^\S|copy-flat|read-flat|:gpu|:call|^  (cuda|triton) " "$OUT/bench.log" | grep -v "^GPU:" || true
  fi
} | tee "$OUT/summary.txt"
exit $FAILED
