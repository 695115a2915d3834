#!/usr/bin/env bash
# Project-wide lint: ruff (Python) and clang-format (C++/CUDA). Fails on any finding.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN="${LRKERNELS_VENV:-$ROOT/.venv}/bin"
cd "$ROOT"
"$BIN/ruff" check .
"$BIN/ruff" format --check .
mapfile -t cxx < <(git ls-files 'csrc/*.cpp' 'csrc/*.h' 'csrc/*.cu' 'csrc/*.cuh' 'cpp_tests/*.cpp' \
  'tests/*.cpp' 'tests/*.h' 'tests/*.cu' 'tests/*.cuh')
"$BIN/clang-format" --dry-run -Werror "${cxx[@]}"
echo "lint: clean"
