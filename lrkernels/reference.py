"""Plain-PyTorch references: the single source of truth for tests and benchmarks.

`*_reference` functions compute in the inputs' dtype with torch's own ops (they are also the
`torch` backend); `*_exact` functions compute in float64 for accuracy checks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def lowrank_linear_reference(x: Tensor, U: Tensor, V: Tensor, bias: Tensor | None = None) -> Tensor:
    """y = (x · Vᵀ) · Uᵀ + bias as torch's two matmuls in x's dtype.

    x (..., in), V (rank, in), U (out, rank), bias (out,) or None -> (..., out). The rank-r
    intermediate is materialised and rounded to x's dtype, as the fused kernels also round it.
    """
    return F.linear(F.linear(x, V), U, bias)


def lowrank_linear_exact(x: Tensor, U: Tensor, V: Tensor, bias: Tensor | None = None) -> Tensor:
    """The same product in float64 (no intermediate rounding): the accuracy yardstick."""
    b = None if bias is None else bias.double()
    return F.linear(F.linear(x.double(), V.double()), U.double(), b)


def relative_error(out: Tensor, ref: Tensor) -> float:
    """‖out − ref‖_F / ‖ref‖_F computed in float64 (0 when both are empty)."""
    diff = torch.linalg.vector_norm(out.double() - ref.double())
    norm = torch.linalg.vector_norm(ref.double())
    if ref.numel() == 0:
        return 0.0
    return float(diff / norm) if float(norm) > 0 else float(diff)


def dequantize_reference(qweight: Tensor, scales: Tensor, dtype: torch.dtype) -> Tensor:
    """W (N, K) = q · s in `dtype`, from int8 q (N, K) and scales (N,) or (N, K // G)."""
    n, k = qweight.shape
    s = scales.to(torch.float32 if dtype != torch.float64 else dtype)
    s = s.unsqueeze(1) if scales.dim() == 1 else s.repeat_interleave(k // scales.shape[1], dim=1)
    return (qweight.to(s.dtype) * s).to(dtype)


def int8_linear_reference(
    x: Tensor, qweight: Tensor, scales: Tensor, bias: Tensor | None = None
) -> Tensor:
    """y = x · Wᵀ + bias with W dequantized to x's dtype, then torch's own same-dtype matmul
    (dequantize-then-matmul: what a user would write without the fused kernel)."""
    return F.linear(x, dequantize_reference(qweight, scales, x.dtype), bias)


def int8_linear_exact(
    x: Tensor, qweight: Tensor, scales: Tensor, bias: Tensor | None = None
) -> Tensor:
    """The same product in float64: the accuracy yardstick."""
    b = None if bias is None else bias.double()
    return F.linear(x.double(), dequantize_reference(qweight, scales.double(), torch.float64), b)
