"""Shared test set-up: environment, seeds, tolerances and input makers.

- Outputs are poisoned with NaN before every launch (LRKERNELS_POISON_OUTPUT=1), so an element
  a kernel never writes cannot pass.
- Without a GPU the Triton kernels run under the interpreter (TRITON_INTERPRET=1, set before
  triton is imported).
- Every test gets fresh random inputs: the run's base seed (LRKERNELS_TEST_SEED, random when
  unset, printed in the header) mixed with the test's id, so a failure can be replayed.
- The tests that exercise a GPU when one is there carry the ``gpu`` marker (`needs_gpu`), which
  scripts/gpu_run.sh selects with ``-m gpu``; without a GPU they run or skip as before.
"""

from __future__ import annotations

import os
import random
import zlib

os.environ.setdefault("LRKERNELS_POISON_OUTPUT", "1")

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import lrkernels  # noqa: E402
from lrkernels.reference import relative_error  # noqa: E402

BASE_SEED = int(os.environ.get("LRKERNELS_TEST_SEED", random.randrange(2**31)))

# Floors under the "2x torch's own same-dtype error" rule, so that two results that are both
# essentially exact do not fail on summation order alone. Far below any real bug's error.
ERROR_FLOOR = {
    torch.float64: 1e-12,
    torch.float32: 2e-6,
    torch.float16: 1e-4,
    torch.bfloat16: 1e-3,
}

HAS_CUDA = torch.cuda.is_available()


def pytest_report_header(config):
    avail = lrkernels.available_backends()
    lines = [f"lrkernels test seed: LRKERNELS_TEST_SEED={BASE_SEED}"]
    lines += [
        f"  backend {k}: {'available' if v is None else 'unavailable: ' + v}"
        for k, v in avail.items()
    ]
    return lines


@pytest.fixture(autouse=True)
def _seed(request):
    seed = (BASE_SEED + zlib.crc32(request.node.nodeid.encode())) % 2**31
    torch.manual_seed(seed)
    random.seed(seed)
    yield


@pytest.fixture
def table(tmp_path):
    """Write dispatch-table rows to a temporary table and make auto selection read it; restore
    the packaged table afterwards."""
    from lrkernels import dispatch

    path = tmp_path / "table.json"

    def use(rows: list[dict]) -> None:
        dispatch.write_table(path, {"format": 1, "rows": rows})
        dispatch.use_table(path)

    yield use
    dispatch.use_table(None)


def device_for(backend: str) -> str:
    return "cuda" if backend in ("cuda", "triton") and HAS_CUDA else "cpu"


def skip_unless_runs(op: str, backend: str, *args) -> None:
    """Skip (with the backend's own reason) when `backend` cannot run these inputs here."""
    reasons = lrkernels.not_supported_reasons(op, backend, *args)
    if reasons:
        pytest.skip(f"{backend}: " + "; ".join(reasons))


def assert_matches(out, exact, same_dtype_torch, *, what="output"):
    """Relative error of `out` against the float64 `exact` result at most twice that of
    torch's own same-dtype computation (plus a tiny floor)."""
    assert out.shape == exact.shape, f"{what}: shape {tuple(out.shape)} != {tuple(exact.shape)}"
    assert torch.isfinite(out).all(), f"{what}: non-finite values (unwritten or overflowed)"
    err = relative_error(out, exact)
    torch_err = relative_error(same_dtype_torch, exact)
    bound = 2 * torch_err + ERROR_FLOOR[out.dtype]
    assert err <= bound, (
        f"{what}: relative error {err:.3e} > bound {bound:.3e} (torch: {torch_err:.3e})"
    )


# Test files whose every test runs on CUDA tensors when a GPU is there (the Triton kernel tests).
GPU_MODULE_PREFIXES = ("test_triton_",)


def needs_gpu(item) -> bool:
    """Whether a test exercises the GPU when one is there: marked ``gpu`` explicitly,
    parametrized with the cuda or triton backend, in a Triton kernel test file, or skipped
    without a GPU (a skipif whose reason names the GPU)."""
    if item.get_closest_marker("gpu") is not None:
        return True
    callspec = getattr(item, "callspec", None)
    if callspec is not None and callspec.params.get("backend") in ("cuda", "triton"):
        return True
    if item.path.name.startswith(GPU_MODULE_PREFIXES):
        return True
    return any("GPU" in str(m.kwargs.get("reason", "")) for m in item.iter_markers("skipif"))


def pytest_collection_modifyitems(config, items):
    for item in items:
        if needs_gpu(item) and item.get_closest_marker("gpu") is None:
            item.add_marker(pytest.mark.gpu)
