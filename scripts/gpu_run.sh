#!/usr/bin/env bash
# The one command for a GPU machine: build the extension in place, run the test suite, run
# compute-sanitizer over the CUDA backend, run the low-rank, int8 and attention benchmark sweeps.
#
#   bash scripts/gpu_run.sh [OUT_DIR]        (default: $OUT, else ./gpu-out)
#
# Uses the machine's own python3 with torch/triton/ninja/pytest preinstalled: no venv, no pip
# downloads. Writes to OUT_DIR: summary.txt, build.log, tests.log, tests-junit.xml,
# sanitizer.log, bench.log, bench-int8.log, bench-attn.log and
# results/{lowrank,int8,attn}-<gpu>.{csv,svg}.
# Every step runs even after an earlier one failed; the exit status is 0 only if all passed.
# The whole run keeps inside GPU_RUN_BUDGET_S seconds (default 560): each step gets a time
# limit that leaves room for the steps after it; each benchmark stops starting new shapes when
# its time is nearly up and still writes the rows it has (the low-rank sweep gets a third of the
# time left for benchmarks, the int8 sweep half of what is then left, the attention sweep the
# rest).
#
# Environment knobs: PYTHON, GPU_RUN_BUDGET_S, TORCH_CUDA_ARCH_LIST (default 9.0a), MAX_JOBS,
# CUDA_HOME (default /usr/local/cuda), BENCH_ARGS (extra arguments for bench/lowrank.py),
# BENCH_INT8_ARGS (extra arguments for bench/int8.py), BENCH_ATTN_ARGS (for bench/attn.py),
# SANITIZER_TOOLS (default "memcheck racecheck synccheck").
set -u
set -o pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT_DIR="${1:-${OUT:-./gpu-out}}"
mkdir -p "$OUT_DIR" || exit 2
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
cd "$ROOT" || exit 2

PY="${PYTHON:-python3}"
BUDGET_S="${GPU_RUN_BUDGET_S:-560}"
SUMMARY_FILE="$OUT_DIR/summary.txt"
START_S=$SECONDS
FAILED=0
RESULTS=()

unset TRITON_INTERPRET LRKERNELS_BACKEND
export PYTHONUNBUFFERED=1
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
export LRKERNELS_BUILD_CUDA=1
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0a}"
export MAX_JOBS="${MAX_JOBS:-16}"
export PATH="$CUDA_HOME/bin:$PATH"

remaining() { echo $((BUDGET_S - (SECONDS - START_S))); }

record() { # record STATUS NAME SECONDS DETAIL
  RESULTS+=("$(printf '%-5s %-22s %5ss  %s' "$1" "$2" "$3" "$4")")
  if [ "$1" = FAIL ]; then FAILED=1; fi
}

# run_step NAME LOG CAP_S RESERVE_S SHOW cmd...: run cmd with a time limit of CAP_S seconds, or
# less so that RESERVE_S seconds stay for the later steps; append its output to LOG and, when
# SHOW is "all", echo it too (else only its last lines).
run_step() {
  local name=$1 log=$2 cap=$3 reserve=$4 show=$5
  shift 5
  local limit rc t0
  limit=$(($(remaining) - reserve))
  if [ "$limit" -gt "$cap" ]; then limit=$cap; fi
  if [ "$limit" -lt 15 ]; then
    echo "=== $name: skipped, time budget spent" | tee -a "$log"
    record FAIL "$name" 0 "not run: time budget spent"
    return 1
  fi
  echo
  echo "=== $name (time limit ${limit}s) -> $log"
  echo "=== $name: $*" >>"$log"
  t0=$SECONDS
  if [ "$show" = all ]; then
    timeout --kill-after=15 "$limit" "$@" 2>&1 | tee -a "$log"
    rc=$?
  else
    timeout --kill-after=15 "$limit" "$@" >>"$log" 2>&1
    rc=$?
    tail -n 25 "$log"
  fi
  if [ "$rc" -eq 0 ]; then
    record PASS "$name" $((SECONDS - t0)) "$log"
  elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    record FAIL "$name" $((SECONDS - t0)) "timed out after ${limit}s; $log"
  else
    record FAIL "$name" $((SECONDS - t0)) "exit $rc; $log"
  fi
  return "$rc"
}

# ---------------------------------------------------------------------------- environment
{
  echo "gpu_run.sh at $(date -u +%Y-%m-%dT%H:%M:%SZ) in $ROOT"
  echo "git: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)" \
    "$( [ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ] && echo '(dirty)')"
  nvidia-smi || echo "nvidia-smi failed"
  nvcc --version 2>&1 | tail -n 2 || echo "nvcc not found"
  "$PY" - <<'EOF' 2>&1
import platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
try:
    import triton
    print("triton", triton.__version__)
except ImportError as e:
    print("triton: not importable:", e)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, f"sm_{p.major}{p.minor}", p.multi_processor_count, "SMs",
          f"{p.total_memory / 2**30:.0f} GiB")
else:
    print("torch sees no CUDA device")
EOF
} 2>&1 | tee "$SUMMARY_FILE"

SITE="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' 2>/dev/null)"
if [ -n "$SITE" ] && [ -d "$SITE/nvidia/cu13/include" ]; then
  export CPATH="$SITE/nvidia/cu13/include${CPATH:+:$CPATH}"
fi

# ---------------------------------------------------------------------------- build
# reserve: tests 90 s, sanitizer 60 s, benchmark 150 s
run_step build "$OUT_DIR/build.log" 300 300 tail \
  "$PY" setup.py build_ext --inplace
run_step backends "$OUT_DIR/build.log" 60 300 all \
  "$PY" -c 'import lrkernels, sys
b = lrkernels.available_backends(); print(b)
sys.exit(0 if b["cuda"] is None and b["triton"] is None else "cuda/triton backend unavailable")'

# ---------------------------------------------------------------------------- tests
run_step tests "$OUT_DIR/tests.log" 150 210 tail \
  "$PY" -m pytest -q -p no:cacheprovider tests --junitxml="$OUT_DIR/tests-junit.xml"

# ---------------------------------------------------------------------------- sanitizer
SANITIZER="$(command -v compute-sanitizer || echo "$CUDA_HOME/bin/compute-sanitizer")"
if [ -x "$SANITIZER" ]; then
  for tool in ${SANITIZER_TOOLS:-memcheck racecheck synccheck}; do
    # memcheck: without torch's caching allocator every tensor is its own allocation, so an
    # out-of-bounds access is not hidden inside a larger cached block.
    nocache=0
    if [ "$tool" = memcheck ]; then nocache=1; fi
    run_step "sanitizer-$tool" "$OUT_DIR/sanitizer.log" 75 150 tail \
      env PYTORCH_NO_CUDA_MEMORY_CACHING="$nocache" \
      "$SANITIZER" --tool "$tool" --error-exitcode 1 --print-limit 20 \
      "$PY" scripts/sanitize_lowrank.py
    run_step "sanitizer-$tool-int8-attn" "$OUT_DIR/sanitizer.log" 90 150 tail \
      env PYTORCH_NO_CUDA_MEMORY_CACHING="$nocache" \
      "$SANITIZER" --tool "$tool" --error-exitcode 1 --print-limit 20 \
      "$PY" scripts/sanitize_int8_attention.py
  done
else
  echo "compute-sanitizer not found" | tee -a "$OUT_DIR/sanitizer.log"
  record SKIP sanitizer 0 "compute-sanitizer not found"
fi

# ---------------------------------------------------------------------------- benchmarks
# The low-rank sweep gets a third of the time left, the int8 sweep half of what is then left,
# the attention sweep the rest (each gets more when the ones before it end early).
bench_limit=$((($(remaining) - 5) / 3))
bench_sweep_s=$((bench_limit - 40))  # leave time for the shape in flight and the report
if [ "$bench_sweep_s" -lt 10 ]; then bench_sweep_s=10; fi
# shellcheck disable=SC2086 # BENCH_ARGS is a list of words on purpose
run_step bench "$OUT_DIR/bench.log" "$bench_limit" 5 all \
  "$PY" bench/lowrank.py --out "$OUT_DIR/results" --max-seconds "$bench_sweep_s" \
  ${BENCH_ARGS:-}

int8_limit=$((($(remaining) - 5) / 2))
int8_sweep_s=$((int8_limit - 40))  # leave time for the shape in flight and the report
if [ "$int8_sweep_s" -lt 10 ]; then int8_sweep_s=10; fi
# shellcheck disable=SC2086 # BENCH_INT8_ARGS is a list of words on purpose
run_step bench-int8 "$OUT_DIR/bench-int8.log" "$int8_limit" 5 all \
  "$PY" bench/int8.py --out "$OUT_DIR/results" --max-seconds "$int8_sweep_s" \
  ${BENCH_INT8_ARGS:-}

attn_limit=$(($(remaining) - 5))
# an attention problem in flight can take a while (FlexAttention compiles, the float32
# reference, three passes): leave it more room
attn_sweep_s=$((attn_limit - 60))
if [ "$attn_sweep_s" -lt 10 ]; then attn_sweep_s=10; fi
# shellcheck disable=SC2086 # BENCH_ATTN_ARGS is a list of words on purpose
run_step bench-attn "$OUT_DIR/bench-attn.log" "$attn_limit" 5 all \
  "$PY" bench/attn.py --out "$OUT_DIR/results" --max-seconds "$attn_sweep_s" \
  ${BENCH_ATTN_ARGS:-}

# ---------------------------------------------------------------------------- summary
{
  echo
  echo "=== summary ($((SECONDS - START_S))s of ${BUDGET_S}s budget)"
  printf '%s\n' "${RESULTS[@]}"
  if [ -f "$OUT_DIR/tests.log" ]; then
    echo "tests: $(grep -E '(passed|failed|error)' "$OUT_DIR/tests.log" | tail -n 1)"
  fi
  grep -hE '^ *lrkernels-.*(PASS|MISS)$' "$OUT_DIR/bench.log" "$OUT_DIR/bench-int8.log" \
    "$OUT_DIR/bench-attn.log" 2>/dev/null
  if [ "$FAILED" -eq 0 ]; then echo "ALL STEPS PASSED"; else echo "SOME STEPS FAILED"; fi
} 2>&1 | tee -a "$SUMMARY_FILE"
exit "$FAILED"
