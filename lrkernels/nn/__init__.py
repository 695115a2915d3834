"""Modules and model converters, one module per family (the public names live here):

- `lrkernels.nn.lowrank`: `LowRankLinear`, `factorize_linears` (truncated / activation-aware SVD);
- `lrkernels.nn.int8`: `Int8Linear`, `quantize_linears` (int8 weight-only);
- `lrkernels.nn.lora`: `LoRALinear`, `add_lora`, adapter save/load (ours and PEFT's),
  `MultiLoRALinear` (many adapters on one base, for serving);
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
from .lora import (
    LoRALayerReport,
    LoRALinear,
    LoRAReport,
    MultiLoRALinear,
    add_lora,
    load_lora,
    load_lora_state_dict,
    load_peft_adapter,
    lora_layers,
    lora_scale,
    lora_state_dict,
    save_lora,
    save_peft_adapter,
)
from .lowrank import FactorizeReport, LayerReport, LowRankLinear, factorize_linears

__all__ = [
    "FactorizeReport",
    "Int8LayerReport",
    "Int8Linear",
    "LayerReport",
    "LoRALayerReport",
    "LoRALinear",
    "LoRAReport",
    "LowRankLinear",
    "MultiLoRALinear",
    "QuantizeReport",
    "SparseAttention",
    "add_lora",
    "apply_plan",
    "compression_plan",
    "factorize_linears",
    "load_compressed",
    "load_lora",
    "load_lora_state_dict",
    "load_peft_adapter",
    "lora_layers",
    "lora_scale",
    "lora_state_dict",
    "quantize_linears",
    "read_plan",
    "register_plan_kind",
    "save_compressed",
    "save_lora",
    "save_peft_adapter",
]
