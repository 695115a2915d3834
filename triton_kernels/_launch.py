"""What every Triton launcher of the package shares.

`launchable(kernel)` is how a launcher inside a `torch.library.triton_op` launches a kernel:
``launchable(kernel)[grid](...)``. On a GPU that is ``torch.library.wrap_triton(kernel)``, which
lets ``torch.compile`` and ``opcheck`` trace the launch. Under the Triton interpreter
(``TRITON_INTERPRET=1``, CPU tensors) ``@triton.jit`` returns an ``InterpretedFunction``: torch
2.11–2.13 reject it in ``wrap_triton`` ("wrap_triton only works on functions annotated with
triton.jit or triton.autotune"), newer torch returns it unchanged. Launching it directly is the
same eager launch on every supported torch (compile and opcheck of the Triton ops need a GPU in
any case; ENVIRONMENT.md).
"""

from __future__ import annotations

import os

import torch


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def launchable(kernel):
    """``kernel`` wrapped for a launch inside a triton_op (see the module docstring)."""
    if interpreting():
        return kernel
    return torch.library.wrap_triton(kernel)
