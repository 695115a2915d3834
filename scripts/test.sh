#!/usr/bin/env bash
# The test command (README). On a fresh machine it sets itself up and tests the project against
# both ends of the supported torch range:
#
#   newest  (.venv, torch 2.15.0)        lint, build (with the CUDA kernels whenever nvcc is found:
#                                        CI has no GPU, so compiling and linking them is the guard
#                                        on the CUDA C++), C++ tests (CMake + ctest), pytest
#   oldest  (.venv-oldest, torch 2.11.0  build (CUDA for sm_90a only, the GPU machine's arch) and
#            + triton 3.6.0)             pytest; the CUDA kernels' emulation and the static checks
#                                        do not depend on torch and run once
#
# LRKERNELS_TORCH=newest or =oldest runs one of them (default: both). Without a GPU the Triton
# kernels run under the interpreter and the CUDA tests skip with their reason. Extra arguments go
# to pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

if [ "${LRKERNELS_TORCH:-both}" = both ]; then
  start=$(date +%s)
  LRKERNELS_TORCH=newest bash "$0" "$@"
  echo "== newest torch: done in $(($(date +%s) - start)) s"
  start=$(date +%s)
  LRKERNELS_TORCH=oldest bash "$0" "$@"
  echo "== oldest torch: done in $(($(date +%s) - start)) s"
  exit 0
fi

if [ "$LRKERNELS_TORCH" = oldest ]; then
  # The CUDA kernels compile once for both arches on the newest torch; against the oldest (the
  # GPU machine's torch) only for the GPU machine's sm_90a, as scripts/gpu_run.sh builds there:
  # the host code is checked against torch 2.11's headers at half the nvcc time.
  export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0a}"
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
"$PY" -m pytest -p no:cacheprovider -q -rs "${pytest_args[@]}" "$@" tests
