"""LoRA on a frozen dense or int8 base in Triton: forward, input gradient, A gradient and the
multi-adapter (serving) forward.

Products (x (M, K), base W (N, K), A (R, K), B (N, R), t (M, R), keep = dropout mask (M, K)):

* forward        ``y = x · Wᵀ + scale · round(t) · Bᵀ + bias``, ``t = (keep ⊙ x) · Aᵀ``
* input gradient ``dx = dy · W + keep ⊙ (dt · A)``
* A gradient     ``dA = dtᵀ · (keep ⊙ x)``
* multi-adapter  ``y[m] = x[m] · Wᵀ + s[a] · round(t[m]) · B[a]ᵀ + bias``, ``a = index[m]``

The base W is the dense weight (x's dtype) or int8 ``q`` with scales per output channel or
per group of G inputs, dequantized in registers by `_dequant` — the one place this module turns
int8 into the activation dtype (``(q.float() · s).to(dtype)``, the rounding of
`lrkernels.triton_kernels.int8`), so a new weight layout changes `_load_weight_tile` only.
The int8 ``q`` comes in either layout of `lrkernels.quant`: plain ``(N, K)`` (any strides) or
packed (layout 2, 3-D, contiguous; PACKED), whose tiles `_load_weight_tile` reads with the int8
family's `load_packed_tile` (contiguous runs of 512-byte units, put into (k, n) order in
registers). Packed tiles need the N-block to be a multiple of 32 (`choose_config` sees to it)
and K a multiple of 16 (the packed layout's own condition).

Fusion (the forward, one launch when SPLIT == 1):

* A program owns a (BLOCK_M, BLOCK_N) tile of y. Its K loop loads each x tile once and feeds
  it to two dots: the base product (x_tile · W_tileᵀ) and the LoRA shrink
  (drop(x_tile) · A_tileᵀ, A is tiny and stays in L2). The epilogue rounds t to the dtype,
  multiplies by the B tile (one more dot, R deep), scales, adds the bias and stores once:
  neither t nor the LoRA term ever round-trips through global memory.
* Cost of the fusion: every column tile recomputes its row tile's t, R / BLOCK_N more MMA work
  (r = 16, BLOCK_N = 128: +12.5% tensor-core work, free when memory-bound, i.e. at decode),
  plus A re-read from L2. With dropout, the mask hash is also recomputed per column tile
  (one lowbias32 per element of x per column tile: integer work that is not free at training
  sizes; see the README).
* Decode (few row tiles): SPLIT > 1 splits K over programs writing float32 partials of y and t;
  a second kernel sums them in a fixed order (deterministic) and runs the epilogue.

The input gradient mirrors the forward with the roles swapped (reduction over N, epilogue
``keep ⊙ (dt · A)`` on the dx tile, the mask regenerated per dx element); the A gradient
reduces over M (split over programs, fixed-order reduction). Multi-adapter: a shrink kernel
computes each row's t with its own adapter, then a GEMM over the base adds
``s[a] · t · B[a]ᵀ`` in its epilogue; both walk the adapters present in a row tile one at a
time (min of the remaining indices, a masked dot, repeat): no sort, no host sync, a fixed
number of launches whatever the mix. Indices outside [0, n) are base-only rows, ranks are
clamped to [0, R_max]: no read is ever out of bounds.

Dropout mask: `_keep` is the counter-based hash of `lrkernels.reference` (lowbias32 of
(seed, row, column)), computed bit-identically to the torch, C++ and CUDA versions.

Static report (ahead-of-time compile for sm_90a, triton 3.9, bf16, r = 16; registers per
thread / stack bytes / shared memory; no GPU has run these kernels yet):

* forward, decode tile 16x64x128 (4 warps, split-K): 178 regs, 0 stack, mma.sync; int8 base
  at 16x64x64: 253 regs, 0 stack; with dropout 255 regs and 40-48 bytes of stack (spills).
* forward, training tile 128x128x64 (8 warps): 235 regs (dense) / 236 (int8), wgmma; with
  dropout 255 regs and 24-32 bytes of stack.
* grad-input 128x64x128 with dropout: 255 regs (48 bytes of stack dense, none int8).
* multi-adapter GEMM 64x128x64: 245 regs; shrink 64x64: 168; grad-A 64x128: 168.
* No cp.async in any of them: the K loops are not software-pipelined by this compile (one
  stage of shared memory). The expected numbers below assume a pipelined loop: finding out
  why it is not (the second dot in the loop? the runtime loop bounds of the split?) is the first
  GPU task, with the dropout configs' register pressure (smaller BLOCK_N) second.

Expected on an H200 (4.3 TB/s, ~790 TFLOP/s bf16), 4096², r = 16: decode M = 16 is bound by
the weight stream (32 MiB bf16: ~8 us, int8 ~4 us) and the fusion adds the A re-reads from L2
and r / BLOCK_N more MMA work: within ~5% of the base GEMM kernel of the same design; training
M = 8192 adds ~12.5% tensor-core work to the base product in the forward (t per column tile),
~2% in the backward, plus the dropout hash.

Configuration is a plain heuristic (:func:`choose_config`), no autotuning, so launches stay
torch.compile-friendly and fast under ``TRITON_INTERPRET=1``. float32 dots use
``input_precision="ieee"`` (no TF32).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._launch import launchable
from .int8 import load_packed_tile

__all__ = [
    "choose_config",
    "launch_lora_grad_A",
    "launch_lora_grad_input",
    "launch_lora_linear",
    "launch_lora_linear_multi",
]

_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_INT32_LIMIT = 2**31 - 1
_MIN_STEPS_PER_SPLIT = 4
_MAX_SPLIT = 32
# Ranks above this are not "low rank" for this kernel (t would not fit in registers).
MAX_RANK = 128


# --------------------------------------------------------------------------------------
# Device helpers.
# --------------------------------------------------------------------------------------


@triton.jit
def _dot(a, b, acc, IEEE_FP32: tl.constexpr):
    if IEEE_FP32:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def _mix32(v):
    """lowbias32 on uint32 (wrapping arithmetic)."""
    v ^= v >> 16
    v *= 0x7FEB352D
    v ^= v >> 15
    v *= 0x846CA68B
    v ^= v >> 16
    return v


@triton.jit
def _keep(seed_ptr, offs_m, offs_c, threshold):
    """Bool (len(offs_m), len(offs_c)): the dropout mask at rows offs_m, columns offs_c."""
    seed = tl.load(seed_ptr).to(tl.uint32)
    rowkey = _mix32(seed ^ _mix32(offs_m.to(tl.uint32)))
    cols = offs_c.to(tl.uint32)
    word = _mix32(rowkey[:, None] + (cols >> 1)[None, :] * 0x9E3779B9)
    u16 = (word >> ((cols & 1) * 16)[None, :]) & 0xFFFF
    return u16 >= threshold


@triton.jit
def _dequant(q, s, DTYPE: tl.constexpr):
    """int8 q times scales s (broadcastable), formed in float32, rounded to DTYPE."""
    return (q.to(tl.float32) * s.to(tl.float32)).to(DTYPE)


@triton.jit
def _load_weight_tile(
    w_ptr,
    s_ptr,
    offs_n,
    n_mask,
    offs_k,
    k_mask,
    n0,
    k0,
    NB,
    KB,
    stride_wn,
    stride_wk,
    stride_sn,
    stride_sg,
    IS_INT8: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    SCALE_PER_TILE: tl.constexpr,
    TRANSPOSED: tl.constexpr,
    PACKED: tl.constexpr,
    TILE_N: tl.constexpr,
    TILE_K: tl.constexpr,
    DTYPE: tl.constexpr,
):
    """The base weight's tile in DTYPE: W[offs_n, offs_k]ᵀ (len(k), len(n)) when TRANSPOSED
    (the forward's operand), else W[offs_n, offs_k] (len(n), len(k)) (the input gradient's).
    offs_n = n0 + arange(TILE_N), offs_k = k0 + arange(TILE_K).
    int8: per-channel scales s[n]; with groups, s[n, k0 // G] for the whole tile when
    SCALE_PER_TILE (the tile lies in one group), else gathered per element. PACKED: q is the
    packed layout 2 (NB x KB units of 32 x 16), read by `load_packed_tile` (n0 a multiple of
    32, k0 of 16, TILE_N of 32, TILE_K of 16; out-of-range rows and columns load as 0)."""
    if TRANSPOSED:
        ptrs = w_ptr + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn
        mask = k_mask[:, None] & n_mask[None, :]
    else:
        ptrs = w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :] * stride_wk
        mask = n_mask[:, None] & k_mask[None, :]
    if IS_INT8:
        if PACKED:
            if TRANSPOSED:  # (k, n): load_packed_tile's plain orientation
                q = load_packed_tile(w_ptr, n0, k0, NB, KB, TILE_N, TILE_K, False)
            else:
                q = load_packed_tile(w_ptr, n0, k0, NB, KB, TILE_N, TILE_K, True)
        else:
            q = tl.load(ptrs, mask=mask, other=0)
        if GROUP_SIZE == 0:
            s = tl.load(s_ptr + offs_n * stride_sn, mask=n_mask, other=0.0)
        elif SCALE_PER_TILE:
            s = tl.load(s_ptr + offs_n * stride_sn + (k0 // GROUP_SIZE) * stride_sg, mask=n_mask)
        else:
            g = offs_k // GROUP_SIZE
            if TRANSPOSED:
                s = tl.load(s_ptr + g[:, None] * stride_sg + offs_n[None, :] * stride_sn, mask=mask)
            else:
                s = tl.load(s_ptr + offs_n[:, None] * stride_sn + g[None, :] * stride_sg, mask=mask)
        if GROUP_SIZE == 0 or SCALE_PER_TILE:
            if TRANSPOSED:
                s = s[None, :]
            else:
                s = s[:, None]
        w = _dequant(q, s, DTYPE)
    else:
        w = tl.load(ptrs, mask=mask, other=0.0)
    return w  # one return: the compiler types every return statement, constexpr branches too


@triton.jit
def _store(out_ptr, val, offs_m, m_mask, offs_c, c_mask, stride_om, stride_oc):
    tl.store(
        out_ptr + offs_m[:, None] * stride_om + offs_c[None, :] * stride_oc,
        val.to(out_ptr.dtype.element_ty),
        mask=m_mask[:, None] & c_mask[None, :],
    )


@triton.jit
def _lora_epilogue(
    acc,
    p,
    q_ptr,
    bias_ptr,
    seed_ptr,
    offs_m,
    m_mask,
    offs_c,
    c_mask,
    offs_r,
    R,
    stride_qc,
    stride_qr,
    stride_b,
    scale,
    threshold,
    HAS_BIAS: tl.constexpr,
    MASKED: tl.constexpr,
    IEEE_FP32: tl.constexpr,
):
    """acc + scale · [keep ⊙] (p · Q[offs_c, :R]ᵀ) [+ bias], in float32.

    Forward: p = round(t), Q = B (out, R), no mask. Input gradient: p = dt, Q = Aᵀ read
    through strides (Q[c, r] = A[r, c]), mask = the dropout mask at (offs_m, offs_c)."""
    r_mask = offs_r < R
    q = tl.load(
        q_ptr + offs_r[:, None] * stride_qr + offs_c[None, :] * stride_qc,
        mask=r_mask[:, None] & c_mask[None, :],
        other=0.0,
    )
    lora = _dot(p, q, tl.zeros(acc.shape, dtype=tl.float32), IEEE_FP32)
    if MASKED:
        lora = tl.where(_keep(seed_ptr, offs_m, offs_c, threshold), lora, 0.0)
    acc += scale * lora
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_c * stride_b, mask=c_mask, other=0.0).to(tl.float32)[None, :]
    return acc


# --------------------------------------------------------------------------------------
# Forward.
# --------------------------------------------------------------------------------------


@triton.jit
def _lora_fwd_kernel(
    x_ptr,
    w_ptr,
    s_ptr,
    a_ptr,
    b_ptr,
    bias_ptr,
    seed_ptr,
    y_ptr,
    t_ptr,
    M,
    N,
    K,
    R,
    k_per_split,
    scale,
    threshold,
    NB,
    KB,
    stride_xm,
    stride_xk,
    stride_wn,
    stride_wk,
    stride_sn,
    stride_sg,
    stride_ar,
    stride_ak,
    stride_bn,
    stride_br,
    stride_bias,
    stride_ys,
    stride_ym,
    stride_yn,
    stride_ts,
    stride_tm,
    stride_tr,
    IS_INT8: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    PACKED: tl.constexpr,
    DROPOUT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SPLIT: tl.constexpr,
    IEEE_FP32: tl.constexpr,
    INDEX_64: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """Grid (cdiv(M, BLOCK_M), cdiv(N, BLOCK_N), SPLIT). SPLIT == 1: y and t final (t
    written by the pid_n == 0 programs). SPLIT > 1: y_ptr / t_ptr are float32 workspaces
    (SPLIT, M, N) / (SPLIT, M, BLOCK_R) of partial sums over this split's K range."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_s = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k0 = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    if INDEX_64:
        offs_m = offs_m.to(tl.int64)
        offs_n = offs_n.to(tl.int64)
        offs_k0 = offs_k0.to(tl.int64)
        pid_s = pid_s.to(tl.int64)
    n0 = pid_n * BLOCK_N
    if INDEX_64:
        n0 = n0.to(tl.int64)
    m_mask = offs_m < M
    n_mask = offs_n < N
    r_mask = offs_r < R
    dtype = x_ptr.dtype.element_ty

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    t_acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    k_begin = pid_s * k_per_split
    k_end = tl.minimum(k_begin + k_per_split, K)
    for k0 in range(k_begin, k_end, BLOCK_K):
        offs_k = k0 + offs_k0
        k_mask = offs_k < K
        x_tile = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
            mask=m_mask[:, None] & k_mask[None, :],
            other=0.0,
        )
        w_tile = _load_weight_tile(
            w_ptr, s_ptr, offs_n, n_mask, offs_k, k_mask, n0, k0, NB, KB, stride_wn, stride_wk,
            stride_sn, stride_sg, IS_INT8, GROUP_SIZE, True, True, PACKED, BLOCK_N, BLOCK_K,
            dtype,
        )  # fmt: skip
        acc = _dot(x_tile, w_tile, acc, IEEE_FP32)
        a_tile = tl.load(
            a_ptr + offs_k[:, None] * stride_ak + offs_r[None, :] * stride_ar,
            mask=k_mask[:, None] & r_mask[None, :],
            other=0.0,
        )
        if DROPOUT:
            x_tile = tl.where(_keep(seed_ptr, offs_m, offs_k, threshold), x_tile, 0.0)
        t_acc = _dot(x_tile, a_tile, t_acc, IEEE_FP32)

    if SPLIT == 1:
        t = t_acc.to(dtype)
        if pid_n == 0:
            _store(t_ptr, t, offs_m, m_mask, offs_r, r_mask, stride_tm, stride_tr)
        acc = _lora_epilogue(
            acc, t, b_ptr, bias_ptr, seed_ptr, offs_m, m_mask, offs_n, n_mask, offs_r, R,
            stride_bn, stride_br, stride_bias, scale, threshold, HAS_BIAS, False, IEEE_FP32,
        )  # fmt: skip
        _store(y_ptr, acc, offs_m, m_mask, offs_n, n_mask, stride_ym, stride_yn)
    else:
        _store(y_ptr + pid_s * stride_ys, acc, offs_m, m_mask, offs_n, n_mask, stride_ym, stride_yn)
        if pid_n == 0:
            _store(
                t_ptr + pid_s * stride_ts, t_acc, offs_m, m_mask, offs_r, offs_r < BLOCK_R,
                stride_tm, stride_tr,
            )  # fmt: skip


@triton.jit
def _split_reduce(ws_ptr, offs_m, m_mask, offs_c, c_mask, SPLIT, stride_s, stride_m, stride_c, acc):
    ptrs = ws_ptr + offs_m[:, None] * stride_m + offs_c[None, :] * stride_c
    mask = m_mask[:, None] & c_mask[None, :]
    for _ in range(0, SPLIT):
        acc += tl.load(ptrs, mask=mask, other=0.0)
        ptrs += stride_s
    return acc


@triton.jit
def _lora_fwd_reduce_kernel(
    ws_y_ptr,
    ws_t_ptr,
    b_ptr,
    bias_ptr,
    y_ptr,
    t_ptr,
    M,
    N,
    R,
    SPLIT,
    scale,
    stride_ys,
    stride_ym,
    stride_yn,
    stride_ts,
    stride_tm,
    stride_tr,
    stride_bn,
    stride_br,
    stride_bias,
    stride_om,
    stride_on,
    stride_otm,
    stride_otr,
    HAS_BIAS: tl.constexpr,
    IEEE_FP32: tl.constexpr,
    INDEX_64: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """y = Σ_s ws_y[s] + scale · round(Σ_s ws_t[s]) · Bᵀ + bias (fixed split order)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    if INDEX_64:
        offs_m = offs_m.to(tl.int64)
        offs_n = offs_n.to(tl.int64)
    m_mask = offs_m < M
    n_mask = offs_n < N
    r_all = offs_r < BLOCK_R
    acc = _split_reduce(
        ws_y_ptr, offs_m, m_mask, offs_n, n_mask, SPLIT, stride_ys, stride_ym, stride_yn,
        tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32),
    )  # fmt: skip
    t32 = _split_reduce(
        ws_t_ptr, offs_m, m_mask, offs_r, r_all, SPLIT, stride_ts, stride_tm, stride_tr,
        tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32),
    )  # fmt: skip
    t = t32.to(y_ptr.dtype.element_ty)
    if pid_n == 0:
        _store(t_ptr, t, offs_m, m_mask, offs_r, offs_r < R, stride_otm, stride_otr)
    acc = _lora_epilogue(
        acc, t, b_ptr, bias_ptr, b_ptr, offs_m, m_mask, offs_n, n_mask, offs_r, R,
        stride_bn, stride_br, stride_bias, scale, 0, HAS_BIAS, False, IEEE_FP32,
    )  # fmt: skip
    _store(y_ptr, acc, offs_m, m_mask, offs_n, n_mask, stride_om, stride_on)


# --------------------------------------------------------------------------------------
# Input gradient.
# --------------------------------------------------------------------------------------


@triton.jit
def _lora_grad_input_kernel(
    dy_ptr,
    w_ptr,
    s_ptr,
    dt_ptr,
    a_ptr,
    seed_ptr,
    out_ptr,
    M,
    N,
    K,
    R,
    n_per_split,
    threshold,
    NB,
    KB,
    stride_dym,
    stride_dyn,
    stride_wn,
    stride_wk,
    stride_sn,
    stride_sg,
    stride_dtm,
    stride_dtr,
    stride_ar,
    stride_ak,
    stride_os,
    stride_om,
    stride_ok,
    IS_INT8: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    SCALE_PER_TILE: tl.constexpr,
    PACKED: tl.constexpr,
    DROPOUT: tl.constexpr,
    SPLIT: tl.constexpr,
    IEEE_FP32: tl.constexpr,
    INDEX_64: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """dx tile (BLOCK_M, BLOCK_K) = Σ_n dy · W [+ keep ⊙ (dt · A) when SPLIT == 1; with a
    split, float32 partials go to out (SPLIT, M, K) and the reduce kernel adds the term]."""
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_s = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    if INDEX_64:
        offs_m = offs_m.to(tl.int64)
        offs_k = offs_k.to(tl.int64)
        offs_n0 = offs_n0.to(tl.int64)
        pid_s = pid_s.to(tl.int64)
    m_mask = offs_m < M
    k_mask = offs_k < K
    dtype = dy_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    n_begin = pid_s * n_per_split
    n_end = tl.minimum(n_begin + n_per_split, N)
    for n0 in range(n_begin, n_end, BLOCK_N):
        offs_n = n0 + offs_n0
        n_mask = offs_n < N
        dy_tile = tl.load(
            dy_ptr + offs_m[:, None] * stride_dym + offs_n[None, :] * stride_dyn,
            mask=m_mask[:, None] & n_mask[None, :],
            other=0.0,
        )
        w_tile = _load_weight_tile(
            w_ptr, s_ptr, offs_n, n_mask, offs_k, k_mask, n0, pid_k * BLOCK_K, NB, KB,
            stride_wn, stride_wk, stride_sn, stride_sg, IS_INT8, GROUP_SIZE, SCALE_PER_TILE,
            False, PACKED, BLOCK_N, BLOCK_K, dtype,
        )  # fmt: skip
        acc = _dot(dy_tile, w_tile, acc, IEEE_FP32)
    if SPLIT == 1:
        dt = tl.load(
            dt_ptr + offs_m[:, None] * stride_dtm + offs_r[None, :] * stride_dtr,
            mask=m_mask[:, None] & (offs_r < R)[None, :],
            other=0.0,
        )
        acc = _lora_epilogue(
            acc, dt, a_ptr, a_ptr, seed_ptr, offs_m, m_mask, offs_k, k_mask, offs_r, R,
            stride_ak, stride_ar, 0, 1.0, threshold, False, DROPOUT, IEEE_FP32,
        )  # fmt: skip
        _store(out_ptr, acc, offs_m, m_mask, offs_k, k_mask, stride_om, stride_ok)
    else:
        _store(
            out_ptr + pid_s * stride_os, acc, offs_m, m_mask, offs_k, k_mask, stride_om, stride_ok
        )


@triton.jit
def _lora_grad_input_reduce_kernel(
    ws_ptr,
    dt_ptr,
    a_ptr,
    seed_ptr,
    out_ptr,
    M,
    K,
    R,
    SPLIT,
    threshold,
    stride_ws,
    stride_wm,
    stride_wk,
    stride_dtm,
    stride_dtr,
    stride_ar,
    stride_ak,
    stride_om,
    stride_ok,
    DROPOUT: tl.constexpr,
    IEEE_FP32: tl.constexpr,
    INDEX_64: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    if INDEX_64:
        offs_m = offs_m.to(tl.int64)
        offs_k = offs_k.to(tl.int64)
    m_mask = offs_m < M
    k_mask = offs_k < K
    acc = _split_reduce(
        ws_ptr, offs_m, m_mask, offs_k, k_mask, SPLIT, stride_ws, stride_wm, stride_wk,
        tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32),
    )  # fmt: skip
    dt = tl.load(
        dt_ptr + offs_m[:, None] * stride_dtm + offs_r[None, :] * stride_dtr,
        mask=m_mask[:, None] & (offs_r < R)[None, :],
        other=0.0,
    )
    acc = _lora_epilogue(
        acc, dt, a_ptr, a_ptr, seed_ptr, offs_m, m_mask, offs_k, k_mask, offs_r, R,
        stride_ak, stride_ar, 0, 1.0, threshold, False, DROPOUT, IEEE_FP32,
    )  # fmt: skip
    _store(out_ptr, acc, offs_m, m_mask, offs_k, k_mask, stride_om, stride_ok)


# --------------------------------------------------------------------------------------
# A gradient.
# --------------------------------------------------------------------------------------


@triton.jit
def _lora_grad_A_kernel(
    dt_ptr,
    x_ptr,
    seed_ptr,
    out_ptr,
    M,
    K,
    R,
    m_per_split,
    threshold,
    stride_dtm,
    stride_dtr,
    stride_xm,
    stride_xk,
    stride_os,
    stride_or,
    stride_ok,
    DROPOUT: tl.constexpr,
    IEEE_FP32: tl.constexpr,
    INDEX_64: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """out[pid_s] (R, K tile) = Σ_{m in split} dt[m]ᵀ · (keep ⊙ x)[m] (float32 partials)."""
    pid_k = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    if INDEX_64:
        offs_k = offs_k.to(tl.int64)
        offs_m0 = offs_m0.to(tl.int64)
        pid_s = pid_s.to(tl.int64)
    k_mask = offs_k < K
    r_mask = offs_r < R
    acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    m_begin = pid_s * m_per_split
    m_end = tl.minimum(m_begin + m_per_split, M)
    for m0 in range(m_begin, m_end, BLOCK_M):
        offs_m = m0 + offs_m0
        m_mask = offs_m < M
        dt_t = tl.load(
            dt_ptr + offs_r[:, None] * stride_dtr + offs_m[None, :] * stride_dtm,
            mask=r_mask[:, None] & m_mask[None, :],
            other=0.0,
        )
        x_tile = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
            mask=m_mask[:, None] & k_mask[None, :],
            other=0.0,
        )
        if DROPOUT:
            x_tile = tl.where(_keep(seed_ptr, offs_m, offs_k, threshold), x_tile, 0.0)
        acc = _dot(dt_t, x_tile, acc, IEEE_FP32)
    _store(out_ptr + pid_s * stride_os, acc, offs_r, r_mask, offs_k, k_mask, stride_or, stride_ok)


@triton.jit
def _lora_sum_splits_kernel(
    ws_ptr,
    out_ptr,
    R,
    K,
    SPLIT,
    stride_ws,
    stride_wr,
    stride_wk,
    stride_or,
    stride_ok,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    offs_r = tl.arange(0, BLOCK_R)
    offs_k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    r_mask = offs_r < R
    k_mask = offs_k < K
    acc = _split_reduce(
        ws_ptr, offs_r, r_mask, offs_k, k_mask, SPLIT, stride_ws, stride_wr, stride_wk,
        tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32),
    )  # fmt: skip
    _store(out_ptr, acc, offs_r, r_mask, offs_k, k_mask, stride_or, stride_ok)


# --------------------------------------------------------------------------------------
# Multi-adapter forward.
# --------------------------------------------------------------------------------------


@triton.jit
def _adapter_rows(idx_ptr, offs_m, m_mask, N_ADAPTERS):
    """Each row's adapter, or a sentinel N_ADAPTERS for base-only / out-of-range rows."""
    a = tl.load(idx_ptr + offs_m, mask=m_mask, other=-1)
    valid = (a >= 0) & (a < N_ADAPTERS) & m_mask
    return tl.where(valid, a, N_ADAPTERS)


@triton.jit
def _lora_multi_shrink_kernel(
    x_ptr,
    a_ptr,
    idx_ptr,
    ranks_ptr,
    t_ptr,
    M,
    K,
    R_MAX,
    N_ADAPTERS,
    stride_xm,
    stride_xk,
    stride_an,
    stride_ar,
    stride_ak,
    stride_im,
    stride_tm,
    stride_tr,
    IEEE_FP32: tl.constexpr,
    INDEX_64: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """t[m] (R_MAX,) = round(x[m] · A[a, :rank_a]ᵀ), zero past the rank and for rows
    without an adapter. Grid (cdiv(M, BLOCK_M),); loops over the adapters of the tile."""
    pid_m = tl.program_id(0)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k0 = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    if INDEX_64:
        offs_m = offs_m.to(tl.int64)
        offs_k0 = offs_k0.to(tl.int64)
    m_mask = offs_m < M
    adapter = _adapter_rows(idx_ptr, offs_m * stride_im, m_mask, N_ADAPTERS)
    t = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    current = tl.min(adapter, axis=0)
    while current < N_ADAPTERS:
        rows = adapter == current
        rank = tl.minimum(tl.maximum(tl.load(ranks_ptr + current), 0), R_MAX)
        r_mask = offs_r < rank
        a_base = a_ptr + current.to(tl.int64) * stride_an
        part = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + offs_k0
            k_mask = offs_k < K
            x_tile = tl.load(
                x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                mask=(rows & m_mask)[:, None] & k_mask[None, :],
                other=0.0,
            )
            a_tile = tl.load(
                a_base + offs_k[:, None] * stride_ak + offs_r[None, :] * stride_ar,
                mask=k_mask[:, None] & r_mask[None, :],
                other=0.0,
            )
            part = _dot(x_tile, a_tile, part, IEEE_FP32)
        t += part  # rows of other adapters got exact zeros
        adapter = tl.where(rows, N_ADAPTERS, adapter)
        current = tl.min(adapter, axis=0)
    _store(t_ptr, t.to(t_ptr.dtype.element_ty), offs_m, m_mask, offs_r, offs_r < R_MAX,
           stride_tm, stride_tr)  # fmt: skip


@triton.jit
def _lora_multi_fwd_kernel(
    x_ptr,
    w_ptr,
    s_ptr,
    t_ptr,
    b_ptr,
    idx_ptr,
    ranks_ptr,
    ascale_ptr,
    bias_ptr,
    y_ptr,
    M,
    N,
    K,
    R_MAX,
    N_ADAPTERS,
    NB,
    KB,
    stride_xm,
    stride_xk,
    stride_wn,
    stride_wk,
    stride_sn,
    stride_sg,
    stride_tm,
    stride_tr,
    stride_bn_a,
    stride_bn,
    stride_br,
    stride_im,
    stride_bias,
    stride_ym,
    stride_yn,
    IS_INT8: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    PACKED: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    IEEE_FP32: tl.constexpr,
    INDEX_64: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """y tile = x · Wᵀ + Σ_{adapters a of the tile} s[a] · t[rows of a] · B[a, tile, :rank]ᵀ
    + bias. Grid (cdiv(M, BLOCK_M), cdiv(N, BLOCK_N))."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k0 = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    if INDEX_64:
        offs_m = offs_m.to(tl.int64)
        offs_n = offs_n.to(tl.int64)
        offs_k0 = offs_k0.to(tl.int64)
    n0 = pid_n * BLOCK_N
    if INDEX_64:
        n0 = n0.to(tl.int64)
    m_mask = offs_m < M
    n_mask = offs_n < N
    dtype = x_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + offs_k0
        k_mask = offs_k < K
        x_tile = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
            mask=m_mask[:, None] & k_mask[None, :],
            other=0.0,
        )
        w_tile = _load_weight_tile(
            w_ptr, s_ptr, offs_n, n_mask, offs_k, k_mask, n0, k0, NB, KB, stride_wn, stride_wk,
            stride_sn, stride_sg, IS_INT8, GROUP_SIZE, True, True, PACKED, BLOCK_N, BLOCK_K,
            dtype,
        )  # fmt: skip
        acc = _dot(x_tile, w_tile, acc, IEEE_FP32)

    adapter = _adapter_rows(idx_ptr, offs_m * stride_im, m_mask, N_ADAPTERS)
    current = tl.min(adapter, axis=0)
    while current < N_ADAPTERS:
        rows = adapter == current
        rank = tl.minimum(tl.maximum(tl.load(ranks_ptr + current), 0), R_MAX)
        r_mask = offs_r < rank
        t = tl.load(
            t_ptr + offs_m[:, None] * stride_tm + offs_r[None, :] * stride_tr,
            mask=(rows & m_mask)[:, None] & r_mask[None, :],
            other=0.0,
        )
        b_tile = tl.load(
            b_ptr + current.to(tl.int64) * stride_bn_a + offs_r[:, None] * stride_br
            + offs_n[None, :] * stride_bn,
            mask=r_mask[:, None] & n_mask[None, :],
            other=0.0,
        )  # fmt: skip
        s = tl.load(ascale_ptr + current)
        acc += s * _dot(t, b_tile, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), IEEE_FP32)
        adapter = tl.where(rows, N_ADAPTERS, adapter)
        current = tl.min(adapter, axis=0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n * stride_bias, mask=n_mask, other=0.0).to(tl.float32)[
            None, :
        ]
    _store(y_ptr, acc, offs_m, m_mask, offs_n, n_mask, stride_ym, stride_yn)


# --------------------------------------------------------------------------------------
# Host side.
# --------------------------------------------------------------------------------------


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _next_pow2(n: int) -> int:
    return 1 << (max(int(n), 1) - 1).bit_length()


def _pow2_divisor_at_most(g: int, cap: int) -> int:
    p = g & -g
    return min(p, _next_pow2(cap + 1) // 2)


@functools.lru_cache(maxsize=1024)
def _choose_config_cached(M, N, K, R, group_size, dtype, num_sms, transposed, is_int8, packed):
    esize = 4 if dtype == torch.float32 else 2
    cols, red = (K, N) if transposed else (N, K)
    small_m = M <= 16
    block_m = 16 if small_m else min(128 if esize == 2 else 64, _next_pow2(M))
    block_c = 128 if (esize == 2 and not small_m) else 64
    block_c = min(block_c, max(16, _next_pow2(cols)))
    # Long reduction steps keep bytes in flight at decode; an int8 tile also holds its
    # dequantized copy, so it takes 64 (128 spills at 4 warps: sm_90 AOT compile, 255 regs).
    block_r_red = (128 if small_m and not is_int8 else 64) if esize == 2 else 32
    block_r_red = min(block_r_red, max(16, _next_pow2(red)))
    if group_size and not transposed:
        block_r_red = _pow2_divisor_at_most(group_size, block_r_red)
    elif group_size and transposed and group_size >= 64:
        block_c = min(block_c, _pow2_divisor_at_most(group_size, block_c))
    if packed:  # load_packed_tile reads whole 32-row units: the N-block is a multiple of 32
        if transposed:
            block_r_red = max(block_r_red, 32)
        else:
            block_c = max(block_c, 32)
    block_rank = max(16, _next_pow2(R))
    m_tiles = _cdiv(max(M, 1), block_m)
    tiles = m_tiles * _cdiv(cols, block_c)
    steps = _cdiv(red, block_r_red)
    split = 1
    if num_sms > 1 and tiles < 2 * num_sms:
        split = min(
            _cdiv(2 * num_sms, tiles),
            steps // _MIN_STEPS_PER_SPLIT,
            red // (32 * max(M, 1)),
            _MAX_SPLIT,
        )
        split = max(1, split)
        split = _cdiv(steps, _cdiv(steps, split))
    num_warps = 8 if block_m * block_c >= 128 * 128 else 4
    num_stages = 3 if esize == 2 else 2
    return (
        ("BLOCK_M", block_m),
        ("BLOCK_N", block_r_red if transposed else block_c),
        ("BLOCK_K", block_c if transposed else block_r_red),
        ("BLOCK_R", block_rank),
        ("SPLIT", split),
        ("num_warps", num_warps),
        ("num_stages", num_stages),
    )


def choose_config(
    M, N, K, R, group_size, dtype, num_sms, transposed=False, is_int8=False, packed=False
) -> dict:
    """Launch configuration (plain heuristic, as `lrkernels.triton_kernels.int8`'s): tiles of
    (BLOCK_M rows, BLOCK_N output columns / reduction step, BLOCK_K reduction step / dx
    columns), BLOCK_R = the rank padded to a power of two >= 16, and SPLIT of the reduction
    when the output tiles cannot fill two waves of the GPU. ``transposed`` picks the input
    gradient's orientation (reduction over N); ``packed`` (a layout-2 int8 base) makes BLOCK_N
    at least 32. num_sms = 1 (the interpreter) never splits."""
    if dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"lora_linear (triton): unsupported dtype {dtype}")
    key = (int(M), int(N), int(K), int(R), int(group_size), dtype, max(1, int(num_sms)))
    return dict(_choose_config_cached(*key, bool(transposed), bool(is_int8), bool(packed)))


@functools.cache
def _num_sms(device_type: str, index: int | None) -> int:
    if device_type != "cuda":
        return 1
    idx = torch.cuda.current_device() if index is None else index
    return torch.cuda.get_device_properties(idx).multi_processor_count


def _spans_int32(t: torch.Tensor, pad: int) -> bool:
    reach = sum((s + pad) * abs(st) for s, st in zip(t.shape, t.stride(), strict=True))
    return reach > _INT32_LIMIT


def _index_64(tensors, pad) -> bool:
    return any(t is not None and _spans_int32(t, pad) for t in tensors)


def _scale_strides(scales):
    if scales is None:
        return 0, 0
    return scales.stride(0), (scales.stride(1) if scales.dim() == 2 else 0)


def _group(K: int, scales) -> int:
    if scales is None or scales.dim() == 1:
        return 0
    return K // scales.shape[1]


def _is_packed(weight, scales) -> bool:
    """An int8 base in the packed layout 2 (3-D; `lrkernels.quant`)."""
    return scales is not None and weight.dim() == 3


def _packed_args(weight, scales, N: int, K: int) -> tuple[int, int, int, int]:
    """(NB, KB, stride_wn, stride_wk) of the kernels: the packed unit grid (zeros for a plain
    weight) and the plain weight's strides (unused when packed)."""
    if _is_packed(weight, scales):
        if (
            not weight.is_contiguous()
            or weight.shape[0] != _cdiv(N, 32)
            or 16 * weight.shape[1] != K
        ):
            raise ValueError(
                f"lora_linear (triton): a packed int8 base must be contiguous with shape "
                f"({_cdiv(N, 32)}, {K // 16}, 512), got {tuple(weight.shape)}"
            )
        return weight.shape[0], weight.shape[1], 0, 0
    return 0, 0, weight.stride(0), weight.stride(1)


def _check_rank(R: int) -> None:
    if R > MAX_RANK:
        raise ValueError(f"lora_linear (triton): rank {R} > {MAX_RANK} is not supported")


def launch_lora_linear(
    x2d, weight, scales, A, B, bias, scale, threshold, seed, y, t, *, config=None
):
    """y (M, N) = x2d · Wᵀ + scale · round(t) · Bᵀ + bias and t (M, R) = (keep ⊙ x2d) · Aᵀ
    (rounded to x's dtype). weight (N, K) dense in x's dtype or int8 with scales (N,) /
    (N, K / G), or packed int8 (layout 2, contiguous); A (R, K); B (N, R); seed a one-element
    int64 tensor (read when threshold > 0). Any strides; y and t preallocated."""
    M, K = x2d.shape
    N, R = y.shape[1], A.shape[0]
    _check_rank(R)
    if M == 0:
        return
    group = _group(K, scales)
    packed = _is_packed(weight, scales)
    nb, kb, swn, swk = _packed_args(weight, scales, N, K)
    if config is None:
        config = choose_config(
            M, N, K, R, group, x2d.dtype, _num_sms(x2d.device.type, x2d.device.index),
            is_int8=scales is not None, packed=packed,
        )  # fmt: skip
    bm, bn, bk, br = config["BLOCK_M"], config["BLOCK_N"], config["BLOCK_K"], config["BLOCK_R"]
    if group and group % bk:
        raise ValueError(f"lora_linear (triton): BLOCK_K={bk} must divide group_size={group}")
    steps = _cdiv(K, bk)
    split = max(1, min(config["SPLIT"], steps))
    k_per_split = _cdiv(steps, split) * bk
    split = _cdiv(K, k_per_split)
    pad = 2 * max(bm, bn, bk, br)
    index_64 = _index_64((x2d, weight, scales, A, B, bias, y, t), pad)
    if split > 1:
        ws_y = torch.empty((split, M, N), dtype=torch.float32, device=x2d.device)
        ws_t = torch.empty((split, M, br), dtype=torch.float32, device=x2d.device)
        index_64 = index_64 or _spans_int32(ws_y, pad)
        dest_y, dest_t = ws_y, ws_t
        ys, ts = ws_y.stride(), ws_t.stride()
    else:
        dest_y, dest_t = y, t
        ys, ts = (0, *y.stride()), (0, *t.stride())
    ssn, ssg = _scale_strides(scales)
    dummy = y
    ieee = x2d.dtype == torch.float32
    launchable(_lora_fwd_kernel)[(_cdiv(M, bm), _cdiv(N, bn), split)](
        x2d, weight, dummy if scales is None else scales, A, B,
        dummy if bias is None else bias, dummy if seed is None else seed, dest_y, dest_t,
        M, N, K, R, k_per_split, float(scale), int(threshold), nb, kb,
        x2d.stride(0), x2d.stride(1), swn, swk, ssn, ssg,
        A.stride(0), A.stride(1), B.stride(0), B.stride(1),
        0 if bias is None else bias.stride(0), *ys, *ts,
        IS_INT8=scales is not None, GROUP_SIZE=group, PACKED=packed, DROPOUT=threshold > 0,
        HAS_BIAS=bias is not None, SPLIT=split, IEEE_FP32=ieee, INDEX_64=index_64,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, BLOCK_R=br,
        num_warps=config["num_warps"], num_stages=config["num_stages"],
    )  # fmt: skip
    if split > 1:
        launchable(_lora_fwd_reduce_kernel)[(_cdiv(M, bm), _cdiv(N, bn))](
            ws_y, ws_t, B, dummy if bias is None else bias, y, t, M, N, R, split, float(scale),
            *ws_y.stride(), *ws_t.stride(), B.stride(0), B.stride(1),
            0 if bias is None else bias.stride(0), y.stride(0), y.stride(1),
            t.stride(0), t.stride(1),
            HAS_BIAS=bias is not None, IEEE_FP32=ieee, INDEX_64=index_64,
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_R=br, num_warps=4,
        )  # fmt: skip


def launch_lora_grad_input(dy2d, weight, scales, dt, A, threshold, seed, out, *, config=None):
    """out (M, K) = dy2d (M, N) · W + keep ⊙ (dt (M, R) · A (R, K)); keep regenerated from
    the seed (threshold > 0). Any strides; out preallocated."""
    M, N = dy2d.shape
    K, R = out.shape[1], A.shape[0]
    _check_rank(R)
    if M == 0:
        return
    group = _group(K, scales)
    packed = _is_packed(weight, scales)
    nb, kb, swn, swk = _packed_args(weight, scales, N, K)
    if config is None:
        config = choose_config(
            M, N, K, R, group, dy2d.dtype, _num_sms(dy2d.device.type, dy2d.device.index), True,
            is_int8=scales is not None, packed=packed,
        )  # fmt: skip
    bm, bn, bk, br = config["BLOCK_M"], config["BLOCK_N"], config["BLOCK_K"], config["BLOCK_R"]
    steps = _cdiv(N, bn)
    split = max(1, min(config["SPLIT"], steps))
    n_per_split = _cdiv(steps, split) * bn
    split = _cdiv(N, n_per_split)
    pad = 2 * max(bm, bn, bk, br)
    index_64 = _index_64((dy2d, weight, scales, dt, A, out), pad)
    if split > 1:
        ws = torch.empty((split, M, K), dtype=torch.float32, device=dy2d.device)
        index_64 = index_64 or _spans_int32(ws, pad)
        dest, ds = ws, ws.stride()
    else:
        dest, ds = out, (0, *out.stride())
    ssn, ssg = _scale_strides(scales)
    dummy = out
    ieee = dy2d.dtype == torch.float32
    seed_arg = dummy if seed is None else seed
    launchable(_lora_grad_input_kernel)[(_cdiv(M, bm), _cdiv(K, bk), split)](
        dy2d, weight, dummy if scales is None else scales, dt, A, seed_arg, dest,
        M, N, K, R, n_per_split, int(threshold), nb, kb,
        dy2d.stride(0), dy2d.stride(1), swn, swk, ssn, ssg,
        dt.stride(0), dt.stride(1), A.stride(0), A.stride(1), *ds,
        IS_INT8=scales is not None, GROUP_SIZE=group,
        SCALE_PER_TILE=group > 0 and group % bk == 0, PACKED=packed, DROPOUT=threshold > 0,
        SPLIT=split,
        IEEE_FP32=ieee, INDEX_64=index_64, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, BLOCK_R=br,
        num_warps=config["num_warps"], num_stages=config["num_stages"],
    )  # fmt: skip
    if split > 1:
        launchable(_lora_grad_input_reduce_kernel)[(_cdiv(M, bm), _cdiv(K, bk))](
            ws, dt, A, seed_arg, out, M, K, R, split, int(threshold), *ws.stride(),
            dt.stride(0), dt.stride(1), A.stride(0), A.stride(1), out.stride(0), out.stride(1),
            DROPOUT=threshold > 0, IEEE_FP32=ieee, INDEX_64=index_64,
            BLOCK_M=bm, BLOCK_K=bk, BLOCK_R=br, num_warps=4,
        )  # fmt: skip


def launch_lora_grad_A(dt, x2d, threshold, seed, out, *, split=None):
    """out (R, K) = dtᵀ (R, M) · (keep ⊙ x2d) (M, K), split over M with a fixed-order sum
    (``split`` overrides the heuristic: tests)."""
    M, K = x2d.shape
    R = dt.shape[1]
    _check_rank(R)
    esize = 4 if x2d.dtype == torch.float32 else 2
    bm = 64 if esize == 2 else 32
    bk = 128 if esize == 2 else 64
    br = max(16, _next_pow2(R))
    num_sms = _num_sms(x2d.device.type, x2d.device.index)
    k_tiles = _cdiv(K, bk)
    steps = max(1, _cdiv(M, bm))
    if split is None:
        split = 1 if num_sms == 1 else max(1, min(_cdiv(2 * num_sms, k_tiles), steps // 4, 64))
    m_per_split = _cdiv(steps, split) * bm
    split = max(1, _cdiv(M, m_per_split))
    ws = torch.empty((split, R, K), dtype=torch.float32, device=x2d.device)
    pad = 2 * max(bm, bk, br)
    index_64 = _index_64((dt, x2d, ws), pad)
    launchable(_lora_grad_A_kernel)[(k_tiles, split)](
        dt, x2d, out if seed is None else seed, ws, M, K, R, m_per_split, int(threshold),
        dt.stride(0), dt.stride(1), x2d.stride(0), x2d.stride(1), *ws.stride(),
        DROPOUT=threshold > 0, IEEE_FP32=esize == 4, INDEX_64=index_64,
        BLOCK_M=bm, BLOCK_K=bk, BLOCK_R=br, num_warps=4,
    )  # fmt: skip
    launchable(_lora_sum_splits_kernel)[(k_tiles,)](
        ws, out, R, K, split, *ws.stride(), out.stride(0), out.stride(1),
        BLOCK_R=br, BLOCK_K=bk, num_warps=4,
    )  # fmt: skip


def launch_lora_linear_multi(x2d, weight, scales, A, B, idx, ranks, adapter_scales, bias, y):
    """y (M, N) = x2d · Wᵀ + s[a] · round(x2d · A[a, :r_a]ᵀ) · B[a, :, :r_a]ᵀ + bias per row,
    a = idx[m] (int32; outside [0, n) = base only); A (n, R_MAX, K), B (n, N, R_MAX)."""
    M, K = x2d.shape
    N = y.shape[1]
    n, r_max = A.shape[0], A.shape[1]
    _check_rank(r_max)
    if M == 0:
        return
    group = _group(K, scales)
    packed = _is_packed(weight, scales)
    nb, kb, swn, swk = _packed_args(weight, scales, N, K)
    cfg = choose_config(
        M, N, K, r_max, group, x2d.dtype, _num_sms(x2d.device.type, x2d.device.index),
        is_int8=scales is not None, packed=packed,
    )  # fmt: skip
    bm, bn, bk, br = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"], cfg["BLOCK_R"]
    t = torch.empty((M, r_max), dtype=x2d.dtype, device=x2d.device)
    pad = 2 * max(bm, bn, bk, br)
    index_64 = _index_64((x2d, weight, scales, A, B, bias, y, t), pad)
    ieee = x2d.dtype == torch.float32
    launchable(_lora_multi_shrink_kernel)[(_cdiv(M, bm),)](
        x2d, A, idx, ranks, t, M, K, r_max, n, x2d.stride(0), x2d.stride(1),
        A.stride(0), A.stride(1), A.stride(2), idx.stride(0), t.stride(0), t.stride(1),
        IEEE_FP32=ieee, INDEX_64=index_64, BLOCK_M=bm, BLOCK_K=bk, BLOCK_R=br, num_warps=4,
    )  # fmt: skip
    ssn, ssg = _scale_strides(scales)
    launchable(_lora_multi_fwd_kernel)[(_cdiv(M, bm), _cdiv(N, bn))](
        x2d, weight, y if scales is None else scales, t, B, idx, ranks, adapter_scales,
        y if bias is None else bias, y, M, N, K, r_max, n, nb, kb,
        x2d.stride(0), x2d.stride(1), swn, swk, ssn, ssg,
        t.stride(0), t.stride(1), B.stride(0), B.stride(1), B.stride(2), idx.stride(0),
        0 if bias is None else bias.stride(0), y.stride(0), y.stride(1),
        IS_INT8=scales is not None, GROUP_SIZE=group, PACKED=packed, HAS_BIAS=bias is not None,
        IEEE_FP32=ieee, INDEX_64=index_64, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, BLOCK_R=br,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )  # fmt: skip
