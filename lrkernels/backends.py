"""Backend registry: which backends exist on this machine, which can take given inputs, and
the choice between them.

Backends: ``cuda`` (the C++/CUDA extension), ``triton``, ``cpu`` (the C++ CPU implementation)
and ``torch`` (the plain-PyTorch reference, which runs everywhere). ``backend=None`` means auto:
`lrkernels.dispatch` orders the backends for these inputs — from a table of measured results
where it has a row for (op, device, dtype, shape class), from the op's conservative rule
otherwise — and the first whose `not_supported_reasons` is empty runs; ``lrkernels.explain``
says which and why. An explicit backend that cannot run raises with its reasons; auto falls back
and never hides a wrong answer. The environment variable ``LRKERNELS_BACKEND`` (read once at
import) or `set_default_backend` replaces auto for the whole process (benchmarks, A/B checks).
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

from . import _ext, dispatch

BACKENDS = dispatch.BACKENDS


def _triton_status() -> str | None:
    # find_spec, not import: importing triton takes about half a second, paid on first use of
    # the triton backend rather than by `import lrkernels` (the ops register their Triton ops
    # then, see _ensure_triton_ops in lrkernels/ops/*.py).
    import importlib.util

    try:
        found = importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError) as exc:
        return f"triton is not installed ({exc})"
    return None if found else "triton is not installed"


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _compute_availability() -> dict[str, str | None]:
    status: dict[str, str | None] = {}
    cuda_device = torch.cuda.is_available()
    if _ext.LOAD_ERROR is not None:
        status["cuda"] = _ext.LOAD_ERROR
    elif not _ext.has_kernel_for("lowrank_linear", "CUDA"):
        status["cuda"] = "the extension was built without CUDA kernels (no nvcc or a CPU torch)"
    elif not cuda_device:
        status["cuda"] = "no CUDA device is visible"
    else:
        status["cuda"] = None
    triton_error = _triton_status()
    if triton_error is not None:
        status["triton"] = triton_error
    elif not cuda_device and not _interpreting():
        status["triton"] = "no CUDA device (set TRITON_INTERPRET=1 to run on CPU, slowly)"
    else:
        status["triton"] = None
    status["cpu"] = _ext.LOAD_ERROR
    status["torch"] = None
    return status


_AVAILABILITY = _compute_availability()
_DEFAULT_BACKEND: str | None = os.environ.get("LRKERNELS_BACKEND") or None
if _DEFAULT_BACKEND is not None and _DEFAULT_BACKEND not in BACKENDS:
    raise ValueError(f"LRKERNELS_BACKEND must be one of {BACKENDS}, got {_DEFAULT_BACKEND!r}")


def available_backends() -> dict[str, str | None]:
    """Maps each backend name to None when it can run on this machine, else to the reason why
    not (e.g. ``{"cuda": "no CUDA device is visible", "cpu": None, ...}``)."""
    return dict(_AVAILABILITY)


def set_default_backend(backend: str | None) -> None:
    """Use `backend` whenever a call passes ``backend=None`` (None restores auto)."""
    global _DEFAULT_BACKEND
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
    _DEFAULT_BACKEND = backend


GPU_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def kernel_reasons(backend: str, op_names: tuple[str, ...]) -> list[str]:
    """The cpu and cuda backends need the extension to hold kernels for every one of these ops
    (an extension built from an older checkout may lack a newer op)."""
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(backend)
    if key is None:
        return []
    missing = [n for n in op_names if not _ext.KERNELS.get((n, key), False)]
    if missing:
        return [f"the extension has no {key} kernel for {', '.join(missing)} (rebuild it)"]
    return []


def device_and_dtype_reasons(backend: str, x: torch.Tensor, *, explicit: bool) -> list[str]:
    """The rules every op shares, judged on its main input `x`: the cuda kernels need CUDA
    tensors, the cpu kernels CPU tensors; the GPU kernels take float32/float16/bfloat16; the
    triton backend runs CPU tensors only under the interpreter, only when asked for by name,
    and not in bfloat16 (the interpreter gets bfloat16 dot products wrong)."""
    if backend in ("cuda", "triton") and x.dtype not in GPU_KERNEL_DTYPES:
        return [f"the {backend} kernels take float32, float16 or bfloat16, got {x.dtype}"]
    if backend == "cuda":
        return [] if x.is_cuda else [f"the cuda backend needs CUDA tensors, got {x.device}"]
    if backend == "cpu":
        return (
            [] if x.device.type == "cpu" else [f"the cpu backend needs CPU tensors, got {x.device}"]
        )
    if backend == "triton":
        if x.is_cuda:
            return []
        if x.device.type != "cpu":
            return [f"the triton backend needs CUDA tensors, got {x.device}"]
        if not _interpreting():
            return ["the triton backend needs CUDA tensors (or TRITON_INTERPRET=1 on CPU)"]
        if not explicit:
            return ["the Triton interpreter is never chosen automatically (it is slow)"]
        if x.dtype == torch.bfloat16:
            return ["the Triton interpreter computes bfloat16 dot products wrongly (triton #11584)"]
    return []


# op name -> function(backend, *args) -> list of reasons that backend cannot take these inputs
_REASONS: dict[str, Callable[..., list[str]]] = {}


def register_reasons(op: str, fn: Callable[..., list[str]]) -> None:
    _REASONS[op] = fn


def not_supported_reasons(
    op: str, backend: str, *args, explicit: bool = True, **kwargs
) -> list[str]:
    """Why `backend` cannot run `op` on these arguments ([] when it can). With
    ``explicit=False`` (auto selection) a backend may also decline inputs it could run but
    should not be picked for, such as CPU tensors under the Triton interpreter."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
    if op not in _REASONS:
        raise ValueError(f"unknown op {op!r}; known: {sorted(_REASONS)}")
    unavailable = _AVAILABILITY[backend]
    if unavailable is not None:
        return [unavailable]
    return _REASONS[op](backend, *args, explicit=explicit, **kwargs)


def select_backend(op: str, backend: str | None, *args, **kwargs) -> str:
    """The backend that runs `op` on these arguments: `backend` (or the process default) if
    given, which must support them, else the first of `lrkernels.dispatch`'s order for these
    inputs (measured table or rule) that supports them. Under `lrkernels.explain` it returns
    nothing and hands the decision, with its reasons, to `explain` instead."""
    requested = backend if backend is not None else _DEFAULT_BACKEND
    if dispatch.explaining():
        how = (
            f"backend={backend!r} passed"
            if backend is not None
            else "the process default (set_default_backend / LRKERNELS_BACKEND)"
        )
        raise dispatch._Explained(dispatch.explanation(op, requested, how, args, kwargs))
    if requested is not None:
        reasons = not_supported_reasons(op, requested, *args, **kwargs)
        if reasons:
            raise RuntimeError(
                f"{op}: backend {requested!r} cannot run these inputs: " + "; ".join(reasons)
            )
        return requested
    for candidate in dispatch.preference(op, *args, **kwargs):
        if candidate == "torch" or not not_supported_reasons(
            op, candidate, *args, explicit=False, **kwargs
        ):
            return candidate
    raise AssertionError("the order always ends with torch")  # pragma: no cover
