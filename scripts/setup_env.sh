#!/usr/bin/env bash
# Creates (or reuses) a virtual environment and builds the extension into the source tree.
# Source it (`. scripts/setup_env.sh`) to get $PY; the other scripts do.
#
#   LRKERNELS_TORCH=newest (default)  .venv         requirements-dev.txt     (torch 2.15.0)
#   LRKERNELS_TORCH=oldest            .venv-oldest  requirements-oldest.txt  (torch 2.11.0 +
#                                                   triton 3.6.0: the GPU machine's toolchain)
#   LRKERNELS_VENV overrides the folder.
#
# Cheap when nothing changed, so every script can call it:
# - the requirements are installed again only when the requirements file changed (its hash is
#   kept in the venv);
# - the extension is built in place with `setup.py build_ext --inplace` into a build folder kept
#   per torch version (build/temp-torch-<version>): ninja recompiles only what changed (headers
#   included, through its depfiles), so a second call with no change relinks in seconds. `pip
#   install -e .` would rebuild everything in a fresh temporary folder on every call.
# - Nothing is installed into the venv: the scripts and pytest import lrkernels from the source
#   tree (they put it on sys.path), so one venv can serve several checkouts of the project.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
case "${LRKERNELS_TORCH:-newest}" in
  newest) REQS="$ROOT/requirements-dev.txt" DEFAULT_VENV="$ROOT/.venv" ;;
  oldest) REQS="$ROOT/requirements-oldest.txt" DEFAULT_VENV="$ROOT/.venv-oldest" ;;
  *) echo "LRKERNELS_TORCH must be newest or oldest, got ${LRKERNELS_TORCH}" >&2; exit 2 ;;
esac
VENV="${LRKERNELS_VENV:-$DEFAULT_VENV}"

if [ ! -x "$VENV/bin/python" ]; then
  echo "== creating $VENV"
  python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
reqs_hash="$(cat "$REQS" "$ROOT/requirements-test.txt" | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$VENV/.requirements-hash" 2>/dev/null)" != "$reqs_hash" ]; then
  echo "== installing $(basename "$REQS") into $VENV (a CUDA build of torch: minutes the first time)"
  start=$(date +%s)
  # This machine's pip configuration may cap torch below the pinned release
  # (/etc/xdg/pip/constraints.txt, ENVIRONMENT.md): the project's own pins decide, so pip runs
  # without configuration files. pip's output goes to a log, shown only when the install fails.
  if ! PIP_CONFIG_FILE=/dev/null "$PY" -m pip install --disable-pip-version-check -r "$REQS" \
    >"$VENV/pip-install.log" 2>&1; then
    tail -40 "$VENV/pip-install.log"
    exit 1
  fi
  echo "$reqs_hash" >"$VENV/.requirements-hash"
  echo "== installed in $(($(date +%s) - start)) s"
fi

# LRKERNELS_INSTALL_ONLY=1: the environment only (scripts/test.sh installs the oldest env while
# the newest builds).
if [ "${LRKERNELS_INSTALL_ONLY:-0}" = 1 ]; then
  return 0 2>/dev/null || exit 0
fi

# setup.py finds the CUDA toolkit itself (CUDA_HOME, else /usr/local/cuda, else nvcc's folder).
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
TORCH_VERSION="$("$PY" -c 'import torch; print(torch.__version__)')"
BUILD_TEMP="$ROOT/build/temp-torch-$TORCH_VERSION"
echo "== building lrkernels._C against torch $TORCH_VERSION (MAX_JOBS=$MAX_JOBS, $BUILD_TEMP)"
start=$(date +%s)
# --force: setuptools would skip the build when only a header changed (it compares sources
# only) or keep an in-place .so built for the other torch; ninja still recompiles only what
# is out of date.
if ! (cd "$ROOT" && "$PY" setup.py build_ext --inplace --force --build-temp "$BUILD_TEMP" \
  >"$VENV/build.log" 2>&1); then
  grep -E "error|Error" "$VENV/build.log" | head -40
  tail -20 "$VENV/build.log"
  exit 1
fi
echo "== built in $(($(date +%s) - start)) s"
export PY
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
