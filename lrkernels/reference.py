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
