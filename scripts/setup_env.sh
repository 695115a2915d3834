#!/usr/bin/env bash
# Creates the project's virtual environment (.venv, or $LRKERNELS_VENV) with requirements-dev.txt
# and builds the extension into the source tree (pip install --no-build-isolation -e .).
# Idempotent: an existing environment is reused, the build is incremental.
# Source it (`. scripts/setup_env.sh`) to get $PY; the other scripts do.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${LRKERNELS_VENV:-$ROOT/.venv}"

if [ ! -x "$VENV/bin/python" ]; then
  echo "== creating $VENV"
  python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
if ! "$PY" -c "import torch, triton, numpy, ninja, pytest" 2>/dev/null \
  || ! [ -x "$VENV/bin/ruff" ] || ! [ -x "$VENV/bin/clang-format" ]; then
  echo "== installing requirements-dev.txt (a CUDA build of torch: a few minutes the first time)"
  start=$(date +%s)
  # pip's output goes to a log (it is long and noisy), shown only when the install fails.
  if ! "$PY" -m pip install --disable-pip-version-check -r "$ROOT/requirements-dev.txt" \
    >"$VENV/pip-install.log" 2>&1; then
    tail -40 "$VENV/pip-install.log"
    exit 1
  fi
  echo "== installed in $(($(date +%s) - start)) s"
fi

# setup.py finds the CUDA toolkit itself (CUDA_HOME, else /usr/local/cuda, else nvcc's folder).
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
echo "== building lrkernels._C (MAX_JOBS=$MAX_JOBS)"
start=$(date +%s)
if ! (cd "$ROOT" && "$PY" -m pip install --disable-pip-version-check --no-build-isolation \
  --no-deps -e . >"$VENV/build.log" 2>&1); then
  grep -E "error|Error" "$VENV/build.log" | head -40
  tail -20 "$VENV/build.log"
  exit 1
fi
echo "== built in $(( $(date +%s) - start )) s"
export PY
