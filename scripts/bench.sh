#!/usr/bin/env bash
# The main job (README): sets up .venv, builds the extension, and runs the four benchmarks on
# whatever device is there (GPU: the full sweeps; CPU: small shapes, labelled CPU). Results
# (CSV + SVG plots) go to build/bench-results/ (LRKERNELS_BENCH_OUT or --out to change it).
# Extra arguments go to every benchmark (e.g. --quick).
# The exit status is non-zero if any benchmark's correctness cross-check failed.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
. scripts/setup_env.sh
status=0
for bench in lowrank int8 lora attn; do
  echo "== bench/$bench.py $*"
  "$PY" "bench/$bench.py" "$@" || status=1
done
exit "$status"
