#!/usr/bin/env bash
# Builds the C++ sources against libtorch with CMake and runs the C++ tests with ctest.
# Uses $PY (set by scripts/setup_env.sh) or .venv's python to find torch.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PY:-${LRKERNELS_VENV:-$ROOT/.venv}/bin/python}"
BUILD="${LRKERNELS_CMAKE_BUILD:-$ROOT/build-cmake}"
prefix="$("$PY" -c 'import torch; print(torch.utils.cmake_prefix_path)')"
args=(-DCMAKE_PREFIX_PATH="$prefix" -DCMAKE_BUILD_TYPE=Release)
# A CUDA build of torch makes find_package(Torch) look for the toolkit, and for nvrtc, which the
# toolkit here lacks but torch's nvidia-* wheels carry.
if "$PY" -c 'import sys, torch; sys.exit(0 if torch.version.cuda else 1)'; then
  cuda="${CUDA_HOME:-/usr/local/cuda}"
  args+=(-DCUDA_TOOLKIT_ROOT_DIR="$cuda")
  nvrtc="$("$PY" - <<'PYEOF'
import glob, os, torch
site = os.path.dirname(os.path.dirname(torch.__file__))
hits = sorted(glob.glob(os.path.join(site, "nvidia", "*", "lib", "libnvrtc.so*")))
print(hits[0] if hits else "")
PYEOF
)"
  [ -n "$nvrtc" ] && [ ! -e "$cuda/lib64/libnvrtc.so" ] && args+=(-DCUDA_nvrtc_LIBRARY="$nvrtc")
fi
mkdir -p "$BUILD"
LOG="$BUILD/lrkernels-build.log"
cmake -S "$ROOT" -B "$BUILD" "${args[@]}" >"$LOG" 2>&1 || { cat "$LOG"; exit 1; }
cmake --build "$BUILD" -j "$(nproc)" >>"$LOG" 2>&1 || { tail -50 "$LOG"; exit 1; }
ctest --test-dir "$BUILD" --output-on-failure
