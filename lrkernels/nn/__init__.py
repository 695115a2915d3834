"""Modules and model converters, one module per family (the public names live here):

- `lrkernels.nn.lowrank`: `LowRankLinear`, `factorize_linears` (truncated / activation-aware SVD);
- `lrkernels.nn.int8`: `Int8Linear`, `quantize_linears` (int8 weight-only);
- `lrkernels.nn.attention`: `SparseAttention` (sliding window / block layout);
- `lrkernels.nn._walk`: finding the ``nn.Linear`` layers a converter replaces (shared).
"""

from .attention import SparseAttention
from .int8 import Int8LayerReport, Int8Linear, QuantizeReport, quantize_linears
from .lowrank import FactorizeReport, LayerReport, LowRankLinear, factorize_linears

__all__ = [
    "FactorizeReport",
    "Int8LayerReport",
    "Int8Linear",
    "LayerReport",
    "LowRankLinear",
    "QuantizeReport",
    "SparseAttention",
    "factorize_linears",
    "quantize_linears",
]
