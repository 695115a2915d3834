"""LoRA on a frozen base: ``y = x · Wᵀ + s · (drop(x) · Aᵀ) · Bᵀ + bias``.

The base W is a dense weight ``(out, in)`` or the int8 weight of `lrkernels.quant` (qweight and
scales, dequantized on chip as `lrkernels.int8_linear` does). Ops, one per compiled backend (the
``torch`` backend is `lrkernels.reference.lora_linear_reference`, PEFT's three matmuls):

- ``lrkernels::lora_linear`` (forward, returns y and ``t = drop(x) · Aᵀ``),
  ``lrkernels::lora_linear_grad_input``, ``lrkernels::lora_linear_grad_A`` and
  ``lrkernels::lora_linear_multi`` — C++ schemas with CPU and CUDA kernels;
- ``lrkernels::lora_linear_triton`` and friends — `torch.library.triton_op`s around
  `lrkernels.triton_kernels.lora`, registered on first use of the triton backend.

The int8 base comes in either layout of `lrkernels.quant`: plain ``(out, in)`` (layout 1) or
packed (layout 2, 3-D; what `Int8Linear` holds on CUDA). The torch backend dequantizes either;
the triton kernels read packed tiles in place (`load_packed_tile`); the C++ cpu kernels read
layout 1, so a packed base is unpacked per call there (a copy of the int8 weight: the cpu backend
is the reference implementation, not a fast path); the cuda backend reads both: the int8
tensor-core kernel (``csrc/cuda/int8_mma.cuh``, the LoRA term in its epilogue) streams a packed
base in place at every M and a plain one above 16 rows (packed per call, as ``int8_linear``
does), the decode GEMV reads a plain one. How the cuda backend runs the int8 base product (the
kernel, or dequantize + cuBLAS) is ``int8_linear``'s own table entry
(`lrkernels.ops.int8.cuda_path`), passed to the C++ ops as ``int8_path``. A dense base in 16
bits runs on the same tensor-core kernel streaming the 16-bit weight from 17 to
`CUDA_DENSE_FUSED_MAX_ROWS` rows (``csrc/cuda/lora_cuda.cpp`` says what runs where).

Auto selection (``backend=None``): `lrkernels.dispatch` keys on rows, in / out features, rank,
base kind (dense / int8), inference or training and dropout (``_dispatch_features``); where the
measured table has no row, `_dispatch_rule` decides; ``lrkernels.explain("lora_linear", ...)``
says which backend runs and why.

Dropout is a counter-based hash of (seed, row, column) (`lrkernels.reference`,
``csrc/cuda/lora_dropout.h``) that every backend computes bit-identically: the mask is never
stored; the backward regenerates it from the seed (a one-element int64 tensor drawn from torch's
generator on x's device, so no host sync and nothing for torch.compile to specialise on). The
probability is rounded to a multiple of 1/65536 and the LoRA scale is divided by the exact kept
fraction, so the masked x is x or 0.

Autograd (W frozen): with ``dt = s · dy · B`` (M, r),
``dx = dy · W + keep ⊙ (dt · A)`` (the grad-input kernel: the base product plus the LoRA term in
its epilogue, int8 dequantized on chip), ``dA = dtᵀ · (keep ⊙ x)`` (mask regenerated),
``dB = s · dyᵀ · t`` (t saved by the forward: M × r, tiny), ``dbias = Σ dy``.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Sequence

import torch
from torch import Tensor

from .. import _ext, backends, dispatch
from ..quant import unpack
from ..reference import (
    lora_dropout_keep_mask,
    lora_dropout_threshold,
    lora_keep_scale,
    lora_linear_multi_reference,
    lora_linear_reference,
)
from . import compile_time_constant
from .int8 import (
    DEQUANT_MATMUL_MIN_ROWS,
    _path_id,
    group_size_from_scales,
    is_packed,
    weight_shape,
)

_OP = "lora_linear"
_OP_MULTI = "lora_linear_multi"
_FLOAT_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
_POISON = os.environ.get("LRKERNELS_POISON_OUTPUT") == "1"
# LRKERNELS_CHECK_INDICES=1: validate multi-adapter indices and ranks on the GPU too (a
# device-to-host sync per call; not CUDA-graph capturable). Read once.
_CHECK_INDICES = os.environ.get("LRKERNELS_CHECK_INDICES") == "1"

__all__ = ["lora_linear", "lora_linear_multi", "split_base"]

Base = Tensor | Sequence


def split_base(base: Base, op: str = _OP) -> tuple[Tensor, Tensor | None]:
    """``(weight, weight_scales)`` of a base: a dense Tensor ``(out, in)`` gives (it, None); an
    int8 base ``(qweight, scales)`` or ``(qweight, scales, group_size)`` gives (qweight,
    scales) after checking the pair (either layout of `lrkernels.quant`) and the group size
    against the scales."""
    if isinstance(base, Tensor):
        return base, None
    if isinstance(base, Sequence) and len(base) in (2, 3):
        qweight, scales = base[0], base[1]
        for name, t in (("qweight", qweight), ("scales", scales)):
            if not isinstance(t, Tensor):
                raise TypeError(f"{op}: base {name} must be a torch.Tensor, got {type(t).__name__}")
        if qweight.dtype != torch.int8:
            raise TypeError(f"{op}: an int8 base's qweight must be int8, got {qweight.dtype}")
        if qweight.dim() not in (2, 3):
            raise ValueError(
                f"{op}: qweight must be 2-D (out_features, in_features) or packed (layout 2: "
                f"(ceil(out_features / 32), in_features / 16, 512)), got shape "
                f"{tuple(qweight.shape)}"
            )
        group = group_size_from_scales(qweight, scales)  # either layout; N from the scales
        if len(base) == 3 and base[2] is not None and int(base[2] or 0) != group:
            raise ValueError(
                f"{op}: group_size={base[2]} does not match scales of shape "
                f"{tuple(scales.shape)} (which imply {'per-channel' if group == 0 else group})"
            )
        return qweight, scales
    raise TypeError(
        f"{op}: base must be a dense weight Tensor (out, in) or an int8 base (qweight, scales[, "
        f"group_size]), got {type(base).__name__}"
    )


def _check_tensor(op: str, name: str, t, x: Tensor, *, optional: bool = False) -> None:
    if t is None and optional:
        return
    if not isinstance(t, Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != x.dtype:
        raise TypeError(f"{op}: {name} must have x's dtype ({x.dtype}), got {t.dtype}")
    if t.device != x.device:
        raise ValueError(f"{op}: {name} must be on x's device ({x.device}), got {t.device}")


def _check_base(op: str, x, weight: Tensor, weight_scales: Tensor | None) -> tuple[int, int]:
    if not isinstance(x, Tensor):
        raise TypeError(f"{op}: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{op}: x must be float64, float32, float16 or bfloat16, got {x.dtype}")
    if x.dim() < 1:
        raise ValueError(f"{op}: x must have shape (..., in_features), got a 0-d tensor")
    if weight_scales is None:
        _check_tensor(op, "the dense base weight", weight, x)
    else:
        _check_tensor(op, "the int8 base's scales", weight_scales, x)
        if weight.device != x.device:
            raise ValueError(
                f"{op}: qweight must be on x's device ({x.device}), got {weight.device}"
            )
    if weight_scales is None and weight.dim() != 2:
        raise ValueError(
            f"{op}: the base weight must be 2-D (out_features, in_features), got shape "
            f"{tuple(weight.shape)}"
        )
    out_f, in_f = base_shape(weight, weight_scales)
    if out_f < 1 or in_f < 1:
        raise ValueError(
            f"{op}: the base weight must have out_features >= 1 and in_features >= 1, got "
            f"shape {tuple(weight.shape)}"
        )
    if x.shape[-1] != in_f:
        raise ValueError(
            f"{op}: x's last dimension must be {in_f} to match the base weight of shape "
            f"{tuple(weight.shape)} ({out_f} x {in_f}), got {tuple(x.shape)}"
        )
    return out_f, in_f


def base_shape(weight: Tensor, weight_scales: Tensor | None) -> tuple[int, int]:
    """``(out_features, in_features)`` of a (checked) base: a dense weight, or an int8 one in
    either layout (a packed qweight takes out_features from its scales)."""
    if weight_scales is None:
        return weight.shape[0], weight.shape[1]
    return weight_shape(weight, weight_scales)


def _layout1(weight: Tensor, weight_scales: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """The base as the C++ cpu kernels read it: a packed int8 qweight unpacked to (out, in)."""
    if weight_scales is not None and is_packed(weight):
        return unpack(weight, weight_scales)
    return weight, weight_scales


def _int8_path(act: Tensor, weight: Tensor, weight_scales: Tensor | None, transposed: bool) -> int:
    """The C++ ops' ``int8_path`` for activations ``act`` (x, or dy when ``transposed``): how
    the cuda backend runs an int8 base product, from `lrkernels.ops.int8.cuda_path` (0 for a
    dense base and off CUDA)."""
    if weight_scales is None or not act.is_cuda:
        return 0
    n, k = weight_shape(weight, weight_scales)
    return _path_id(act, n if transposed else k, n, k, transposed)


def check_lora_linear_args(
    x: Tensor,
    weight: Tensor,
    weight_scales: Tensor | None,
    A: Tensor,
    B: Tensor,
    bias: Tensor | None,
    scale: float,
    dropout_p: float,
) -> None:
    """TypeError/ValueError naming the bad argument (the C++ ops run the same checks)."""
    out_f, in_f = _check_base(_OP, x, weight, weight_scales)
    _check_tensor(_OP, "A", A, x)
    _check_tensor(_OP, "B", B, x)
    _check_tensor(_OP, "bias", bias, x, optional=True)
    if A.dim() != 2 or A.shape[0] < 1 or A.shape[1] != in_f:
        raise ValueError(f"{_OP}: A must have shape (r, {in_f}) with r >= 1, got {tuple(A.shape)}")
    if B.dim() != 2 or B.shape[0] != out_f or B.shape[1] != A.shape[0]:
        raise ValueError(
            f"{_OP}: B must have shape ({out_f}, {A.shape[0]}) to match the base weight and A's "
            f"rank, got {tuple(B.shape)}"
        )
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != out_f):
        raise ValueError(f"{_OP}: bias must have shape ({out_f},), got {tuple(bias.shape)}")
    if isinstance(scale, bool) or not isinstance(scale, int | float) or not math.isfinite(scale):
        raise ValueError(f"{_OP}: scale must be a finite number, got {scale!r}")
    if (
        isinstance(dropout_p, bool)
        or not isinstance(dropout_p, int | float)
        or not 0.0 <= dropout_p < 1.0
    ):
        raise ValueError(f"{_OP}: dropout_p must be a number in [0, 1), got {dropout_p!r}")


def lora_linear(
    x: Tensor,
    base: Base,
    A: Tensor,
    B: Tensor,
    bias: Tensor | None = None,
    *,
    scale: float,
    dropout_p: float = 0.0,
    dropout_seed: int | Tensor | None = None,
    backend: str | None = None,
) -> Tensor:
    """LoRA linear layer ``y = x · Wᵀ + scale · (drop(x) · Aᵀ) · Bᵀ + bias`` on a frozen base.

    Args:
        x: ``(..., in_features)``; any leading dims (also none and zero-size), any strides.
        base: the dense weight ``(out, in)`` in x's dtype, or an int8 base ``(qweight, scales)``
            / ``(qweight, scales, group_size)`` as made by `lrkernels.quant.quantize` (scales
            in x's dtype, per output channel or per group of 32 / 64 / 128 inputs).
        A: ``(r, in_features)``; B: ``(out_features, r)``; bias: ``(out_features,)`` or None.
            All in x's dtype.
        scale: the LoRA factor s (``alpha / r``, or ``alpha / √r`` for rsLoRA).
        dropout_p: dropout probability of the LoRA branch's input (0 ≤ p < 1), rounded to a
            multiple of 1/65536; the scale is divided by the exact kept fraction.
        dropout_seed: the dropout mask's seed (an int or a one-element int64 tensor on x's
            device); None draws one from torch's generator. The same seed gives the same mask
            on every backend.
        backend: ``"cuda"``, ``"triton"``, ``"cpu"``, ``"torch"`` or None (auto).

    Returns:
        ``(..., out_features)`` in x's dtype. Products accumulate in float32 (float64 for
        float64); ``t = drop(x) · Aᵀ`` is rounded to x's dtype before ``t · Bᵀ``; the fused
        backends add the base product and the LoRA term in float32 and round once.

    Gradients flow to x, A, B and bias; the base (weight / qweight / scales) is frozen.

    Raises:
        TypeError / ValueError: bad arguments (named in the message), before any kernel runs.
        RuntimeError: an explicit ``backend`` that cannot run these inputs, with the reasons.
    """
    weight, weight_scales = split_base(base)
    check_lora_linear_args(x, weight, weight_scales, A, B, bias, scale, dropout_p)
    threshold = lora_dropout_threshold(dropout_p) if dropout_p > 0 else 0
    seed = None
    eff_scale = float(scale)
    if threshold > 0:
        eff_scale *= lora_keep_scale(threshold)
        if dropout_seed is None:
            seed = torch.randint(0, 2**62, (1,), dtype=torch.int64, device=x.device)
        elif isinstance(dropout_seed, Tensor):
            if dropout_seed.numel() != 1 or dropout_seed.is_floating_point():
                raise ValueError(
                    f"{_OP}: dropout_seed must be an int or a one-element integer tensor, got "
                    f"{dropout_seed.dtype} of shape {tuple(dropout_seed.shape)}"
                )
            seed = dropout_seed.reshape(1).to(device=x.device, dtype=torch.int64)
        else:
            seed = torch.tensor([int(dropout_seed)], dtype=torch.int64, device=x.device)
    chosen = backends.select_backend(
        _OP, backend, x, weight, weight_scales, A, B, bias, dropout=threshold > 0
    )
    if chosen == "torch":
        # The base is frozen on every backend: no gradient reaches it through the reference.
        ws = None if weight_scales is None else weight_scales.detach()
        return lora_linear_reference(x, weight.detach(), ws, A, B, bias, eff_scale, threshold, seed)
    if chosen == "triton":
        _ensure_triton_ops()
        op = torch.ops.lrkernels.lora_linear_triton
    else:  # cuda (either layout) or cpu (layout 1)
        if chosen == "cpu":
            weight, weight_scales = _layout1(weight, weight_scales)
        path = _int8_path(x, weight, weight_scales, transposed=False)
        return torch.ops.lrkernels.lora_linear(
            x, weight, weight_scales, A, B, bias, eff_scale, threshold, seed, path
        )[0]
    return op(x, weight, weight_scales, A, B, bias, eff_scale, threshold, seed)[0]


def check_lora_linear_multi_args(
    x: Tensor,
    weight: Tensor,
    weight_scales: Tensor | None,
    A: Tensor,
    B: Tensor,
    adapter_index: Tensor,
    ranks: Tensor,
    adapter_scales: Tensor,
    bias: Tensor | None,
) -> None:
    op = _OP_MULTI
    out_f, in_f = _check_base(op, x, weight, weight_scales)
    _check_tensor(op, "A", A, x)
    _check_tensor(op, "B", B, x)
    _check_tensor(op, "bias", bias, x, optional=True)
    if A.dim() != 3 or A.shape[0] < 1 or A.shape[1] < 1 or A.shape[2] != in_f:
        raise ValueError(
            f"{op}: A must have shape (n_adapters, r_max, {in_f}) with n_adapters, r_max >= 1, "
            f"got {tuple(A.shape)}"
        )
    n, r_max = A.shape[:2]
    if tuple(B.shape) != (n, out_f, r_max):
        raise ValueError(
            f"{op}: B must have shape ({n}, {out_f}, {r_max}) to match the base weight and A, "
            f"got {tuple(B.shape)}"
        )
    for name, t, dtype, shape in (
        ("adapter_index", adapter_index, torch.int32, tuple(x.shape[:-1])),
        ("ranks", ranks, torch.int32, (n,)),
        ("adapter_scales", adapter_scales, torch.float32, (n,)),
    ):
        if not isinstance(t, Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype != dtype:
            raise TypeError(f"{op}: {name} must be {dtype}, got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"{op}: {name} must be on x's device ({x.device}), got {t.device}")
        if tuple(t.shape) != shape:
            raise ValueError(f"{op}: {name} must have shape {shape}, got {tuple(t.shape)}")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != out_f):
        raise ValueError(f"{op}: bias must have shape ({out_f},), got {tuple(bias.shape)}")


def check_adapter_values(adapter_index: Tensor, ranks: Tensor, n: int, r_max: int) -> None:
    """ValueError when an index is outside [-1, n) or a rank outside [0, r_max]. Reads the
    values: eager CPU tensors always; CUDA tensors only with LRKERNELS_CHECK_INDICES=1 (a
    device-to-host sync)."""
    if adapter_index.numel() > 0:
        lo, hi = int(adapter_index.min()), int(adapter_index.max())
        if lo < -1 or hi >= n:
            bad = lo if lo < -1 else hi
            raise ValueError(
                f"{_OP_MULTI}: adapter_index values must be in [-1, {n - 1}] (-1: base only), "
                f"got {bad}"
            )
    lo, hi = int(ranks.min()), int(ranks.max())
    if lo < 0 or hi > r_max:
        raise ValueError(
            f"{_OP_MULTI}: ranks must be in [0, {r_max}] (r_max), got {lo if lo < 0 else hi}"
        )


def lora_linear_multi(
    x: Tensor,
    base: Base,
    A: Tensor,
    B: Tensor,
    adapter_index: Tensor,
    *,
    ranks: Tensor,
    scales: Tensor,
    bias: Tensor | None = None,
    backend: str | None = None,
) -> Tensor:
    """Multi-adapter LoRA for serving: every row of x with its own adapter, in one call.

    ``y[m] = x[m] · Wᵀ + scales[a] · (x[m] · A[a, :ranks[a]]ᵀ) · B[a, :, :ranks[a]]ᵀ + bias``
    with ``a = adapter_index[m]``; ``a = −1`` means the base only (vLLM's ``token_lora_mapping``
    convention). Columns of A / B at or past an adapter's rank never contribute, whatever they
    hold.

    Args:
        x: ``(..., in_features)``.
        base: as for `lora_linear` (dense or int8).
        A: ``(n_adapters, r_max, in_features)``; B: ``(n_adapters, out_features, r_max)``; in
            x's dtype.
        adapter_index: int32 with x's leading shape, values in [−1, n_adapters).
        ranks: int32 ``(n_adapters,)``, values in [0, r_max].
        scales: float32 ``(n_adapters,)`` (each adapter's alpha / r).
        bias: ``(out_features,)`` or None.

    No host synchronisation and no data-dependent shapes on the GPU: a fixed number of launches
    whatever the mix of adapters, so a CUDA graph captured once replays with any indices. The
    values of adapter_index and ranks are checked eagerly on CPU tensors; on CUDA tensors they
    are a documented precondition, checked only with ``LRKERNELS_CHECK_INDICES=1`` (a check
    there needs a device-to-host sync) — without it the kernels still never read out of
    bounds: an out-of-range index gives that row the base output only, and a rank is clamped to
    [0, r_max].

    An inference op: no gradients (train with `lora_linear`, one adapter per call).
    """
    weight, weight_scales = split_base(base, _OP_MULTI)
    check_lora_linear_multi_args(x, weight, weight_scales, A, B, adapter_index, ranks, scales, bias)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, A, B, bias)):
        raise RuntimeError(
            f"{_OP_MULTI} is an inference op and has no gradients: call it under "
            "torch.no_grad() (train adapters with lora_linear)"
        )
    if not torch.compiler.is_compiling() and (not x.is_cuda or _CHECK_INDICES):
        check_adapter_values(adapter_index, ranks, A.shape[0], A.shape[1])
    chosen = backends.select_backend(
        _OP_MULTI, backend, x, weight, weight_scales, A, B, adapter_index, ranks, scales, bias
    )
    if chosen == "torch":
        return lora_linear_multi_reference(
            x, weight, weight_scales, A, B, adapter_index, ranks, scales, bias
        )
    if chosen == "triton":
        _ensure_triton_ops()
        op = torch.ops.lrkernels.lora_linear_multi_triton
    else:
        if chosen == "cpu":
            weight, weight_scales = _layout1(weight, weight_scales)
        path = _int8_path(x, weight, weight_scales, transposed=False)
        return torch.ops.lrkernels.lora_linear_multi(
            x, weight, weight_scales, A, B, adapter_index, ranks, scales, bias, path
        )
    return op(x, weight, weight_scales, A, B, adapter_index, ranks, scales, bias)


# ----------------------------------------------------------------------------- backends

_CPP_OPS = ("lora_linear", "lora_linear_grad_input", "lora_linear_grad_A")
_TRITON_MAX_RANK = 128  # triton_kernels.lora.MAX_RANK (t stays in registers)
_CUDA_MAX_RANK = 64  # csrc/cuda/lora_kernels.cuh kLoraMaxRank
_CUDA_GEMV_MAX_ROWS = 16  # kLoraGemvMaxRows


def _rank_reasons(backend: str, rank: int) -> list[str]:
    limit = {"triton": _TRITON_MAX_RANK, "cuda": _CUDA_MAX_RANK}.get(backend)
    if limit is not None and rank > limit:
        return [f"the {backend} kernels take ranks up to {limit}, got {rank}"]
    return []


def _reasons(
    backend: str, x: Tensor, weight, weight_scales, A, *rest, explicit: bool, dropout=False
) -> list[str]:
    """Why `backend` cannot take these (already validated) inputs; [] when it can. Whether it
    *should* is auto selection's (`_dispatch_rule` / the measured table), not a reason here."""
    reasons = backends.device_and_dtype_reasons(backend, x, explicit=explicit)
    reasons += _rank_reasons(backend, A.shape[0])
    return reasons + backends.kernel_reasons(backend, _CPP_OPS)


def _reasons_multi(backend: str, x: Tensor, weight, weight_scales, A, *rest, explicit: bool):
    reasons = backends.device_and_dtype_reasons(backend, x, explicit=explicit)
    reasons += _rank_reasons(backend, A.shape[1])
    return reasons + backends.kernel_reasons(backend, (_OP_MULTI,))


backends.register_reasons(_OP, _reasons)
backends.register_reasons(_OP_MULTI, _reasons_multi)


# ----------------------------------------------------------------------------- auto selection

#: Bounds of the adapter-count buckets of lora_linear_multi's shape class.
ADAPTER_BUCKETS = (1, 8, 64)


def _grad_needed(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _dispatch_features(
    x: Tensor, weight: Tensor, weight_scales, A: Tensor, B: Tensor, bias=None, *, dropout=False
) -> dict:
    """What auto selection keys on (lrkernels.dispatch): Python ints and strings from the
    shapes, dtypes and requires_grad flags only. ``mode``: ``"train"`` when autograd will run
    the backward (x, A, B or bias requires grad), else ``"infer"``."""
    out_f, in_f = base_shape(weight, weight_scales)
    return {
        "M": dispatch.rows_of(x),
        "in": in_f,
        "out": out_f,
        "rank": A.shape[0],
        "base": "dense" if weight_scales is None else "int8",
        "mode": "train" if _grad_needed(x, A, B, bias) else "infer",
        "dropout": bool(dropout),
    }


def _dispatch_class(f) -> str:
    """`lrkernels.dispatch.linear_class` (M, in, out, rank buckets), the base kind, inference or
    training, and whether the LoRA branch has dropout: e.g.
    ``"M=2-16 in=1025-4096 out=1025-4096 rank=1-32 base=int8 infer"``."""
    cls = f"{dispatch.linear_class(f)} base={f['base']} {f['mode']}"
    return cls + (" dropout" if f["dropout"] else "")


#: Most rows at which the cuda backend runs a dense base as one fused tensor-core pass
#: (csrc/cuda/lora_cuda.cpp kDenseFusedMaxRows); above, cuBLAS plus extra passes.
CUDA_DENSE_FUSED_MAX_ROWS = 1024


def _fused_cuda_rows(f, dtype: str) -> int:
    """Most rows at which auto selection expects the cuda backend's fused tensor-core pass to
    win in 16 bits (0 in float32: no tensor-core path): the int8 kernel's range on an int8 base
    (`lrkernels.ops.int8` DEQUANT_MATMUL_MIN_ROWS), the dense route's on a dense one."""
    if dtype not in ("float16", "bfloat16"):
        return 0
    return DEQUANT_MATMUL_MIN_ROWS - 1 if f["base"] == "int8" else CUDA_DENSE_FUSED_MAX_ROWS


def _dispatch_rule(device: str, dtype: str, f) -> tuple[tuple[str, ...], str]:
    """Backends in the order they are expected to win where the measured table has no row (a
    static estimate, issue 11; the torch path is PEFT's: the base product, drop(x) · Aᵀ, · Bᵀ,
    scale and add, each a pass over memory, and for an int8 base a dequantized copy of W):

    - GPU, M <= 16: the cuda backend (the base weight streamed once, the adapter in the
      epilogue: the decode GEMV, or for a packed int8 base the int8 tensor-core kernel; ranks
      up to 64), then the fused triton kernel.
    - GPU, float16/bfloat16, 16 < M < 512 on an int8 base or <= 1024 on a dense one: the cuda
      tensor-core kernel with the adapter in its epilogue (one pass over x and W: 4-stage
      cp.async pipeline, ldmatrix, mma.sync, split-K to fill the SMs), then the fused triton
      kernel (same fusion, its K loop not software-pipelined).
    - Above that the product is compute-bound, where the kernels' mma.sync is not expected to
      keep up with cuBLAS's wgmma (nor, for int8, with one dequantize + cuBLAS): torch until
      measured.
    - GPU, float32 above 16 rows: torch (the kernels' IEEE float32 dots run on CUDA cores).
    - CPU: torch (the cpu backend is the C++ reference implementation, not tuned)."""
    if device != "cuda":
        return ("torch",), (
            "on the CPU torch's three matmuls (the cpu backend is the C++ reference "
            "implementation, not tuned) until a measurement says otherwise"
        )
    M = f["M"]
    if M <= _CUDA_GEMV_MAX_ROWS:
        return ("cuda", "triton"), (
            "M <= 16: static estimate (issue 11): the cuda backend streams the base weight "
            "once with the adapter in its epilogue; the fused triton kernel next (ranks 65-128)"
        )
    limit = _fused_cuda_rows(f, dtype)
    if M <= limit:
        return ("cuda", "triton"), (
            f"16 < M <= {limit} ({f['base']} base): static estimate (issue 11): the cuda "
            "tensor-core kernel (pipelined, split-K) reads x and the base weight once with the "
            "adapter in its epilogue; the fused triton kernel next; torch's path adds passes "
            "over y (and dequantizes an int8 W every call)"
        )
    return ("torch",), (
        f"M > {max(limit, _CUDA_GEMV_MAX_ROWS)} in {dtype}: compute-bound, where the kernels "
        "are not expected to beat cuBLAS (mma.sync against wgmma, float32 dots on CUDA cores): "
        "torch's path until measured"
    )


def _dispatch_features_multi(
    x: Tensor, weight: Tensor, weight_scales, A: Tensor, B: Tensor, *rest
) -> dict:
    """Multi-adapter: rows, in, out, r_max, the number of adapter slots and the base kind
    (an inference op: no mode)."""
    out_f, in_f = base_shape(weight, weight_scales)
    return {
        "M": dispatch.rows_of(x),
        "in": in_f,
        "out": out_f,
        "rank": A.shape[1],
        "adapters": A.shape[0],
        "base": "dense" if weight_scales is None else "int8",
    }


def _dispatch_class_multi(f) -> str:
    adapters = dispatch.bucket(f["adapters"], ADAPTER_BUCKETS)
    return f"{dispatch.linear_class(f)} adapters={adapters} base={f['base']}"


def _dispatch_rule_multi(device: str, dtype: str, f) -> tuple[tuple[str, ...], str]:
    """The torch path of a multi-adapter batch gathers every row's adapter (M x r_max x
    (in + out) elements written and read), so on a GPU the kernels are expected to win at every
    size: the cuda pair (the shrink, then the GEMV or the tensor-core kernel with every row's
    adapter in its epilogue) at M <= 16 and in the fused range of `_dispatch_rule`, the triton
    shrink + fused GEMM elsewhere (cuda's base product + shrink + expand next). CPU: torch until
    measured."""
    if device != "cuda":
        return ("torch",), (
            "on the CPU torch's path (the cpu backend is the C++ reference implementation) "
            "until a measurement says otherwise"
        )
    if f["M"] <= max(_CUDA_GEMV_MAX_ROWS, _fused_cuda_rows(f, dtype)):
        return ("cuda", "triton"), (
            "static estimate (issue 11): the cuda shrink, then one pass over the base with "
            "every row's adapter in the epilogue; torch's path gathers every row's adapter"
        )
    return ("triton", "cuda"), (
        "static estimate (issue 11): compute-bound here, the triton shrink + fused GEMM, then "
        "the cuda backend's base product + shrink + expand; torch's path gathers every row's "
        "adapter (M x r_max x (in + out) elements)"
    )


dispatch.register_op(
    _OP, features=_dispatch_features, shape_class=_dispatch_class, rule=_dispatch_rule
)
dispatch.register_op(
    _OP_MULTI,
    features=_dispatch_features_multi,
    shape_class=_dispatch_class_multi,
    rule=_dispatch_rule_multi,
)


# ----------------------------------------------------------------------------- torch ops


def _rows(x: Tensor) -> int:
    return math.prod(x.shape[:-1])


def _fake_forward(
    x, weight, weight_scales, A, B, bias=None, scale=1.0, threshold=0, seed=None, int8_path=0
):
    out_f = base_shape(weight, weight_scales)[0]
    return (x.new_empty((*x.shape[:-1], out_f)), x.new_empty((_rows(x), A.shape[0])))


def _fake_grad_input(dy, weight, weight_scales, dt, A, threshold=0, seed=None, int8_path=0):
    return dy.new_empty((*dy.shape[:-1], base_shape(weight, weight_scales)[1]))


def _fake_grad_A(dt, x, threshold, seed):
    return x.new_empty((dt.shape[1], x.shape[-1]))


def _fake_multi(
    x, weight, weight_scales, A, B, adapter_index, ranks, adapter_scales, bias=None, int8_path=0
):
    return x.new_empty((*x.shape[:-1], base_shape(weight, weight_scales)[0]))


def _grad_A_torch(dt: Tensor, x: Tensor, threshold: int, seed: Tensor) -> Tensor:
    """dA = dtᵀ · (keep ⊙ x) with torch ops (mask regenerated by the reference hash)."""
    x2d = x.reshape(-1, x.shape[-1])
    keep = lora_dropout_keep_mask(seed, x2d.shape[0], x2d.shape[1], threshold, x.device)
    return dt.t() @ (x2d * keep.to(x.dtype))


def _setup_context(ctx, inputs, output) -> None:
    x, weight, weight_scales, A, B, bias, scale, threshold, seed = (*inputs, None, 0, None)[:9]
    ctx.save_for_backward(x, weight, weight_scales, A, B, output[1], seed)
    ctx.scale = float(scale)
    ctx.threshold = int(threshold)
    ctx.has_bias = bias is not None


def _make_backward(grad_input_op, grad_A_op):
    def backward(ctx, dy: Tensor, dt_out: Tensor | None):
        x, weight, weight_scales, A, B, t, seed = ctx.saved_tensors
        n_inputs = len(ctx.needs_input_grad)
        need = (*ctx.needs_input_grad, *([False] * 10))[:10]
        dy2 = dy.reshape(-1, dy.shape[-1])
        dt = (dy2 @ B) * ctx.scale  # (M, r): the gradient of t, (dy · B) · s
        if dt_out is not None:
            dt = dt + dt_out
        dx = dA = dB = db = None
        if need[0]:
            dx = grad_input_op(dy, weight, weight_scales, dt, A, ctx.threshold, seed)
        if need[3]:
            if ctx.threshold > 0:
                dA = grad_A_op(dt, x, ctx.threshold, seed)
            else:
                dA = dt.t() @ x.reshape(-1, x.shape[-1])
        if need[4]:
            dB = (dy2.t() @ t) * ctx.scale
        if need[5] and ctx.has_bias:
            db = dy2.sum(0)
        return (dx, None, None, dA, dB, db, None, None, None, None)[:n_inputs]

    return backward


def _grad_input_cpp(dy, weight, weight_scales, dt, A, threshold, seed):
    """The C++ grad-input op with the int8 path of dy's product (the input gradient)."""
    path = _int8_path(dy, weight, weight_scales, transposed=True)
    return torch.ops.lrkernels.lora_linear_grad_input(
        dy, weight, weight_scales, dt, A, threshold, seed, path
    )


if _ext.has_op(_OP):
    torch.library.register_fake("lrkernels::lora_linear")(_fake_forward)
    torch.library.register_fake("lrkernels::lora_linear_grad_input")(_fake_grad_input)
    torch.library.register_fake("lrkernels::lora_linear_grad_A")(_fake_grad_A)
    torch.library.register_fake("lrkernels::lora_linear_multi")(_fake_multi)
    torch.library.register_autograd(
        "lrkernels::lora_linear",
        _make_backward(
            _grad_input_cpp,
            lambda *a: torch.ops.lrkernels.lora_linear_grad_A(*a),
        ),
        setup_context=_setup_context,
    )

_TRITON_LOCK = threading.Lock()
_TRITON_OPS_REGISTERED = False


@compile_time_constant  # torch.compile runs it eagerly, never traces it
def _ensure_triton_ops() -> bool:
    """Registers the ``lrkernels::lora_linear*_triton`` ops on first use of the triton backend:
    importing triton and defining `torch.library.triton_op`s (which imports torch._inductor)
    costs about a second, which ``import lrkernels`` must not pay."""
    global _TRITON_OPS_REGISTERED
    with _TRITON_LOCK:
        if not _TRITON_OPS_REGISTERED:
            _register_triton_ops()
            _TRITON_OPS_REGISTERED = True
    return True


def _register_triton_ops() -> None:
    from ..triton_kernels.lora import (
        launch_lora_grad_A,
        launch_lora_grad_input,
        launch_lora_linear,
        launch_lora_linear_multi,
    )

    def _empty(shape, like: Tensor) -> Tensor:
        out = torch.empty(shape, device=like.device, dtype=like.dtype)
        if _POISON:
            out.fill_(float("nan"))
        return out

    @torch.library.triton_op("lrkernels::lora_linear_triton", mutates_args=())
    def _lora_linear_triton(
        x: Tensor,
        weight: Tensor,
        weight_scales: Tensor | None,
        A: Tensor,
        B: Tensor,
        bias: Tensor | None,
        scale: float,
        dropout_threshold: int = 0,
        seed: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        n, k = base_shape(weight, weight_scales)
        y = _empty((*x.shape[:-1], n), x)
        t = _empty((_rows(x), A.shape[0]), x)
        if y.numel() > 0:
            launch_lora_linear(
                x.reshape(-1, k), weight, weight_scales, A, B, bias, scale, dropout_threshold,
                seed, y.view(-1, n), t,
            )  # fmt: skip
        return y, t

    @torch.library.triton_op("lrkernels::lora_linear_grad_input_triton", mutates_args=())
    def _lora_linear_grad_input_triton(
        dy: Tensor,
        weight: Tensor,
        weight_scales: Tensor | None,
        dt: Tensor,
        A: Tensor,
        dropout_threshold: int = 0,
        seed: Tensor | None = None,
    ) -> Tensor:
        n, k = base_shape(weight, weight_scales)
        dx = _empty((*dy.shape[:-1], k), dy)
        if dx.numel() > 0:
            launch_lora_grad_input(
                dy.reshape(-1, n), weight, weight_scales, dt, A, dropout_threshold, seed,
                dx.view(-1, k),
            )  # fmt: skip
        return dx

    @torch.library.triton_op("lrkernels::lora_linear_grad_A_triton", mutates_args=())
    def _lora_linear_grad_A_triton(
        dt: Tensor, x: Tensor, dropout_threshold: int, seed: Tensor
    ) -> Tensor:
        dA = _empty((dt.shape[1], x.shape[-1]), x)
        if x.numel() == 0:
            return dA.zero_()
        launch_lora_grad_A(dt, x.reshape(-1, x.shape[-1]), dropout_threshold, seed, dA)
        return dA

    @torch.library.triton_op("lrkernels::lora_linear_multi_triton", mutates_args=())
    def _lora_linear_multi_triton(
        x: Tensor,
        weight: Tensor,
        weight_scales: Tensor | None,
        A: Tensor,
        B: Tensor,
        adapter_index: Tensor,
        ranks: Tensor,
        adapter_scales: Tensor,
        bias: Tensor | None = None,
    ) -> Tensor:
        n, k = base_shape(weight, weight_scales)
        y = _empty((*x.shape[:-1], n), x)
        if y.numel() > 0:
            launch_lora_linear_multi(
                x.reshape(-1, k), weight, weight_scales, A, B, adapter_index.reshape(-1), ranks,
                adapter_scales, bias, y.view(-1, n),
            )  # fmt: skip
        return y

    torch.library.register_autograd(
        "lrkernels::lora_linear_triton",
        _make_backward(
            lambda *a: torch.ops.lrkernels.lora_linear_grad_input_triton(*a),
            lambda *a: torch.ops.lrkernels.lora_linear_grad_A_triton(*a),
        ),
        setup_context=_setup_context,
    )
