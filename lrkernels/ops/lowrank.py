"""The fused low-rank linear: ``y = (x · Vᵀ) · Uᵀ + bias``.

Three torch ops compute it, one per compiled backend, and the reference covers the rest:

- ``lrkernels::lowrank_linear`` — C++ schema (csrc/registration.cpp) with a CPU kernel
  (csrc/cpu) and a CUDA kernel (csrc/cuda), present when the extension is built;
- ``lrkernels::lowrank_linear_triton`` — a `torch.library.triton_op` around
  `lrkernels.triton_kernels.lowrank`;
- the ``torch`` backend is `lrkernels.reference.lowrank_linear_reference` (two matmuls).

Both ops get a fake implementation (shapes and strides, for torch.compile / meta tensors: the
output is contiguous, as every backend allocates it) and the same autograd formula, whose input
gradient is itself a low-rank product through the same op:
``dx = dy · U · V = lowrank(dy, Vᵀ, Uᵀ)``; ``dU = dyᵀ · (x · Vᵀ)``, ``dV = (dy · U)ᵀ · x``
and ``dbias = Σ dy`` are ordinary GEMMs/reductions left to torch.
"""

from __future__ import annotations

import os
import threading

import torch
from torch import Tensor

from .. import _ext, backends, dispatch
from ..reference import lowrank_linear_reference
from . import compile_time_constant

_OP = "lowrank_linear"
_FLOAT_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
# Fill outputs with NaN before every launch so that an element a kernel forgot to write cannot
# pass a test (read once: set it before importing lrkernels).
_POISON = os.environ.get("LRKERNELS_POISON_OUTPUT") == "1"


def lowrank_linear(
    x: Tensor,
    U: Tensor,
    V: Tensor,
    bias: Tensor | None = None,
    *,
    backend: str | None = None,
) -> Tensor:
    """Low-rank linear layer ``y = (x · Vᵀ) · Uᵀ + bias``, equal to ``F.linear(x, U @ V, bias)``
    up to rounding, without forming ``U @ V`` or writing the rank-r intermediate to memory.

    Args:
        x: ``(..., in_features)``; any leading dims (also none and zero-size), any strides.
        U: ``(out_features, rank)``.
        V: ``(rank, in_features)``.
        bias: ``(out_features,)`` or None.
        backend: ``"cuda"``, ``"triton"``, ``"cpu"``, ``"torch"`` or None (auto: the fastest
            backend that supports these inputs; see `lrkernels.available_backends`).

    Returns:
        ``(..., out_features)`` in x's dtype.

    Dtypes: float32, float16, bfloat16, all tensors the same (as `F.linear`); float64 too on the
    ``cpu`` and ``torch`` backends (auto picks ``torch`` for float64 CUDA tensors). Products
    accumulate in float32; for float16/bfloat16 the intermediate ``x · Vᵀ`` is rounded to the
    input dtype before the second product, as torch's own two matmuls round it.

    Raises:
        TypeError / ValueError: bad arguments (named in the message), before any kernel runs.
        RuntimeError: an explicit ``backend`` that cannot run these inputs, with the reasons.
    """
    check_lowrank_linear_args(x, U, V, bias)
    chosen = backends.select_backend(_OP, backend, x, U, V, bias)
    if chosen == "torch":
        return lowrank_linear_reference(x, U, V, bias)
    if chosen == "triton":
        _ensure_triton_ops()
        return torch.ops.lrkernels.lowrank_linear_triton(x, U, V, bias)
    return torch.ops.lrkernels.lowrank_linear(x, U, V, bias)  # cuda or cpu, by x's device


def check_lowrank_linear_args(x: Tensor, U: Tensor, V: Tensor, bias: Tensor | None) -> None:
    """Raises TypeError/ValueError naming the bad argument; the C++ ops run the same checks."""
    for name, t in (("x", x), ("U", U), ("V", V)):
        if not isinstance(t, Tensor):
            raise TypeError(
                f"lowrank_linear: {name} must be a torch.Tensor, got {type(t).__name__}"
            )
    if bias is not None and not isinstance(bias, Tensor):
        raise TypeError(
            f"lowrank_linear: bias must be a torch.Tensor or None, got {type(bias).__name__}"
        )
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"lowrank_linear: x must be float64, float32, float16 or bfloat16, got {x.dtype}"
        )
    named = [("U", U), ("V", V)] + ([("bias", bias)] if bias is not None else [])
    for name, t in named:
        if t.dtype != x.dtype:
            raise TypeError(
                f"lowrank_linear: {name} must have x's dtype ({x.dtype}), got {t.dtype}"
            )
        if t.device != x.device:
            raise ValueError(
                f"lowrank_linear: {name} must be on x's device ({x.device}), got {t.device}"
            )
    if x.dim() < 1:
        raise ValueError("lowrank_linear: x must have shape (..., in_features), got a 0-d tensor")
    if V.dim() != 2:
        raise ValueError(
            f"lowrank_linear: V must be 2-D (rank, in_features), got shape {tuple(V.shape)}"
        )
    if U.dim() != 2:
        raise ValueError(
            f"lowrank_linear: U must be 2-D (out_features, rank), got shape {tuple(U.shape)}"
        )
    rank, in_features = V.shape
    if rank < 1:
        raise ValueError(f"lowrank_linear: rank must be >= 1, got V of shape {tuple(V.shape)}")
    if in_features != x.shape[-1]:
        raise ValueError(
            f"lowrank_linear: V must have shape (rank, {x.shape[-1]}) to match x's last "
            f"dimension, got {tuple(V.shape)}"
        )
    if in_features < 1:
        raise ValueError(
            f"lowrank_linear: in_features must be >= 1, got x of shape {tuple(x.shape)}"
        )
    if U.shape[1] != rank:
        raise ValueError(
            f"lowrank_linear: U must have shape (out_features, {rank}) to match V's rank, "
            f"got {tuple(U.shape)}"
        )
    if U.shape[0] < 1:
        raise ValueError(
            f"lowrank_linear: out_features must be >= 1, got U of shape {tuple(U.shape)}"
        )
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != U.shape[0]):
        raise ValueError(
            f"lowrank_linear: bias must have shape ({U.shape[0]},), got {tuple(bias.shape)}"
        )


def kernel_expected_faster(
    backend: str, M: int, in_features: int, out_features: int, rank: int, dtype: torch.dtype
) -> bool:
    """Whether `backend`'s kernels are expected to beat torch's two matmuls (cuBLAS) on a
    ``(M, in) -> (M, out)`` call of this rank: the crossover of auto selection and of the input
    gradient. A conservative default from the bytes/FLOPs model of the kernels' header comments
    (csrc/cuda/lowrank_tc_*.cu, triton_kernels/lowrank.py), until the measured dispatch table
    replaces it:

    - cuda, float16/bfloat16: M <= 1024. Small M is latency-bound: two launches of which the
      second overlaps the first (PDL), against two cuBLAS launches. Above, the work is streaming
      x or y at tensor-core rate, where cuBLAS's wgmma (sm_90) outruns these mma.sync kernels.
    - cuda, float32: M <= 16 (CUDA-core GEMVs; above, cuBLAS's SGEMM).
    - triton, float16/bfloat16: 16 < M <= 1024 (its split counters cost a memset per call, which
      loses to cuBLAS at decode sizes); float32 never (IEEE dots on CUDA cores).
    - cpu / torch: no crossover.
    """
    del in_features, out_features, rank  # the default depends on M alone; the table will not
    if backend == "cuda":
        return M <= (16 if dtype == torch.float32 else 1024)
    if backend == "triton":
        return dtype != torch.float32 and 16 < M <= 1024
    return True


def _reasons(backend: str, x: Tensor, U: Tensor, V: Tensor, bias, *, explicit: bool) -> list[str]:
    """Why `backend` cannot take these (already validated) inputs; [] when it can."""
    reasons = backends.device_and_dtype_reasons(backend, x, explicit=explicit)
    return reasons + backends.kernel_reasons(backend, (_OP,))


backends.register_reasons(_OP, _reasons)


# ----------------------------------------------------------------------------- auto selection


def _dispatch_features(x: Tensor, U: Tensor, V: Tensor, bias=None) -> dict:
    """What auto selection keys on (lrkernels.dispatch): Python ints from the shapes only."""
    return {"M": dispatch.rows_of(x), "in": V.shape[1], "out": U.shape[0], "rank": V.shape[0]}


def _dispatch_rule(device: str, dtype: str, f) -> tuple[tuple[str, ...], str]:
    """Backends in the order they are expected to win where the measured table has no row: on a
    GPU the kernels where `kernel_expected_faster` says they beat torch's two matmuls (a static
    estimate), torch otherwise; on the CPU torch."""
    if device == "cuda":
        torch_dtype = getattr(torch, dtype)
        order = tuple(
            b
            for b in ("cuda", "triton")
            if kernel_expected_faster(b, f["M"], f["in"], f["out"], f["rank"], torch_dtype)
        )
        return order + ("torch",), (
            "static estimate (issue 9, lrkernels.ops.lowrank.kernel_expected_faster): cuda "
            "kernels at M <= 1024 (float32: M <= 16), triton at 16 < M <= 1024 in 16 bits, "
            "torch's two matmuls elsewhere, until a measurement says otherwise"
        )
    return ("torch",), (
        "on the CPU torch's two matmuls (the cpu backend measured 0.40-0.88x of their speed, "
        "issue 7)"
    )


dispatch.register_op(
    _OP, features=_dispatch_features, shape_class=dispatch.linear_class, rule=_dispatch_rule
)


# ----------------------------------------------------------------------------- torch ops


def _fake(x: Tensor, U: Tensor, V: Tensor, bias: Tensor | None = None) -> Tensor:
    # Contiguous whatever x's strides: the C++ CPU kernel reshapes a fresh 2-D product, the CUDA
    # launcher and the Triton op allocate (..., out) with torch.empty.
    return x.new_empty((*x.shape[:-1], U.shape[0]))


def _setup_context(ctx, inputs, output) -> None:
    x, U, V = inputs[:3]
    ctx.save_for_backward(x, U, V)
    ctx.has_bias = len(inputs) > 3 and inputs[3] is not None


def _make_backward(op, backend: str):
    def backward(ctx, dy: Tensor):
        x, U, V = ctx.saved_tensors
        n_inputs = len(ctx.needs_input_grad)  # 3 when the call left bias at its default
        need_x, need_U, need_V, need_b = (*ctx.needs_input_grad, False)[:4]
        dx = dU = dV = db = None
        x2 = x.reshape(-1, x.shape[-1])
        dy2 = dy.reshape(-1, dy.shape[-1])
        if need_x:
            # dy · U · V: the same fused low-rank product, with the transposed factors read in
            # place; torch's two matmuls where the kernel is not expected to win.
            if dy.is_cuda and not kernel_expected_faster(
                backend, dy2.shape[0], U.shape[0], V.shape[1], V.shape[0], dy.dtype
            ):
                dx = lowrank_linear_reference(dy, V.t(), U.t())
            else:
                dx = op(dy, V.t(), U.t(), None)
        if need_U:
            dU = dy2.t() @ (x2 @ V.t())
        if need_V:
            dV = (dy2 @ U).t() @ x2
        if need_b and ctx.has_bias:
            db = dy2.sum(0)
        return (dx, dU, dV, db)[:n_inputs]

    return backward


if _ext.has_op(_OP):
    torch.library.register_fake(f"lrkernels::{_OP}")(_fake)
    torch.library.register_autograd(
        f"lrkernels::{_OP}",
        _make_backward(lambda *a: torch.ops.lrkernels.lowrank_linear(*a), "cuda"),
        setup_context=_setup_context,
    )

_TRITON_LOCK = threading.Lock()
_TRITON_OPS_REGISTERED = False


@compile_time_constant  # torch.compile runs it eagerly, never traces it
def _ensure_triton_ops() -> bool:
    """Registers ``lrkernels::lowrank_linear_triton`` on first use of the triton backend:
    importing triton and defining a `torch.library.triton_op` (which imports torch._inductor)
    costs about a second, which ``import lrkernels`` must not pay."""
    global _TRITON_OPS_REGISTERED
    with _TRITON_LOCK:
        if not _TRITON_OPS_REGISTERED:
            _register_triton_ops()
            _TRITON_OPS_REGISTERED = True
    return True


def _register_triton_ops() -> None:
    from ..triton_kernels.lowrank import launch_lowrank_linear

    @torch.library.triton_op("lrkernels::lowrank_linear_triton", mutates_args=())
    def _lowrank_linear_triton(x: Tensor, U: Tensor, V: Tensor, bias: Tensor | None) -> Tensor:
        out = torch.empty((*x.shape[:-1], U.shape[0]), device=x.device, dtype=x.dtype)
        if _POISON:
            out.fill_(float("nan"))
        if out.numel() > 0:
            launch_lowrank_linear(x.reshape(-1, x.shape[-1]), U, V, bias, out.view(-1, U.shape[0]))
        return out

    torch.library.register_autograd(
        "lrkernels::lowrank_linear_triton",
        _make_backward(lambda *a: torch.ops.lrkernels.lowrank_linear_triton(*a), "triton"),
        setup_context=_setup_context,
    )
