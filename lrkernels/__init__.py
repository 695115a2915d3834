"""lrkernels: fused low-rank, sparse-attention and int8 kernels for PyTorch.

Public API:
    lowrank_linear(x, U, V, bias=None, *, backend=None) -> y = (x·Vᵀ)·Uᵀ + bias
    int8_linear(x, qweight, scales, bias=None, *, group_size=None, backend=None)
                                                 -> y = x·dequant(qweight, scales)ᵀ + bias
    lora_linear(x, base, A, B, bias=None, *, scale, dropout_p=0.0, backend=None)
                                                 -> y = x·Wᵀ + scale·(drop(x)·Aᵀ)·Bᵀ + bias
    lora_linear_multi(x, base, A, B, adapter_index, *, ranks, scales, bias=None)
                                                 -> per-row adapters (serving)
    local_attention(q, k, v, window, *, causal=False, scale=None, return_lse=False, backend=None)
    block_sparse_attention(q, k, v, layout, *, scale=None, return_lse=False, backend=None)
    masks.local_window_layout, ..., masks.BlockLayout   block layouts (docs/attention.md)
    nn.LowRankLinear, nn.factorize_linears       low-rank modules and converters
    nn.Int8Linear, nn.quantize_linears           int8 modules and converters
    nn.LoRALinear, nn.add_lora, nn.load_peft_adapter, ...   LoRA modules, PEFT interop
    nn.SparseAttention                           local / block-sparse attention as a module
    nn.save_compressed, nn.load_compressed       a converted model + its plan in one file
    integrations.transformers                    attn_implementation="lrkernels" (import it)
    quant.quantize / quant.dequantize            int8 weight quantization
    available_backends(), not_supported_reasons(), set_default_backend()
    explain(op, *args, **kwargs)                 which backend a call would run, and why
"""

# Imports stay light (tests/test_import_time.py): triton, the Triton kernels and torch._inductor
# load on first use of the triton backend, safetensors and transformers on first use of what
# needs them.
from ._source_layout import ensure_triton_kernels_package

ensure_triton_kernels_package()

from . import masks, nn, quant, reference, roofline  # noqa: E402
from .backends import (  # noqa: E402
    BACKENDS,
    available_backends,
    not_supported_reasons,
    set_default_backend,
)
from .dispatch import explain  # noqa: E402
from .ops.attention import block_sparse_attention, local_attention  # noqa: E402
from .ops.int8 import int8_linear  # noqa: E402
from .ops.lora import lora_linear, lora_linear_multi  # noqa: E402
from .ops.lowrank import lowrank_linear  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "available_backends",
    "block_sparse_attention",
    "explain",
    "int8_linear",
    "local_attention",
    "lora_linear",
    "lora_linear_multi",
    "lowrank_linear",
    "masks",
    "nn",
    "not_supported_reasons",
    "quant",
    "reference",
    "roofline",
    "set_default_backend",
]
