#!/usr/bin/env bash
# The test command (README). On a fresh machine it sets itself up and tests the project against
# both ends of the supported torch range:
#
#   newest  (.venv, torch 2.15.0)        lint, build (C++ CPU kernels, and the CUDA kernels for
#                                        sm_90a whenever nvcc is found: CI has no GPU, so compiling
#                                        and linking them is the guard on the CUDA C++), C++ tests
#                                        (CMake + ctest), pytest with the CUDA emulation
#   oldest  (.venv-oldest, torch 2.11.0  build (C++ CPU kernels) and pytest; the CUDA emulation
#            + triton 3.6.0)             and the static checks do not depend on torch: run once
#
# Both ends: the oldest env installs while the newest builds; pytest runs as concurrent shards
# (scripts/run_pytest.py). CI (2 cores, from a clean checkout) took 28 min 9 s at fcca3ca.
# LRKERNELS_TORCH=newest or =oldest runs one of them (default: both). Without a GPU the Triton
# kernels run under the interpreter and the CUDA tests skip with their reason. Extra arguments go
# to pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

if [ "${LRKERNELS_TORCH:-both}" = both ]; then
  start=$(date +%s)
  # The oldest env's install (network and disk) runs while the newest env builds (CPU).
  mkdir -p build
  (LRKERNELS_TORCH=oldest LRKERNELS_INSTALL_ONLY=1 . scripts/setup_env.sh) \
    >build/oldest-install.log 2>&1 &
  oldest_install=$!
  LRKERNELS_TORCH=newest bash "$0" "$@"
  echo "== newest torch: done in $(($(date +%s) - start)) s"
  start=$(date +%s)
  if ! wait "$oldest_install"; then
    cat build/oldest-install.log
    exit 1
  fi
  cat build/oldest-install.log
  LRKERNELS_TORCH=oldest bash "$0" "$@"
  echo "== oldest torch: done in $(($(date +%s) - start)) s"
  exit 0
fi

# What each end builds. The newest: the C++ CPU kernels and the CUDA kernels for sm_90a (the GPU
# machine's arch, the one the static kernel report reads; TORCH_CUDA_ARCH_LIST='8.0;9.0a' checks
# both of the package's default arches). The oldest (the GPU machine's torch): the C++ CPU
# kernels, which its tests run; its CUDA build happens on the GPU machine (scripts/gpu_run.sh).
if [ "$LRKERNELS_TORCH" = newest ]; then
  export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0a}"
else
  export LRKERNELS_BUILD_CUDA="${LRKERNELS_BUILD_CUDA:-0}"
fi
. scripts/setup_env.sh
"$PY" -c 'import torch, triton; print("== torch", torch.__version__, "triton", triton.__version__)'

if command -v nvcc >/dev/null 2>&1 && [ "${LRKERNELS_BUILD_CUDA:-1}" != 0 ]; then
  # The build must have produced CUDA kernels; tests/test_build.py checks it.
  export LRKERNELS_EXPECT_CUDA_BUILD=1
fi

pytest_args=()
if [ "$LRKERNELS_TORCH" = newest ]; then
  echo "== lint"
  bash scripts/lint.sh
  echo "== C++ tests (CMake, CPU library)"
  bash scripts/cmake_test.sh
else
  # Torch-independent: the CUDA emulation compiles the kernels with g++ and never imports torch.
  pytest_args+=(--ignore-glob='tests/test_*cuda_emulation*.py')
fi

echo "== pytest"
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  export TRITON_INTERPRET=1
fi
# Concurrent pytest processes over shards of the test files (scripts/run_pytest.py): CI's two
# cores both stay busy. LRKERNELS_TEST_JOBS=1 runs one plain pytest.
"$PY" scripts/run_pytest.py ${pytest_args[@]+"${pytest_args[@]}"} "$@" tests
