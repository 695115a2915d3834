"""Modules and model converters, one module per family (the public names live here):

- `lrkernels.nn.lowrank`: `LowRankLinear`, `factorize_linears` (truncated / activation-aware SVD);
- `lrkernels.nn.int8`: `Int8Linear`, `quantize_linears` (int8 weight-only);
- `lrkernels.nn.attention`: `SparseAttention` (sliding window / block layout);
- `lrkernels.nn.checkpoint`: `save_compressed` / `load_compressed` (a converted model and its
  plan in one safetensors file, loadable into a fresh dense model), `compression_plan`,
  `apply_plan`, `register_plan_kind`;
- `lrkernels.nn._walk`: finding the ``nn.Linear`` layers a converter replaces (shared);
- `lrkernels.nn._weight`: the read-only ``.weight`` view converted layers expose.
"""

from .attention import SparseAttention
from .checkpoint import (
    apply_plan,
    compression_plan,
    load_compressed,
    read_plan,
    register_plan_kind,
    save_compressed,
)
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
    "apply_plan",
    "compression_plan",
    "factorize_linears",
    "load_compressed",
    "quantize_linears",
    "read_plan",
    "register_plan_kind",
    "save_compressed",
]
