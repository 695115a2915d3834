#!/usr/bin/env bash
# The test command (README): on a fresh machine it sets up .venv, builds the extension (with
# its CUDA kernels whenever nvcc is found: CI has no GPU, so compiling and linking them is the
# guard on the CUDA C++), runs the lint, the C++ tests (CMake + ctest) and pytest. Without a
# GPU the Triton kernels run under the interpreter and the CUDA tests skip with their reason.
# Extra arguments go to pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
. scripts/setup_env.sh

echo "== lint"
bash scripts/lint.sh

if command -v nvcc >/dev/null 2>&1 && [ "${LRKERNELS_BUILD_CUDA:-1}" != 0 ]; then
  # The build must have produced CUDA kernels; tests/test_build.py checks it.
  export LRKERNELS_EXPECT_CUDA_BUILD=1
fi

echo "== C++ tests (CMake, CPU library)"
bash scripts/cmake_test.sh

echo "== pytest"
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  export TRITON_INTERPRET=1
fi
"$PY" -m pytest -p no:cacheprovider -q -rs "$@" tests
