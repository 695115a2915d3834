"""Int8 weight-only (W8A16) linear layer in Triton: forward and input gradient.

The weight is stored as symmetric int8 ``q`` (N, K) with scales ``s`` in the activation
dtype, either per output channel or per group of ``G`` consecutive input features:

* per channel, ``s`` (N,):       ``W[n, k] = q[n, k] * s[n]``
* per group,   ``s`` (N, K / G): ``W[n, k] = q[n, k] * s[n, k // G]``

Two products are provided:

* forward        ``y  (M, N) = x  (M, K) @ W.T + bias``   (reduction over K)
* input gradient ``dx (M, K) = dy (M, N) @ W``            (reduction over N, no bias)

Activations, scales, bias and outputs share one dtype: float32, float16 or bfloat16. Every
tensor may have arbitrary strides.

Weights: the plain ``(N, K)`` int8 layout (any strides) or the packed layout 2 of
`lrkernels.quant` (3-D, contiguous), read tile by tile with `load_packed_tile`: the units of
a tile are contiguous runs in memory, loaded as such (vector loads) and put into (k, n) order
by a register permutation. For Triton the packing brings no speed of its own (the compiler
chooses its own operand layouts): it is supported so that one packed weight serves every
backend.

Numerics. int8 -> float by bit manipulation (`int8_exact`), never the int-to-float unit:
``(q + 128)`` placed in the mantissa of 1024.0 (float16) or 2^23 (float32) minus the offset is
``q`` exactly (I2F.BF16 runs at 16 results per clock per SM on sm_90; the LOP3 + FADD pair at
64-128). Group scales multiply the weight tile (``round(q · s)`` in the activation dtype: the
same rounding as materialising ``W = (q.float() * s).to(dtype)`` for ``F.linear``), then
``tl.dot`` accumulates in float32. Per-channel scales of the forward multiply the float32 sums
instead (the weight tile is ``q`` exactly: one rounding less than the reference). The bias is
added to the float32 result and the output cast once. float32 dots use
``input_precision="ieee"`` (no TF32).

Design:

* Forward: a program owns a (BLOCK_M, BLOCK_N) tile of y and walks its K range in BLOCK_K
  steps (software-pipelined by ``num_stages``). The q tile is read as its transpose
  (BLOCK_K, BLOCK_N), so the product is a plain ``x_tile @ w_tile``. With groups, BLOCK_K
  divides G, so a k-tile lies inside one group and needs one (BLOCK_N,) scale vector.
* Input gradient: a program owns a (BLOCK_M, BLOCK_K) tile of dx and walks N in BLOCK_N
  steps, reading q tiles (BLOCK_N, BLOCK_K). Per-channel scales are one value per row of the
  tile. With groups, when BLOCK_K divides G the tile needs one scale column (a (BLOCK_N,)
  load); otherwise the scales are gathered element-wise, ``s[n, k // G]``.
* Split reduction, one launch (both kernels): when the output tiles alone cannot fill the
  GPU, the reduction dimension is split over SPLIT programs per tile (~2 programs per SM).
  Each stores its float32 partial tile in a workspace and increments the tile's counter
  (atomic, acquire-release); the last program of the tile adds the partials in split order
  0, 1, ... (deterministic: no atomics on values), applies the epilogue and resets the
  counter. The counters live per (device, stream), zeroed once (`_split_buffers`).
* Every load is masked and zero-filled (activations, int8 weights and scales), so M, N, K
  need not be multiples of the blocks.

Configurations come from a plain Python heuristic (:func:`choose_config`) rather than
``triton.autotune``, so the launch stays ``torch.compile``-friendly (kernels are launched
through ``torch.library.wrap_triton``) and fast under ``TRITON_INTERPRET=1``; per shape class
(decode M <= 16, medium, large), checked ahead of time for sm_90 (no spills, shared memory
within the limit; see the int8 section of the README).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._launch import launchable

__all__ = [
    "choose_config",
    "int8_exact",
    "launch_int8_linear",
    "launch_int8_linear_grad_input",
    "load_packed_tile",
]

_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Offsets at or beyond this need 64-bit index arithmetic.
_INT32_LIMIT = 2**31 - 1
# Default shared-memory budget of choose_config (fits consumer GPUs as well as A100/H100);
# the launchers pass a budget derived from the device.
_DEFAULT_SMEM_BUDGET = 96 * 1024
# At most this many programs per output tile along the reduction.
_MAX_SPLIT = 32


# --------------------------------------------------------------------------------------
# Kernels.
# --------------------------------------------------------------------------------------


@triton.jit
def _dot_acc(a, b, acc, IEEE_FP32: tl.constexpr):
    """acc += a @ b; float32 operands use exact IEEE products, never TF32."""
    if IEEE_FP32:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def int8_exact(q, DTYPE: tl.constexpr):
    """The int8 tile ``q`` as exact values of DTYPE (float16; float32 for bfloat16 / float32) by
    bit manipulation, never the int-to-float unit: the byte ``u = q + 128`` placed in the
    mantissa of 1024.0 (float16, 0x6400) or 2^23 (float32, 0x4B000000), minus 1152 or 2^23 + 128.
    (I2F runs at 16 results per clock per SM on sm_90; these are LOP3 + FADD at 64-128.)"""
    u = q.to(tl.uint8, bitcast=True).to(tl.uint32) ^ 0x80
    if DTYPE == tl.float16:
        return (u | 0x6400).to(tl.uint16).to(tl.float16, bitcast=True) - 1152.0
    else:
        return (u | 0x4B000000).to(tl.float32, bitcast=True) - 8388736.0


@triton.jit
def _dequant(q, scale, DTYPE: tl.constexpr):
    """round_DTYPE(q · scale): q exact (`int8_exact`), one rounding of the product (the
    numerics of dequantize-then-matmul). ``scale`` broadcasts against q, in DTYPE."""
    if DTYPE == tl.float16:
        return int8_exact(q, DTYPE) * scale
    else:
        return (int8_exact(q, DTYPE) * scale.to(tl.float32)).to(DTYPE)


@triton.jit
def load_packed_tile(
    q_ptr, n0, k0, NB, KB, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, TRANSPOSED: tl.constexpr
):
    """A tile of the packed (layout 2) int8 weight: rows n0 .. n0 + BLOCK_N of W, columns
    k0 .. k0 + BLOCK_K, returned as (BLOCK_K, BLOCK_N) (W's transpose, what ``x @ Wᵀ`` takes)
    or with TRANSPOSED as (BLOCK_N, BLOCK_K). n0 a multiple of 32, k0 of 16; BLOCK_N a
    multiple of 32, BLOCK_K of 16. NB = ceil(N / 32), KB = K / 16 (the packed tensor's first
    two dims). Rows past N are zero (packing pads them); units past NB / KB load as zeros.

    The units of the tile are contiguous runs of memory (one run of BLOCK_K / 16 units per row
    of units), loaded as such (vectorized), then put into (k, n) order in registers by the
    permutation `lrkernels.quant` documents: dims (nb, kb, g, t, j, b1, b0) of the bytes ->
    k = 16 kb + 8 b1 + 2 t + b0, n = 32 nb + 8 j + g. Public: kernels that read an int8 base
    weight (e.g. LoRA on an int8 base) use it."""
    NBU: tl.constexpr = BLOCK_N // 32
    KBU: tl.constexpr = BLOCK_K // 16
    nb = n0 // 32 + tl.arange(0, NBU)
    byte = tl.arange(0, KBU * 512)
    kb = k0 // 16 + byte // 512
    offs = nb[:, None] * (KB * 512) + (k0 // 16) * 512 + byte[None, :]
    raw = tl.load(q_ptr + offs, mask=(nb[:, None] < NB) & (kb[None, :] < KB), other=0)
    t = tl.reshape(raw, (NBU, KBU, 8, 4, 4, 2, 2))
    if TRANSPOSED:  # (nb, j, g) x (kb, b1, t, b0)
        t = tl.permute(t, (0, 4, 2, 1, 5, 3, 6))
        return tl.reshape(t, (BLOCK_N, BLOCK_K))
    else:  # (kb, b1, t, b0) x (nb, j, g)
        t = tl.permute(t, (1, 5, 3, 6, 0, 4, 2))
        return tl.reshape(t, (BLOCK_K, BLOCK_N))


@triton.jit
def _write_tile(
    acc,
    out_ptr,
    bias_ptr,
    offs_m,
    m_mask,
    offs_c,
    c_mask,
    stride_om,
    stride_oc,
    stride_b,
    HAS_BIAS: tl.constexpr,
):
    """Adds the bias (float32) to the accumulator, casts to out's dtype, stores (masked)."""
    if HAS_BIAS:
        b = tl.load(bias_ptr + offs_c * stride_b, mask=c_mask, other=0.0)
        acc += b.to(tl.float32)[None, :]
    tl.store(
        out_ptr + offs_m[:, None] * stride_om + offs_c[None, :] * stride_oc,
        acc.to(out_ptr.dtype.element_ty),
        mask=m_mask[:, None] & c_mask[None, :],
    )


@triton.jit
def _split_range(pid_s, split, steps, BLOCK: tl.constexpr, total):
    """[begin, end) of the reduction for split `pid_s` of `split`: `steps` steps of BLOCK
    (the last one may be partial at `total`) dealt out evenly, steps // split each and one more
    to the first steps % split splits (the plan keeps split <= steps: none is empty)."""
    per = steps // split
    extra = steps % split
    first = pid_s * per + tl.minimum(pid_s, extra)
    count = per + tl.where(pid_s < extra, 1, 0)
    return first * BLOCK, tl.minimum((first + count) * BLOCK, total)


@triton.jit
def _reduce_splits(
    acc, ws_ptr, cnt_ptr, tile, pid_s, split, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr
):
    """Split-K within the launch: stores this program's float32 partial tile, counts it in
    the tile's counter; returns (is_last, sum) where the last program of the tile gets the sum
    of all partials in split order 0, 1, ... (deterministic: no atomics on values) and resets
    the counter to 0 for the next launch. Other programs get is_last False."""
    TILE: tl.constexpr = BLOCK_M * BLOCK_C
    loc = tl.arange(0, BLOCK_M)[:, None] * BLOCK_C + tl.arange(0, BLOCK_C)[None, :]
    base = ws_ptr + tile * split * TILE
    tl.store(base + pid_s * TILE + loc, acc)
    tl.debug_barrier()  # every thread's partials precede the (release) count
    old = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel")
    total = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    is_last = old == split - 1
    if is_last:
        for s in range(0, split):
            total += tl.load(base + s * TILE + loc, cache_modifier=".cg")
        tl.atomic_xchg(cnt_ptr + tile, 0)
    return is_last, total


@triton.jit
def _int8_linear_fwd_kernel(
    x_ptr,
    q_ptr,
    s_ptr,
    bias_ptr,
    out_ptr,
    ws_ptr,
    cnt_ptr,
    M,
    N,
    K,
    k_steps,
    split,
    NB,
    KB,
    stride_xm,
    stride_xk,
    stride_qn,
    stride_qk,
    stride_sn,
    stride_sg,
    stride_b,
    stride_om,
    stride_on,
    GROUP_SIZE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    PACKED: tl.constexpr,
    IS_SPLIT: tl.constexpr,
    IEEE_FP32: tl.constexpr,
    INDEX_64: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """out (M, N) = x @ dequant(q, s).T (+ bias) for one (BLOCK_M, BLOCK_N) tile and one split
    of K. Grid (cdiv(M, BLOCK_M), cdiv(N, BLOCK_N), split); the k_steps = cdiv(K, BLOCK_K)
    steps are dealt out evenly over the splits (`_split_range`).
    q: (N, K) with strides (stride_qn, stride_qk), or packed (PACKED; NB x KB units).
    GROUP_SIZE == 0: per-channel scales s (N,), applied to the float32 sums in the epilogue
    (the weight tile is q exactly); else s[n, k // G] with BLOCK_K dividing G (one scale column
    per k-tile) multiplies the weights (round(q · s)). IS_SPLIT: partials reduced in this launch
    by the tile's last program (`_reduce_splits`)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_s = tl.program_id(2)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k0 = tl.arange(0, BLOCK_K)
    if INDEX_64:
        # Some operand spans more than 2**31 elements: all address math in int64.
        offs_m = offs_m.to(tl.int64)
        offs_n = offs_n.to(tl.int64)
        offs_k0 = offs_k0.to(tl.int64)
        pid_s = pid_s.to(tl.int64)
    m_mask = offs_m < M
    n_mask = offs_n < N
    dtype = x_ptr.dtype.element_ty

    x_rows = x_ptr + offs_m[:, None] * stride_xm
    # q (N, K) read as its transpose: a (BLOCK_K, BLOCK_N) tile per step.
    qt_cols = q_ptr + offs_n[None, :] * stride_qn
    s_rows = s_ptr + offs_n * stride_sn

    k_begin, k_end = _split_range(pid_s, split, k_steps, BLOCK_K, K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_begin, k_end, BLOCK_K):
        offs_k = k0 + offs_k0
        # Split boundaries are multiples of BLOCK_K, so only the global end K needs a mask.
        k_mask = offs_k < K
        x_tile = tl.load(
            x_rows + offs_k[None, :] * stride_xk,
            mask=m_mask[:, None] & k_mask[None, :],
            other=0.0,
        )
        if PACKED:
            q_tile = load_packed_tile(q_ptr, pid_n * BLOCK_N, k0, NB, KB, BLOCK_N, BLOCK_K, False)
        else:
            q_tile = tl.load(
                qt_cols + offs_k[:, None] * stride_qk,
                mask=k_mask[:, None] & n_mask[None, :],
                other=0,
            )
        if GROUP_SIZE != 0:
            # The whole k-tile lies in group k0 // G (BLOCK_K divides G).
            group = k0 // GROUP_SIZE
            if INDEX_64:
                group = group.to(tl.int64)
            scale = tl.load(s_rows + group * stride_sg, mask=n_mask, other=0.0)
            w_tile = _dequant(q_tile, scale[None, :], dtype)
        else:
            w_tile = int8_exact(q_tile, dtype).to(dtype)
        acc = _dot_acc(x_tile, w_tile, acc, IEEE_FP32)

    done = True
    if IS_SPLIT:
        tile = pid_m * tl.num_programs(1) + pid_n
        if INDEX_64:
            tile = tile.to(tl.int64)
        done, acc = _reduce_splits(acc, ws_ptr, cnt_ptr, tile, pid_s, split, BLOCK_M, BLOCK_N)
    if done:
        if GROUP_SIZE == 0:  # per-channel scales on the float32 sums
            acc *= tl.load(s_rows, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        _write_tile(
            acc, out_ptr, bias_ptr, offs_m, m_mask, offs_n, n_mask,
            stride_om, stride_on, stride_b, HAS_BIAS,
        )  # fmt: skip


@triton.jit
def _int8_linear_grad_input_kernel(
    dy_ptr,
    q_ptr,
    s_ptr,
    out_ptr,
    ws_ptr,
    cnt_ptr,
    M,
    N,
    K,
    n_steps,
    split,
    NB,
    KB,
    stride_dym,
    stride_dyn,
    stride_qn,
    stride_qk,
    stride_sn,
    stride_sg,
    stride_om,
    stride_ok,
    GROUP_SIZE: tl.constexpr,
    SCALE_PER_TILE: tl.constexpr,
    PACKED: tl.constexpr,
    IS_SPLIT: tl.constexpr,
    IEEE_FP32: tl.constexpr,
    INDEX_64: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """out (M, K) = dy @ dequant(q, s) for one (BLOCK_M, BLOCK_K) tile and one split of N.

    Grid (cdiv(M, BLOCK_M), cdiv(K, BLOCK_K), split); BLOCK_K is the width of the program's
    dx tile, BLOCK_N the reduction step; the n_steps = cdiv(N, BLOCK_N) steps are dealt out
    evenly over the splits (`_split_range`).
    Scales multiply the weights (round(q · s), the dequantize-then-mm numerics):
    GROUP_SIZE == 0 -> s[n] per tile row. GROUP_SIZE > 0 and SCALE_PER_TILE (BLOCK_K divides G)
    -> the tile lies in one group: s[n, k_start // G] per row. Otherwise each element gathers
    s[n, k // G] (masked 2-D load). PACKED / IS_SPLIT as in the forward kernel.
    """
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_s = tl.program_id(2)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n0 = tl.arange(0, BLOCK_N)
    if INDEX_64:
        offs_m = offs_m.to(tl.int64)
        offs_k = offs_k.to(tl.int64)
        offs_n0 = offs_n0.to(tl.int64)
        pid_s = pid_s.to(tl.int64)
    m_mask = offs_m < M
    k_mask = offs_k < K
    dtype = dy_ptr.dtype.element_ty

    dy_rows = dy_ptr + offs_m[:, None] * stride_dym
    q_cols = q_ptr + offs_k[None, :] * stride_qk
    if GROUP_SIZE != 0:
        if SCALE_PER_TILE:
            # The first column of the tile, offs_k[0], fixes the group of the whole tile.
            group = (pid_k * BLOCK_K) // GROUP_SIZE
            if INDEX_64:
                group = group.to(tl.int64)
            s_col = s_ptr + group * stride_sg
        else:
            s_cols = s_ptr + (offs_k // GROUP_SIZE)[None, :] * stride_sg

    n_begin, n_end = _split_range(pid_s, split, n_steps, BLOCK_N, N)
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(n_begin, n_end, BLOCK_N):
        offs_n = n0 + offs_n0
        n_mask = offs_n < N
        dy_tile = tl.load(
            dy_rows + offs_n[None, :] * stride_dyn,
            mask=m_mask[:, None] & n_mask[None, :],
            other=0.0,
        )
        if PACKED:
            q_tile = load_packed_tile(q_ptr, n0, pid_k * BLOCK_K, NB, KB, BLOCK_N, BLOCK_K, True)
        else:
            q_tile = tl.load(
                q_cols + offs_n[:, None] * stride_qn,
                mask=n_mask[:, None] & k_mask[None, :],
                other=0,
            )
        if GROUP_SIZE == 0:
            scale = tl.load(s_ptr + offs_n * stride_sn, mask=n_mask, other=0.0)[:, None]
        elif SCALE_PER_TILE:
            scale = tl.load(s_col + offs_n * stride_sn, mask=n_mask, other=0.0)[:, None]
        else:
            scale = tl.load(
                s_cols + offs_n[:, None] * stride_sn,
                mask=n_mask[:, None] & k_mask[None, :],
                other=0.0,
            )
        acc = _dot_acc(dy_tile, _dequant(q_tile, scale, dtype), acc, IEEE_FP32)

    done = True
    if IS_SPLIT:
        tile = pid_m * tl.num_programs(1) + pid_k
        if INDEX_64:
            tile = tile.to(tl.int64)
        done, acc = _reduce_splits(acc, ws_ptr, cnt_ptr, tile, pid_s, split, BLOCK_M, BLOCK_K)
    if done:
        # No bias in the input gradient: HAS_BIAS=False compiles the bias load away.
        _write_tile(
            acc, out_ptr, out_ptr, offs_m, m_mask, offs_k, k_mask,
            stride_om, stride_ok, 0, False,
        )  # fmt: skip


# --------------------------------------------------------------------------------------
# Host side: configuration heuristic and launch.
# --------------------------------------------------------------------------------------


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _next_pow2(n: int) -> int:
    return 1 << (max(int(n), 1) - 1).bit_length()


def _pow2_divisor_at_most(g: int, cap: int) -> int:
    """Largest power of two <= cap that divides g (g > 0)."""
    p = g & -g  # largest power of two dividing g
    return min(p, _next_pow2(cap + 1) // 2)


@functools.lru_cache(maxsize=1024)
def _choose_config_cached(
    M: int,
    N: int,
    K: int,
    group_size: int,
    dtype: torch.dtype,
    num_sms: int,
    transposed: bool,
    smem_budget: int,
    packed: bool,
) -> tuple:
    esize = 4 if dtype == torch.float32 else 2
    # Output columns and reduction length of the product this config is for.
    cols, red = (K, N) if transposed else (N, K)
    # Shape classes: decode (M <= 16: one 16-row tile, bandwidth-bound on the int8 stream),
    # medium (M <= 128: one or two row tiles) and large (compute-bound: 128 x 128 tiles).
    small_m = M <= 16
    large_m = M > 128

    # BLOCK_M: 16 is the smallest dot tile; float32 runs the IEEE (FMA) dot, at most 64.
    block_m = 16 if small_m else min(128, _next_pow2(M))
    if esize == 4:
        block_m = min(block_m, 64)

    # Output-column tile: 128 for 16-bit beyond decode; 64 for float32 and for decode, where
    # narrower tiles give more programs for the same weight stream.
    block_c = 128 if (esize == 2 and not small_m) else 64
    # Packed weights come in units of 32 rows x 16 columns: the forward's output tile (rows of
    # W) is >= 32, the gradient's reduction step (rows of W) too.
    block_c = min(block_c, max(32 if (packed and not transposed) else 16, _next_pow2(cols)))

    # Reduction step: decode takes long steps (more bytes in flight per program); medium M 64;
    # large M 32: with 64 the 128 x 128 tiles need 133-154 registers (sm_90, ahead-of-time
    # compile: one CTA per SM), with 32 113-115 (two).
    if esize == 2:
        block_r = 128 if small_m else (32 if large_m else 64)
    else:
        block_r = 32
    block_r = min(block_r, max(32 if (packed and transposed) else 16, _next_pow2(red)))

    if group_size:
        if not transposed:
            # Forward: a k-tile must lie inside one group (one scale column per step).
            block_r = _pow2_divisor_at_most(group_size, block_r)
        elif group_size >= 64:
            # Gradient: a dx tile inside one group loads its scales as a vector instead of
            # gathering them per element. Not for G = 32: the tile would get too narrow
            # (dy is re-read once per column tile), so G = 32 uses the 2-D gather.
            block_c = min(block_c, _pow2_divisor_at_most(group_size, block_c))

    # SPLIT: split the reduction (reduced inside the same launch, `_reduce_splits`) until the
    # grid has ~2 programs per SM. Limits: >= 2 steps per split; the partial sums
    # (8 bytes per element: float32 write + read) stay below the int8 weight bytes streamed:
    # 8 * SPLIT * M * cols <= cols * red.
    m_tiles = _cdiv(max(M, 1), block_m)
    tiles = m_tiles * _cdiv(cols, block_c)
    steps = _cdiv(red, block_r)
    target = 2 * num_sms
    split = 1
    if num_sms > 1 and tiles < target:
        split = min(_cdiv(target, tiles), steps // 2, red // (8 * max(M, 1)), _MAX_SPLIT)
        split = max(1, split)  # the kernels deal the steps out evenly (`_split_range`)

    # num_warps: 8 for the big 128 x 128 16-bit tiles (large M), else 4.
    num_warps = 8 if block_m * block_c >= 128 * 128 else 4

    # num_stages: shared memory inside the loop = stages x (activation tile + int8 tile)
    # + the dequantized operand staged for the dot (one buffer). The epilogue's layout
    # conversion of the float32 accumulator reuses that memory after the loop, so the
    # estimate is the larger of the two.
    stage = block_m * block_r * esize + block_r * block_c
    dequant = block_r * block_c * esize
    epilogue = block_m * block_c * 4
    num_stages = 2
    for stages in (4, 3):
        if max(stages * stage + dequant, epilogue) <= smem_budget:
            num_stages = stages
            break
    if large_m and esize == 2:
        num_stages = min(num_stages, 3)  # 3 stages already cover the latency at 128 x 128

    return (
        ("BLOCK_M", block_m),
        ("BLOCK_N", block_r if transposed else block_c),
        ("BLOCK_K", block_c if transposed else block_r),
        ("SPLIT", split),
        ("num_warps", num_warps),
        ("num_stages", num_stages),
    )


def choose_config(
    M: int,
    N: int,
    K: int,
    group_size: int,
    dtype: torch.dtype,
    num_sms: int,
    transposed: bool,
    smem_budget: int | None = None,
    packed: bool = False,
) -> dict:
    """Launch configuration of the int8 kernels (plain heuristic, no autotuning).

    Args:
        M: rows of x (forward) or dy (gradient).
        N, K: the weight's shape (out_features, in_features).
        group_size: 0 for per-channel scales, else the group size G.
        dtype: activation dtype, torch.float32, torch.float16 or torch.bfloat16.
        num_sms: streaming multiprocessors of the target device (1 for the CPU
            interpreter: no split, fewest and largest programs).
        transposed: False for the forward (y = x @ W.T, reduction over K), True for the
            input gradient (dx = dy @ W, reduction over N).
        smem_budget: bytes of shared memory the estimate may use (only affects
            num_stages); defaults to a conservative 96 KiB.
        packed: the weight is packed (layout 2): W's rows come in tiles of >= 32.

    Returns:
        dict with BLOCK_M, BLOCK_N, BLOCK_K (powers of two >= 16), SPLIT, num_warps,
        num_stages. BLOCK_N / BLOCK_K tile the weight's dimensions: in the forward BLOCK_N is
        the output tile and BLOCK_K the reduction step (dividing G with groups); in the
        gradient BLOCK_K is the output (dx column) tile and BLOCK_N the reduction step.
        SPLIT is the number of programs the reduction dimension is split over (their partial
        sums are added by the last one of each tile, in the same launch).
    """
    if dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"int8_linear: unsupported dtype {dtype}")
    budget = _DEFAULT_SMEM_BUDGET if smem_budget is None else int(smem_budget)
    return dict(
        _choose_config_cached(
            int(M),
            int(N),
            int(K),
            int(group_size),
            dtype,
            max(1, int(num_sms)),
            bool(transposed),
            budget,
            bool(packed),
        )
    )


@functools.cache
def _device_limits(device_type: str, index: int | None) -> tuple[int, int | None]:
    """(SM count, shared-memory budget) of a device; the CPU interpreter gets (1, None)."""
    if device_type != "cuda":
        # Interpreter: programs run one after another, so fewer, larger ones are faster.
        return 1, None
    idx = torch.cuda.current_device() if index is None else index
    props = torch.cuda.get_device_properties(idx)
    optin = getattr(props, "shared_memory_per_block_optin", 0) or _DEFAULT_SMEM_BUDGET
    # The estimate in choose_config is rough: leave ~30% headroom.
    return props.multi_processor_count, max(48 * 1024, int(optin * 0.7))


def _spans_int32(t: torch.Tensor, pad: int) -> bool:
    """True when the largest offset into t (plus up to `pad` masked lanes past every
    dimension) does not fit in int32."""
    reach = sum(
        (size + pad) * abs(stride) for size, stride in zip(t.shape, t.stride(), strict=True)
    )
    return reach > _INT32_LIMIT


def _is_packed(qweight: torch.Tensor) -> bool:
    return qweight.dim() == 3


def _check_weight(
    op: str,
    act: torch.Tensor,
    act_name: str,
    act_features_of,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    out: torch.Tensor,
    out_shape_of,
    group_size: int,
) -> tuple[int, int]:
    """Shape / dtype / device checks shared by both launchers (errors name the op). Returns
    the weight's (N, K): qweight (N, K), or packed (layout 2) with N = scales.shape[0]."""
    if act.dim() != 2 or qweight.dim() not in (2, 3) or out.dim() != 2:
        raise ValueError(f"{op}: {act_name} and out must be 2-D, qweight 2-D or packed (3-D)")
    if qweight.dtype != torch.int8:
        raise TypeError(f"{op}: qweight must be int8, got {qweight.dtype}")
    if _is_packed(qweight):
        if qweight.shape[2] != 512 or scales.dim() not in (1, 2):
            raise ValueError(f"{op}: packed qweight must be (ceil(N/32), K/16, 512)")
        N, K = scales.shape[0], 16 * qweight.shape[1]
        if _cdiv(N, 32) != qweight.shape[0]:
            raise ValueError(
                f"{op}: scales give N = {N}; the packed qweight holds {qweight.shape[0]} units"
            )
        if not qweight.is_contiguous():
            raise ValueError(f"{op}: a packed qweight must be contiguous")
    else:
        N, K = qweight.shape
    if N < 1 or K < 1:
        raise ValueError(f"{op}: qweight must have N, K >= 1, got {(N, K)}")
    act_features = act_features_of(N, K)
    if act.shape[1] != act_features:
        raise ValueError(
            f"{op}: {act_name} has shape {tuple(act.shape)}, expected (M, {act_features})"
        )
    out_shape = out_shape_of(act.shape[0], N, K)
    if tuple(out.shape) != out_shape:
        raise ValueError(f"{op}: out has shape {tuple(out.shape)}, expected {out_shape}")
    dtype = act.dtype
    if dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"{op}: unsupported dtype {dtype}")
    for name, t in (("scales", scales), ("out", out)):
        if t.dtype != dtype:
            raise TypeError(f"{op}: {name} has dtype {t.dtype}, expected {dtype}")
    for name, t in (("qweight", qweight), ("scales", scales), ("out", out)):
        if t.device != act.device:
            raise ValueError(f"{op}: {name} is on {t.device}, expected {act.device}")
    if group_size == 0:
        if tuple(scales.shape) != (N,):
            raise ValueError(
                f"{op}: per-channel scales must have shape ({N},), got {tuple(scales.shape)}"
            )
    else:
        if group_size < 0 or group_size % 16 != 0 or K % group_size != 0:
            raise ValueError(
                f"{op}: group_size must be a positive multiple of 16 dividing K={K}, "
                f"got {group_size}"
            )
        if tuple(scales.shape) != (N, K // group_size):
            raise ValueError(
                f"{op}: group scales must have shape ({N}, {K // group_size}), "
                f"got {tuple(scales.shape)}"
            )
    return N, K


def _scale_strides(scales: torch.Tensor) -> tuple[int, int]:
    """(stride along N, stride along groups); the group stride is unused per channel."""
    return scales.stride(0), (scales.stride(1) if scales.dim() == 2 else 0)


def _split_plan(red: int, block_r: int, split: int) -> tuple[int, int]:
    """(split count, steps of block_r along the reduction): at most one split per step, the
    steps dealt out evenly by the kernels (`_split_range`)."""
    steps = _cdiv(red, block_r)
    return max(1, min(int(split), steps)), steps


# Split-K counters, one int32 per output tile, per (device, stream): zeroed when allocated and
# reset by the reducing program of every launch, so no memset per call.
_COUNTERS: dict[tuple, torch.Tensor] = {}


def _split_buffers(
    split: int, tiles: int, tile_elems: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(float32 workspace, int32 counters, whether they need int64 offsets) for a split
    launch; placeholders (no split) otherwise."""
    if split == 1:
        dummy = torch.empty(1, dtype=torch.int32, device=device)
        return dummy, dummy, False
    ws = torch.empty(tiles * split * tile_elems, dtype=torch.float32, device=device)
    if torch.compiler.is_compiling():  # a traced graph gets its own (zeroed) counters
        counters = torch.zeros(tiles, dtype=torch.int32, device=device)
    else:
        stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
        key = (device.type, device.index, stream)
        counters = _COUNTERS.get(key)
        if counters is None or counters.numel() < tiles:
            counters = torch.zeros(max(tiles, 4096), dtype=torch.int32, device=device)
            _COUNTERS[key] = counters
    return ws, counters, ws.numel() > _INT32_LIMIT


def launch_int8_linear(
    x2d: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None,
    out: torch.Tensor,
    group_size: int,
    *,
    config: dict | None = None,
) -> None:
    """out (M, N) = x2d (M, K) · dequant(qweight, scales)ᵀ + bias; group_size 0 = per channel.

    x2d (M, K); qweight (N, K) int8 or packed (layout 2, `lrkernels.quant`); scales (N,) per
    channel or (N, K // group_size) per group; bias (N,) or None; out (M, N) preallocated.
    x2d, scales, bias and out share one dtype (float32, float16 or bfloat16) and device; any
    strides (a packed qweight contiguous). Group-scaled weights are rounded to the dtype before
    the float32-accumulated product (as torch's dequantize-then-F.linear); per-channel scales
    multiply the float32 sums. ``config`` overrides :func:`choose_config` (tests and
    benchmarks) and must hold the same keys.
    """
    op = "int8_linear"
    group_size = int(group_size)
    M = x2d.shape[0]
    N, K = _check_weight(
        op, x2d, "x2d", lambda n, k: k, qweight, scales, out, lambda m, n, k: (m, n), group_size
    )
    packed = _is_packed(qweight)
    if bias is not None:
        if bias.dim() != 1 or bias.shape[0] != N:
            raise ValueError(f"{op}: bias must have shape ({N},), got {tuple(bias.shape)}")
        if bias.dtype != x2d.dtype or bias.device != x2d.device:
            raise TypeError(f"{op}: bias must have x2d's dtype and device")
    if M == 0:
        return  # nothing to write: no launch

    if config is None:
        num_sms, smem = _device_limits(x2d.device.type, x2d.device.index)
        config = choose_config(M, N, K, group_size, x2d.dtype, num_sms, False, smem, packed)
    block_m, block_n, block_k = config["BLOCK_M"], config["BLOCK_N"], config["BLOCK_K"]
    if group_size and group_size % block_k != 0:
        raise ValueError(f"{op}: BLOCK_K={block_k} must divide group_size={group_size}")
    if packed and (block_n % 32 or block_k % 16):
        raise ValueError(f"{op}: a packed weight needs BLOCK_N % 32 == 0 and BLOCK_K % 16 == 0")
    split, k_steps = _split_plan(K, block_k, config["SPLIT"])

    grid = (_cdiv(M, block_m), _cdiv(N, block_n), split)
    ws, counters, ws64 = _split_buffers(split, grid[0] * grid[1], block_m * block_n, x2d.device)
    pad = 2 * max(block_m, block_n, block_k)
    tensors = [x2d, qweight, scales, out] + ([] if bias is None else [bias])
    index_64 = ws64 or any(_spans_int32(t, pad) for t in tensors)
    stride_sn, stride_sg = _scale_strides(scales)
    launchable(_int8_linear_fwd_kernel)[grid](
        x2d,
        qweight,
        scales,
        out if bias is None else bias,  # dummy pointer when there is no bias
        out,
        ws,
        counters,
        M,
        N,
        K,
        k_steps,
        split,
        _cdiv(N, 32),
        K // 16,
        x2d.stride(0),
        x2d.stride(1),
        qweight.stride(0),
        qweight.stride(1),
        stride_sn,
        stride_sg,
        0 if bias is None else bias.stride(0),
        out.stride(0),
        out.stride(1),
        GROUP_SIZE=group_size,
        HAS_BIAS=bias is not None,
        PACKED=packed,
        IS_SPLIT=split > 1,
        IEEE_FP32=x2d.dtype == torch.float32,
        INDEX_64=index_64,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        num_warps=config["num_warps"],
        num_stages=config["num_stages"],
    )


def launch_int8_linear_grad_input(
    dy2d: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    out: torch.Tensor,
    group_size: int,
    *,
    config: dict | None = None,
) -> None:
    """out (M, K) = dy2d (M, N) · dequant(qweight, scales).

    dy2d (M, N); qweight (N, K) int8 or packed (layout 2); scales (N,) per channel
    (group_size 0) or (N, K // group_size) per group; out (M, K) preallocated. dy2d, scales
    and out share one dtype (float32, float16 or bfloat16) and device; any strides. float32
    accumulation over N; dequantized weights are rounded to the dtype first (as torch's
    dequantize-then-mm). ``config`` overrides :func:`choose_config` (with transposed=True).
    """
    op = "int8_linear_grad_input"
    group_size = int(group_size)
    M = dy2d.shape[0]
    N, K = _check_weight(
        op, dy2d, "dy2d", lambda n, k: n, qweight, scales, out, lambda m, n, k: (m, k), group_size
    )
    packed = _is_packed(qweight)
    if M == 0:
        return

    if config is None:
        num_sms, smem = _device_limits(dy2d.device.type, dy2d.device.index)
        config = choose_config(M, N, K, group_size, dy2d.dtype, num_sms, True, smem, packed)
    block_m, block_n, block_k = config["BLOCK_M"], config["BLOCK_N"], config["BLOCK_K"]
    if packed and (block_n % 32 or block_k % 16):
        raise ValueError(f"{op}: a packed weight needs BLOCK_N % 32 == 0 and BLOCK_K % 16 == 0")
    split, n_steps = _split_plan(N, block_n, config["SPLIT"])

    grid = (_cdiv(M, block_m), _cdiv(K, block_k), split)
    ws, counters, ws64 = _split_buffers(split, grid[0] * grid[1], block_m * block_k, dy2d.device)
    pad = 2 * max(block_m, block_n, block_k)
    index_64 = ws64 or any(_spans_int32(t, pad) for t in (dy2d, qweight, scales, out))
    stride_sn, stride_sg = _scale_strides(scales)
    launchable(_int8_linear_grad_input_kernel)[grid](
        dy2d,
        qweight,
        scales,
        out,
        ws,
        counters,
        M,
        N,
        K,
        n_steps,
        split,
        _cdiv(N, 32),
        K // 16,
        dy2d.stride(0),
        dy2d.stride(1),
        qweight.stride(0),
        qweight.stride(1),
        stride_sn,
        stride_sg,
        out.stride(0),
        out.stride(1),
        GROUP_SIZE=group_size,
        SCALE_PER_TILE=group_size > 0 and group_size % block_k == 0,
        PACKED=packed,
        IS_SPLIT=split > 1,
        IEEE_FP32=dy2d.dtype == torch.float32,
        INDEX_64=index_64,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        num_warps=config["num_warps"],
        num_stages=config["num_stages"],
    )
