"""Low-rank linear layer in Triton: ``y = (x @ V.T) @ U.T + bias``.

Shapes: ``x`` (M, in), ``V`` (rank, in), ``U`` (out, rank), ``bias`` (out,) or None,
``y`` (M, out). Dtypes: float32, float16 or bfloat16, all operands the same dtype.
Products accumulate in float32. For float16/bfloat16 the intermediate ``t = x @ V.T`` is
rounded to the input dtype before the second product (the numerics of two torch matmuls, and
what lets the second product run on tensor cores); the bias is added to the float32
accumulator before the final cast. Every tensor may have arbitrary strides (the input
gradient's transposed factors are read in place).

Design: the decomposition of the CUDA kernels (csrc/cuda/lowrank_kernels.cuh), two launches.

* ``_lowrank_down_kernel``: one program per (rank chunk, K slice, row tile) computes
  ``x[rows, slice] @ V[chunk, slice].T`` in float32. With ``SPLITS > 1`` it stores that partial
  to a workspace, and the partials are summed in slice order (fixed order: deterministic, no
  atomics on values) into ``t`` (the dtype), a small workspace of ``M x LDT`` elements, by
  (``REDUCE``):

  - ``"last"``: the program that arrives last at its tile's counter (``tl.atomic_add``,
    acq_rel), which resets it;
  - ``"sep"``: ``_lowrank_reduce_kernel``, a third launch that spreads the sum over the GPU
    (one program per 512 elements of a tile): for large tiles, where one program reading every
    partial of its tile would bound the split count.

  Without splits it writes ``t`` directly. The split count brings the grid to at least two
  programs per SM whenever the work splits that far (the cheapest such by the cost model).
* ``_lowrank_up_kernel``: one program per (output-column tile, row tile) computes
  ``t[rows] @ U[cols].T + bias``.

Why a second launch rather than one fused program per row tile: each output needs the whole
``t`` of its row, which needs all of ``V``; within one launch that means either every program
recomputing ``t`` over all of ``in`` (the previous design: at M = 1024 about 12.9 GFLOP executed
for 2.15 useful, V re-read per split) or a grid-wide wait, which Triton cannot express safely
(no co-residency guarantee). The intermediate is tiny (1 MiB at M = 4096, rank 128) and stays in
L2; the counters cost one small memset per call (``torch.zeros``).

Configuration comes from a plain Python heuristic (:func:`choose_config`) rather than
``triton.autotune``, so the launch stays ``torch.compile``-friendly (``_launch.launchable``)
and fast under ``TRITON_INTERPRET=1``: a cost model over a pruned list of tile configurations
(:data:`_DOWN_CONFIGS`, :data:`_UP_CONFIGS`) that counts HBM and L2 bytes, MMA time, GPU fill,
waves and the last program's reduction. The configurations were compiled ahead of time for
sm_90 (Triton 3.9, AOT, see :func:`_smem_estimate`): none spills, and the shared-memory
estimate is checked against Triton's own numbers.

Expected (H200, bf16, in = out = 4096, rank 128; to be measured by bench/lowrank.py): M <= 16
about torch's speed (three launches: memset, down, up); M = 64-1024 about 1.2-1.5x torch's two
matmuls (each kernel streams its operands through 128-256 programs; t never leaves L2); M >= 4096
about torch's speed: Triton lowers the 64- and 128-row tiles to wgmma on sm_90, so both kernels
stream x or y near HBM rate like cuBLAS does, saving t's round trip and adding the partials.
The dispatch keeps torch outside 16 < M <= 1024 until measured
(``lrkernels.ops.lowrank.kernel_expected_faster``).
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from ._launch import launchable

__all__ = ["choose_config", "launch_lowrank_linear"]

# Offsets at or beyond this need 64-bit index arithmetic.
_INT32_LIMIT = 2**31 - 1
_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _mma(a, b, acc, IEEE_FP32: tl.constexpr):
    """acc += a @ b. float32 inputs use exact IEEE products (no TF32) on purpose."""
    if IEEE_FP32:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def _lowrank_down_kernel(
    x_ptr,
    v_ptr,
    t_ptr,
    part_ptr,
    cnt_ptr,
    M,
    K,
    R,
    ldt,
    slice_len,
    splits,
    rank_chunks,
    stride_xm,
    stride_xk,
    stride_vr,
    stride_vk,
    SPLIT: tl.constexpr,
    SEPARATE_REDUCE: tl.constexpr,
    IEEE_FP32: tl.constexpr,
    INDEX_64: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """t[M, ldt] = x[M, K] @ V[R, K].T (columns >= R are zeros), split over K when SPLIT.

    Program pid = rc + rank_chunks * (s + splits * rt): rank chunk rc, K slice s, row tile rt.
    Partials: part[tile, s] is a BLOCK_M x BLOCK_R float32 tile (rows >= M not written);
    cnt[tile] is zero at launch and left zero. SEPARATE_REDUCE: only the partials are written
    (``_lowrank_reduce_kernel`` sums them).
    """
    pid = tl.program_id(0)
    rc = pid % rank_chunks
    rest = pid // rank_chunks
    s = rest % splits
    rt = rest // splits
    offs_m = rt * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = rc * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_k0 = tl.arange(0, BLOCK_K)
    if INDEX_64:
        offs_m = offs_m.to(tl.int64)
        offs_r = offs_r.to(tl.int64)
    m_mask = offs_m < M
    r_mask = offs_r < R
    k_begin = s * slice_len
    k_end = tl.minimum(K, k_begin + slice_len)

    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    x_rows = x_ptr + offs_m[:, None] * stride_xm
    vt_cols = v_ptr + offs_r[None, :] * stride_vr  # V read as its transpose (BLOCK_K x BLOCK_R)
    for k0 in range(k_begin, k_end, BLOCK_K):
        offs_k = k0 + offs_k0
        k_mask = offs_k < k_end
        x_tile = tl.load(
            x_rows + offs_k[None, :] * stride_xk, mask=m_mask[:, None] & k_mask[None, :], other=0.0
        )
        vt_tile = tl.load(
            vt_cols + offs_k[:, None] * stride_vk, mask=k_mask[:, None] & r_mask[None, :], other=0.0
        )
        acc = _mma(x_tile, vt_tile, acc, IEEE_FP32)

    t_ptrs = t_ptr + offs_m[:, None] * ldt + offs_r[None, :]
    t_mask = m_mask[:, None] & (offs_r[None, :] < ldt)
    if SPLIT:
        tile = rt * rank_chunks + rc
        base = part_ptr + tile * splits * (BLOCK_M * BLOCK_R)
        loc = tl.arange(0, BLOCK_M)[:, None] * BLOCK_R + tl.arange(0, BLOCK_R)[None, :]
        tl.store(base + s * (BLOCK_M * BLOCK_R) + loc, acc, mask=m_mask[:, None])
        if not SEPARATE_REDUCE:
            tl.debug_barrier()  # every thread's partial is stored before the (release) arrival
            arrived = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel")
            if arrived == splits - 1:  # the last slice to arrive: sum the partials in slice order
                tl.atomic_xchg(cnt_ptr + tile, 0)  # ready for the next launch
                total = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
                for q in range(0, splits):
                    total += tl.load(
                        base + q * (BLOCK_M * BLOCK_R) + loc,
                        mask=m_mask[:, None],
                        other=0.0,
                        cache_modifier=".cg",  # through L2: other programs wrote them
                    )
                tl.store(t_ptrs, total.to(t_ptr.dtype.element_ty), mask=t_mask)
    else:
        tl.store(t_ptrs, acc.to(t_ptr.dtype.element_ty), mask=t_mask)


# Elements of a down tile per program of _lowrank_reduce_kernel.
_REDUCE_CHUNK = 512


@triton.jit
def _lowrank_reduce_kernel(
    part_ptr,
    t_ptr,
    M,
    ldt,
    splits,
    rank_chunks,
    INDEX_64: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
    CHUNK: tl.constexpr,
    CHUNKS: tl.constexpr,
):
    """t = sum of the partials part[tile, 0], part[tile, 1], ... in slice order (the sum of the
    last-program reduction, bit for bit), rounded to t's dtype.

    Program pid = c + CHUNKS * tile: elements [c * CHUNK, (c + 1) * CHUNK) of the row-major
    BLOCK_M x BLOCK_R tile `tile` = rt * rank_chunks + rc (rows >= M skipped).
    """
    pid = tl.program_id(0)
    tile = pid // CHUNKS
    loc = (pid % CHUNKS) * CHUNK + tl.arange(0, CHUNK)
    if INDEX_64:
        tile = tile.to(tl.int64)
        loc = loc.to(tl.int64)
    rt = tile // rank_chunks
    rc = tile % rank_chunks
    row = rt * BLOCK_M + loc // BLOCK_R
    col = rc * BLOCK_R + loc % BLOCK_R
    mask = (loc < BLOCK_M * BLOCK_R) & (row < M)
    base = part_ptr + tile * splits * (BLOCK_M * BLOCK_R) + loc
    total = tl.zeros((CHUNK,), dtype=tl.float32)
    for q in range(0, splits):
        total += tl.load(base + q * (BLOCK_M * BLOCK_R), mask=mask, other=0.0)
    tl.store(t_ptr + row * ldt + col, total.to(t_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _lowrank_up_kernel(
    t_ptr,
    u_ptr,
    bias_ptr,
    y_ptr,
    M,
    N,
    R,
    ldt,
    col_tiles,
    stride_un,
    stride_ur,
    stride_b,
    stride_ym,
    stride_yn,
    HAS_BIAS: tl.constexpr,
    IEEE_FP32: tl.constexpr,
    INDEX_64: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """y[M, N] = t[M, ldt] @ U[N, R].T (+ bias[N]); program pid = ct + col_tiles * rt."""
    pid = tl.program_id(0)
    ct = pid % col_tiles
    rt = pid // col_tiles
    offs_m = rt * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = ct * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r0 = tl.arange(0, BLOCK_R)
    if INDEX_64:
        offs_m = offs_m.to(tl.int64)
        offs_n = offs_n.to(tl.int64)
    m_mask = offs_m < M
    n_mask = offs_n < N

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    t_rows = t_ptr + offs_m[:, None] * ldt
    ut_cols = u_ptr + offs_n[None, :] * stride_un  # U read as its transpose (BLOCK_R x BLOCK_N)
    for r0 in range(0, ldt, BLOCK_R):
        offs_r = r0 + offs_r0
        t_tile = tl.load(
            t_rows + offs_r[None, :], mask=m_mask[:, None] & (offs_r[None, :] < ldt), other=0.0
        )
        ut_tile = tl.load(
            ut_cols + offs_r[:, None] * stride_ur,
            mask=(offs_r[:, None] < R) & n_mask[None, :],
            other=0.0,
        )
        acc = _mma(t_tile, ut_tile, acc, IEEE_FP32)

    if HAS_BIAS:
        b = tl.load(bias_ptr + offs_n * stride_b, mask=n_mask, other=0.0)
        acc += b.to(tl.float32)[None, :]
    tl.store(
        y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn,
        acc.to(y_ptr.dtype.element_ty),
        mask=m_mask[:, None] & n_mask[None, :],
    )


# --------------------------------------------------------------------------------------
# Host side: configurations, cost model and launch.
# --------------------------------------------------------------------------------------


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


# Candidate tiles: (BLOCK_M, BLOCK_R, BLOCK_K, num_warps, num_stages) for `down`,
# (BLOCK_M, BLOCK_N, BLOCK_R, num_warps, num_stages) for `up`. Pruned to configurations that
# compile for sm_90 without spilling and fit 227 KiB of shared memory (Triton 3.9 AOT, bf16;
# registers and shared bytes, row-major / transposed factors, in the comments; BLOCK_M >= 64
# lowers to wgmma, smaller tiles to mma.sync); the planner drops those over the device budget.
_DOWN_CONFIGS = {
    "16bit": (
        (16, 32, 128, 4, 4),  # mma.sync; 48 / 72 regs, 36,864 / 20,480 B: decode, many programs
        (32, 64, 64, 4, 4),  # mma.sync; 68 / 110 regs, 36,864 / 20,480 B
        (64, 64, 64, 4, 4),  # wgmma; 82 / 104 regs, 65,536 / 40,960 B
        (128, 128, 64, 8, 3),  # wgmma; 140 / 175 regs, 98,304 / 65,536 B
    ),
    "fp32": (  # IEEE FMA dots
        (16, 32, 32, 4, 2),  # 56 / 48 regs, 6,144 B
        (32, 32, 32, 4, 2),  # 72 / 64 regs, 8,192 B
        (64, 64, 32, 8, 2),  # 108 / 98 regs, 16,384 B
    ),
}
_UP_CONFIGS = {
    "16bit": (
        (16, 64, 64, 4, 3),  # mma.sync; 72 / 50 regs, 12,288 / 20,480 B
        (64, 64, 64, 4, 3),  # wgmma; 102 / 64 regs, 32,768 / 49,152 B
        (128, 128, 64, 8, 3),  # wgmma; 130 / 108 regs, 65,536 / 98,304 B
    ),
    "fp32": (
        (16, 32, 32, 4, 2),  # 48 / 40 regs, 6,144 B
        (64, 64, 32, 8, 2),  # 80 / 64 regs, 16,384 B
    ),
}

# Planning figures (H100/H200-class, 132 SMs; scaled by the SM count). They only rank the
# candidates against each other; the measured dispatch table decides against torch.
_HBM_BYTES_PER_US = 3.5e6
_L2_BYTES_PER_US = 8.0e6
# tl.dot: wgmma (BLOCK_M >= 64 on sm_90), mma.sync (smaller tiles), IEEE FMAs (float32).
_MMA_FLOPS_PER_US = {"wgmma": 5.5e8, "mma": 3.0e8, "fp32": 2.5e7}
_SM_L2_BYTES_PER_US = 1.0e5  # into one SM: the last program's reduction
_WAVE_US = 1.0
_REF_SMS = 132
_RESIDENT_PER_SM = 2  # programs an SM holds at once (the waves below assume as much)
_LATENCY_WARPS = 8  # resident warps an SM needs to keep dot latencies covered
# A grid of >= 2 programs per SM is taken when its estimate is at most this factor of the
# cheapest (csrc/cuda/lowrank_kernels.cuh, kFillMargin: the same rule).
_FILL_MARGIN = 1.25


def _mma_spread(programs: int, warps: int, sms: int) -> float:
    """Factor on a perfectly spread MMA time: the busiest SM runs ceil(programs / SMs)
    programs against a mean of programs / SMs (1 / fill below one per SM), and fewer than
    _LATENCY_WARPS resident warps leave dot latency exposed."""
    programs = max(programs, 1)
    busiest = _cdiv(programs, sms)
    occupancy = min(1.0, min(busiest, _RESIDENT_PER_SM) * warps / _LATENCY_WARPS)
    return busiest * sms / programs / occupancy


def _smem_estimate(kind: str, config: tuple, esize: int) -> int:
    """Upper bound on the shared memory (bytes) Triton allocates for a `down` or `up`
    configuration: one (A tile + B tile) buffer per pipeline stage. Exact for the tiles Triton
    lowers to wgmma on sm_90 (BLOCK_M >= 64); the mma.sync tiles (BLOCK_M < 64) often keep one
    stage fewer. The old estimate (every stage of both loops plus t and an fp32 scratch) was
    about 2.4x Triton's figure (163,840 vs 66,560 B). Checked against sm_90 AOT compilations
    (Triton 3.9) of every candidate, row-major and transposed factors: compiled / estimate
    between 0.33 and 1.0, never above (the numbers are in _DOWN_CONFIGS / _UP_CONFIGS).
    """
    if kind == "down":
        bm, br, bk, _, stages = config
        per_stage = (bm * bk + bk * br) * esize
    else:
        bm, bn, br, _, stages = config
        per_stage = (bm * br + br * bn) * esize
    return stages * per_stage


def _mma_rate(kind: str, block_m: int) -> float:
    if kind == "fp32":
        return _MMA_FLOPS_PER_US["fp32"]
    return _MMA_FLOPS_PER_US["wgmma" if block_m >= 64 else "mma"]


def _reduce_cost(M: int, R: int, cfg: tuple, splits: int, reduce: str, sms: int) -> float:
    """Microseconds of summing the partials (csrc/cuda/lowrank_kernels.cuh, reduce_cost_us):
    "last", one program per tile reads its S partials through one SM; "sep", every partial read
    once over the GPU plus one more launch."""
    if splits <= 1:
        return 0.0
    bm, br = cfg[0], cfg[1]
    if reduce == "last":
        return 4.0 * splits * min(M, bm) * br / _SM_L2_BYTES_PER_US
    ldt = _cdiv(R, br) * br
    nbytes = 4.0 * splits * M * ldt + 2.0 * M * ldt
    programs = max(_cdiv(M, bm) * _cdiv(R, br) * _cdiv(bm * br, _REDUCE_CHUNK), 1)
    per_sm = nbytes / min(programs, sms)
    return max(nbytes / (_L2_BYTES_PER_US * sms / _REF_SMS), per_sm / _SM_L2_BYTES_PER_US) + (
        _WAVE_US
    )


def _down_cost(
    M: int, K: int, R: int, cfg: tuple, splits: int, reduce: str, kind: str, sms: int
) -> float:
    bm, br = cfg[0], cfg[1]
    esize = 4 if kind == "fp32" else 2
    rt, rc = _cdiv(M, bm), _cdiv(R, br)
    programs = rt * rc * splits
    scale = sms / _REF_SMS
    x_b, v_b = esize * M * K, esize * R * K
    part_b = 4.0 * splits * M * rc * br if splits > 1 else 0.0
    hbm = (x_b + v_b) / (_HBM_BYTES_PER_US * scale)
    l2 = (x_b * rc + v_b * rt + 2 * part_b) / (_L2_BYTES_PER_US * scale)
    mma = 2.0 * rt * bm * rc * br * K / (_mma_rate(kind, bm) * scale)
    fill = min(1.0, programs / sms)
    spread = _mma_spread(programs, cfg[3], sms)
    waves = _cdiv(programs, _RESIDENT_PER_SM * sms)
    return (
        max(hbm / fill, l2 / fill, mma * spread)
        + _WAVE_US * waves
        + _reduce_cost(M, R, cfg, splits, reduce, sms)
    )


def _up_cost(M: int, N: int, ldt: int, cfg: tuple, kind: str, sms: int) -> float:
    bm, bn = cfg[0], cfg[1]
    esize = 4 if kind == "fp32" else 2
    rt, nt = _cdiv(M, bm), _cdiv(N, bn)
    scale = sms / _REF_SMS
    u_b, y_b, t_b = esize * N * ldt, esize * M * N, esize * M * ldt
    hbm = (u_b + y_b) / (_HBM_BYTES_PER_US * scale)
    l2 = (u_b * rt + t_b * nt + y_b) / (_L2_BYTES_PER_US * scale)
    mma = 2.0 * rt * bm * nt * bn * ldt / (_mma_rate(kind, bm) * scale)
    fill = min(1.0, rt * nt / sms)
    spread = _mma_spread(rt * nt, cfg[3], sms)
    return max(hbm / fill, l2 / fill, mma * spread) + _WAVE_US * _cdiv(
        rt * nt, _RESIDENT_PER_SM * sms
    )


def _slice_for(K: int, splits: int, align: int) -> tuple[int, int]:
    """(slice length, slices): equal slices, a multiple of `align` long, none empty."""
    length = _cdiv(_cdiv(K, max(splits, 1)), align) * align
    return length, _cdiv(K, length)


@functools.lru_cache(maxsize=1024)
def _choose_config_cached(
    M: int,
    K: int,
    N: int,
    R: int,
    dtype: torch.dtype,
    num_sms: int,
    smem_budget: int,
    fill_margin: float | None,
) -> tuple:
    kind = "fp32" if dtype == torch.float32 else "16bit"
    esize = 4 if kind == "fp32" else 2
    M = max(M, 1)
    # A grid of >= 2 programs per SM, the cheapest such (tile, split, reduction) by the cost
    # model, whenever the work splits that far and it is within `fill_margin` (default
    # _FILL_MARGIN) of the cheapest grid of all; otherwise that cheapest grid
    # (csrc/cuda/lowrank_kernels.cuh: the same rule).
    best = filling = None
    for cfg in _DOWN_CONFIGS[kind]:
        if _smem_estimate("down", cfg, esize) > smem_budget:
            continue
        bm, br, bk = cfg[:3]
        base = _cdiv(M, bm) * _cdiv(R, br)
        max_splits = max(1, min(_cdiv(3 * num_sms, base), _cdiv(K, 2 * bk), 64))
        seen = set()
        for request in range(1, max_splits + 1):
            slice_len, splits = _slice_for(K, request, bk)
            if splits in seen:
                continue
            seen.add(splits)
            fills = num_sms > 1 and base * splits >= 2 * num_sms
            for reduce in ("last", "sep") if splits > 1 else ("last",):
                cost = _down_cost(M, K, R, cfg, splits, reduce, kind, num_sms)
                choice = (cost, cfg, splits, slice_len, reduce)
                if best is None or cost < best[0]:
                    best = choice
                if fills and (filling is None or cost < filling[0]):
                    filling = choice
    margin = _FILL_MARGIN if fill_margin is None else fill_margin
    if filling is not None and filling[0] <= margin * best[0]:
        best = filling
    if best is None:  # nothing fits the budget: the smallest tiles
        cfg = _DOWN_CONFIGS[kind][0]
        best = (0.0, cfg, 1, _cdiv(K, cfg[2]) * cfg[2], "last")
    _, down, splits, slice_len, reduce = best
    ldt = _cdiv(R, down[1]) * down[1]

    up_best = None
    for cfg in _UP_CONFIGS[kind]:
        if _smem_estimate("up", cfg, esize) > smem_budget:
            continue
        cost = _up_cost(M, N, ldt, cfg, kind, num_sms)
        if up_best is None or cost < up_best[0]:
            up_best = (cost, cfg)
    up = up_best[1] if up_best is not None else _UP_CONFIGS[kind][0]
    return (
        ("DOWN", down),
        ("SPLITS", splits),
        ("SLICE", slice_len),
        ("REDUCE", reduce),
        ("LDT", ldt),
        ("UP", up),
    )


def choose_config(
    M: int,
    in_features: int,
    out_features: int,
    rank: int,
    dtype: torch.dtype,
    num_sms: int,
    smem_budget: int | None = None,
    fill_margin: float | None = None,
) -> dict:
    """Launch configuration for ``launch_lowrank_linear`` (cost model, no autotuning).

    Args:
        M, in_features, out_features, rank: problem sizes of
            ``y[M, out] = (x[M, in] @ V[rank, in].T) @ U[out, rank].T``.
        dtype: torch.float32, torch.float16 or torch.bfloat16.
        num_sms: streaming multiprocessors of the target device (1 for the CPU interpreter:
            fewest, largest programs).
        smem_budget: bytes of shared memory a program may use (default 96 KiB: consumer GPUs
            too); configurations whose estimate exceeds it are skipped.
        fill_margin: a grid of >= 2 programs per SM is taken when the work splits that far
            and its estimate is within this factor of the cheapest (None: _FILL_MARGIN, 1.25;
            1.0: the cheapest; ``LRKERNELS_LOWRANK_FILL_MARGIN`` sets it for the launcher).

    Returns:
        dict with DOWN = (BLOCK_M, BLOCK_R, BLOCK_K, num_warps, num_stages) of the first
        kernel, SPLITS (K slices) and SLICE (their length, a multiple of BLOCK_K), REDUCE
        ("last" or "sep": who sums the partials when SPLITS > 1), LDT (t's leading dimension:
        rank rounded up to BLOCK_R), UP = (BLOCK_M, BLOCK_N, BLOCK_R, num_warps, num_stages) of
        the second.
    """
    if dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"lowrank: unsupported dtype {dtype}")
    budget = 96 * 1024 if smem_budget is None else int(smem_budget)
    return dict(
        _choose_config_cached(
            int(M),
            int(in_features),
            int(out_features),
            int(rank),
            dtype,
            max(1, int(num_sms)),
            budget,
            None if fill_margin is None else float(fill_margin),
        )
    )


def _env_fill_margin() -> float | None:
    """LRKERNELS_LOWRANK_FILL_MARGIN (the CUDA backend reads the same variable), or None."""
    value = os.environ.get("LRKERNELS_LOWRANK_FILL_MARGIN")
    return float(value) if value else None


@functools.cache
def _device_limits(device_type: str, index: int | None) -> tuple[int, int | None]:
    """(SM count, shared-memory budget) of a device; the CPU interpreter gets (1, None)."""
    if device_type == "cuda":
        idx = torch.cuda.current_device() if index is None else index
        props = torch.cuda.get_device_properties(idx)
        optin = getattr(props, "shared_memory_per_block_optin", 0) or 96 * 1024
        return props.multi_processor_count, int(optin)
    # Interpreter on CPU: programs run one after another, so fewer is faster.
    return 1, None


def _needs_int64(t: torch.Tensor, pad: int) -> bool:
    """True if addressing t (plus masked-out lanes up to `pad` past each dim) overflows int32."""
    span = sum((size + pad) * stride for size, stride in zip(t.shape, t.stride(), strict=True))
    return span > _INT32_LIMIT


def launch_lowrank_linear(
    x2d: torch.Tensor,
    U: torch.Tensor,
    V: torch.Tensor,
    bias: torch.Tensor | None,
    out: torch.Tensor,
    *,
    config: dict | None = None,
) -> None:
    """Writes out (M, out_features) = (x2d·Vᵀ)·Uᵀ + bias.

    x2d (M, in), U (out, rank), V (rank, in), bias (out,) or None, out preallocated
    (M, out) in x2d's dtype. All on the same device; any strides. Dtype float32, float16
    or bfloat16 (all the same); float32 accumulation; for 16-bit dtypes x2d·Vᵀ is rounded
    to the dtype before the second product. ``config`` overrides :func:`choose_config`
    (tests and benchmarks); it must contain the same keys (SPLITS is then clamped so that no
    slice is empty, and SLICE recomputed; REDUCE may be left out: "last").
    """
    if x2d.dim() != 2 or U.dim() != 2 or V.dim() != 2 or out.dim() != 2:
        raise ValueError("lowrank: x2d, U, V and out must be 2-D")
    M, in_features = x2d.shape
    out_features, rank = U.shape
    if V.shape[0] != rank or V.shape[1] != in_features:
        raise ValueError(f"lowrank: V has shape {tuple(V.shape)}, expected ({rank}, {in_features})")
    if out.shape[0] != M or out.shape[1] != out_features:
        raise ValueError(
            f"lowrank: out has shape {tuple(out.shape)}, expected ({M}, {out_features})"
        )
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != out_features):
        raise ValueError(f"lowrank: bias must have shape ({out_features},)")
    dtype = x2d.dtype
    if dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"lowrank: unsupported dtype {dtype}")
    for name, t in (("U", U), ("V", V), ("out", out), ("bias", bias)):
        if t is not None and t.dtype != dtype:
            raise TypeError(f"lowrank: {name} has dtype {t.dtype}, expected {dtype}")

    if M == 0 or out_features == 0:
        return  # nothing to write

    if config is None:
        num_sms, smem_budget = _device_limits(x2d.device.type, x2d.device.index)
        config = choose_config(
            M, in_features, out_features, rank, dtype, num_sms, smem_budget, _env_fill_margin()
        )
    bm, br, bk, down_warps, down_stages = config["DOWN"]
    ubm, ubn, ubr, up_warps, up_stages = config["UP"]
    slice_len, splits = _slice_for(in_features, config["SPLITS"], bk)
    ldt = _cdiv(rank, br) * br
    if config.get("LDT", ldt) != ldt:
        raise ValueError(f"lowrank: config LDT must be rank rounded up to BLOCK_R ({ldt})")
    row_tiles, rank_chunks = _cdiv(M, bm), _cdiv(rank, br)
    tiles = row_tiles * rank_chunks
    reduce = config.get("REDUCE", "last")
    if reduce not in ("last", "sep"):
        raise ValueError(f"lowrank: config REDUCE must be 'last' or 'sep', got {reduce!r}")
    separate = splits > 1 and reduce == "sep"

    dev = x2d.device
    t = torch.empty((M, ldt), device=dev, dtype=dtype)
    if splits > 1:
        partial = torch.empty(tiles * splits * bm * br, device=dev, dtype=torch.float32)
        # the separate reduction needs no counters: a dummy pointer, never read
        counters = partial if separate else torch.zeros(tiles, device=dev, dtype=torch.int32)
    else:
        partial = counters = t  # unused (SPLIT=False compiles them away)

    pad = 2 * max(bm, br, bk, ubm, ubn, ubr)
    tensors = (x2d, U, V, out, t) if bias is None else (x2d, U, V, out, t, bias)
    index_64 = any(_needs_int64(a, pad) for a in tensors) or tiles * splits * bm * br > (
        _INT32_LIMIT
    )
    ieee = dtype == torch.float32

    launchable(_lowrank_down_kernel)[(tiles * splits,)](
        x2d,
        V,
        t,
        partial,
        counters,
        M,
        in_features,
        rank,
        ldt,
        slice_len,
        splits,
        rank_chunks,
        x2d.stride(0),
        x2d.stride(1),
        V.stride(0),
        V.stride(1),
        SPLIT=splits > 1,
        SEPARATE_REDUCE=separate,
        IEEE_FP32=ieee,
        INDEX_64=index_64,
        BLOCK_M=bm,
        BLOCK_R=br,
        BLOCK_K=bk,
        num_warps=down_warps,
        num_stages=down_stages,
    )

    if separate:
        chunks = _cdiv(bm * br, _REDUCE_CHUNK)
        launchable(_lowrank_reduce_kernel)[(tiles * chunks,)](
            partial,
            t,
            M,
            ldt,
            splits,
            rank_chunks,
            INDEX_64=index_64,
            BLOCK_M=bm,
            BLOCK_R=br,
            CHUNK=_REDUCE_CHUNK,
            CHUNKS=chunks,
            num_warps=4,
        )

    # bias=None: HAS_BIAS=False compiles the bias load away; `out` is a dummy pointer.
    col_tiles = _cdiv(out_features, ubn)
    launchable(_lowrank_up_kernel)[(_cdiv(M, ubm) * col_tiles,)](
        t,
        U,
        out if bias is None else bias,
        out,
        M,
        out_features,
        rank,
        ldt,
        col_tiles,
        U.stride(0),
        U.stride(1),
        0 if bias is None else bias.stride(0),
        out.stride(0),
        out.stride(1),
        HAS_BIAS=bias is not None,
        IEEE_FP32=ieee,
        INDEX_64=index_64,
        BLOCK_M=ubm,
        BLOCK_N=ubn,
        BLOCK_R=ubr,
        num_warps=up_warps,
        num_stages=up_stages,
    )
