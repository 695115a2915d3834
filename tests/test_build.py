"""The build and the package: what the extension provides, and life without it."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import lrkernels
from lrkernels import _ext


def test_extension_loaded_with_cpu_kernels():
    assert _ext.LOAD_ERROR is None, _ext.LOAD_ERROR
    for op in _ext.CPP_OPS:  # every C++ op has a CPU implementation
        assert _ext.has_kernel_for(op, "CPU"), op


@pytest.mark.skipif(
    os.environ.get("LRKERNELS_EXPECT_CUDA_BUILD") != "1",
    reason="set LRKERNELS_EXPECT_CUDA_BUILD=1 when the build should contain CUDA kernels",
)
def test_extension_has_cuda_kernels():
    # CI has nvcc but no GPU: the CUDA kernels must still be compiled, linked and registered.
    for op in _ext.CPP_OPS:
        assert _ext.has_kernel_for(op, "CUDA"), op


def test_triton_kernels_importable_as_subpackage():
    from lrkernels.triton_kernels import lowrank

    assert callable(lowrank.launch_lowrank_linear)


def test_package_works_without_the_extension():
    code = (
        "import sys; sys.modules['lrkernels._C'] = None\n"  # makes `import lrkernels._C` fail
        "import torch, lrkernels\n"
        "a = lrkernels.available_backends()\n"
        "assert a['cpu'] and 'not available' in a['cpu'], a\n"
        "assert a['cuda'] and a['torch'] is None, a\n"
        "x, U, V = torch.randn(3, 8), torch.randn(5, 2), torch.randn(2, 8)\n"
        "y = lrkernels.lowrank_linear(x, U, V)\n"
        "assert torch.allclose(y, x @ (U @ V).T, atol=1e-5)\n"
        "print('ok')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "LRKERNELS_BACKEND"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr


def test_public_api():
    for name in lrkernels.__all__:
        assert hasattr(lrkernels, name), name
    assert lrkernels.lowrank_linear.__doc__ and "(x · Vᵀ) · Uᵀ" in lrkernels.lowrank_linear.__doc__
    assert isinstance(torch.ops.lrkernels.lowrank_linear.default, torch._ops.OpOverload)
