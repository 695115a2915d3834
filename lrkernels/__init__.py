"""lrkernels: fused low-rank, sparse-attention and int8 kernels for PyTorch.

Public API:
    lowrank_linear(x, U, V, bias=None, *, backend=None) -> y = (x·Vᵀ)·Uᵀ + bias
    nn.LowRankLinear, nn.factorize_linears       modules and converters
    available_backends(), not_supported_reasons(), set_default_backend()
"""

from ._source_layout import ensure_triton_kernels_package

ensure_triton_kernels_package()

from . import nn, reference, roofline  # noqa: E402
from .backends import (  # noqa: E402
    BACKENDS,
    available_backends,
    not_supported_reasons,
    set_default_backend,
)
from .ops.lowrank import lowrank_linear  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "available_backends",
    "lowrank_linear",
    "nn",
    "not_supported_reasons",
    "reference",
    "roofline",
    "set_default_backend",
]
