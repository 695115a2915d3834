#!/usr/bin/env bash
# The main job (README): sets up .venv, builds the extension, and runs the benchmarks on
# whatever device is there (GPU: the full sweeps; CPU: small shapes, labelled CPU). Results
# (CSV + SVG plot) go to bench/results/. Extra arguments go to bench/lowrank.py.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
. scripts/setup_env.sh
"$PY" bench/lowrank.py "$@"
