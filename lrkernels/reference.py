"""Plain-PyTorch references: the single source of truth for tests and benchmarks.

`*_reference` functions compute in the inputs' dtype with torch's own ops (they are also the
`torch` backend); `*_exact` functions compute in float64 for accuracy checks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .quant import unpack_qweight


def lowrank_linear_reference(x: Tensor, U: Tensor, V: Tensor, bias: Tensor | None = None) -> Tensor:
    """y = (x · Vᵀ) · Uᵀ + bias as torch's two matmuls in x's dtype.

    x (..., in), V (rank, in), U (out, rank), bias (out,) or None -> (..., out). The rank-r
    intermediate is materialised and rounded to x's dtype, as the fused kernels also round it.
    """
    return F.linear(F.linear(x, V), U, bias)


def lowrank_linear_exact(x: Tensor, U: Tensor, V: Tensor, bias: Tensor | None = None) -> Tensor:
    """The same product in float64 (no intermediate rounding): the accuracy yardstick."""
    b = None if bias is None else bias.double()
    return F.linear(F.linear(x.double(), V.double()), U.double(), b)


def relative_error(out: Tensor, ref: Tensor) -> float:
    """‖out − ref‖_F / ‖ref‖_F computed in float64 (0 when both are empty)."""
    diff = torch.linalg.vector_norm(out.double() - ref.double())
    norm = torch.linalg.vector_norm(ref.double())
    if ref.numel() == 0:
        return 0.0
    return float(diff / norm) if float(norm) > 0 else float(diff)


def dequantize_reference(qweight: Tensor, scales: Tensor, dtype: torch.dtype) -> Tensor:
    """W (N, K) = q · s in `dtype`, from int8 q (N, K) (or packed, layout 2: unpacked first,
    `lrkernels.quant`) and scales (N,) or (N, K // G). q · s is formed in float32 (float64 for
    float64) and rounded once."""
    if qweight.dim() == 3:
        qweight = unpack_qweight(qweight, scales.shape[0])
    n, k = qweight.shape
    s = scales.to(torch.float32 if dtype != torch.float64 else dtype)
    s = s.unsqueeze(1) if scales.dim() == 1 else s.repeat_interleave(k // scales.shape[1], dim=1)
    return (qweight.to(s.dtype) * s).to(dtype)


def int8_linear_reference(
    x: Tensor, qweight: Tensor, scales: Tensor, bias: Tensor | None = None
) -> Tensor:
    """y = x · Wᵀ + bias with W dequantized to x's dtype, then torch's own same-dtype matmul
    (dequantize-then-matmul: what a user would write without the fused kernel)."""
    return F.linear(x, dequantize_reference(qweight, scales, x.dtype), bias)


def int8_linear_exact(
    x: Tensor, qweight: Tensor, scales: Tensor, bias: Tensor | None = None
) -> Tensor:
    """The same product in float64: the accuracy yardstick."""
    b = None if bias is None else bias.double()
    return F.linear(x.double(), dequantize_reference(qweight, scales.double(), torch.float64), b)


def _listed_blocks(num_blocks: Tensor, indices: Tensor | None, n_kv_blocks: int) -> Tensor:
    """Bool (Bl, Hl, NQB, NKB): which key blocks the left-packed lists name."""
    hits = torch.zeros(
        (*num_blocks.shape, n_kv_blocks), dtype=torch.int32, device=num_blocks.device
    )
    if indices is None or indices.shape[-1] == 0:
        return hits > 0
    slot = torch.arange(indices.shape[-1], device=num_blocks.device)
    valid = slot < num_blocks.unsqueeze(-1).long()  # entries past the count are ignored
    idx = indices.long().clamp(0, n_kv_blocks - 1)
    return hits.scatter_add_(-1, idx, valid.to(torch.int32)) > 0


def attention_visibility(layout, device=None) -> Tensor:
    """Bool (Bl, Hl, Sq, Sk): key j visible to query i under `layout` (docs/attention.md):
    listed full blocks entirely, listed partial blocks where the window allows. O(S²): for
    references and tests at small sizes only."""
    sq, sk, bq, bk = layout.q_len, layout.kv_len, layout.block_q, layout.block_k
    nkb = -(-sk // bk)
    partial = _listed_blocks(layout.kv_num_blocks, layout.kv_indices, nkb)
    full = (
        _listed_blocks(layout.full_kv_num_blocks, layout.full_kv_indices, nkb)
        if layout.full_kv_num_blocks is not None
        else torch.zeros_like(partial)
    )

    def expand(blocks: Tensor) -> Tensor:
        return blocks.repeat_interleave(bq, dim=-2)[..., :sq, :].repeat_interleave(bk, dim=-1)[
            ..., :sk
        ]

    i = torch.arange(sq, device=partial.device).unsqueeze(1)
    j = torch.arange(sk, device=partial.device).unsqueeze(0)
    left, right = layout.window
    in_window = torch.ones(sq, sk, dtype=torch.bool, device=partial.device)
    if left >= 0:
        in_window &= j >= i + sk - sq - left
    if right >= 0:
        in_window &= j <= i + sk - sq + right
    visible = expand(full) | (expand(partial) & in_window)
    return visible if device is None else visible.to(device)


def block_sparse_attention_reference(
    q: Tensor, k: Tensor, v: Tensor, layout, scale: float | None = None
) -> tuple[Tensor, Tensor]:
    """Dense masked softmax attention (the ``torch`` backend, and the yardstick of the tests).

    q (B, Hq, Sq, D), k/v (B, Hkv, Sk, D) with Hq % Hkv == 0 -> out (B, Hq, Sq, D) in q's
    dtype, lse (B, Hq, Sq) float32 (float64 for float64 inputs). Scores and softmax in float32
    (float64 for float64); a query row that sees no key gives out 0 and lse -inf, with zero
    gradients. Builds the (Sq, Sk) visibility matrix: small sizes only.
    """
    b, hq, sq, d = q.shape
    hkv = k.shape[1]
    scale = d**-0.5 if scale is None else scale
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    kk = k.to(acc).repeat_interleave(hq // hkv, dim=1)
    vv = v.to(acc).repeat_interleave(hq // hkv, dim=1)
    visible = attention_visibility(layout, q.device)  # (Bl, Hl, Sq, Sk), broadcasts
    scores = torch.matmul(q.to(acc), kk.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~visible, float("-inf"))
    any_visible = visible.any(-1, keepdim=True)
    # Rows that see nothing: softmax over a row of zeros instead of -inf (no NaN), then zeroed.
    safe = torch.where(any_visible, scores, torch.zeros_like(scores))
    lse = torch.logsumexp(safe, dim=-1, keepdim=True)
    probs = torch.exp(safe - lse) * any_visible
    out = torch.matmul(probs, vv).to(q.dtype)
    lse = torch.where(any_visible, lse, torch.full_like(lse, float("-inf"))).squeeze(-1)
    return out, lse.expand(b, hq, sq)


# ----------------------------------------------------------------------------------- LoRA
#
# Dropout of the LoRA branch is a counter-based hash of (seed, row, column) that every backend
# computes bit-identically (torch here, C++ in csrc/cpu/lora_cpu.cpp, Triton in
# triton_kernels/lora.py, CUDA in csrc/cuda/lora_*.cu), so that no mask is ever stored: the
# backward regenerates it, and this reference reproduces a kernel's mask exactly.
#
#   mix32(v)  = lowbias32: v ^= v >> 16; v *= 0x7feb352d; v ^= v >> 15; v *= 0x846ca68b;
#               v ^= v >> 16                                   (all arithmetic mod 2**32)
#   rowkey    = mix32(seed32 ^ mix32(row))                     row of x flattened to (M, K)
#   word      = mix32(rowkey + (col >> 1) * 0x9e3779b9)        one 32-bit word per 2 columns
#   u16       = (word >> (16 * (col & 1))) & 0xffff
#   keep      = u16 >= threshold,  threshold = round(p * 65536) clamped to [0, 65535]
#
# The kept fraction is exactly (65536 - threshold) / 65536 in expectation; the op scales the
# LoRA branch by scale * 65536 / (65536 - threshold), so the masked x itself is x or 0 (no
# rounding from the dropout). Only the low 32 bits of the seed are used.

_MASK32 = 0xFFFFFFFF
LORA_DROPOUT_LEVELS = 65536


def _mul32(v: Tensor, c: int) -> Tensor:
    """(v * c) mod 2**32 for int64 v in [0, 2**32), without int64 overflow."""
    lo = (v * (c & 0xFFFF)) & _MASK32
    hi = ((v * (c >> 16)) & 0xFFFF) << 16
    return (lo + hi) & _MASK32


def _mix32(v: Tensor) -> Tensor:
    v = v ^ (v >> 16)
    v = _mul32(v, 0x7FEB352D)
    v = v ^ (v >> 15)
    v = _mul32(v, 0x846CA68B)
    return v ^ (v >> 16)


def lora_dropout_threshold(p: float) -> int:
    """The integer threshold of dropout probability ``p`` (0 <= p < 1): round(p · 65536)."""
    return min(max(round(float(p) * LORA_DROPOUT_LEVELS), 0), LORA_DROPOUT_LEVELS - 1)


def lora_dropout_keep_mask(
    seed: int | Tensor, rows: int, cols: int, threshold: int, device=None
) -> Tensor:
    """Bool (rows, cols): which elements of x (flattened to (rows, cols)) the LoRA dropout
    keeps, for a seed (an int, or a 1-element integer tensor) and an integer threshold."""
    if isinstance(seed, Tensor):  # stays a tensor: no device-to-host sync, traceable
        device = seed.device if device is None else device
        seed32 = seed.reshape(-1)[:1].to(device=device, dtype=torch.int64) & _MASK32
    else:
        seed32 = int(seed) & _MASK32
    r = torch.arange(rows, device=device, dtype=torch.int64)
    c = torch.arange(cols, device=device, dtype=torch.int64)
    rowkey = _mix32(_mix32(r) ^ seed32)
    word = _mix32((rowkey[:, None] + _mul32(c[None, :] >> 1, 0x9E3779B9)) & _MASK32)
    u16 = (word >> (16 * (c[None, :] & 1))) & 0xFFFF
    return u16 >= int(threshold)


def lora_keep_scale(threshold: int) -> float:
    """1 / (kept fraction): the factor the dropout folds into the LoRA scale."""
    return LORA_DROPOUT_LEVELS / (LORA_DROPOUT_LEVELS - int(threshold))


def lora_base_weight(weight: Tensor, weight_scales: Tensor | None, dtype: torch.dtype) -> Tensor:
    """The base weight (out, in) in `dtype`: `weight` itself (dense) or int8 dequantized
    (either layout of `lrkernels.quant`)."""
    if weight_scales is None:
        return weight.to(dtype)
    return dequantize_reference(weight, weight_scales, dtype)


def _lora_dropped(x2d: Tensor, threshold: int, seed) -> Tensor:
    if threshold == 0:
        return x2d
    keep = lora_dropout_keep_mask(seed, x2d.shape[0], x2d.shape[1], threshold, x2d.device)
    return x2d * keep.to(x2d.dtype)


def lora_linear_reference(
    x: Tensor,
    weight: Tensor,
    weight_scales: Tensor | None,
    A: Tensor,
    B: Tensor,
    bias: Tensor | None,
    scale: float,
    threshold: int = 0,
    seed=None,
) -> Tensor:
    """PEFT-style LoRA in x's dtype with torch's own ops (the ``torch`` backend):
    ``F.linear(x, W, bias) + scale · F.linear(F.linear(drop(x), A), B)``.

    x (..., in); weight (out, in) dense, or int8 with ``weight_scales`` (see
    `dequantize_reference`); A (r, in); B (out, r); bias (out,) or None. ``scale`` is the
    effective factor (the dropout's 1 / keep-fraction included); ``threshold``/``seed`` give
    the dropout mask (`lora_dropout_keep_mask` over x flattened to 2-D); threshold 0 = none.
    """
    w = lora_base_weight(weight, weight_scales, x.dtype)
    x2d = x.reshape(-1, x.shape[-1])
    t = F.linear(_lora_dropped(x2d, threshold, seed), A)
    y = F.linear(x2d, w, bias) + scale * F.linear(t, B)
    return y.reshape(*x.shape[:-1], w.shape[0])  # w: a packed int8 base unpacked


def lora_linear_exact(
    x: Tensor,
    weight: Tensor,
    weight_scales: Tensor | None,
    A: Tensor,
    B: Tensor,
    bias: Tensor | None,
    scale: float,
    threshold: int = 0,
    seed=None,
) -> Tensor:
    """The same in float64 (no intermediate rounding): the accuracy yardstick."""
    ws = None if weight_scales is None else weight_scales.double()
    b = None if bias is None else bias.double()
    return lora_linear_reference(
        x.double(), weight if ws is not None else weight.double(), ws, A.double(), B.double(),
        b, scale, threshold, seed,
    )  # fmt: skip


def lora_multi_adapter_weights(
    A: Tensor, B: Tensor, adapter_index: Tensor, ranks: Tensor, adapter_scales: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-row adapters of a multi-adapter batch: (A_rows (M, r_max, in), B_rows (M, out, r_max),
    s_rows (M,)), zero for rows with index −1 and for columns at or past each adapter's rank."""
    idx = adapter_index.reshape(-1).long()
    active = idx >= 0
    safe = idx.clamp(min=0)
    r_max = A.shape[1]
    live = torch.arange(r_max, device=A.device)[None, :] < ranks.long()[safe][:, None]
    live = live & active[:, None]  # (M, r_max)
    a_rows = A[safe] * live[:, :, None].to(A.dtype)
    b_rows = B[safe] * live[:, None, :].to(B.dtype)
    s_rows = torch.where(active, adapter_scales.float()[safe], 0.0)
    return a_rows, b_rows, s_rows


def lora_linear_multi_reference(
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
    """Multi-adapter LoRA, each row with its own adapter, in x's dtype:
    ``y[m] = x[m]·Wᵀ + s[a]·(x[m]·A[a, :r_a]ᵀ)·B[a, :, :r_a]ᵀ + bias`` with ``a`` =
    adapter_index[m] (−1: base only). A (n, r_max, in), B (n, out, r_max), ranks int (n,),
    adapter_scales (n,) (float32), adapter_index int (...) = x's leading dims."""
    w = lora_base_weight(weight, weight_scales, x.dtype)
    x2d = x.reshape(-1, x.shape[-1])
    a_rows, b_rows, s_rows = lora_multi_adapter_weights(A, B, adapter_index, ranks, adapter_scales)
    t = torch.einsum("mk,mrk->mr", x2d, a_rows)
    lora = torch.einsum("mr,mor->mo", t, b_rows) * s_rows.to(x.dtype)[:, None]
    y = F.linear(x2d, w, bias) + lora
    return y.reshape(*x.shape[:-1], w.shape[0])


def lora_linear_multi_exact(
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
    """The same in float64."""
    ws = None if weight_scales is None else weight_scales.double()
    return lora_linear_multi_reference(
        x.double(), weight if ws is not None else weight.double(), ws, A.double(), B.double(),
        adapter_index, ranks, adapter_scales.double(), None if bias is None else bias.double(),
    )  # fmt: skip
