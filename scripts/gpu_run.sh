#!/usr/bin/env bash
# The one call on a GPU machine, built around its budget: at most 9 minutes on a 16-core H200
# with the machine's own python3 (torch 2.11 + triton 3.6 there; nothing is installed), and at
# most 8 files of 16 MiB come back. Everything goes into ONE archive plus summary.txt:
#
#   bash scripts/gpu_run.sh [OUT_DIR]             (default: $OUT, else ./gpu-out)
#   bash scripts/gpu_run.sh --dry-run [OUT_DIR]   every step's CPU path, small: CI runs it
#
#   OUT_DIR/summary.txt      device, versions, commit, each step's status and time, the
#                            headline rows with PASS/MISS against the goals of issues 8-11
#   OUT_DIR/gpu_run.tar.gz   gpu_run/: summary.txt, the logs, results/*.csv|svg,
#                            tests-*.xml, headline.txt, dispatch_table.json (+ .txt)
#
# Steps, in order, each time-boxed (a step never eats the time the steps after it reserve):
#   1. build      the extension for the visible GPU's architecture only (MAX_JOBS=16)
#   2. headline   bench/{lowrank,int8,lora,attn}.py --headline: the shapes the goals name, each
#                 checked before timing in seconds (float64/float32 reference on a spread of rows
#                 or on the first heads, and lrkernels-cuda vs lrkernels-triton on everything)
#   3. correct    in parallel: the GPU tests (pytest -m gpu, one process per family, -x, each
#                 time-boxed) and compute-sanitizer memcheck and racecheck restricted to this
#                 library's kernels (--kernel-name), on tiny shapes (scripts/sanitize.py)
#   4. sweeps     the four full benchmark sweeps with the time left (LoRA's a small share)
#   5. table      the dispatch table every benchmark step merged its rows into, printed
# The archive and summary are rewritten after every step, so a run cut short still returns them.
# Exit status 0 only if every step passed.
#
# The copy of the tree on the GPU machine has no .git: pass the commit, e.g.
#   LRKERNELS_COMMIT=$(git rev-parse --short HEAD) (computed here, written literally there).
# Knobs: PYTHON (default python3), GPU_RUN_BUDGET_S (default 540), TORCH_CUDA_ARCH_LIST (default:
# the visible GPU's), MAX_JOBS (16), CUDA_HOME (/usr/local/cuda), BENCH_ARGS / BENCH_INT8_ARGS /
# BENCH_LORA_ARGS / BENCH_ATTN_ARGS (more arguments for the sweeps), SANITIZER_TOOLS
# ("memcheck racecheck").
set -u
set -o pipefail

DRY=0
if [ "${1:-}" = --dry-run ]; then
  DRY=1
  shift
fi
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT_DIR="${1:-${OUT:-./gpu-out}}"
mkdir -p "$OUT_DIR" || exit 2
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
cd "$ROOT" || exit 2

PY="${PYTHON:-python3}"
# The dry run's steps are small (CI: a minute or two); its limits only stop a hang
if [ "$DRY" = 1 ]; then BUDGET_S="${GPU_RUN_BUDGET_S:-3600}"; else BUDGET_S="${GPU_RUN_BUDGET_S:-540}"; fi
WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu_run.XXXXXX")" || exit 2
RES="$WORK/gpu_run"  # the archive's one folder
mkdir -p "$RES/results"
START_S=$SECONDS
FAILED=0
STEPS=()

unset TRITON_INTERPRET LRKERNELS_BACKEND LRKERNELS_DISPATCH_TABLE
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
export MAX_JOBS="${MAX_JOBS:-16}"
export PATH="$CUDA_HOME/bin:$PATH"
export LRKERNELS_BENCH_OUT="$RES/results"
if [ -z "${LRKERNELS_COMMIT:-}" ]; then
  LRKERNELS_COMMIT="$(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  if [ "$LRKERNELS_COMMIT" != unknown ]; then
    LRKERNELS_DIRTY=False
    if [ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ]; then
      LRKERNELS_DIRTY=True
    fi
    export LRKERNELS_DIRTY
  fi
fi
export LRKERNELS_COMMIT  # the benchmarks stamp their rows and the dispatch table with it

remaining() { echo $((BUDGET_S - (SECONDS - START_S))); }

# a benchmark's --max-seconds: its step's limit less SLACK for the shape in flight (>= 5)
bench_seconds() {
  local s=$(($1 - $2))
  if [ "$s" -lt 5 ]; then s=5; fi
  echo "$s"
}

# the time a step may take: CAP, or less so that RESERVE seconds stay for the steps after it
limit_for() {
  local cap=$1 reserve=$2 left
  if [ "$DRY" = 1 ]; then cap=600 reserve=0; fi  # the GPU's caps mean nothing on a CPU
  left=$(($(remaining) - reserve))
  if [ "$left" -lt "$cap" ]; then echo "$left"; else echo "$cap"; fi
}

record() { # record STATUS NAME SECONDS DETAIL
  STEPS+=("$(printf '%-5s %-24s %5ss  %s' "$1" "$2" "$3" "$4")")
  if [ "$1" = FAIL ]; then FAILED=1; fi
}

status_of() { # status_of RC LIMIT -> "PASS" / "FAIL: why"
  case "$1" in
    0) echo PASS ;;
    124 | 137) echo "FAIL: timed out after ${2}s" ;;
    *) echo "FAIL: exit $1" ;;
  esac
}

detail() { # detail LOG STATUS -> "LOG" or "LOG; why"
  case "$2" in
    *:*) echo "$1;${2#*:}" ;;
    *) echo "$1" ;;
  esac
}

# run_step NAME LOG CAP RESERVE cmd...: one time-boxed step, its output in LOG (tail shown)
run_step() {
  local name=$1 log=$2 cap=$3 reserve=$4
  shift 4
  local limit rc t0 st
  limit=$(limit_for "$cap" "$reserve")
  if [ "$limit" -lt 10 ]; then
    echo "=== $name: not run, the time budget is spent" | tee -a "$RES/$log"
    record FAIL "$name" 0 "not run: time budget spent"
    snapshot
    return 1
  fi
  echo
  echo "=== $name (limit ${limit}s) -> $log: $*" | tee -a "$RES/$log"
  t0=$SECONDS
  timeout --kill-after=10 "$limit" "$@" >>"$RES/$log" 2>&1
  rc=$?
  tail -n 15 "$RES/$log"
  st=$(status_of "$rc" "$limit")
  record "${st%%:*}" "$name" $((SECONDS - t0)) "$(detail "$log" "$st")"
  snapshot
  return "$rc"
}

# ---------------------------------------------------------------------------- summary, archive

summary() {
  {
    cat "$RES/env.txt" 2>/dev/null
    echo
    echo "=== steps ($((SECONDS - START_S))s of a ${BUDGET_S}s budget)"
    printf '%s\n' "${STEPS[@]}"
    echo
    echo "=== tests (pytest -m gpu, per family)"
    for f in "$RES"/tests-*.log; do
      [ -f "$f" ] || continue
      printf '%-28s %s\n' "$(basename "$f")" "$(grep -E '(passed|failed|error|selected|no tests)' "$f" | tail -n 1)"
    done
    echo
    echo "=== compute-sanitizer"
    for f in "$RES"/sanitizer-*.log; do
      [ -f "$f" ] || continue
      printf '%-28s %s\n' "$(basename "$f")" "$(grep -E 'ERROR SUMMARY|failure\(s\)|unavailable' "$f" | tail -n 2 | tr '\n' ' ')"
    done
    echo
    echo "=== headline rows (bench/*.py --headline; goals of issues 8-11: PASS/MISS)"
    cat "$RES/headline.txt" 2>/dev/null || echo "(no headline step finished)"
    echo
    echo "=== verdicts of the full sweeps"
    grep -hE '(PASS|MISS)$' "$RES"/sweep-*.log 2>/dev/null || echo "(none)"
    echo
    echo "=== dispatch table (merge it: python -m lrkernels --merge gpu_run/dispatch_table.json)"
    cat "$RES/dispatch_table.txt" 2>/dev/null || echo "(not printed yet)"
    echo
    if [ "$FAILED" -eq 0 ]; then echo "ALL STEPS PASSED"; else echo "SOME STEPS FAILED"; fi
  } >"$RES/summary.txt" 2>&1
  cp "$RES/summary.txt" "$OUT_DIR/summary.txt"
}

snapshot() { # the summary and the archive as they are now
  summary
  tar -czf "$OUT_DIR/gpu_run.tar.gz.tmp" -C "$WORK" gpu_run && mv "$OUT_DIR/gpu_run.tar.gz.tmp" "$OUT_DIR/gpu_run.tar.gz"
}

# ---------------------------------------------------------------------------- environment

SITE="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' 2>/dev/null)"
if [ -n "$SITE" ] && [ -d "$SITE/nvidia/cu13/include" ]; then
  export CPATH="$SITE/nvidia/cu13/include${CPATH:+:$CPATH}"
fi
ARCH="$("$PY" - <<'EOF' 2>/dev/null
import torch

if torch.cuda.is_available():
    major, minor = torch.cuda.get_device_capability()
    print(f"{major}.{minor}" + ("a" if major >= 9 else ""))  # sm_90a: wgmma / setmaxnreg
else:
    print("none")
EOF
)"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-$ARCH}"
{
  echo "gpu_run.sh$([ "$DRY" = 1 ] && echo ' --dry-run (CPU paths only, no GPU numbers)')" \
    "at $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "commit: $LRKERNELS_COMMIT$([ "${LRKERNELS_DIRTY:-}" = True ] && echo ' (dirty)')"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null \
    | sed 's/^/gpu: /' || echo "gpu: none (nvidia-smi not found)"
  echo "nvcc: $(nvcc --version 2>/dev/null | grep -o 'release [0-9.]*' || echo 'not found')"
  "$PY" - <<'EOF' 2>&1
import os, platform
import torch
try:
    import triton
    tv = triton.__version__
except ImportError as e:
    tv = f"not importable ({e})"
print(f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), triton {tv}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"device: {p.name}, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, "
          f"{p.total_memory / 2**30:.0f} GiB; building for {os.environ.get('TORCH_CUDA_ARCH_LIST')}")
else:
    print(f"device: none visible to torch ({os.cpu_count()} CPU cores)")
EOF
} >"$RES/env.txt" 2>&1
cat "$RES/env.txt"

# ---------------------------------------------------------------------------- 1. build
# reserves: headline 195 s, correctness 70 s, table + archive 15 s
if [ "$DRY" = 1 ]; then
  echo "dry run: no build (TORCH_CUDA_ARCH_LIST would be '$TORCH_CUDA_ARCH_LIST'); the extension as found" \
    | tee "$RES/build.log"
  record SKIP build 0 "dry run"
elif [ "$ARCH" = none ]; then
  echo "torch sees no CUDA device: nothing to build for" | tee "$RES/build.log"
  record FAIL build 0 "no CUDA device visible"
else
  run_step build build.log 240 280 \
    env LRKERNELS_BUILD_CUDA=1 "$PY" setup.py build_ext --inplace --build-temp "build/temp-gpu-$ARCH"
fi
run_step backends build.log 60 280 "$PY" -c '
import sys, lrkernels
b = lrkernels.available_backends()
for k, v in b.items():
    print("backend", k + ":", v or "available")
gpu = sys.argv[1] == "0"
sys.exit(1 if gpu and (b["cuda"] or b["triton"]) else 0)' "$DRY"

# ---------------------------------------------------------------------------- 2. headline
if [ "$DRY" = 1 ]; then
  HL=(--device cpu --rep-ms 5 --threads 1)
else
  HL=()
fi
BENCH_OUT=(--write-table "$RES/dispatch_table.json" --summary "$RES/headline.txt")
# caps: lowrank 70 s, int8 70 s, LoRA 50 s (five cases; its Triton kernels compile on first
# use), attention 150 s (FlexAttention compiles its forward and backward); each stops starting
# new shapes 25 s (LoRA 20 s, attention 40 s) before its limit
# when the build took its whole cap, each is still left lowrank 55 s, int8 55 s, LoRA 45 s,
# attention 55 s and the correctness step 70 s
cap=$(limit_for 70 240)
run_step headline-lowrank headline-lowrank.log 70 240 \
  "$PY" bench/lowrank.py --headline --max-seconds "$(bench_seconds "$cap" 25)" ${HL[@]+"${HL[@]}"} "${BENCH_OUT[@]}"
cap=$(limit_for 70 185)
run_step headline-int8 headline-int8.log 70 185 \
  "$PY" bench/int8.py --headline --max-seconds "$(bench_seconds "$cap" 25)" ${HL[@]+"${HL[@]}"} "${BENCH_OUT[@]}"
# torch.compile of PEFT's LoRA costs a compile per case: left out of the time-boxed runs
LORA_PROVIDERS=lrkernels-cuda,lrkernels-triton,lrkernels-torch,base-only,peft-eager,eager-loop
if [ "$DRY" = 1 ]; then LORA_PROVIDERS=lrkernels-cpu,lrkernels-torch,base-only,peft-eager,eager-loop; fi
cap=$(limit_for 50 140)
run_step headline-lora headline-lora.log 50 140 \
  "$PY" bench/lora.py --headline --max-seconds "$(bench_seconds "$cap" 20)" --providers "$LORA_PROVIDERS" \
  ${HL[@]+"${HL[@]}"} "${BENCH_OUT[@]}"
cap=$(limit_for 150 85)
run_step headline-attn headline-attn.log 150 85 \
  "$PY" bench/attn.py --headline --max-seconds "$(bench_seconds "$cap" 40)" ${HL[@]+"${HL[@]}"} "${BENCH_OUT[@]}"

# ---------------------------------------------------------------------------- 3. correctness
# The GPU tests of each family and the sanitizer runs in parallel (correctness, not timing;
# 16 cores compile Triton kernels side by side), all within one limit.
families=(lowrank int8 attention lora other)
family_files() {
  case "$1" in
    lowrank) ls tests/test_*lowrank*.py 2>/dev/null ;;
    int8) ls tests/test_*int8*.py 2>/dev/null ;;
    attention) ls tests/test_*attention*.py tests/test_masks.py 2>/dev/null ;;
    lora) ls tests/test_*lora*.py 2>/dev/null ;;
    other)
      for f in tests/test_*.py; do
        case "$f" in *lowrank* | *int8* | *attention* | tests/test_masks.py | *lora*) ;; *) echo "$f" ;; esac
      done
      ;;
  esac
}
limit=$(limit_for 120 15)
REGEX="$("$PY" scripts/sanitize.py --print-kernel-regex)"
SANITIZER="$(command -v compute-sanitizer || echo "$CUDA_HOME/bin/compute-sanitizer")"
echo
echo "=== correctness: GPU tests per family and compute-sanitizer, in parallel (limit ${limit}s)"
t0=$SECONDS
pids=()
names=()
if [ "$limit" -ge 10 ]; then
  all_files=()
  for fam in "${families[@]}"; do
    mapfile -t files < <(family_files "$fam")
    if [ "${#files[@]}" -eq 0 ]; then continue; fi
    all_files+=("${files[@]}")
    if [ "$DRY" = 1 ]; then continue; fi
    cmd=("$PY" -m pytest -q -p no:cacheprovider -m gpu -x --durations=5
      --junitxml="$RES/tests-$fam.xml" "${files[@]}")
    echo "tests-$fam: ${cmd[*]}" >"$RES/tests-$fam.log"
    timeout --kill-after=10 "$limit" "${cmd[@]}" >>"$RES/tests-$fam.log" 2>&1 &
    pids+=($!)
    names+=("tests-$fam")
  done
  if [ "$DRY" = 1 ]; then # the selection only, in one process: the tests need a GPU
    cmd=("$PY" -m pytest -q -p no:cacheprovider -m gpu --collect-only "${all_files[@]}")
    echo "tests-collect: ${cmd[*]}" >"$RES/tests-collect.log"
    timeout --kill-after=10 "$limit" "${cmd[@]}" >>"$RES/tests-collect.log" 2>&1 &
    pids+=($!)
    names+=("tests-collect")
  fi
  for tool in ${SANITIZER_TOOLS:-memcheck racecheck}; do
    # memcheck without torch's caching allocator: every tensor its own allocation, so an
    # out-of-bounds access is not hidden inside a larger cached block
    nocache=0
    if [ "$tool" = memcheck ]; then nocache=1; fi
    cmd=("$SANITIZER" --tool "$tool" --kernel-name "regex=$REGEX" --error-exitcode 1
      --print-limit 20 "$PY" scripts/sanitize.py)
    if [ "$DRY" = 1 ]; then
      echo "dry run: would run PYTORCH_NO_CUDA_MEMORY_CACHING=$nocache ${cmd[*]}" >"$RES/sanitizer-$tool.log"
      cmd=("$PY" scripts/sanitize.py --dry-run)
      if [ "$tool" != memcheck ]; then cmd=(true); fi  # the driver's CPU path once is enough
    elif [ ! -x "$SANITIZER" ]; then
      echo "compute-sanitizer not found" >"$RES/sanitizer-$tool.log"
      record FAIL "sanitizer-$tool" 0 "compute-sanitizer not found"
      continue
    else
      echo "PYTORCH_NO_CUDA_MEMORY_CACHING=$nocache ${cmd[*]}" >"$RES/sanitizer-$tool.log"
    fi
    PYTORCH_NO_CUDA_MEMORY_CACHING=$nocache timeout --kill-after=10 "$limit" "${cmd[@]}" \
      >>"$RES/sanitizer-$tool.log" 2>&1 &
    pids+=($!)
    names+=("sanitizer-$tool")
  done
  for i in "${!pids[@]}"; do
    wait "${pids[$i]}"
    rc=$?
    st=$(status_of "$rc" "$limit")
    if [ "$rc" -eq 5 ] && [[ ${names[$i]} == tests-* ]]; then st="SKIP: no gpu tests"; fi
    record "${st%%:*}" "${names[$i]}" $((SECONDS - t0)) "$(detail "${names[$i]}.log" "$st")"
    tail -n 3 "$RES/${names[$i]}.log"
  done
else
  record FAIL correctness 0 "not run: time budget spent"
fi
snapshot

# ---------------------------------------------------------------------------- 4. sweeps
# lowrank a third of the time left, int8 half of what is then left, LoRA a quarter of the rest,
# attention what remains
if [ "$DRY" = 1 ]; then
  SW=(--quick --device cpu --rep-ms 5 --threads 1)
  sweep_s() { echo 1; }
else
  SW=()
  sweep_s() { echo $(($1 - $2)); }
fi
sweep() { # sweep NAME SCRIPT SHARE SLACK EXTRA_ARGS
  local name=$1 script=$2 share=$3 slack=$4 extra=$5 cap s
  cap=$((($(remaining) - 15) / share))
  s=$(sweep_s "$cap" "$slack")
  if [ "$s" -lt 10 ] && [ "$DRY" = 0 ]; then
    echo "=== $name: no time left for a sweep" | tee -a "$RES/$name.log"
    record SKIP "$name" 0 "no time left"
    return
  fi
  # shellcheck disable=SC2086 # the extra arguments are a list of words on purpose
  run_step "$name" "$name.log" "$cap" 15 "$PY" "$script" --max-seconds "$s" ${SW[@]+"${SW[@]}"} \
    --write-table "$RES/dispatch_table.json" $extra
}
# torch.compile of the two matmuls costs a compile per shape for what cuBLAS already does: left
# out of the timed-out sweeps unless BENCH_ARGS says otherwise
LOWRANK_PROVIDERS=lrkernels-cuda,lrkernels-triton,torch-2mm,dense-linear
if [ "$DRY" = 1 ]; then LOWRANK_PROVIDERS=lrkernels-cpu,torch-2mm,dense-linear; fi
sweep sweep-lowrank bench/lowrank.py 3 30 "${BENCH_ARGS:---providers $LOWRANK_PROVIDERS}"
sweep sweep-int8 bench/int8.py 2 30 "${BENCH_INT8_ARGS:-}"
sweep sweep-lora bench/lora.py 4 20 "${BENCH_LORA_ARGS:---providers $LORA_PROVIDERS}"
sweep sweep-attn bench/attn.py 1 60 "${BENCH_ATTN_ARGS:-}"

# ---------------------------------------------------------------------------- 5. table
if [ -f "$RES/dispatch_table.json" ]; then
  run_step table dispatch_table.txt 30 0 "$PY" -m lrkernels "$RES/dispatch_table.json"
else
  echo "no dispatch table was written" | tee "$RES/dispatch_table.txt"
  record FAIL table 0 "no benchmark wrote a row"
fi
snapshot
rm -rf "$WORK"
echo
cat "$OUT_DIR/summary.txt"
exit "$FAILED"
