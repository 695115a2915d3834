"""Block-sparse softmax attention in Triton: forward and (deterministic) backward.

Implements the contract of ``docs/attention.md``:

* ``q`` (B, Hq, Sq, D), ``k`` / ``v`` (B, Hkv, Sk, D), ``Hq % Hkv == 0`` (query head ``h``
  reads kv head ``h // (Hq // Hkv)``; kv heads are never repeated in memory). Any strides
  on the batch, head and sequence dimensions; the last dimension must have stride 1.
* Block layout in FlexAttention's CSR-like form: per (batch or 1, head or 1, query block)
  the *full* key blocks (every element visible, no element mask) and the *partial* key
  blocks (the window mask below is applied per element). The backward's dk/dv pass reads
  the transposed lists (per key block, the query blocks that read it).
* Window (FlashAttention's convention, diagonal aligned to the bottom right): query ``i``
  sees key ``j`` iff ``Sk - Sq - left <= j - i <= Sk - Sq + right``; ``-1`` = unbounded.
  Every kernel also applies the sequence bounds ``i < Sq``, ``j < Sk``.
* ``lse`` is the natural-log log-sum-exp of ``scale * q . k`` over the visible keys. A row
  that sees no key gets ``out = 0`` and ``lse = -inf``; in the backward its gradients are 0.

Numerics: dots accumulate in float32; float32 inputs use exact IEEE products
(``input_precision="ieee"``, no TF32); 16-bit inputs feed the probabilities / dS to the
second dot rounded to the input dtype (as FlashAttention does). Softmax statistics are
float32; ``exp2`` with ``scale * log2(e)`` folded into the scores.

Kernels (every output element is written by exactly one program, no atomics, so the
results are bitwise reproducible run to run):

* ``_attn_fwd_kernel``, grid ``(cdiv(Sq, BLOCK_M), Hq, B)``: a program owns ``BLOCK_M``
  query rows of one head. ``BLOCK_M`` equals the layout's ``block_q`` or divides it (the
  program then reads the lists of the layout block containing its rows). It walks the full
  key blocks first (no element mask; only the ``j < Sk`` bound, compiled in only when
  ``Sk`` is not a multiple of the key tile), then the partial ones with the window mask,
  each layout key block in ``block_k / BLOCK_N`` tiles of ``BLOCK_N`` keys (one flat loop
  over (listed block, tile) pairs: a single loop body for Triton's software pipeliner;
  unrolled sub-tiles spilled registers on sm_90). Online softmax
  (running max ``m``, running sum ``l``); a tile whose scores are all masked keeps
  ``m = -inf`` and contributes exactly 0 (the exponent base is then 0, never ``-inf - -inf``).
* ``_attn_bwd_preprocess_kernel``: ``delta = rowsum(dout * out)`` in float32 (B, Hq, Sq).
* ``_attn_bwd_dkdv_kernel``, grid ``(cdiv(Sk, BLOCK_N), Hkv, B)``: a program owns
  ``BLOCK_N`` keys of one kv head (``BLOCK_N`` divides ``block_k``), keeps K, V, dK, dV on
  chip and, for every query head of its GQA group and every query block of the transposed
  lists (full: no mask, partial: window mask), in tiles of ``BLOCK_M`` rows, recomputes
  ``P = exp(scale q k - lse)`` and accumulates ``dV += P^T dO``, ``dK += dS^T Q`` with
  ``dS = P o (dO V^T - delta)``; ``dK`` is scaled by ``scale`` once at the end. Rows with
  ``lse = -inf`` (and rows past ``Sq``) use ``lse = +inf``, i.e. ``P = 0``. Keys no query
  reads get zeros.
* ``_attn_bwd_dq_kernel``, grid ``(cdiv(Sq, BLOCK_M), Hq, B)``: the forward's traversal,
  ``dQ += dS K``, scaled once at the end.

Layout block sizes: 64 or 128 on a GPU; the interpreter also takes 16 and 32 (small
tests). Block indices in the lists must lie in range (not checked: that needs a device
sync). The order of the listed blocks is free (the floating-point summation order follows
it, so a given layout always gives the same bits).

Index arithmetic is int32 unless some tensor's offsets may exceed it (``INDEX_64``). Under
the interpreter the 64-bit path is always taken (``_INTERPRETER_INDEX_64``): the
interpreter checks every int32 add / multiply for overflow, which would dominate its run
time; the int32 path is still tested there by switching that flag off.

Head dims that are not a power of two (96) are padded to the next one (128) with masked
loads and stores. D = 256 needs big on-chip tiles: :func:`choose_config` shrinks the tiles
(and pipelining depth) until its shared-memory estimate fits the device, and the launchers
raise a ``ValueError`` if even the smallest tiles do not fit (the estimate is conservative:
sm_90 compilations use 0.5-0.8 of it). float32 inputs are accepted on the GPU too (exact
IEEE dots, small tiles), although the contract's GPU dtypes are float16 / bfloat16.

Configuration comes from a plain Python heuristic (:func:`choose_config`) rather than
``triton.autotune``, so the launch stays ``torch.compile``-friendly (kernels are launched
through ``torch.library.wrap_triton``) and fast under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._launch import launchable

__all__ = [
    "choose_config",
    "launch_block_sparse_attention_bwd",
    "launch_block_sparse_attention_fwd",
]

_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_SUPPORTED_HEAD_DIMS = (32, 64, 96, 128, 256)
# Layout block sizes accepted by the GPU kernels; the interpreter (CPU tensors) also takes
# 16 and 32 so that tests stay small.
_GPU_BLOCK_SIZES = (64, 128)
_INTERPRETER_BLOCK_SIZES = (16, 32, 64, 128)
_KERNELS = ("fwd", "bwd_dkdv", "bwd_dq")
# Offsets at or beyond this need 64-bit index arithmetic.
_INT32_LIMIT = 2**31 - 1
# The interpreter checks every int32 add / multiply for overflow (slow in numpy); int64
# arithmetic skips those checks, so interpreted launches use the 64-bit path. Tests set
# this to False to run the int32 path (the one GPUs take) under the interpreter too.
_INTERPRETER_INDEX_64 = True
# Default shared-memory budget of choose_config (bytes per program); the launchers pass a
# budget derived from the device instead.
_DEFAULT_SMEM_BUDGET = 96 * 1024
_LOG2E = 1.4426950408889634
# Rows of the delta preprocessing kernel per program.
_PRE_BLOCK_M = 64


# --------------------------------------------------------------------------------------
# Device code. Under the interpreter every call of a jitted helper re-patches
# triton.language (milliseconds each), so loads and dots are written inline in the
# per-tile helpers instead of going through further helpers.
# --------------------------------------------------------------------------------------


@triton.jit
def _lse_log2(lse):
    """Natural-log lse -> base-2 units, with -inf (row sees no key) mapped to +inf.

    exp2(score - (+inf)) = 0 then makes every probability of such a row exactly 0
    (instead of exp2(-inf - -inf) = NaN).
    """
    return tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)


@triton.jit
def _fwd_tile(
    q,
    k_base,
    v_base,
    kv_start,
    offs_m,
    offs_n0,
    offs_d,
    Sk,
    stride_kn,
    stride_vn,
    lo,
    hi,
    qk_scale,
    m_i,
    l_i,
    acc,
    MASKED: tl.constexpr,
    EVEN_SK: tl.constexpr,
    EVEN_D: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One online-softmax step over keys [kv_start, kv_start + BLOCK_N).

    Scores are in base-2 units (scale * log2(e) folded in). MASKED applies the window
    (lo <= j - i <= hi); the j < Sk bound is compiled in only when Sk is not a multiple
    of BLOCK_N. Keys past Sk (and padded head-dim columns) read as 0.
    """
    offs_n = kv_start + offs_n0
    k_ptrs = k_base + offs_n[:, None] * stride_kn + offs_d[None, :]
    v_ptrs = v_base + offs_n[:, None] * stride_vn + offs_d[None, :]
    if EVEN_SK and EVEN_D:
        k = tl.load(k_ptrs)
        v = tl.load(v_ptrs)
    else:
        kv_mask = (offs_n < Sk)[:, None] & (offs_d < HEAD_DIM)[None, :]
        k = tl.load(k_ptrs, mask=kv_mask, other=0.0)
        v = tl.load(v_ptrs, mask=kv_mask, other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
    if MASKED:
        diff = offs_n[None, :] - offs_m[:, None]
        visible = (diff >= lo) & (diff <= hi)
        if not EVEN_SK:
            visible = visible & (offs_n < Sk)[None, :]
        s = tl.where(visible, s, float("-inf"))
    elif not EVEN_SK:
        s = tl.where((offs_n < Sk)[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # All scores of a row masked so far: m_new = -inf; use 0 as the exponent base so that
    # alpha = exp2(-inf) = 0 and p = exp2(-inf) = 0 (acc and l are still 0 there).
    m_base = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_base)
    p = tl.exp2(s - m_base[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
    return m_new, l_i, acc


@triton.jit
def _attn_fwd_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    out_ptr,
    lse_ptr,
    kv_num_ptr,
    kv_idx_ptr,
    full_num_ptr,
    full_idx_ptr,
    Sq,
    Sk,
    group,
    lo,
    hi,
    qk_scale,
    stride_qb,
    stride_qh,
    stride_qm,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_ob,
    stride_oh,
    stride_om,
    stride_lb,
    stride_lh,
    stride_lm,
    stride_cb,
    stride_ch,
    stride_cm,
    stride_ib,
    stride_ih,
    stride_im,
    stride_in,
    stride_fcb,
    stride_fch,
    stride_fcm,
    stride_fib,
    stride_fih,
    stride_fim,
    stride_fin,
    HAS_FULL: tl.constexpr,
    EVEN_SQ: tl.constexpr,
    EVEN_SK: tl.constexpr,
    EVEN_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    INDEX_64: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,
    LAYOUT_BQ: tl.constexpr,
    LAYOUT_BK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    WARP_SPEC: tl.constexpr,
):
    """out, lse of BLOCK_M query rows of head program_id(1), batch program_id(2).

    Block-list strides are 0 on broadcast (size-1) batch / head dimensions.
    """
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    if INDEX_64:
        pid_m = pid_m.to(tl.int64)
        h = h.to(tl.int64)
        b = b.to(tl.int64)
    hkv = h // group
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    if INDEX_64:
        offs_n0 = offs_n0.to(tl.int64)
    row_mask = offs_m < Sq
    d_mask = offs_d < HEAD_DIM

    q_ptrs = q_ptr + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :]
    if EVEN_SQ and EVEN_D:
        q = tl.load(q_ptrs)
    else:
        q = tl.load(q_ptrs, mask=row_mask[:, None] & d_mask[None, :], other=0.0)
    k_base = k_ptr + b * stride_kb + hkv * stride_kh
    v_base = v_ptr + b * stride_vb + hkv * stride_vh

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, D_PAD), dtype=tl.float32)

    # The layout block holding this program's rows (BLOCK_M divides LAYOUT_BQ).
    qblk = (pid_m * BLOCK_M) // LAYOUT_BQ
    if HAS_FULL:
        count = tl.load(full_num_ptr + b * stride_fcb + h * stride_fch + qblk * stride_fcm)
        idx_ptr = full_idx_ptr + b * stride_fib + h * stride_fih + qblk * stride_fim
        for t in tl.range(0, count * (LAYOUT_BK // BLOCK_N), warp_specialize=WARP_SPEC):
            kblk = tl.load(idx_ptr + (t // (LAYOUT_BK // BLOCK_N)) * stride_fin)
            if INDEX_64:
                kblk = kblk.to(tl.int64)
            m_i, l_i, acc = _fwd_tile(
                q,
                k_base,
                v_base,
                kblk * LAYOUT_BK + (t % (LAYOUT_BK // BLOCK_N)) * BLOCK_N,
                offs_m,
                offs_n0,
                offs_d,
                Sk,
                stride_kn,
                stride_vn,
                lo,
                hi,
                qk_scale,
                m_i,
                l_i,
                acc,
                False,
                EVEN_SK,
                EVEN_D,
                HEAD_DIM,
                DOT_PRECISION,
            )
    count = tl.load(kv_num_ptr + b * stride_cb + h * stride_ch + qblk * stride_cm)
    idx_ptr = kv_idx_ptr + b * stride_ib + h * stride_ih + qblk * stride_im
    for t in tl.range(0, count * (LAYOUT_BK // BLOCK_N), warp_specialize=WARP_SPEC):
        kblk = tl.load(idx_ptr + (t // (LAYOUT_BK // BLOCK_N)) * stride_in)
        if INDEX_64:
            kblk = kblk.to(tl.int64)
        m_i, l_i, acc = _fwd_tile(
            q,
            k_base,
            v_base,
            kblk * LAYOUT_BK + (t % (LAYOUT_BK // BLOCK_N)) * BLOCK_N,
            offs_m,
            offs_n0,
            offs_d,
            Sk,
            stride_kn,
            stride_vn,
            lo,
            hi,
            qk_scale,
            m_i,
            l_i,
            acc,
            True,
            EVEN_SK,
            EVEN_D,
            HEAD_DIM,
            DOT_PRECISION,
        )

    seen = l_i > 0.0
    l_div = tl.where(seen, l_i, 1.0)
    acc = acc / l_div[:, None]  # rows that saw no key: acc = 0 -> out = 0
    # m_i is in base-2 units: lse = ln(2) * (m + log2(l)).
    lse = tl.where(seen, (m_i + tl.log2(l_div)) * 0.6931471805599453, float("-inf"))
    out_ptrs = (
        out_ptr + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :]
    )
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & d_mask[None, :])
    tl.store(lse_ptr + b * stride_lb + h * stride_lh + offs_m * stride_lm, lse, mask=row_mask)


# --------------------------------------------------------------------------------------
# Backward.
# --------------------------------------------------------------------------------------


@triton.jit
def _attn_bwd_preprocess_kernel(
    out_ptr,
    dout_ptr,
    delta_ptr,
    Sq,
    stride_ob,
    stride_oh,
    stride_om,
    stride_gb,
    stride_gh,
    stride_gm,
    stride_db,
    stride_dh,
    stride_dm,
    INDEX_64: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """delta[b, h, i] = sum_d dout[b, h, i, d] * out[b, h, i, d] in float32."""
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    if INDEX_64:
        pid_m = pid_m.to(tl.int64)
        h = h.to(tl.int64)
        b = b.to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    mask = (offs_m < Sq)[:, None] & (offs_d < HEAD_DIM)[None, :]
    o = tl.load(
        out_ptr + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :],
        mask=mask,
        other=0.0,
    )
    g = tl.load(
        dout_ptr + b * stride_gb + h * stride_gh + offs_m[:, None] * stride_gm + offs_d[None, :],
        mask=mask,
        other=0.0,
    )
    delta = tl.sum(o.to(tl.float32) * g.to(tl.float32), 1)
    tl.store(
        delta_ptr + b * stride_db + h * stride_dh + offs_m * stride_dm, delta, mask=offs_m < Sq
    )


@triton.jit
def _dkdv_tile(
    k,
    v,
    dk,
    dv,
    q_base,
    do_base,
    lse_base,
    delta_base,
    q_start,
    offs_n,
    offs_m0,
    offs_d,
    Sq,
    stride_qm,
    stride_gm,
    stride_lm,
    stride_dm,
    lo,
    hi,
    qk_scale,
    MASKED: tl.constexpr,
    EVEN_SQ: tl.constexpr,
    EVEN_D: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """dK/dV contributions of query rows [q_start, q_start + BLOCK_M), transposed form.

    Works on S^T (BLOCK_N keys x BLOCK_M queries). Rows past Sq read lse = +inf (P = 0),
    dO = 0 and delta = 0, so they contribute nothing; keys past Sk are never stored.
    """
    offs_m = q_start + offs_m0
    q_ptrs = q_base + offs_m[:, None] * stride_qm + offs_d[None, :]
    do_ptrs = do_base + offs_m[:, None] * stride_gm + offs_d[None, :]
    if EVEN_SQ and EVEN_D:
        q = tl.load(q_ptrs)
        do = tl.load(do_ptrs)
    else:
        q_mask = (offs_m < Sq)[:, None] & (offs_d < HEAD_DIM)[None, :]
        q = tl.load(q_ptrs, mask=q_mask, other=0.0)
        do = tl.load(do_ptrs, mask=q_mask, other=0.0)
    if EVEN_SQ:
        lse = tl.load(lse_base + offs_m * stride_lm)
        delta = tl.load(delta_base + offs_m * stride_dm)
    else:
        lse = tl.load(lse_base + offs_m * stride_lm, mask=offs_m < Sq, other=float("inf"))
        delta = tl.load(delta_base + offs_m * stride_dm, mask=offs_m < Sq, other=0.0)
    lse2 = _lse_log2(lse)
    st = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale
    if MASKED:
        diff = offs_n[:, None] - offs_m[None, :]
        st = tl.where((diff >= lo) & (diff <= hi), st, float("-inf"))
    pt = tl.exp2(st - lse2[None, :])
    dv = tl.dot(pt.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
    dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
    dst = pt * (dpt - delta[None, :])
    dk = tl.dot(dst.to(q.dtype), q, dk, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    dout_ptr,
    lse_ptr,
    delta_ptr,
    dk_ptr,
    dv_ptr,
    q_num_ptr,
    q_idx_ptr,
    fq_num_ptr,
    fq_idx_ptr,
    Sq,
    Sk,
    group,
    lo,
    hi,
    qk_scale,
    scale,
    stride_qb,
    stride_qh,
    stride_qm,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_gb,
    stride_gh,
    stride_gm,
    stride_lb,
    stride_lh,
    stride_lm,
    stride_db,
    stride_dh,
    stride_dm,
    stride_dkb,
    stride_dkh,
    stride_dkn,
    stride_dvb,
    stride_dvh,
    stride_dvn,
    stride_cb,
    stride_ch,
    stride_cn,
    stride_ib,
    stride_ih,
    stride_in,
    stride_im,
    stride_fcb,
    stride_fch,
    stride_fcn,
    stride_fib,
    stride_fih,
    stride_fin,
    stride_fim,
    HAS_FULL: tl.constexpr,
    EVEN_SQ: tl.constexpr,
    EVEN_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    INDEX_64: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,
    LAYOUT_BQ: tl.constexpr,
    LAYOUT_BK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    WARP_SPEC: tl.constexpr,
):
    """dk, dv of BLOCK_N keys of kv head program_id(1), batch program_id(2).

    Sums over the `group` query heads that read this kv head, each with its own
    transposed lists (head stride 0 when the layout broadcasts over heads).
    """
    pid_n = tl.program_id(0)
    hkv = tl.program_id(1)
    b = tl.program_id(2)
    if INDEX_64:
        pid_n = pid_n.to(tl.int64)
        hkv = hkv.to(tl.int64)
        b = b.to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    if INDEX_64:
        offs_m0 = offs_m0.to(tl.int64)
    kv_mask = (offs_n < Sk)[:, None] & (offs_d < HEAD_DIM)[None, :]

    # Keys past Sk read as 0 and are never stored.
    k = tl.load(
        k_ptr + b * stride_kb + hkv * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :],
        mask=kv_mask,
        other=0.0,
    )
    v = tl.load(
        v_ptr + b * stride_vb + hkv * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :],
        mask=kv_mask,
        other=0.0,
    )
    dk = tl.zeros((BLOCK_N, D_PAD), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, D_PAD), dtype=tl.float32)

    kblk = (pid_n * BLOCK_N) // LAYOUT_BK
    for g in range(0, group):
        h = hkv * group + g
        q_base = q_ptr + b * stride_qb + h * stride_qh
        do_base = dout_ptr + b * stride_gb + h * stride_gh
        lse_base = lse_ptr + b * stride_lb + h * stride_lh
        delta_base = delta_ptr + b * stride_db + h * stride_dh
        if HAS_FULL:
            count = tl.load(fq_num_ptr + b * stride_fcb + h * stride_fch + kblk * stride_fcn)
            idx_ptr = fq_idx_ptr + b * stride_fib + h * stride_fih + kblk * stride_fin
            for t in tl.range(0, count * (LAYOUT_BQ // BLOCK_M), warp_specialize=WARP_SPEC):
                qblk = tl.load(idx_ptr + (t // (LAYOUT_BQ // BLOCK_M)) * stride_fim)
                if INDEX_64:
                    qblk = qblk.to(tl.int64)
                dk, dv = _dkdv_tile(
                    k,
                    v,
                    dk,
                    dv,
                    q_base,
                    do_base,
                    lse_base,
                    delta_base,
                    qblk * LAYOUT_BQ + (t % (LAYOUT_BQ // BLOCK_M)) * BLOCK_M,
                    offs_n,
                    offs_m0,
                    offs_d,
                    Sq,
                    stride_qm,
                    stride_gm,
                    stride_lm,
                    stride_dm,
                    lo,
                    hi,
                    qk_scale,
                    False,
                    EVEN_SQ,
                    EVEN_D,
                    HEAD_DIM,
                    DOT_PRECISION,
                )
        count = tl.load(q_num_ptr + b * stride_cb + h * stride_ch + kblk * stride_cn)
        idx_ptr = q_idx_ptr + b * stride_ib + h * stride_ih + kblk * stride_in
        for t in tl.range(0, count * (LAYOUT_BQ // BLOCK_M), warp_specialize=WARP_SPEC):
            qblk = tl.load(idx_ptr + (t // (LAYOUT_BQ // BLOCK_M)) * stride_im)
            if INDEX_64:
                qblk = qblk.to(tl.int64)
            dk, dv = _dkdv_tile(
                k,
                v,
                dk,
                dv,
                q_base,
                do_base,
                lse_base,
                delta_base,
                qblk * LAYOUT_BQ + (t % (LAYOUT_BQ // BLOCK_M)) * BLOCK_M,
                offs_n,
                offs_m0,
                offs_d,
                Sq,
                stride_qm,
                stride_gm,
                stride_lm,
                stride_dm,
                lo,
                hi,
                qk_scale,
                True,
                EVEN_SQ,
                EVEN_D,
                HEAD_DIM,
                DOT_PRECISION,
            )

    dk = dk * scale
    dk_ptrs = (
        dk_ptr + b * stride_dkb + hkv * stride_dkh + offs_n[:, None] * stride_dkn + offs_d[None, :]
    )
    dv_ptrs = (
        dv_ptr + b * stride_dvb + hkv * stride_dvh + offs_n[:, None] * stride_dvn + offs_d[None, :]
    )
    tl.store(dk_ptrs, dk.to(dk_ptr.dtype.element_ty), mask=kv_mask)
    tl.store(dv_ptrs, dv.to(dv_ptr.dtype.element_ty), mask=kv_mask)


@triton.jit
def _dq_tile(
    q,
    do,
    lse2,
    delta,
    dq,
    k_base,
    v_base,
    kv_start,
    offs_m,
    offs_n0,
    offs_d,
    Sk,
    stride_kn,
    stride_vn,
    lo,
    hi,
    qk_scale,
    MASKED: tl.constexpr,
    EVEN_SK: tl.constexpr,
    EVEN_D: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """dQ contribution (before the final scale) of keys [kv_start, kv_start + BLOCK_N)."""
    offs_n = kv_start + offs_n0
    k_ptrs = k_base + offs_n[:, None] * stride_kn + offs_d[None, :]
    v_ptrs = v_base + offs_n[:, None] * stride_vn + offs_d[None, :]
    if EVEN_SK and EVEN_D:
        k = tl.load(k_ptrs)
        v = tl.load(v_ptrs)
    else:
        kv_mask = (offs_n < Sk)[:, None] & (offs_d < HEAD_DIM)[None, :]
        k = tl.load(k_ptrs, mask=kv_mask, other=0.0)
        v = tl.load(v_ptrs, mask=kv_mask, other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
    if MASKED:
        diff = offs_n[None, :] - offs_m[:, None]
        visible = (diff >= lo) & (diff <= hi)
        if not EVEN_SK:
            visible = visible & (offs_n < Sk)[None, :]
        s = tl.where(visible, s, float("-inf"))
    elif not EVEN_SK:
        s = tl.where((offs_n < Sk)[None, :], s, float("-inf"))
    p = tl.exp2(s - lse2[:, None])
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
    ds = p * (dp - delta[:, None])
    dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)
    return dq


@triton.jit
def _attn_bwd_dq_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    dout_ptr,
    lse_ptr,
    delta_ptr,
    dq_ptr,
    kv_num_ptr,
    kv_idx_ptr,
    full_num_ptr,
    full_idx_ptr,
    Sq,
    Sk,
    group,
    lo,
    hi,
    qk_scale,
    scale,
    stride_qb,
    stride_qh,
    stride_qm,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_gb,
    stride_gh,
    stride_gm,
    stride_lb,
    stride_lh,
    stride_lm,
    stride_db,
    stride_dh,
    stride_dm,
    stride_dqb,
    stride_dqh,
    stride_dqm,
    stride_cb,
    stride_ch,
    stride_cm,
    stride_ib,
    stride_ih,
    stride_im,
    stride_in,
    stride_fcb,
    stride_fch,
    stride_fcm,
    stride_fib,
    stride_fih,
    stride_fim,
    stride_fin,
    HAS_FULL: tl.constexpr,
    EVEN_SQ: tl.constexpr,
    EVEN_SK: tl.constexpr,
    EVEN_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    INDEX_64: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,
    LAYOUT_BQ: tl.constexpr,
    LAYOUT_BK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    WARP_SPEC: tl.constexpr,
):
    """dq of BLOCK_M query rows of head program_id(1), batch program_id(2)."""
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    if INDEX_64:
        pid_m = pid_m.to(tl.int64)
        h = h.to(tl.int64)
        b = b.to(tl.int64)
    hkv = h // group
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    if INDEX_64:
        offs_n0 = offs_n0.to(tl.int64)
    row_mask = offs_m < Sq
    q_mask = row_mask[:, None] & (offs_d < HEAD_DIM)[None, :]

    q_ptrs = q_ptr + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :]
    do_ptrs = (
        dout_ptr + b * stride_gb + h * stride_gh + offs_m[:, None] * stride_gm + offs_d[None, :]
    )
    lse_ptrs = lse_ptr + b * stride_lb + h * stride_lh + offs_m * stride_lm
    delta_ptrs = delta_ptr + b * stride_db + h * stride_dh + offs_m * stride_dm
    if EVEN_SQ and EVEN_D:
        q = tl.load(q_ptrs)
        do = tl.load(do_ptrs)
    else:
        q = tl.load(q_ptrs, mask=q_mask, other=0.0)
        do = tl.load(do_ptrs, mask=q_mask, other=0.0)
    if EVEN_SQ:
        lse = tl.load(lse_ptrs)
        delta = tl.load(delta_ptrs)
    else:
        lse = tl.load(lse_ptrs, mask=row_mask, other=float("inf"))
        delta = tl.load(delta_ptrs, mask=row_mask, other=0.0)
    lse2 = _lse_log2(lse)
    k_base = k_ptr + b * stride_kb + hkv * stride_kh
    v_base = v_ptr + b * stride_vb + hkv * stride_vh
    dq = tl.zeros((BLOCK_M, D_PAD), dtype=tl.float32)

    qblk = (pid_m * BLOCK_M) // LAYOUT_BQ
    if HAS_FULL:
        count = tl.load(full_num_ptr + b * stride_fcb + h * stride_fch + qblk * stride_fcm)
        idx_ptr = full_idx_ptr + b * stride_fib + h * stride_fih + qblk * stride_fim
        for t in tl.range(0, count * (LAYOUT_BK // BLOCK_N), warp_specialize=WARP_SPEC):
            kblk = tl.load(idx_ptr + (t // (LAYOUT_BK // BLOCK_N)) * stride_fin)
            if INDEX_64:
                kblk = kblk.to(tl.int64)
            dq = _dq_tile(
                q,
                do,
                lse2,
                delta,
                dq,
                k_base,
                v_base,
                kblk * LAYOUT_BK + (t % (LAYOUT_BK // BLOCK_N)) * BLOCK_N,
                offs_m,
                offs_n0,
                offs_d,
                Sk,
                stride_kn,
                stride_vn,
                lo,
                hi,
                qk_scale,
                False,
                EVEN_SK,
                EVEN_D,
                HEAD_DIM,
                DOT_PRECISION,
            )
    count = tl.load(kv_num_ptr + b * stride_cb + h * stride_ch + qblk * stride_cm)
    idx_ptr = kv_idx_ptr + b * stride_ib + h * stride_ih + qblk * stride_im
    for t in tl.range(0, count * (LAYOUT_BK // BLOCK_N), warp_specialize=WARP_SPEC):
        kblk = tl.load(idx_ptr + (t // (LAYOUT_BK // BLOCK_N)) * stride_in)
        if INDEX_64:
            kblk = kblk.to(tl.int64)
        dq = _dq_tile(
            q,
            do,
            lse2,
            delta,
            dq,
            k_base,
            v_base,
            kblk * LAYOUT_BK + (t % (LAYOUT_BK // BLOCK_N)) * BLOCK_N,
            offs_m,
            offs_n0,
            offs_d,
            Sk,
            stride_kn,
            stride_vn,
            lo,
            hi,
            qk_scale,
            True,
            EVEN_SK,
            EVEN_D,
            HEAD_DIM,
            DOT_PRECISION,
        )

    dq = dq * scale
    dq_ptrs = (
        dq_ptr + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqm + offs_d[None, :]
    )
    tl.store(dq_ptrs, dq.to(dq_ptr.dtype.element_ty), mask=q_mask)


# --------------------------------------------------------------------------------------
# Host side: configuration heuristic and launches.
# --------------------------------------------------------------------------------------


def _next_pow2(n: int) -> int:
    return 1 << (max(int(n), 1) - 1).bit_length()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _smem_estimate(kernel: str, block_m: int, block_n: int, d_pad: int, esize: int, stages: int):
    """Rough upper bound on a kernel's shared memory (bytes).

    Per pipeline stage the streamed operand tiles (K and V in the forward and the dq
    kernel, Q and dO in the dk/dv kernel), plus the tiles held for the whole program that
    Triton stages through shared memory for the dots (Q; K and V; Q and dO) and the
    probability / dS tiles converted for the second dot of each step.
    """
    if kernel == "fwd":
        resident, per_stage, staged = block_m * d_pad, 2 * block_n * d_pad, block_m * block_n
    elif kernel == "bwd_dkdv":
        resident, per_stage, staged = (
            2 * block_n * d_pad,
            2 * block_m * d_pad,
            2 * block_m * block_n,
        )
    else:
        resident, per_stage, staged = 2 * block_m * d_pad, 2 * block_n * d_pad, block_m * block_n
    return (resident + stages * per_stage + staged) * esize


@functools.lru_cache(maxsize=1024)
def _choose_config_cached(
    kernel: str,
    block_q: int,
    block_k: int,
    head_dim: int,
    dtype: torch.dtype,
    seq_q: int,
    seq_k: int,
    smem_budget: int,
    interpret: bool,
) -> tuple:
    d_pad = max(16, _next_pow2(head_dim))
    esize = 4 if dtype == torch.float32 else 2
    fp32 = dtype == torch.float32
    # Tiles never need to be longer than the (power-of-two rounded) sequence they walk; a
    # power of two <= the layout block still divides it. Dots need >= 16 on every side.
    cap_q = max(16, _next_pow2(seq_q))
    cap_k = max(16, _next_pow2(seq_k))

    if interpret:
        # The interpreter runs programs one after another in numpy: fewest, largest tiles.
        block_m = min(block_q, cap_q)
        block_n = min(block_k, cap_k)
        return (
            ("BLOCK_M", block_m),
            ("BLOCK_N", block_n),
            ("D_PAD", d_pad),
            ("num_warps", 4),
            ("num_stages", 1),
        )

    # GPU tiles (BLOCK_M query rows x BLOCK_N keys). Chosen from sm_90 compilations of
    # these kernels (Triton 3.8, register / local-memory counts from cuobjdump): none of
    # the defaults spills. 16-bit: tensor-core dots, FlashAttention-2-like tiles (forward
    # 128 x 64, dq 64 x 64 / 64 x 32, dk/dv 64 keys x 32 queries), narrower for D = 256.
    # float32 (IEEE dots lower to FMA loops whose operands live in registers; not a
    # contract dtype of the GPU path, supported for completeness) uses much smaller tiles.
    if fp32:
        if kernel == "fwd":
            block_m, block_n = (64, 32) if d_pad <= 64 else (32, 16)
        elif kernel == "bwd_dkdv":
            block_m, block_n = 16, 32
        else:
            block_m, block_n = (32, 32) if d_pad <= 32 else ((16, 32) if d_pad <= 128 else (16, 16))
    elif kernel == "fwd":
        block_m, block_n = (128, 64) if d_pad <= 128 else (64, 32)
    elif kernel == "bwd_dkdv":
        block_m, block_n = (32, 64) if d_pad <= 128 else (16, 32)
    else:
        block_m = 64 if d_pad <= 128 else 32
        block_n = 64 if d_pad <= 64 else 32
    block_m = min(block_m, block_q, cap_q)
    block_n = min(block_n, block_k, cap_k)

    # Shrink the tiles until two pipeline stages fit the shared-memory budget (first the
    # streamed tile, then the resident one), then pipeline as deep as it allows (<= 3).
    streamed_is_n = kernel != "bwd_dkdv"
    while _smem_estimate(kernel, block_m, block_n, d_pad, esize, 2) > smem_budget:
        first, second = ("n", "m") if streamed_is_n else ("m", "n")
        cur = {"m": block_m, "n": block_n}
        for which in (first, second):
            if cur[which] > 16:
                cur[which] //= 2
                break
        else:
            break  # smallest tiles: the launcher reports that it does not fit
        block_m, block_n = cur["m"], cur["n"]
    num_stages = 1
    for stages in (3, 2):
        if _smem_estimate(kernel, block_m, block_n, d_pad, esize, stages) <= smem_budget:
            num_stages = stages
            break

    if kernel == "fwd" or kernel == "bwd_dq":
        acc_elems = block_m * d_pad
    else:
        acc_elems = 2 * block_n * d_pad
    num_warps = 8 if (fp32 or acc_elems >= 8192) else 4

    return (
        ("BLOCK_M", block_m),
        ("BLOCK_N", block_n),
        ("D_PAD", d_pad),
        ("num_warps", num_warps),
        ("num_stages", num_stages),
    )


def choose_config(
    kernel: str,
    block_q: int,
    block_k: int,
    head_dim: int,
    dtype: torch.dtype,
    seq_q: int,
    seq_k: int,
    smem_budget: int | None = None,
    interpret: bool = False,
) -> dict:
    """Launch configuration of one attention kernel (plain heuristic, no autotuning).

    Args:
        kernel: "fwd", "bwd_dkdv" or "bwd_dq".
        block_q, block_k: the layout's block sizes.
        head_dim: D.
        dtype: torch.float32, torch.float16 or torch.bfloat16.
        seq_q, seq_k: Sq and Sk (tiles are not made longer than the sequences need).
        smem_budget: bytes of shared memory per program the estimate may use; defaults to
            a conservative 96 KiB.
        interpret: configuration for the CPU interpreter (tiles = layout blocks).

    Returns:
        dict with BLOCK_M (query rows per tile; divides block_q), BLOCK_N (keys per tile;
        divides block_k), D_PAD (power of two >= max(D, 16)), num_warps, num_stages. In the
        forward and dq kernels a program owns BLOCK_M query rows and steps over keys
        BLOCK_N at a time; in the dk/dv kernel it owns BLOCK_N keys and steps over queries
        BLOCK_M at a time.
    """
    if kernel not in _KERNELS:
        raise ValueError(f"block_sparse_attention: unknown kernel {kernel!r}")
    if dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"block_sparse_attention: unsupported dtype {dtype}")
    budget = _DEFAULT_SMEM_BUDGET if smem_budget is None else int(smem_budget)
    return dict(
        _choose_config_cached(
            kernel,
            int(block_q),
            int(block_k),
            int(head_dim),
            dtype,
            int(seq_q),
            int(seq_k),
            budget,
            bool(interpret),
        )
    )


@functools.cache
def _device_smem_budget(device_type: str, index: int | None) -> int | None:
    """Shared-memory budget per program of a CUDA device (None for the interpreter)."""
    if device_type != "cuda":
        return None
    idx = torch.cuda.current_device() if index is None else index
    props = torch.cuda.get_device_properties(idx)
    optin = getattr(props, "shared_memory_per_block_optin", 0) or _DEFAULT_SMEM_BUDGET
    # The estimate is an upper bound already; keep 10% headroom for compiler drift.
    return int(optin * 0.9)


def _max_offset(t: torch.Tensor | None, extents: tuple[int, ...] | None = None) -> int:
    """Largest element offset a kernel may compute into `t`, masked lanes included.

    ``extents[d]`` is how far along dimension ``d`` the kernels' index vectors reach
    (default: the size): sequence dimensions are walked in whole layout blocks and the head
    dimension in ``D_PAD`` columns, so those reach past the size; batch and head indices
    come from the grid and never do. Strides are those the kernels use (a broadcast list
    dimension passes stride 0, and so reaches nothing).
    """
    if t is None or t.numel() == 0:
        return 0
    extents = t.shape if extents is None else extents
    return sum((n - 1) * abs(s) for n, s in zip(extents, t.stride(), strict=True) if n > 0)


def _index_64_needed(
    qo, kv, rows, lists, Sq: int, Sk: int, reach: int, d_reach: int, interpret: bool
) -> bool:
    """64-bit address arithmetic: when the largest offset some kernel computes does not fit
    in int32, and always under the interpreter (_INTERPRETER_INDEX_64), whose per-operation
    int32 overflow checks would otherwise dominate its run time.

    qo: (B, Hq, Sq, D) tensors; kv: (B, Hkv, Sk, D) tensors; rows: (B, Hq, Sq) tensors;
    lists: block-list tensors (read at listed entries only). Sequence indices reach
    ``round_up(S, reach)`` (whole layout blocks / preprocessing tiles), head-dim columns
    ``d_reach`` (D_PAD). With H200-sized problems (B = 2, H = 16, S = 16k, D = 128: largest
    offset 6.7e7) this is int32, where padding every dimension would have said int64.
    """
    if interpret and _INTERPRETER_INDEX_64:
        return True

    def up(n):
        return _cdiv(n, reach) * reach

    worst = 0
    for t in qo:
        if t is not None:
            worst = max(worst, _max_offset(t, (t.shape[0], t.shape[1], up(Sq), d_reach)))
    for t in kv:
        if t is not None:
            worst = max(worst, _max_offset(t, (t.shape[0], t.shape[1], up(Sk), d_reach)))
    for t in rows:
        worst = max(worst, _max_offset(t, (t.shape[0], t.shape[1], up(Sq))))
    for t in lists:
        worst = max(worst, _max_offset(t))
    return worst > _INT32_LIMIT


def _extra_launch_options(cfg: dict) -> dict:
    """Compiler options a configuration may add: ``maxnreg`` (register cap per thread)."""
    return {"maxnreg": int(cfg["maxnreg"])} if cfg.get("maxnreg") else {}


def _window_bounds(window_left: int, window_right: int, Sq: int, Sk: int) -> tuple[int, int]:
    """(lo, hi) with: query i sees key j iff lo <= j - i <= hi (clamped to int32)."""
    big = 2**31 - 1  # |j - i| < 2**31 always; the bounds only need to reach past it
    lo = Sk - Sq - int(window_left) if window_left >= 0 else -big
    hi = Sk - Sq + int(window_right) if window_right >= 0 else big
    return max(-big, min(big, lo)), max(-big, min(big, hi))


def _check_blocks(block_q: int, block_k: int, interpret: bool) -> None:
    allowed = _INTERPRETER_BLOCK_SIZES if interpret else _GPU_BLOCK_SIZES
    for name, bs in (("block_q", block_q), ("block_k", block_k)):
        if int(bs) not in allowed:
            raise ValueError(f"block_sparse_attention: {name}={bs} not in {allowed}")


def _check_config(cfg: dict, block_q: int, block_k: int, d_pad_min: int) -> None:
    for key, layout in (("BLOCK_M", block_q), ("BLOCK_N", block_k)):
        val = cfg[key]
        if val < 16 or val & (val - 1) or layout % val:
            raise ValueError(
                f"block_sparse_attention: {key}={val} must be a power of two >= 16 dividing {layout}"
            )
    if cfg["D_PAD"] < d_pad_min or cfg["D_PAD"] & (cfg["D_PAD"] - 1):
        raise ValueError(f"block_sparse_attention: D_PAD={cfg['D_PAD']} invalid")


def _check_fits(kernel: str, cfg: dict, esize: int, budget: int | None, D: int) -> None:
    if budget is None:
        return
    need = _smem_estimate(
        kernel, cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["D_PAD"], esize, cfg["num_stages"]
    )
    if need > budget:
        raise ValueError(
            f"block_sparse_attention: head dim {D} needs ~{need} bytes of shared memory in the "
            f"{kernel} kernel even with the smallest tiles; this device allows {budget}"
        )


def _check_qkv(op, q, k, v):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"{op}: q, k, v must be 4-D (B, H, S, D)")
    B, Hq, Sq, D = q.shape
    Bk, Hkv, Sk, Dk = k.shape
    if Bk != B or Dk != D or tuple(v.shape) != tuple(k.shape):
        raise ValueError(
            f"{op}: incompatible shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if Hkv < 1 or Hq % Hkv:
        raise ValueError(f"{op}: Hq={Hq} is not a multiple of Hkv={Hkv}")
    if D not in _SUPPORTED_HEAD_DIMS:
        raise ValueError(f"{op}: head dim {D} not in {_SUPPORTED_HEAD_DIMS}")
    if q.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"{op}: unsupported dtype {q.dtype}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{op}: {name} has dtype {t.dtype}, expected {q.dtype}")
    return B, Hq, Sq, D, Hkv, Sk


def _check_tensor(op, name, t, shape, dtype, device, unit_last=True):
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{op}: {name} has shape {tuple(t.shape)}, expected {tuple(shape)}")
    if t.dtype != dtype:
        raise TypeError(f"{op}: {name} has dtype {t.dtype}, expected {dtype}")
    if t.device != device:
        raise ValueError(f"{op}: {name} is on {t.device}, expected {device}")
    if unit_last and t.numel() > 0 and t.stride(-1) != 1:
        raise ValueError(f"{op}: {name} must have a unit last-dimension stride")


def _list_args(op, name, num, idx, B, H, n_blocks, device):
    """Validates one (num, idx) block list; returns its 7 strides (0 on broadcast dims)."""
    if num.dim() != 3 or idx.dim() != 4:
        raise ValueError(f"{op}: {name} counts must be 3-D and indices 4-D")
    if num.dtype != torch.int32 or idx.dtype != torch.int32:
        raise TypeError(f"{op}: {name} block lists must be int32")
    if num.device != device or idx.device != device:
        raise ValueError(f"{op}: {name} block lists must be on {device}")
    Bl, Hl, nb = num.shape
    if Bl not in (1, B) or Hl not in (1, H) or nb != n_blocks:
        raise ValueError(
            f"{op}: {name} counts have shape {tuple(num.shape)}, expected ({{1, {B}}}, "
            f"{{1, {H}}}, {n_blocks})"
        )
    if tuple(idx.shape[:3]) != (Bl, Hl, nb):
        raise ValueError(
            f"{op}: {name} indices have shape {tuple(idx.shape)}, counts {tuple(num.shape)}"
        )
    sc = [0 if num.shape[d] == 1 else num.stride(d) for d in range(2)] + [num.stride(2)]
    si = [0 if idx.shape[d] == 1 else idx.stride(d) for d in range(2)] + [
        idx.stride(2),
        idx.stride(3),
    ]
    return sc + si


def launch_block_sparse_attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_num_blocks: torch.Tensor,
    kv_indices: torch.Tensor,
    full_kv_num_blocks: torch.Tensor | None,
    full_kv_indices: torch.Tensor | None,
    block_q: int,
    block_k: int,
    window_left: int,
    window_right: int,
    scale: float,
    out: torch.Tensor,
    lse: torch.Tensor,
    *,
    config: dict | None = None,
) -> None:
    """Writes out (B, Hq, Sq, D) and lse (B, Hq, Sq) of block-sparse attention.

    q (B, Hq, Sq, D), k / v (B, Hkv, Sk, D) in one dtype (float32, float16, bfloat16), any
    strides with a unit last-dimension stride. kv_num_blocks int32 (Bl, Hl, NQB) and
    kv_indices int32 (Bl, Hl, NQB, MAXB): the partial key blocks per query block
    (Bl in {1, B}, Hl in {1, Hq}, NQB = cdiv(Sq, block_q)); full_kv_* the full ones (or
    both None). Indices must lie in [0, cdiv(Sk, block_k)) (not checked: that would need a
    device sync). out: preallocated in q's dtype; lse: preallocated float32. Every element
    of out and lse is written. ``config`` overrides :func:`choose_config` (tests).
    """
    op = "block_sparse_attention_fwd"
    B, Hq, Sq, D, Hkv, Sk = _check_qkv(op, q, k, v)
    interpret = q.device.type != "cuda"
    _check_blocks(block_q, block_k, interpret)
    dev = q.device
    for name, t in (("k", k), ("v", v)):
        if t.device != dev:
            raise ValueError(f"{op}: {name} is on {t.device}, expected {dev}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.numel() > 0 and t.stride(-1) != 1:
            raise ValueError(f"{op}: {name} must have a unit last-dimension stride")
    _check_tensor(op, "out", out, (B, Hq, Sq, D), q.dtype, dev)
    _check_tensor(op, "lse", lse, (B, Hq, Sq), torch.float32, dev, unit_last=False)
    nqb = _cdiv(Sq, block_q)
    part = _list_args(op, "kv", kv_num_blocks, kv_indices, B, Hq, nqb, dev)
    if (full_kv_num_blocks is None) != (full_kv_indices is None):
        raise ValueError(f"{op}: full_kv_num_blocks and full_kv_indices go together")
    has_full = full_kv_num_blocks is not None
    if has_full:
        full = _list_args(op, "full_kv", full_kv_num_blocks, full_kv_indices, B, Hq, nqb, dev)
    else:
        full_kv_num_blocks, full_kv_indices, full = kv_num_blocks, kv_indices, part

    if B == 0 or Hq == 0 or Sq == 0:
        return
    if Sk == 0:
        out.zero_()
        lse.fill_(float("-inf"))
        return

    budget = _device_smem_budget(dev.type, dev.index)
    if config is None:
        config = choose_config("fwd", block_q, block_k, D, q.dtype, Sq, Sk, budget, interpret)
        _check_fits("fwd", config, q.element_size(), budget, D)
    _check_config(config, block_q, block_k, _next_pow2(D))
    block_m, block_n = config["BLOCK_M"], config["BLOCK_N"]
    lo, hi = _window_bounds(window_left, window_right, Sq, Sk)
    index_64 = _index_64_needed(
        (q, out),
        (k, v),
        (lse,),
        (kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices),
        Sq,
        Sk,
        max(block_q, block_k),
        config["D_PAD"],
        interpret,
    )
    grid = (_cdiv(Sq, block_m), Hq, B)
    launchable(_attn_fwd_kernel)[grid](
        q,
        k,
        v,
        out,
        lse,
        kv_num_blocks,
        kv_indices,
        full_kv_num_blocks,
        full_kv_indices,
        Sq,
        Sk,
        Hq // Hkv,
        lo,
        hi,
        float(scale) * _LOG2E,
        *q.stride()[:3],
        *k.stride()[:3],
        *v.stride()[:3],
        *out.stride()[:3],
        *lse.stride(),
        *part,
        *full,
        HAS_FULL=has_full,
        EVEN_SQ=Sq % block_m == 0,
        EVEN_SK=Sk % block_n == 0,
        EVEN_D=D == config["D_PAD"],
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        INDEX_64=index_64,
        HEAD_DIM=D,
        D_PAD=config["D_PAD"],
        LAYOUT_BQ=block_q,
        LAYOUT_BK=block_k,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        WARP_SPEC=bool(config.get("warp_specialize", False)),
        num_warps=config["num_warps"],
        num_stages=config["num_stages"],
        **_extra_launch_options(config),
    )


def launch_block_sparse_attention_bwd(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    kv_num_blocks: torch.Tensor,
    kv_indices: torch.Tensor,
    full_kv_num_blocks: torch.Tensor | None,
    full_kv_indices: torch.Tensor | None,
    q_num_blocks: torch.Tensor,
    q_indices: torch.Tensor,
    full_q_num_blocks: torch.Tensor | None,
    full_q_indices: torch.Tensor | None,
    block_q: int,
    block_k: int,
    window_left: int,
    window_right: int,
    scale: float,
    dq: torch.Tensor,
    dk: torch.Tensor,
    dv: torch.Tensor,
    *,
    dkdv_config: dict | None = None,
    dq_config: dict | None = None,
) -> None:
    """Writes dq (B, Hq, Sq, D), dk and dv (B, Hkv, Sk, D) of block-sparse attention.

    Inputs as in :func:`launch_block_sparse_attention_fwd`, plus dout (like out) and the
    forward's out and lse; q_num_blocks int32 (Bl, Hl, NKB) / q_indices int32
    (Bl, Hl, NKB, MAXQ) are the transposed partial lists (NKB = cdiv(Sk, block_k)),
    full_q_* the transposed full lists (None exactly when full_kv_* are None). dq, dk, dv:
    preallocated in q's dtype (unit last-dimension stride) and written fully (zeros where
    nothing contributes). Deterministic: no atomics, fixed summation order.
    ``dkdv_config`` / ``dq_config`` override :func:`choose_config` (tests).
    """
    op = "block_sparse_attention_bwd"
    B, Hq, Sq, D, Hkv, Sk = _check_qkv(op, q, k, v)
    interpret = q.device.type != "cuda"
    _check_blocks(block_q, block_k, interpret)
    dev = q.device
    for name, t in (("k", k), ("v", v)):
        if t.device != dev:
            raise ValueError(f"{op}: {name} is on {t.device}, expected {dev}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.numel() > 0 and t.stride(-1) != 1:
            raise ValueError(f"{op}: {name} must have a unit last-dimension stride")
    _check_tensor(op, "dout", dout, (B, Hq, Sq, D), q.dtype, dev)
    _check_tensor(op, "out", out, (B, Hq, Sq, D), q.dtype, dev)
    _check_tensor(op, "lse", lse, (B, Hq, Sq), torch.float32, dev, unit_last=False)
    _check_tensor(op, "dq", dq, (B, Hq, Sq, D), q.dtype, dev)
    _check_tensor(op, "dk", dk, (B, Hkv, Sk, D), q.dtype, dev)
    _check_tensor(op, "dv", dv, (B, Hkv, Sk, D), q.dtype, dev)
    nqb, nkb = _cdiv(Sq, block_q), _cdiv(Sk, block_k)
    part = _list_args(op, "kv", kv_num_blocks, kv_indices, B, Hq, nqb, dev)
    tpart = _list_args(op, "q", q_num_blocks, q_indices, B, Hq, nkb, dev)
    full_given = [
        t is not None
        for t in (full_kv_num_blocks, full_kv_indices, full_q_num_blocks, full_q_indices)
    ]
    if any(full_given) and not all(full_given):
        raise ValueError(f"{op}: the full lists (forward and transposed) are all given or all None")
    has_full = all(full_given)
    if has_full:
        full = _list_args(op, "full_kv", full_kv_num_blocks, full_kv_indices, B, Hq, nqb, dev)
        tfull = _list_args(op, "full_q", full_q_num_blocks, full_q_indices, B, Hq, nkb, dev)
    else:
        full_kv_num_blocks, full_kv_indices, full = kv_num_blocks, kv_indices, part
        full_q_num_blocks, full_q_indices, tfull = q_num_blocks, q_indices, tpart

    if B == 0 or Hq == 0:
        return
    if Sq == 0 or Sk == 0:
        dq.zero_()
        dk.zero_()
        dv.zero_()
        return

    budget = _device_smem_budget(dev.type, dev.index)
    esize = q.element_size()
    if dkdv_config is None:
        dkdv_config = choose_config(
            "bwd_dkdv", block_q, block_k, D, q.dtype, Sq, Sk, budget, interpret
        )
        _check_fits("bwd_dkdv", dkdv_config, esize, budget, D)
    if dq_config is None:
        dq_config = choose_config("bwd_dq", block_q, block_k, D, q.dtype, Sq, Sk, budget, interpret)
        _check_fits("bwd_dq", dq_config, esize, budget, D)
    _check_config(dkdv_config, block_q, block_k, _next_pow2(D))
    _check_config(dq_config, block_q, block_k, _next_pow2(D))
    d_pad = max(dkdv_config["D_PAD"], dq_config["D_PAD"])

    lo, hi = _window_bounds(window_left, window_right, Sq, Sk)
    delta = torch.empty((B, Hq, Sq), dtype=torch.float32, device=dev)
    index_64 = _index_64_needed(
        (dout, q, out, dq),
        (k, v, dk, dv),
        (lse, delta),
        (
            kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices,
            q_num_blocks, q_indices, full_q_num_blocks, full_q_indices,
        ),
        Sq,
        Sk,
        max(block_q, block_k, _PRE_BLOCK_M),
        max(d_pad, _next_pow2(D), 16),
        interpret,
    )  # fmt: skip
    group = Hq // Hkv
    qk_scale = float(scale) * _LOG2E
    # float32: exact IEEE products; 16-bit: "tf32" is Triton's default (ignored for them).
    precision = "ieee" if q.dtype == torch.float32 else "tf32"

    launchable(_attn_bwd_preprocess_kernel)[(_cdiv(Sq, _PRE_BLOCK_M), Hq, B)](
        out,
        dout,
        delta,
        Sq,
        *out.stride()[:3],
        *dout.stride()[:3],
        *delta.stride(),
        INDEX_64=index_64,
        HEAD_DIM=D,
        D_PAD=max(16, _next_pow2(D)),
        BLOCK_M=_PRE_BLOCK_M,
        num_warps=4,
    )

    cfg = dkdv_config
    launchable(_attn_bwd_dkdv_kernel)[(_cdiv(Sk, cfg["BLOCK_N"]), Hkv, B)](
        q,
        k,
        v,
        dout,
        lse,
        delta,
        dk,
        dv,
        q_num_blocks,
        q_indices,
        full_q_num_blocks,
        full_q_indices,
        Sq,
        Sk,
        group,
        lo,
        hi,
        qk_scale,
        float(scale),
        *q.stride()[:3],
        *k.stride()[:3],
        *v.stride()[:3],
        *dout.stride()[:3],
        *lse.stride(),
        *delta.stride(),
        *dk.stride()[:3],
        *dv.stride()[:3],
        *tpart,
        *tfull,
        HAS_FULL=has_full,
        EVEN_SQ=Sq % cfg["BLOCK_M"] == 0,
        EVEN_D=D == cfg["D_PAD"],
        DOT_PRECISION=precision,
        INDEX_64=index_64,
        HEAD_DIM=D,
        D_PAD=cfg["D_PAD"],
        LAYOUT_BQ=block_q,
        LAYOUT_BK=block_k,
        BLOCK_M=cfg["BLOCK_M"],
        BLOCK_N=cfg["BLOCK_N"],
        WARP_SPEC=bool(cfg.get("warp_specialize", False)),
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
        **_extra_launch_options(cfg),
    )

    cfg = dq_config
    launchable(_attn_bwd_dq_kernel)[(_cdiv(Sq, cfg["BLOCK_M"]), Hq, B)](
        q,
        k,
        v,
        dout,
        lse,
        delta,
        dq,
        kv_num_blocks,
        kv_indices,
        full_kv_num_blocks,
        full_kv_indices,
        Sq,
        Sk,
        group,
        lo,
        hi,
        qk_scale,
        float(scale),
        *q.stride()[:3],
        *k.stride()[:3],
        *v.stride()[:3],
        *dout.stride()[:3],
        *lse.stride(),
        *delta.stride(),
        *dq.stride()[:3],
        *part,
        *full,
        HAS_FULL=has_full,
        EVEN_SQ=Sq % cfg["BLOCK_M"] == 0,
        EVEN_SK=Sk % cfg["BLOCK_N"] == 0,
        EVEN_D=D == cfg["D_PAD"],
        DOT_PRECISION=precision,
        INDEX_64=index_64,
        HEAD_DIM=D,
        D_PAD=cfg["D_PAD"],
        LAYOUT_BQ=block_q,
        LAYOUT_BK=block_k,
        BLOCK_M=cfg["BLOCK_M"],
        BLOCK_N=cfg["BLOCK_N"],
        WARP_SPEC=bool(cfg.get("warp_specialize", False)),
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
        **_extra_launch_options(cfg),
    )
