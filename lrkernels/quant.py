"""Weight-only symmetric int8 quantization (W8A16) for `lrkernels.int8_linear`.

Format (layout version 1: portable)
-----------------------------------
- ``qweight``: int8 ``(N, K)`` = (out_features, in_features), plain row-major, values in
  ``−127…127`` (−128 is never produced, so the grid is symmetric and ``−q`` is always valid).
- ``scales``: ``(N,)`` per output channel, or ``(N, K // G)`` per group of ``G ∈ {32, 64, 128}``
  consecutive input features, in the *activation* dtype (see below).
- Meaning: ``W[n, k] ≈ q[n, k] · s[n]`` or ``W[n, k] ≈ q[n, k] · s[n, k // G]``; the group
  size is implied by the scales' shape (`group_size_of`).

This is the exchange format: a ``state_dict`` holds exactly these tensors (``Int8Linear`` saves
layout 1 whatever it runs on), portable across devices, backends and file formats such as
safetensors.

Format (layout version 2: packed for the tensor-core kernels)
-------------------------------------------------------------
Produced once by `pack` (``quantize(..., layout=2)``, ``Int8Linear.from_linear``, or an
``Int8Linear`` moved to CUDA); `unpack` inverts it exactly. It needs ``K % 16 == 0``. The packed
tensor carries its layout: it is the only 3-D int8 weight (`layout_of`).

- ``qweight``: int8 ``(ceil(N / 32), K / 16, 512)``. The weight is cut into *units* of 32 output
  rows x 16 input columns (rows past N are zero padding); unit ``(nb, kb)`` holds
  ``q[32 nb : 32 nb + 32, 16 kb : 16 kb + 16]`` as 32 *records* of 16 bytes, one per lane of a
  warp. Record ``L = 4 g + t`` (``g = L // 4 ∈ 0..7``, ``t = L % 4``) is four 4-byte words
  ``j = 0..3``, word ``j`` holding row ``32 nb + 8 j + g`` at columns
  ``16 kb + (2t, 2t + 1, 2t + 8, 2t + 9)`` (byte ``b`` of the word: column
  ``16 kb + 2t + (b & 1) + 8 (b >> 1)``)::

      packed[nb, kb, 16 L + 4 j + b] = q[32 nb + 8 j + g, 16 kb + 2 t + (b & 1) + 8 (b >> 1)]

- ``scales``: the same values and shape as in layout 1. Group scales are stored *column-major*
  (strides ``(1, N)``, i.e. group-major: the N scales of one group are contiguous) — the order
  the kernels stream them in; any other strides are accepted and only cost a copy per call.

Why this order: ``mma.sync.m16n8k16`` takes its B operand (``k x n``, 16 x 8) as two 32-bit
registers per lane, lane ``(g, t)`` holding rows ``2t, 2t + 1`` and ``2t + 8, 2t + 9`` of column
``g``. Word ``j`` of record ``L`` is exactly the 4 weights lane ``L`` needs for the n8 tile
``j`` of a unit, in register order; a lane reads its whole record (4 n8 tiles) with one 16-byte
load and turns each word into the two 16-bit registers by byte permutes (no conversion
instruction). Units are stored row of units by row of units (``kb`` fastest), so the tile of 32
rows x 64 columns a pipeline stage streams is one contiguous 2 KiB run (the transposed product
reads 64 rows x 128 columns as two 4 KiB runs). The input-gradient kernel reads the same records:
the 4 rows x 1 column a lane needs there sit in the records of lanes ``2t`` and ``2t + 1`` of the
forward (see csrc/cuda/int8_mma.cuh).

How to unpack: ``packed.view(NB, KB, 8, 4, 4, 2, 2)`` has dims (nb, kb, g, t, j, b1, b0) with
``b = 2 b1 + b0``; permuting them to (nb, j, g, kb, b1, t, b0) and reshaping to ``(32 NB, K)``
gives the padded ``q`` (`unpack`).

Scale dtype
-----------
Scales are stored in the activation dtype — float16, bfloat16 or float32, the dtype the layer
computes in — not always in float32. This is deliberate: group-wise scales then cost half the
bytes of float32 ones (one 2-byte scale per 32 weights is 6.25% on top of the int8 weight,
instead of 12.5%); the kernels compute in that dtype anyway, so no conversion is needed; and it
is the convention of torch's own ``torch._weight_int8pack_mm``, whose scales have the
activation's dtype. Because a bfloat16 scale is a *rounded* scale, quantization works with the
rounded scale throughout (below), so the stored (qweight, scales) pair is self-consistent.

Quantization (`quantize`)
-------------------------
Round-to-nearest with an absmax scale per channel or group. For each channel/group with
clipping threshold ``c = clip_ratio · max|w|``:

1. ``s = c / 127`` (computed in float64), rounded to the scale dtype: ``s_r``.
2. If rounding moved ``s_r`` so far *down* that ``c / s_r > 127.5`` (possible for subnormal
   scales, when the scale rounds to 0, or from double rounding), ``s_r`` is bumped up to the
   next representable value of the scale dtype, which is then ``≥ s``.
3. ``q = clamp(round(w / s_r), −127, 127)`` with the *rounded* scale ``s_r`` (w / s_r in
   float64, so the division rounds no element across a .5 boundary).
4. An all-zero channel/group gets ``s_r = 1`` and ``q = 0`` (no division by zero, exact zeros).

Guarantee: with ``clip_ratio = 1``, every element satisfies ``|w − q·s_r| ≤ s_r / 2`` exactly
(``q·s_r`` the exact product, e.g. `dequantize` to float64) — for float32, float16 and
bfloat16 scales alike, because step 2 ensures ``max|w| / s_r ≤ 127.5`` so the clamp never
costs more than half a step. With ``clip_ratio < 1`` the bound holds for every element with
``|w| ≤ c``; larger elements are clipped to ``±127·s_r``. Materialising the weight in a 16-bit
dtype (``dequantize(..., dtype=torch.bfloat16)``) rounds ``q·s_r`` once more, by at most half
an ulp of that dtype; the kernels avoid this by forming ``q·s`` in float32, where it is exact
for 16-bit scales. A weight that already is ``q·s`` with ``s`` representable in the scale
dtype and ``max|q| = 127`` in every channel/group is reproduced exactly.

Clipping search (`search_clip_ratio`)
-------------------------------------
Picks, per output channel, the clip ratio from a grid that minimises the layer's output error
on calibration inputs X: ``‖(w − ŵ)·Xᵀ‖² = (w − ŵ)ᵀ·G·(w − ŵ)`` with ``G = XᵀX``. The
ratio 1.0 is always a candidate and wins ties, so the result is never worse than no clipping
on that objective.
"""

from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from .factorize import GramAccumulator, _as_gram, _compute_device

__all__ = [
    "DEFAULT_CLIP_GRID",
    "GROUP_SIZES",
    "LAYOUT_VERSION",
    "PACKED_LAYOUT_VERSION",
    "QMAX",
    "SCALE_DTYPES",
    "can_pack",
    "dequantize",
    "group_size_of",
    "layout_of",
    "normalize_group_size",
    "pack",
    "packed_shape",
    "quantization_error",
    "quantize",
    "search_clip_ratio",
    "unpack",
    "weight_shape",
]

#: Version of the portable (qweight, scales) layout described in the module docstring.
LAYOUT_VERSION = 1
#: Version of the packed layout `pack` produces (module docstring, "layout version 2").
PACKED_LAYOUT_VERSION = 2
#: Rows x columns of q per packed unit, and bytes per unit.
PACK_ROWS, PACK_COLS, PACK_UNIT_BYTES = 32, 16, 512
#: Largest quantized magnitude: the grid is symmetric, −127…127.
QMAX = 127
#: Supported group sizes (input features per scale) for group-wise scales.
GROUP_SIZES = (32, 64, 128)
#: Supported scale (= activation) dtypes.
SCALE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
#: Default clip-ratio candidates of `search_clip_ratio`.
DEFAULT_CLIP_GRID = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)

# Elements of float64 work tensors per row block (bounds the temporary memory of quantize
# and search_clip_ratio to a few hundred MB for any weight size).
_BLOCK_ELEMENTS = 1 << 24
# Integer views used to step a positive float to the next representable value.
_INT_VIEW = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32}


# --------------------------------------------------------------------------------------------
# Argument checks
# --------------------------------------------------------------------------------------------


def _check_weight(weight) -> None:
    if not isinstance(weight, Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if not weight.is_floating_point():
        raise TypeError(f"weight must be a floating-point tensor, got {weight.dtype}")
    if weight.dim() != 2:
        raise ValueError(
            f"weight must be 2-D (out_features, in_features), got shape {tuple(weight.shape)}"
        )
    if weight.shape[0] < 1 or weight.shape[1] < 1:
        raise ValueError(f"weight must not be empty, got shape {tuple(weight.shape)}")


def normalize_group_size(
    group_size, in_features: int | None = None, name: str = "group_size"
) -> int:
    """``None`` or ``0`` → 0 (per output channel); 32 / 64 / 128 → itself. ValueError naming
    ``name`` for anything else, or when ``in_features`` is not divisible by the group size."""
    if group_size is None:
        return 0
    if isinstance(group_size, bool):
        raise ValueError(f"{name} must be None (per channel), 32, 64 or 128, got {group_size!r}")
    try:
        g = operator.index(group_size)
    except TypeError:
        raise ValueError(
            f"{name} must be None (per channel), 32, 64 or 128, got {group_size!r}"
        ) from None
    if g == 0:
        return 0
    if g not in GROUP_SIZES:
        raise ValueError(f"{name} must be None (per channel), 32, 64 or 128, got {g}")
    if in_features is not None and in_features % g != 0:
        raise ValueError(
            f"in_features ({in_features}) must be divisible by {name} ({g}) for group-wise scales"
        )
    return g


def _resolve_scale_dtype(scale_dtype, weight_dtype: torch.dtype) -> torch.dtype:
    if scale_dtype is None:
        # float64 weights: float64 is no supported scale dtype; their activations are usually
        # run in float32 after quantization.
        return weight_dtype if weight_dtype in SCALE_DTYPES else torch.float32
    if scale_dtype not in SCALE_DTYPES:
        raise ValueError(
            f"scale_dtype must be torch.float16, torch.bfloat16 or torch.float32, got {scale_dtype!r}"
        )
    return scale_dtype


def _check_ratio_value(value: float, what: str) -> None:
    if not (0.0 < value <= 1.0):  # also rejects NaN
        raise ValueError(f"{what} must be in (0, 1], got {value!r}")


def _clip_ratio_tensor(clip_ratio, n: int, device: torch.device) -> Tensor:
    """The clip ratio as a float64 ``(n, 1)`` tensor on ``device`` (scalars broadcast)."""
    if isinstance(clip_ratio, Tensor):
        if clip_ratio.is_complex() or clip_ratio.dtype == torch.bool:
            raise TypeError(f"clip_ratio must be a real tensor, got {clip_ratio.dtype}")
        if clip_ratio.dim() == 0:
            ratio = clip_ratio.detach().to(device=device, dtype=torch.float64).expand(n)
        elif clip_ratio.dim() == 1 and clip_ratio.shape[0] == n:
            ratio = clip_ratio.detach().to(device=device, dtype=torch.float64)
        else:
            raise ValueError(
                f"clip_ratio must be a number or a tensor of shape ({n},) (one ratio per output "
                f"channel), got shape {tuple(clip_ratio.shape)}"
            )
        if not bool(((ratio > 0) & (ratio <= 1)).all()):
            bad = ratio[~((ratio > 0) & (ratio <= 1))][0].item()
            raise ValueError(f"clip_ratio must be in (0, 1], got a value {bad!r}")
        return ratio.reshape(n, 1)
    if isinstance(clip_ratio, bool) or not isinstance(clip_ratio, numbers.Real):
        raise TypeError(
            f"clip_ratio must be a real number or a tensor of shape ({n},), got "
            f"{type(clip_ratio).__name__}"
        )
    _check_ratio_value(float(clip_ratio), "clip_ratio")
    return torch.full((n, 1), float(clip_ratio), dtype=torch.float64, device=device)


def _check_qweight(qweight) -> int:
    """Type and rank checks; returns the layout version (1 or 2)."""
    if not isinstance(qweight, Tensor):
        raise TypeError(f"qweight must be a torch.Tensor, got {type(qweight).__name__}")
    if qweight.dtype != torch.int8:
        raise TypeError(f"qweight must be int8, got {qweight.dtype}")
    if qweight.dim() == 3 and qweight.shape[2] == PACK_UNIT_BYTES:
        return PACKED_LAYOUT_VERSION
    if qweight.dim() != 2:
        raise ValueError(
            "qweight must be 2-D (out_features, in_features) or packed (layout 2: "
            f"(ceil(out / 32), in / 16, 512)), got shape {tuple(qweight.shape)}"
        )
    return LAYOUT_VERSION


def layout_of(qweight: Tensor) -> int:
    """1 for a plain ``(N, K)`` int8 weight, 2 for a packed one (`pack`); TypeError/ValueError
    for anything else."""
    return _check_qweight(qweight)


def weight_shape(qweight: Tensor, scales: Tensor) -> tuple[int, int]:
    """``(out_features, in_features)`` of a quantized weight in either layout (a packed weight
    takes N from the scales). Raises like `group_size_of`."""
    if _check_qweight(qweight) == LAYOUT_VERSION:
        return tuple(qweight.shape)
    if not isinstance(scales, Tensor):
        raise TypeError(f"scales must be a torch.Tensor, got {type(scales).__name__}")
    if scales.dim() not in (1, 2) or scales.shape[0] < 1:
        raise ValueError(
            f"scales must have shape (N,) or (N, K // group_size), got {tuple(scales.shape)}"
        )
    n, k = scales.shape[0], PACK_COLS * qweight.shape[1]
    if -(-n // PACK_ROWS) != qweight.shape[0] or k < 1:
        raise ValueError(
            f"packed qweight of shape {tuple(qweight.shape)} holds ceil(N / 32) = "
            f"{qweight.shape[0]} row units and K = {k}; scales of shape "
            f"{tuple(scales.shape)} give N = {n}"
        )
    return n, k


def group_size_of(qweight: Tensor, scales: Tensor) -> int:
    """The group size implied by the scales' shape: 0 for per-channel scales ``(N,)``; ``G``
    for ``(N, K // G)`` with ``G ∈ {32, 64, 128}`` dividing ``K``. Either layout of qweight.

    Raises:
        TypeError: qweight not an int8 tensor, scales not a floating-point tensor.
        ValueError: qweight neither 2-D nor packed, or scales of any other shape.
    """
    _check_qweight(qweight)
    if not isinstance(scales, Tensor):
        raise TypeError(f"scales must be a torch.Tensor, got {type(scales).__name__}")
    if not scales.is_floating_point():
        raise TypeError(f"scales must be a floating-point tensor, got {scales.dtype}")
    n, k = weight_shape(qweight, scales)
    if scales.dim() == 1:
        if scales.shape[0] != n:
            raise ValueError(
                f"scales: per-channel scales must have shape ({n},) for qweight of shape "
                f"{tuple(qweight.shape)}, got {tuple(scales.shape)}"
            )
        return 0
    if scales.dim() != 2 or scales.shape[0] != n or scales.shape[1] < 1:
        raise ValueError(
            f"scales must have shape ({n},) or ({n}, {k} // group_size) for qweight of shape "
            f"{tuple(qweight.shape)}, got {tuple(scales.shape)}"
        )
    groups = scales.shape[1]
    g = k // groups
    if g * groups != k or g not in GROUP_SIZES:
        raise ValueError(
            f"scales of shape {tuple(scales.shape)} imply {groups} groups over in_features={k}; "
            f"the group size must be 32, 64 or 128 and divide in_features"
        )
    return g


# --------------------------------------------------------------------------------------------
# Quantize / dequantize
# --------------------------------------------------------------------------------------------


def _row_blocks(n: int, k: int) -> Iterator[slice]:
    step = max(1, _BLOCK_ELEMENTS // max(k, 1))
    for start in range(0, n, step):
        yield slice(start, min(start + step, n))


def _next_up(x: Tensor) -> Tensor:
    """The next representable value above each (non-negative, finite) element of x."""
    itype = _INT_VIEW[x.dtype]
    return (x.contiguous().view(itype) + 1).view(x.dtype)


def _quantize_block(w: Tensor, ratio: Tensor, group: int, scale_dtype: torch.dtype):
    """w: float64 (r, K); ratio: float64 (r, 1). Returns q float64 (r, K) with integer values
    and the rounded scales (r, groups) in ``scale_dtype``."""
    r, k = w.shape
    gs = k if group == 0 else group
    wg = w.view(r, k // gs, gs)
    threshold = wg.abs().amax(dim=-1) * ratio  # (r, groups)
    zero = threshold == 0
    s = (threshold / QMAX).to(scale_dtype)
    s = torch.where(zero, torch.ones((), dtype=scale_dtype, device=s.device), s)
    if not bool(torch.isfinite(s).all()):
        raise ValueError(
            f"weight: a scale max|w|/{QMAX} overflows {scale_dtype} (use a wider scale_dtype)"
        )
    # Rounding down may leave c / s > 127.5 (subnormal scales, scales rounded to 0, double
    # rounding): step those scales up once; the next value above a round-to-nearest neighbour
    # of the exact scale is >= the exact scale.
    low = threshold / s.double() > QMAX + 0.5
    if bool(low.any()):
        s = torch.where(low, _next_up(s), s)
        if not bool(torch.isfinite(s).all()):
            raise ValueError(
                f"weight: a scale max|w|/{QMAX} overflows {scale_dtype} (use a wider scale_dtype)"
            )
    q = torch.round(wg / s.double().unsqueeze(-1)).clamp_(-QMAX, QMAX)
    return q.view(r, k), s


def quantize(
    weight: Tensor,
    group_size: int | None = None,
    *,
    scale_dtype: torch.dtype | None = None,
    clip_ratio: float | Tensor = 1.0,
    layout: int = LAYOUT_VERSION,
) -> tuple[Tensor, Tensor]:
    """Symmetric round-to-nearest int8 quantization of ``weight`` (N, K) with absmax scales.

    See the module docstring for the method and its exact error guarantee.

    Args:
        weight: ``(out_features, in_features)`` floating-point tensor (not modified).
        group_size: None (or 0) for one scale per output channel; 32, 64 or 128 for one scale
            per group of that many consecutive input features (must divide in_features).
        scale_dtype: float16, bfloat16 or float32 — the activation dtype the layer will run
            in. Default: the weight's dtype (float32 for a float64 weight).
        clip_ratio: in ``(0, 1]``: the scale maps ``clip_ratio · max|w|`` to 127; larger
            elements are clipped. A number, or a tensor ``(N,)`` of per-channel ratios
            (e.g. from `search_clip_ratio`).
        layout: 1 (default, portable ``(N, K)``) or 2 (packed for the kernels, `pack`; needs
            ``K % 16 == 0``).

    Returns:
        ``(qweight, scales)``: int8 ``(N, K)`` in ``−127…127`` and scales ``(N,)`` or
        ``(N, K // group_size)`` in ``scale_dtype``, both contiguous on the weight's device
        (with ``layout=2``: as `pack` returns them).

    Raises:
        TypeError: non-tensor or non-floating weight, bad clip_ratio type.
        ValueError: weight not 2-D or empty or non-finite, bad group_size, in_features not
            divisible by group_size, bad scale_dtype, clip_ratio outside ``(0, 1]``, a scale
            that overflows the scale dtype.
    """
    _check_weight(weight)
    n, k = weight.shape
    group = normalize_group_size(group_size, k)
    sdt = _resolve_scale_dtype(scale_dtype, weight.dtype)
    if layout not in (LAYOUT_VERSION, PACKED_LAYOUT_VERSION):
        raise ValueError(f"layout must be 1 or 2, got {layout!r}")
    if layout == PACKED_LAYOUT_VERSION and not can_pack(k):
        raise ValueError(f"layout 2 needs in_features % {PACK_COLS} == 0, got {k}")
    device = _compute_device(weight.device)
    ratio = _clip_ratio_tensor(clip_ratio, n, device)
    qweight = torch.empty((n, k), dtype=torch.int8, device=weight.device)
    scales = torch.empty((n, k // group) if group else (n, 1), dtype=sdt, device=weight.device)
    src = weight.detach()
    for rows in _row_blocks(n, k):
        w = src[rows].to(device=device, dtype=torch.float64)
        if not bool(torch.isfinite(w).all()):
            raise ValueError("weight contains non-finite values (NaN or inf)")
        q, s = _quantize_block(w, ratio[rows], group, sdt)
        qweight[rows] = q.to(torch.int8)
        scales[rows] = s
    scales = scales if group else scales.view(n)
    if layout == PACKED_LAYOUT_VERSION:
        return pack(qweight, scales)
    return qweight, scales


def dequantize(
    qweight: Tensor,
    scales: Tensor,
    group_size: int | None = None,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """``W = q · s`` (N, K) from int8 ``qweight`` (N, K) and ``scales`` (N,) or (N, K // G).
    qweight may be packed (layout 2, `pack`): it is unpacked first.

    The group size is inferred from the scales' shape (`group_size_of`); ``group_size``, if
    given (None/0 = per channel), must agree. The product is formed in float32 (float64 when
    ``dtype`` is float64) and rounded once to ``dtype`` (default: the scales' dtype) — the same
    arithmetic as `lrkernels.reference.dequantize_reference`. With 16-bit scales the float32
    product is exact, so ``dtype=torch.float32`` (or float64) gives ``q·s`` exactly.
    """
    group = group_size_of(qweight, scales)
    if group_size is not None:
        want = normalize_group_size(group_size, qweight.shape[1])
        if want != group:
            implied = "per-channel" if group == 0 else f"group size {group}"
            raise ValueError(
                f"group_size={group_size} does not match scales of shape "
                f"{tuple(scales.shape)}, which imply {implied}"
            )
    if dtype is None:
        dtype = scales.dtype
    elif not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
    if scales.device != qweight.device:
        raise ValueError(
            f"scales must be on qweight's device ({qweight.device}), got {scales.device}"
        )
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    if _check_qweight(qweight) == PACKED_LAYOUT_VERSION:
        qweight = unpack_qweight(qweight, scales.shape[0])
    n, k = qweight.shape
    s = scales.to(acc)
    if group == 0:
        w = qweight.to(acc) * s.unsqueeze(1)
    else:
        w = (qweight.to(acc).view(n, k // group, group) * s.unsqueeze(-1)).view(n, k)
    return w.to(dtype)


# --------------------------------------------------------------------------------------------
# Layout 2: packing for the tensor-core kernels (module docstring)
# --------------------------------------------------------------------------------------------


def can_pack(in_features: int) -> bool:
    """Whether a weight with this many input features has a layout-2 form (``K % 16 == 0``)."""
    return in_features >= PACK_COLS and in_features % PACK_COLS == 0


def packed_shape(out_features: int, in_features: int) -> tuple[int, int, int]:
    """Shape of the packed qweight of an ``(out_features, in_features)`` weight."""
    if not can_pack(in_features):
        raise ValueError(f"layout 2 needs in_features % {PACK_COLS} == 0, got {in_features}")
    return (-(-out_features // PACK_ROWS), in_features // PACK_COLS, PACK_UNIT_BYTES)


def pack_qweight(qweight: Tensor) -> Tensor:
    """The packed (layout 2) form of an int8 ``(N, K)`` weight, ``K % 16 == 0`` (a new
    contiguous tensor on the same device; rows past N are zero)."""
    if _check_qweight(qweight) != LAYOUT_VERSION:
        raise ValueError("qweight is already packed (layout 2)")
    n, k = qweight.shape
    nb, kb, _ = packed_shape(n, k)
    q = qweight
    if nb * PACK_ROWS != n:
        q = torch.cat([q, q.new_zeros(nb * PACK_ROWS - n, k)])
    # (nb, j, g, kb, b1, t, b0) -> (nb, kb, g, t, j, b1, b0); see the module docstring.
    q = q.reshape(nb, 4, 8, kb, 2, 4, 2).permute(0, 3, 2, 5, 1, 4, 6)
    return q.reshape(nb, kb, PACK_UNIT_BYTES).contiguous()


def unpack_qweight(packed: Tensor, out_features: int) -> Tensor:
    """The plain int8 ``(out_features, K)`` weight of a packed one (`pack_qweight` inverted)."""
    if _check_qweight(packed) != PACKED_LAYOUT_VERSION:
        raise ValueError(f"qweight must be packed (layout 2), got shape {tuple(packed.shape)}")
    nb, kb, _ = packed.shape
    if not 0 < out_features <= nb * PACK_ROWS or -(-out_features // PACK_ROWS) != nb:
        raise ValueError(
            f"out_features={out_features} does not match a packed weight of {nb} row units"
        )
    q = packed.reshape(nb, kb, 8, 4, 4, 2, 2).permute(0, 4, 2, 1, 5, 3, 6)
    return q.reshape(nb * PACK_ROWS, kb * PACK_COLS)[:out_features].contiguous()


def _group_major(scales: Tensor) -> Tensor:
    """Group scales (N, G') with strides (1, N): the values unchanged, group-major storage."""
    if scales.dim() == 2 and scales.stride(0) != 1:
        return scales.t().contiguous().t()
    return scales


def pack(qweight: Tensor, scales: Tensor) -> tuple[Tensor, Tensor]:
    """Layout 1 -> layout 2: ``(packed qweight, scales)`` (module docstring). The scales keep
    their values and shape; group scales become column-major (group-major storage).
    A packed input is returned as is (scales made group-major)."""
    group_size_of(qweight, scales)  # validates the pair
    if _check_qweight(qweight) == LAYOUT_VERSION:
        qweight = pack_qweight(qweight)
    return qweight, _group_major(scales)


def unpack(qweight: Tensor, scales: Tensor) -> tuple[Tensor, Tensor]:
    """Layout 2 -> layout 1: ``(qweight (N, K), contiguous scales)``; a layout-1 input is
    returned with contiguous tensors."""
    group_size_of(qweight, scales)
    if _check_qweight(qweight) == PACKED_LAYOUT_VERSION:
        qweight = unpack_qweight(qweight, scales.shape[0])
    return qweight.contiguous(), scales.contiguous()


# --------------------------------------------------------------------------------------------
# Output-error objective and clipping search
# --------------------------------------------------------------------------------------------


def _resolve_gram(calibration, gram, k: int, device: torch.device) -> Tensor:
    if (calibration is None) == (gram is None):
        raise ValueError("give exactly one of calibration (inputs (..., in)) and gram (in, in)")
    if calibration is not None:
        if isinstance(calibration, GramAccumulator):
            return _as_gram(calibration.gram, k, device)
        if not isinstance(calibration, Tensor):
            raise TypeError(f"calibration must be a torch.Tensor, got {type(calibration).__name__}")
        if calibration.dim() < 1 or calibration.shape[-1] != k:
            raise ValueError(
                f"calibration must have shape (..., {k}), got {tuple(calibration.shape)}"
            )
        acc = GramAccumulator(k, device=device)
        acc.update(calibration)
        g = acc.gram
        if not bool(torch.isfinite(g).all()):
            raise ValueError("calibration contains non-finite values (NaN or inf)")
        return g
    return _as_gram(gram, k, device)


def _row_errors(err: Tensor, gram: Tensor) -> Tensor:
    """``eᵀ·G·e`` per row of ``err`` (r, K), float64 (clamped at 0 against rounding)."""
    return ((err @ gram) * err).sum(dim=1).clamp_min_(0.0)


def search_clip_ratio(
    weight: Tensor,
    calibration: Tensor | GramAccumulator | None = None,
    *,
    gram: Tensor | None = None,
    group_size: int | None = None,
    grid: Sequence[float] = DEFAULT_CLIP_GRID,
    scale_dtype: torch.dtype | None = None,
) -> Tensor:
    """Per-output-channel clip ratio minimising the layer's output error on calibration data.

    For every candidate ``c`` of ``grid`` (1.0 is always added), row n is quantized with
    ``quantize(weight, group_size, scale_dtype=scale_dtype, clip_ratio=c)`` and scored by
    ``(w_n − ŵ_n)ᵀ·G·(w_n − ŵ_n) = ‖(w_n − ŵ_n)·Xᵀ‖²`` with ``G = XᵀX`` (float64, ŵ the exact
    ``q·s``). Each row keeps its best candidate; ties go to the earlier one with 1.0 first, so
    no row is ever worse than without clipping. Pass the result to
    ``quantize(..., clip_ratio=ratios)`` with the same group_size and scale_dtype: it
    reproduces the evaluated quantization exactly.

    Args:
        weight: ``(N, K)`` floating-point tensor.
        calibration: inputs ``(..., K)`` (or a `lrkernels.factorize.GramAccumulator`); or
        gram: their Gram matrix ``XᵀX`` ``(K, K)``. Exactly one of the two.
        group_size, scale_dtype: as for `quantize`.
        grid: candidate ratios, each in ``(0, 1]``.

    Returns:
        float64 ``(N,)`` ratios, on the weight's device.
    """
    _check_weight(weight)
    n, k = weight.shape
    group = normalize_group_size(group_size, k)
    sdt = _resolve_scale_dtype(scale_dtype, weight.dtype)
    if isinstance(grid, Tensor):
        grid = grid.tolist()
    try:
        candidates = [float(c) for c in grid]
    except TypeError:
        raise TypeError(f"grid must be a sequence of numbers, got {grid!r}") from None
    for c in candidates:
        _check_ratio_value(c, "grid values")
    candidates = [1.0] + [c for c in dict.fromkeys(candidates) if c != 1.0]
    device = _compute_device(weight.device)
    G = _resolve_gram(calibration, gram, k, device)
    cand = torch.tensor(candidates, dtype=torch.float64, device=device)
    best = torch.empty(n, dtype=torch.float64, device=device)
    src = weight.detach()
    for rows in _row_blocks(n, k):
        w = src[rows].to(device=device, dtype=torch.float64)
        if not bool(torch.isfinite(w).all()):
            raise ValueError("weight contains non-finite values (NaN or inf)")
        r = w.shape[0]
        errors = torch.empty((len(candidates), r), dtype=torch.float64, device=device)
        for i, c in enumerate(candidates):
            ratio = torch.full((r, 1), c, dtype=torch.float64, device=device)
            q, s = _quantize_block(w, ratio, group, sdt)
            gs = k if group == 0 else group
            w_hat = (q.view(r, k // gs, gs) * s.double().unsqueeze(-1)).view(r, k)
            errors[i] = _row_errors(w - w_hat, G)
        best[rows] = cand[errors.argmin(dim=0)]  # argmin returns the first minimum
    return best.to(weight.device)


def quantization_error(
    weight: Tensor,
    qweight: Tensor,
    scales: Tensor,
    gram: Tensor | None = None,
) -> float:
    """Relative error of the quantized weight ``Ŵ = q·s`` (exact, float64).

    Without ``gram``: ``‖W − Ŵ‖_F / ‖W‖_F``. With ``gram`` G = XᵀX: the relative output
    error ``‖(W − Ŵ)·Xᵀ‖_F / ‖W·Xᵀ‖_F = sqrt(tr(E·G·Eᵀ) / tr(W·G·Wᵀ))``, E = W − Ŵ.
    0.0 when numerator and denominator both vanish.
    """
    _check_weight(weight)
    if tuple(qweight.shape) != tuple(weight.shape):
        raise ValueError(
            f"qweight must have the weight's shape {tuple(weight.shape)}, got {tuple(qweight.shape)}"
        )
    device = _compute_device(weight.device)
    W = weight.detach().to(device=device, dtype=torch.float64)
    E = W - dequantize(qweight.to(device), scales.to(device), dtype=torch.float64)
    if gram is None:
        num, den = float(E.square().sum()), float(W.square().sum())
    else:
        G = _as_gram(gram, W.shape[1], device)
        num = float(_row_errors(E, G).sum())
        den = float(_row_errors(W, G).sum())
    if den == 0.0:
        return 0.0 if num == 0.0 else math.inf
    return math.sqrt(num / den)
