"""Loads the compiled extension lrkernels._C and says what it provides.

Importing _C runs its TORCH_LIBRARY registrations (the op schemas, the C++ CPU kernels and,
when built with CUDA, the CUDA kernels). The package works without it, through the Triton and
torch backends; `STATUS` records why it is missing so that `lrkernels.available_backends()`
can tell the user.
"""

from __future__ import annotations

import torch

try:
    from . import _C  # noqa: F401  (import for its registrations)

    LOAD_ERROR: str | None = None
except ImportError as exc:  # not built, or built against another torch
    LOAD_ERROR = f"the C++ extension lrkernels._C is not available ({exc})"


def has_op(name: str) -> bool:
    """True when the schema lrkernels::<name> is registered (by the extension)."""
    return LOAD_ERROR is None and torch._C._dispatch_has_kernel(f"lrkernels::{name}")


def has_kernel_for(name: str, dispatch_key: str) -> bool:
    """True when lrkernels::<name> has a kernel for `dispatch_key` ("CPU" or "CUDA")."""
    return has_op(name) and torch._C._dispatch_has_kernel_for_dispatch_key(
        f"lrkernels::{name}", dispatch_key
    )


# Every C++ op of the library; which dispatch keys have kernels, read once at import so that
# backend selection is plain dictionary lookups (torch.compile traces through it).
CPP_OPS = (
    "lowrank_linear",
    "int8_linear",
    "int8_linear_grad_input",
    "int8_linear_packed",
    "int8_linear_packed_grad_input",
    "int8_dequantize_packed",
    "block_sparse_attention_fwd",
    "block_sparse_attention_bwd",
    "lora_linear",
    "lora_linear_grad_input",
    "lora_linear_grad_A",
    "lora_linear_multi",
)
KERNELS: dict[tuple[str, str], bool] = {
    (name, key): has_kernel_for(name, key) for name in CPP_OPS for key in ("CPU", "CUDA")
}
