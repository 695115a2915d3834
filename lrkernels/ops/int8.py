"""int8 weight-only dequantize-matmul (W8A16): ``y = x · Wᵀ + bias`` with
``W[n, k] = qweight[n, k] · scales[n]`` (per output channel) or ``· scales[n, k // G]`` (per
group of G ∈ {32, 64, 128} input features), dequantized on chip: the weight crosses memory as
int8, half the bytes of bf16.

The weight comes in either layout of `lrkernels.quant`: plain ``(N, K)`` (layout 1, portable) or
packed (layout 2, what the tensor-core kernels stream; `lrkernels.quant.pack`). The packed tensor
carries its layout (it is 3-D), so the same call takes both; N is then the scales' first
dimension and K = 16 × ``qweight.shape[1]``.

Ops (one per compiled backend; the ``torch`` backend is `lrkernels.reference`):

- ``lrkernels::int8_linear`` / ``lrkernels::int8_linear_grad_input`` (layout 1) and
  ``lrkernels::int8_linear_packed`` / ``lrkernels::int8_linear_packed_grad_input`` (layout 2) —
  C++ schemas with CPU and CUDA kernels, present when the extension is built; their ``path``
  argument picks, on CUDA, the fused kernel or dequantize + cuBLAS (`cuda_path`);
- ``lrkernels::int8_linear_triton`` / ``lrkernels::int8_linear_grad_input_triton`` —
  `torch.library.triton_op`s around `lrkernels.triton_kernels.int8` (either layout).

Autograd: ``dx = dy · W`` through the grad-input op of the same backend (the full-precision W is
never saved for backward), ``dbias = Σ dy``. The weight is frozen: qweight and scales get no
gradient.
"""

from __future__ import annotations

import math
import os
import threading

import torch
from torch import Tensor

from .. import _ext, backends, dispatch
from ..reference import dequantize_reference, int8_linear_reference
from . import compile_time_constant

_OP = "int8_linear"
_FLOAT_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
_GROUP_SIZES = (32, 64, 128)
_POISON = os.environ.get("LRKERNELS_POISON_OUTPUT") == "1"

# ------------------------------------------------------------------- cuda: kernel or cuBLAS

#: The two ways the cuda backend computes the product, and their ``path`` ids in the C++ ops.
CUDA_PATHS = {"kernel": 1, "dequant_matmul": 2}
#: Where the measured dispatch table has no row for the shape, from this many rows
#: (M = x.numel() / in_features) on `cuda_path` dequantizes once to the activation dtype and calls
#: cuBLAS. Conservative default, not a measurement: the fused kernel's mma.sync tops out near 2/3
#: of cuBLAS's wgmma rate, so it should lose once the product is compute-bound; the crossover is
#: expected between M = 256 and 512 on an H100/H200.
DEQUANT_MATMUL_MIN_ROWS = 512
#: The dispatch-table op under which `bench/int8.py` records the two cuda paths side by side
#: (providers lrkernels-cuda-kernel / lrkernels-cuda-dequant, "backends" kernel / dequant_matmul;
#: forward and input gradient), so that a GPU run's `--write-table` moves the crossover.
CUDA_PATH_OP = "int8_linear.cuda_path"


def cuda_path_features(m: int, n: int, k: int, transposed: bool) -> dict:
    """The table features of an int8 product on the cuda backend: rows M, the weight's
    ``in`` (K) and ``out`` (N), and the pass (``"dx"``: the input gradient)."""
    return {"M": m, "in": k, "out": n, "pass": "dx" if transposed else "fwd"}


def cuda_path_class(f) -> str:
    return f"{dispatch.linear_class(f)} pass={f['pass']}"


def _cuda_path_rule(device: str, dtype: str, f) -> tuple[tuple[str, ...], str]:
    if f["M"] >= DEQUANT_MATMUL_MIN_ROWS:
        return ("dequant_matmul", "kernel"), f"rule: M >= {DEQUANT_MATMUL_MIN_ROWS}"
    return ("kernel", "dequant_matmul"), f"rule: M < {DEQUANT_MATMUL_MIN_ROWS}"


dispatch.register_op(
    CUDA_PATH_OP,
    features=lambda m, n, k, transposed: cuda_path_features(m, n, k, transposed),
    shape_class=cuda_path_class,
    rule=_cuda_path_rule,
)


def _cuda_path_choice(m, n, k, dtype, transposed, device) -> tuple[str, str]:
    """(path, why) of `cuda_path`."""
    forced = os.environ.get("LRKERNELS_INT8_CUDA_PATH")
    if forced:
        if forced not in CUDA_PATHS:
            raise ValueError(
                f"LRKERNELS_INT8_CUDA_PATH must be one of {sorted(CUDA_PATHS)}, got {forced!r}"
            )
        return forced, "forced by LRKERNELS_INT8_CUDA_PATH"
    f = cuda_path_features(m, n, k, transposed)
    if device is not None:
        row = dispatch.table_row(CUDA_PATH_OP, device, dtype, cuda_path_class(f))
        first = next((p for p in row["order"] if p in CUDA_PATHS), None) if row else None
        if first is not None:
            return first, "table: measured " + " > ".join(
                p for p in row["order"] if p in CUDA_PATHS
            )
    order, why = _cuda_path_rule("cuda", dispatch.dtype_name(dtype), f)
    return order[0], why


def cuda_path(
    m: int,
    n: int,
    k: int,
    dtype: torch.dtype,
    *,
    transposed: bool = False,
    device: torch.device | None = None,
) -> str:
    """How the cuda backend runs an ``(m x k) · (k x n)`` int8 product (``transposed``: the input
    gradient, ``(m x n) · (n x k)``): ``"kernel"`` (the fused tensor-core kernel: the weight
    streams as int8) or ``"dequant_matmul"`` (W dequantized once to ``dtype``, then cuBLAS).

    The one place this choice is made: the measured dispatch table's row for
    (`CUDA_PATH_OP`, `device`, dtype, shape class and pass) where it has one (written by
    ``bench/int8.py --write-table`` / ``scripts/gpu_run.sh``), else the conservative rule
    ``m >= DEQUANT_MATMUL_MIN_ROWS`` (float32 always dequantizes, in the C++ op: no float32
    kernel).
    ``LRKERNELS_INT8_CUDA_PATH=kernel`` or ``=dequant_matmul`` forces one (benchmarks, A/B
    checks)."""
    return _cuda_path_choice(m, n, k, dtype, transposed, device)[0]


def _path_id(act: Tensor, features: int, n: int, k: int, transposed: bool) -> int:
    """The ``path`` argument of the C++ ops for activations ``act`` (..., features)."""
    if not act.is_cuda:
        return 0
    m = math.prod(act.shape[:-1])
    return CUDA_PATHS[cuda_path(m, n, k, act.dtype, transposed=transposed, device=act.device)]


def is_packed(qweight: Tensor) -> bool:
    """True for a packed (layout 2) weight: int8 ``(ceil(N / 32), K / 16, 512)``."""
    return qweight.dim() == 3


def weight_shape(qweight: Tensor, scales: Tensor) -> tuple[int, int]:
    """``(out_features, in_features)`` of a checked (qweight, scales) pair in either layout."""
    if is_packed(qweight):
        return scales.shape[0], 16 * qweight.shape[1]
    return qweight.shape[0], qweight.shape[1]


def dequantize_weight(qweight: Tensor, scales: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """W ``(N, K)`` = q · s (formed in float32, rounded once to ``dtype``, default the scales'
    dtype) from either layout. A packed weight on CUDA uses the extension's dequantize kernel
    (one pass: 1 byte read, 2 written per weight); otherwise plain tensor ops. For callers that
    need W itself (e.g. a LoRA merge, or an adapter kernel that takes a dense base)."""
    dtype = scales.dtype if dtype is None else dtype
    if (
        is_packed(qweight)
        and qweight.is_cuda
        and dtype == scales.dtype
        and dtype != torch.float64
        and _ext.KERNELS.get(("int8_dequantize_packed", "CUDA"), False)
    ):
        return torch.ops.lrkernels.int8_dequantize_packed(qweight, scales)
    return dequantize_reference(qweight, scales, dtype)


def int8_linear(
    x: Tensor,
    qweight: Tensor,
    scales: Tensor,
    bias: Tensor | None = None,
    *,
    group_size: int | None = None,
    backend: str | None = None,
) -> Tensor:
    """int8-weight linear layer ``y = x · dequantize(qweight, scales)ᵀ + bias``, equal to
    ``F.linear(x, lrkernels.quant.dequantize(qweight, scales), bias)`` up to rounding.

    Args:
        x: ``(..., in_features)`` float16 / bfloat16 (float32 too; float64 on the cpu and torch
            backends); any leading dims and strides.
        qweight: int8 ``(out_features, in_features)``, symmetric (−127…127); or its packed form
            (layout 2, `lrkernels.quant.pack`), which the CUDA kernels read without a copy.
        scales: x's dtype; ``(out_features,)`` per output channel, or
            ``(out_features, in_features // group_size)`` per group (any strides; the
            column-major storage `lrkernels.quant.pack` gives is the one the kernels stream).
        bias: ``(out_features,)`` in x's dtype, or None.
        group_size: optional check: None accepts the layout the scales' shape implies; 0 means
            per channel; 32 / 64 / 128 must match the scales.
        backend: ``"cuda"``, ``"triton"``, ``"cpu"``, ``"torch"`` or None (auto).

    Returns:
        ``(..., out_features)`` in x's dtype. Accumulation in float32.

    Gradients flow to x (``dx = dy · W`` by the same backend, without materialising W) and to
    bias; qweight and scales are frozen (no gradient).
    """
    check_int8_linear_args(x, qweight, scales, bias, group_size)
    chosen = backends.select_backend(_OP, backend, x, qweight, scales, bias)
    if chosen == "torch":
        # The weight is frozen on every backend: no gradient reaches the scales here either.
        return int8_linear_reference(x, qweight, scales.detach(), bias)
    if chosen == "triton":
        _ensure_triton_ops()
        return torch.ops.lrkernels.int8_linear_triton(x, qweight, scales, bias)
    n, k = weight_shape(qweight, scales)
    path = _path_id(x, k, n, k, False) if chosen == "cuda" else 0
    if is_packed(qweight):
        return torch.ops.lrkernels.int8_linear_packed(x, qweight, scales, bias, path)
    return torch.ops.lrkernels.int8_linear(x, qweight, scales, bias, path)


def _check_packed_qweight(qweight: Tensor, scales: Tensor) -> tuple[int, int]:
    """(N, K) of a packed qweight, N from the scales; ValueError naming the mismatch."""
    if qweight.shape[2] != 512 or qweight.shape[0] < 1 or qweight.shape[1] < 1:
        raise ValueError(
            "int8_linear: a 3-D qweight must be packed (layout 2): (ceil(out_features / 32), "
            f"in_features / 16, 512), got shape {tuple(qweight.shape)}"
        )
    if scales.dim() not in (1, 2) or scales.shape[0] < 1:
        raise ValueError(
            "int8_linear: scales must have shape (out_features,) or (out_features, "
            f"in_features / group_size), got {tuple(scales.shape)}"
        )
    n, k = scales.shape[0], 16 * qweight.shape[1]
    if -(-n // 32) != qweight.shape[0]:
        raise ValueError(
            f"int8_linear: scales of shape {tuple(scales.shape)} give out_features {n}, but the "
            f"packed qweight of shape {tuple(qweight.shape)} holds ceil(out_features / 32) = "
            f"{qweight.shape[0]} row units"
        )
    return n, k


def group_size_from_scales(qweight: Tensor, scales: Tensor) -> int:
    """0 for per-channel scales ``(N,)``; G for ``(N, K // G)``; ValueError otherwise. Either
    layout of qweight."""
    n, k = _check_packed_qweight(qweight, scales) if is_packed(qweight) else qweight.shape
    if scales.dim() == 1:
        if scales.shape[0] != n:
            raise ValueError(
                f"int8_linear: per-channel scales must have shape ({n},), got {tuple(scales.shape)}"
            )
        return 0
    if scales.dim() != 2 or scales.shape[0] != n or scales.shape[1] < 1:
        raise ValueError(
            f"int8_linear: scales must have shape ({n},) or ({n}, in_features / group_size), "
            f"got {tuple(scales.shape)}"
        )
    groups = scales.shape[1]
    if k % groups != 0:
        raise ValueError(
            f"int8_linear: in_features ({k}) is not divisible into {groups} groups "
            f"(scales of shape {tuple(scales.shape)})"
        )
    group = k // groups
    if group not in _GROUP_SIZES:
        raise ValueError(
            f"int8_linear: group size must be 32, 64 or 128, got {group} "
            f"(in_features {k}, {groups} groups)"
        )
    return group


def check_int8_linear_args(
    x: Tensor, qweight: Tensor, scales: Tensor, bias: Tensor | None, group_size: int | None = None
) -> int:
    """Raises TypeError/ValueError naming the bad argument (the C++ ops run the same checks);
    returns the group size (0 per channel)."""
    for name, t in (("x", x), ("qweight", qweight), ("scales", scales)):
        if not isinstance(t, Tensor):
            raise TypeError(f"int8_linear: {name} must be a torch.Tensor, got {type(t).__name__}")
    if bias is not None and not isinstance(bias, Tensor):
        raise TypeError(
            f"int8_linear: bias must be a torch.Tensor or None, got {type(bias).__name__}"
        )
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"int8_linear: x must be float64, float32, float16 or bfloat16, got {x.dtype}"
        )
    if qweight.dtype != torch.int8:
        raise TypeError(f"int8_linear: qweight must be int8, got {qweight.dtype}")
    for name, t in [("scales", scales)] + ([("bias", bias)] if bias is not None else []):
        if t.dtype != x.dtype:
            raise TypeError(f"int8_linear: {name} must have x's dtype ({x.dtype}), got {t.dtype}")
    for name, t in [("qweight", qweight), ("scales", scales)] + (
        [("bias", bias)] if bias is not None else []
    ):
        if t.device != x.device:
            raise ValueError(
                f"int8_linear: {name} must be on x's device ({x.device}), got {t.device}"
            )
    if x.dim() < 1:
        raise ValueError("int8_linear: x must have shape (..., in_features), got a 0-d tensor")
    if qweight.dim() not in (2, 3):
        raise ValueError(
            "int8_linear: qweight must be 2-D (out_features, in_features) or packed (layout 2, "
            f"3-D), got shape {tuple(qweight.shape)}"
        )
    n, k = _check_packed_qweight(qweight, scales) if is_packed(qweight) else qweight.shape
    if n < 1 or k < 1:
        raise ValueError(
            "int8_linear: qweight must have out_features >= 1 and in_features >= 1, got shape "
            f"{tuple(qweight.shape)}"
        )
    if x.shape[-1] != k:
        raise ValueError(
            f"int8_linear: x's last dimension must be {k} to match qweight of shape "
            f"{tuple(qweight.shape)}{' (packed)' if is_packed(qweight) else ''}, got "
            f"{tuple(x.shape)}"
        )
    group = group_size_from_scales(qweight, scales)
    if group_size is not None and group_size != group:
        raise ValueError(
            f"int8_linear: group_size={group_size} does not match scales of shape "
            f"{tuple(scales.shape)} (which imply {'per-channel' if group == 0 else group})"
        )
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != n):
        raise ValueError(f"int8_linear: bias must have shape ({n},), got {tuple(bias.shape)}")
    return group


_LAYOUT_OPS = {
    1: ("int8_linear", "int8_linear_grad_input"),
    2: ("int8_linear_packed", "int8_linear_packed_grad_input"),
}


def _reasons(backend: str, x, qweight, scales, bias, *, explicit: bool) -> list[str]:
    reasons = backends.device_and_dtype_reasons(backend, x, explicit=explicit)
    layout = 2 if isinstance(qweight, Tensor) and is_packed(qweight) else 1
    return reasons + backends.kernel_reasons(backend, _LAYOUT_OPS[layout])


backends.register_reasons(_OP, _reasons)


# ----------------------------------------------------------------------------- auto selection


def _dispatch_features(x: Tensor, qweight: Tensor, scales: Tensor, bias=None) -> dict:
    """What auto selection keys on (lrkernels.dispatch): Python ints from the shapes only."""
    n, k = weight_shape(qweight, scales)
    group = 0 if scales.dim() == 1 else k // scales.shape[1]
    return {
        "M": dispatch.rows_of(x),
        "in": k,
        "out": n,
        "scales": f"g{group}" if group else "channel",
    }


def _dispatch_rule(device: str, dtype: str, f) -> tuple[tuple[str, ...], str]:
    """Backends in the order they are expected to win where the measured table has no row.
    The torch path dequantizes the whole weight on every call (int8 read, float32 and 16-bit
    copies written and read: about 20 bytes per weight against the kernels' 1), which the
    kernels beat wherever the weight's bytes dominate: small M."""
    if device == "cuda":
        if f["M"] <= 256:
            return ("cuda", "triton"), (
                "M <= 256: static estimate (issue 8): the cuda tensor-core kernels stream the "
                "packed weight at ~1.3-1.8x of a bf16 F.linear, the triton kernel at about 1.0x; "
                "both ahead of the torch path, which dequantizes the whole weight every call"
            )
        return ("cuda", "torch"), (
            "M > 256: the cuda backend's own choice (lrkernels.ops.int8.cuda_path: the "
            "measured int8_linear.cuda_path row, else its kernel below M = 512 and one "
            "dequantize pass + cuBLAS above), which the torch path (several dequantize ops) "
            "cannot beat; torch where cuda cannot run"
        )
    return (
        "torch",
    ), "on the CPU torch's dequantize-then-matmul until a measurement says otherwise"


dispatch.register_op(
    _OP, features=_dispatch_features, shape_class=dispatch.linear_class, rule=_dispatch_rule
)


# ----------------------------------------------------------------------------- torch ops


# Fakes return contiguous outputs whatever the inputs' strides, as every backend does: the C++
# CPU kernel reshapes a fresh 2-D product, the CUDA launcher and the Triton ops allocate the
# final shape with torch.empty.


def _fake_forward(x: Tensor, qweight: Tensor, scales: Tensor, bias: Tensor | None = None, path=0):
    return x.new_empty((*x.shape[:-1], weight_shape(qweight, scales)[0]))


def _fake_grad_input(dy: Tensor, qweight: Tensor, scales: Tensor, path=0):
    return dy.new_empty((*dy.shape[:-1], weight_shape(qweight, scales)[1]))


def _setup_context(ctx, inputs, output) -> None:
    _, qweight, scales = inputs[:3]
    ctx.save_for_backward(qweight, scales)
    ctx.has_bias = len(inputs) > 3 and inputs[3] is not None


def _make_backward(grad_input_op, with_path: bool):
    """Backward of a forward op: ``dx = grad_input_op(dy, q, s[, path])``, ``db = Σ dy``. The
    C++ ops get the path `cuda_path` picks for the gradient's own shape."""

    def backward(ctx, dy: Tensor):
        qweight, scales = ctx.saved_tensors
        n_inputs = len(ctx.needs_input_grad)  # 3 when the call left bias (and path) default
        need_x, _, _, need_b = (*ctx.needs_input_grad, False)[:4]
        dx = None
        if need_x:
            if with_path:
                n, k = weight_shape(qweight, scales)
                dx = grad_input_op(dy, qweight, scales, _path_id(dy, n, n, k, True))
            else:
                dx = grad_input_op(dy, qweight, scales)
        db = dy.reshape(-1, dy.shape[-1]).sum(0) if need_b and ctx.has_bias else None
        return (dx, None, None, db, None)[:n_inputs]

    return backward


def _register_grad_input_autograd(name: str, forward_op, with_path: bool) -> None:
    """grad_input is linear in dy: its own derivative is the forward op (double backward)."""

    def setup(ctx, inputs, output):
        ctx.save_for_backward(inputs[1], inputs[2])

    def backward(ctx, ddx):
        qweight, scales = ctx.saved_tensors
        if with_path:
            n, k = weight_shape(qweight, scales)
            out = forward_op(ddx, qweight, scales, None, _path_id(ddx, k, n, k, False))
        else:
            out = forward_op(ddx, qweight, scales, None)
        return (out, None, None, None)[: len(ctx.needs_input_grad)]

    torch.library.register_autograd(name, backward, setup_context=setup)


for _fwd, _grad in _LAYOUT_OPS.values():
    if _ext.has_op(_fwd):
        torch.library.register_fake(f"lrkernels::{_fwd}")(_fake_forward)
        torch.library.register_fake(f"lrkernels::{_grad}")(_fake_grad_input)
        torch.library.register_autograd(
            f"lrkernels::{_fwd}",
            _make_backward(getattr(torch.ops.lrkernels, _grad), with_path=True),
            setup_context=_setup_context,
        )
        _register_grad_input_autograd(
            f"lrkernels::{_grad}", getattr(torch.ops.lrkernels, _fwd), with_path=True
        )
if _ext.has_op("int8_dequantize_packed"):

    @torch.library.register_fake("lrkernels::int8_dequantize_packed")
    def _fake_dequantize(qweight: Tensor, scales: Tensor):
        return scales.new_empty(weight_shape(qweight, scales))


_TRITON_LOCK = threading.Lock()
_TRITON_OPS_REGISTERED = False


@compile_time_constant  # torch.compile runs it eagerly, never traces it
def _ensure_triton_ops() -> bool:
    """Registers the ``lrkernels::int8_linear*_triton`` ops on first use of the triton backend
    (importing triton and defining a `torch.library.triton_op` costs about a second, which
    ``import lrkernels`` must not pay)."""
    global _TRITON_OPS_REGISTERED
    with _TRITON_LOCK:
        if not _TRITON_OPS_REGISTERED:
            _register_triton_ops()
            _TRITON_OPS_REGISTERED = True
    return True


def _register_triton_ops() -> None:
    from ..triton_kernels.int8 import launch_int8_linear, launch_int8_linear_grad_input

    @torch.library.triton_op("lrkernels::int8_linear_triton", mutates_args=())
    def _int8_linear_triton(
        x: Tensor, qweight: Tensor, scales: Tensor, bias: Tensor | None
    ) -> Tensor:
        n, k = weight_shape(qweight, scales)
        out = torch.empty((*x.shape[:-1], n), device=x.device, dtype=x.dtype)
        if _POISON:
            out.fill_(float("nan"))
        if out.numel() > 0:
            group = 0 if scales.dim() == 1 else k // scales.shape[1]
            launch_int8_linear(x.reshape(-1, k), qweight, scales, bias, out.view(-1, n), group)
        return out

    @torch.library.triton_op("lrkernels::int8_linear_grad_input_triton", mutates_args=())
    def _int8_linear_grad_input_triton(dy: Tensor, qweight: Tensor, scales: Tensor) -> Tensor:
        n, k = weight_shape(qweight, scales)
        out = torch.empty((*dy.shape[:-1], k), device=dy.device, dtype=dy.dtype)
        if _POISON:
            out.fill_(float("nan"))
        if out.numel() > 0:
            group = 0 if scales.dim() == 1 else k // scales.shape[1]
            launch_int8_linear_grad_input(
                dy.reshape(-1, n), qweight, scales, out.view(-1, k), group
            )
        return out

    torch.library.register_autograd(
        "lrkernels::int8_linear_triton",
        _make_backward(
            lambda *a: torch.ops.lrkernels.int8_linear_grad_input_triton(*a), with_path=False
        ),
        setup_context=_setup_context,
    )
    _register_grad_input_autograd(
        "lrkernels::int8_linear_grad_input_triton",
        lambda *a: torch.ops.lrkernels.int8_linear_triton(*a),
        with_path=False,
    )
