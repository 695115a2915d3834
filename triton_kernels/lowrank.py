"""Fused low-rank linear layer in Triton: ``y = (x @ V.T) @ U.T + bias``.

Shapes: ``x`` (M, in), ``V`` (rank, in), ``U`` (out, rank), ``bias`` (out,) or None,
``y`` (M, out). Dtypes: float32, float16 or bfloat16, all operands the same dtype.
Products accumulate in float32. For float16/bfloat16 the intermediate ``t = x @ V.T``
(float32 accumulator) is rounded to the input dtype before the second product, which
reproduces the numerics of two separate torch matmuls and lets the second product run
on tensor cores. The bias is added to the float32 accumulator, then the result is cast
to the output dtype. Every tensor may have arbitrary strides.

Design (one kernel launch, no intermediate in global memory):

* A program owns ``BLOCK_M`` rows of ``x`` and a contiguous range of output-column
  tiles of width ``BLOCK_N``. Grid = ``(cdiv(M, BLOCK_M), SPLIT_N)``.
* Phase 1 computes ``t[BLOCK_M, RANK_PAD] = x_tile @ V.T`` by looping over ``in`` in
  ``BLOCK_K`` steps. ``RANK_PAD`` (a power of two >= max(rank, 16)) is a compile-time
  constant, so the whole rank-r intermediate of the row tile stays on chip.
* Phase 2 walks the program's output tiles: ``acc = t @ U_tile.T (+ bias)``, store.
* ``SPLIT_N > 1`` splits the output columns across programs so that small ``M`` still
  fills the GPU. Every split recomputes its own ``t``: that is cheap next to the memory
  traffic at the ranks this library targets (phase 1 costs ``in x rank`` multiply-adds
  per row, V is re-read from L2, not HBM, and nothing round-trips through global
  memory). It is not free when ``in x rank`` is large next to a program's share of
  ``out x rank``, so :func:`choose_config` picks ``SPLIT_N`` with a cost model that
  charges for the recomputation.
* ``rank > 512``: the rank is processed in chunks of ``_RANK_CHUNK`` (64; 32 for
  float32) columns inside the kernel, accumulating every chunk's contribution into
  ``acc``. ``t`` for a chunk is then recomputed for every output tile (correctness over
  speed; such ranks are not "low rank" and are better served by two dense matmuls).

Configuration comes from a plain Python heuristic (:func:`choose_config`) rather than
``triton.autotune`` so the launch stays ``torch.compile``-friendly (the kernel is
launched through ``torch.library.wrap_triton``, see ``_launch.launchable``) and fast under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._launch import launchable

__all__ = ["choose_config", "launch_lowrank_linear"]

# Largest rank that is kept whole on chip (RANK_PAD <= 512); above it the rank is chunked.
_MAX_FUSED_RANK = 512
# Chunk widths (columns of t per step) for rank > _MAX_FUSED_RANK, 16-bit and float32.
# Powers of two, at most 256. Narrow because the chunked kernel keeps the float32 t chunk,
# its rounded copy, the U tile and acc alive together (wider chunks spill registers).
_RANK_CHUNK = 64
_RANK_CHUNK_FP32 = 32
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
def _project_rows(
    x_ptr,
    v_ptr,
    offs_m,
    m_mask,
    offs_r,
    r_mask,
    offs_k0,
    K,
    stride_xm,
    stride_xk,
    stride_vr,
    stride_vk,
    BLOCK_M: tl.constexpr,
    RANK_PAD: tl.constexpr,
    BLOCK_K: tl.constexpr,
    IEEE_FP32: tl.constexpr,
):
    """Phase 1: t[BLOCK_M, RANK_PAD] = x[offs_m, :] @ V[offs_r, :].T in float32.

    Masked loads zero-fill rows >= M, columns >= in and rank rows >= rank, so padded
    entries of t are exactly zero and contribute nothing to phase 2.
    """
    t = tl.zeros((BLOCK_M, RANK_PAD), dtype=tl.float32)
    x_rows = x_ptr + offs_m[:, None] * stride_xm
    # V is read as its transpose (BLOCK_K x RANK_PAD) so the product is a plain dot.
    vt_cols = v_ptr + offs_r[None, :] * stride_vr
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + offs_k0
        k_mask = offs_k < K
        x_tile = tl.load(
            x_rows + offs_k[None, :] * stride_xk,
            mask=m_mask[:, None] & k_mask[None, :],
            other=0.0,
        )
        vt_tile = tl.load(
            vt_cols + offs_k[:, None] * stride_vk,
            mask=k_mask[:, None] & r_mask[None, :],
            other=0.0,
        )
        t = _mma(x_tile, vt_tile, t, IEEE_FP32)
    return t


@triton.jit
def _load_ut(u_ptr, offs_r, r_mask, offs_n, n_mask, stride_un, stride_ur):
    """U[offs_n, offs_r] read as its transpose, (RANK_PAD, BLOCK_N), zero-filled."""
    return tl.load(
        u_ptr + offs_r[:, None] * stride_ur + offs_n[None, :] * stride_un,
        mask=r_mask[:, None] & n_mask[None, :],
        other=0.0,
    )


@triton.jit
def _store_tile(
    acc,
    y_ptr,
    bias_ptr,
    offs_m,
    m_mask,
    offs_n,
    n_mask,
    stride_ym,
    stride_yn,
    stride_b,
    HAS_BIAS: tl.constexpr,
):
    """Adds the bias to the float32 accumulator, casts to the output dtype, stores."""
    if HAS_BIAS:
        b = tl.load(bias_ptr + offs_n * stride_b, mask=n_mask, other=0.0)
        acc += b.to(tl.float32)[None, :]
    tl.store(
        y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn,
        acc.to(y_ptr.dtype.element_ty),
        mask=m_mask[:, None] & n_mask[None, :],
    )


@triton.jit
def _lowrank_linear_kernel(
    x_ptr,
    v_ptr,
    u_ptr,
    bias_ptr,
    y_ptr,
    M,
    K,
    N,
    R,
    n_tiles,
    tiles_per_split,
    stride_xm,
    stride_xk,
    stride_vr,
    stride_vk,
    stride_un,
    stride_ur,
    stride_b,
    stride_ym,
    stride_yn,
    HAS_BIAS: tl.constexpr,
    RANK_CHUNKED: tl.constexpr,
    IEEE_FP32: tl.constexpr,
    INDEX_64: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    RANK_PAD: tl.constexpr,
):
    """y[M, N] = (x[M, K] @ V[R, K].T) @ U[N, R].T (+ bias[N]).

    Program (pid_m, pid_n) owns rows [pid_m * BLOCK_M, +BLOCK_M) and output-column tiles
    [pid_n * tiles_per_split, min(+tiles_per_split, n_tiles)) of width BLOCK_N.
    RANK_CHUNKED=False: RANK_PAD >= R, t is computed once and reused for every tile.
    RANK_CHUNKED=True: the rank is walked in RANK_PAD-wide chunks for every tile.
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r0 = tl.arange(0, RANK_PAD)
    offs_k0 = tl.arange(0, BLOCK_K)
    offs_n0 = tl.arange(0, BLOCK_N)
    if INDEX_64:
        # Some tensor spans more than 2**31 elements: do all address math in int64.
        offs_m = offs_m.to(tl.int64)
        offs_r0 = offs_r0.to(tl.int64)
        offs_k0 = offs_k0.to(tl.int64)
        offs_n0 = offs_n0.to(tl.int64)
    m_mask = offs_m < M

    tile_begin = pid_n * tiles_per_split
    tile_end = tl.minimum(tile_begin + tiles_per_split, n_tiles)

    if not RANK_CHUNKED:
        r_mask = offs_r0 < R
        t = _project_rows(
            x_ptr,
            v_ptr,
            offs_m,
            m_mask,
            offs_r0,
            r_mask,
            offs_k0,
            K,
            stride_xm,
            stride_xk,
            stride_vr,
            stride_vk,
            BLOCK_M,
            RANK_PAD,
            BLOCK_K,
            IEEE_FP32,
        )
        # Round t to the input dtype (no-op for float32): same numerics as two torch
        # matmuls, and the second product runs on 16-bit tensor cores.
        t = t.to(u_ptr.dtype.element_ty)
        for tile in range(tile_begin, tile_end):
            offs_n = tile * BLOCK_N + offs_n0
            n_mask = offs_n < N
            ut = _load_ut(u_ptr, offs_r0, r_mask, offs_n, n_mask, stride_un, stride_ur)
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            acc = _mma(t, ut, acc, IEEE_FP32)
            _store_tile(
                acc,
                y_ptr,
                bias_ptr,
                offs_m,
                m_mask,
                offs_n,
                n_mask,
                stride_ym,
                stride_yn,
                stride_b,
                HAS_BIAS,
            )
    else:
        # rank > 512: a whole-rank t would not fit on chip. Each chunk of t is
        # recomputed per output tile (correctness over speed at such ranks). Rounding t
        # per chunk is identical to rounding the full t: every element is a complete sum
        # over `in`.
        for tile in range(tile_begin, tile_end):
            offs_n = tile * BLOCK_N + offs_n0
            n_mask = offs_n < N
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for r0 in range(0, R, RANK_PAD):
                offs_r = r0 + offs_r0
                r_mask = offs_r < R
                t = _project_rows(
                    x_ptr,
                    v_ptr,
                    offs_m,
                    m_mask,
                    offs_r,
                    r_mask,
                    offs_k0,
                    K,
                    stride_xm,
                    stride_xk,
                    stride_vr,
                    stride_vk,
                    BLOCK_M,
                    RANK_PAD,
                    BLOCK_K,
                    IEEE_FP32,
                )
                ut = _load_ut(u_ptr, offs_r, r_mask, offs_n, n_mask, stride_un, stride_ur)
                acc = _mma(t.to(u_ptr.dtype.element_ty), ut, acc, IEEE_FP32)
            _store_tile(
                acc,
                y_ptr,
                bias_ptr,
                offs_m,
                m_mask,
                offs_n,
                n_mask,
                stride_ym,
                stride_yn,
                stride_b,
                HAS_BIAS,
            )


# --------------------------------------------------------------------------------------
# Host side: configuration heuristic and launch.
# --------------------------------------------------------------------------------------


def _next_pow2(n: int) -> int:
    return 1 << (max(int(n), 1) - 1).bit_length()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _dtype_size(dtype: torch.dtype) -> int:
    return 4 if dtype == torch.float32 else 2


def _prev_pow2(n: int) -> int:
    return 1 << (max(int(n), 1).bit_length() - 1)


# Default shared-memory budget of choose_config (bytes per program). Conservative: fits
# consumer GPUs (99 KiB per block) as well as A100/H100; launch_lowrank_linear passes a
# budget derived from the device instead.
_DEFAULT_SMEM_BUDGET = 96 * 1024


def _smem_estimate(block_m, block_n, block_k, rank_pad, esize, stages):
    """Upper bound on the kernel's shared memory (bytes), fitted to Triton's own numbers.

    Triton allocates the pipeline buffers of both loops at the same time: per stage one
    x tile + one V tile (phase 1) and one U tile (phase 2); plus a copy of t staged for the
    second dot and float32 scratch for the accumulator's layout change before the store.
    Checked against ~350 sm_90 compilations of this kernel (actual <= 0.87 x estimate).
    """
    per_stage = (block_m * block_k + block_k * rank_pad + rank_pad * block_n) * esize
    return stages * per_stage + block_m * rank_pad * esize + block_m * block_n * 4


@functools.lru_cache(maxsize=1024)
def _choose_config_cached(
    M: int,
    in_features: int,
    out_features: int,
    rank: int,
    dtype: torch.dtype,
    num_sms: int,
    smem_budget: int,
) -> tuple:
    esize = _dtype_size(dtype)
    fp32 = esize == 4
    chunked = rank > _MAX_FUSED_RANK
    if chunked:
        # float32 dots run on FMA units with operands held in registers: narrow chunks.
        rank_pad = _RANK_CHUNK_FP32 if fp32 else _RANK_CHUNK
    else:
        rank_pad = max(16, _next_pow2(rank))

    # Register budgets (elements per program) for t (BLOCK_M x RANK_PAD) and for acc
    # (BLOCK_M x BLOCK_N). The limits come from sm_90 compilations of this kernel (Triton
    # 3.8, register / spill counts from cuobjdump): inside them nothing spills.
    # 16-bit: tensor-core dots, 16K-element tiles at 8 warps.
    # float32: IEEE dots lower to FMA loops whose operand slices also live in registers,
    # so much smaller tiles (and BLOCK_M <= 32 in the chunked kernel, which keeps t of the
    # phase-1 loop and acc alive together).
    t_budget = 8192 if fp32 else 16384
    acc_budget = 2048 if fp32 else 16384

    # BLOCK_M: cover M for small M (M=1 still needs 16, the minimum dot size), at most
    # 128, and shrink it for large ranks so that t fits its budget.
    block_m = min(max(16, _next_pow2(M)), 32 if (fp32 and chunked) else 128)
    block_m = max(16, min(block_m, t_budget // rank_pad))

    # BLOCK_N: up to 128 output columns per tile, limited by the accumulator budget and by
    # the size of one U tile (RANK_PAD x BLOCK_N: <= 16K 16-bit elements; <= 4K float32
    # elements, beyond which the FMA dot spills on sm_80).
    block_n = min(128, max(16, _next_pow2(out_features)), acc_budget // block_m)
    block_n = max(16, min(block_n, _prev_pow2((4096 if fp32 else 16384) // rank_pad)))

    # BLOCK_K: 64 (16-bit) / 32 (float32 and the chunked kernel, whose nested loops spill
    # at 64) input features per phase-1 step, limited so that one x tile + V tile stays
    # <= 32 KiB.
    block_k = min(32 if (fp32 or chunked) else 64, max(16, _next_pow2(in_features)))
    block_k = max(16, min(block_k, _prev_pow2(32768 // ((block_m + rank_pad) * esize))))

    # num_stages: as deep a software pipeline (up to 4) as the shared-memory budget allows;
    # if even 2 stages do not fit (small budgets, large ranks), narrow the tiles first.
    while _smem_estimate(block_m, block_n, block_k, rank_pad, esize, 2) > smem_budget:
        if block_n > 16:
            block_n //= 2
        elif block_k > 16:
            block_k //= 2
        elif block_m > 16:
            block_m //= 2
        else:
            break  # smallest tiles; nothing left to shrink
    num_stages = 2
    for stages in (4, 3):
        if _smem_estimate(block_m, block_n, block_k, rank_pad, esize, stages) <= smem_budget:
            num_stages = stages
            break

    # num_warps: float32 and the chunked kernel always 8 (fewer registers per thread);
    # 16-bit 8 once a tile reaches 8K elements (4 warps spill there at large ranks), else 4.
    if fp32 or chunked or max(block_m * rank_pad, block_m * block_n) >= 8192:
        num_warps = 8
    else:
        num_warps = 4

    # SPLIT_N: minimise a simple traffic model (units: elements moved) over the number of
    # column splits:
    #   per program: phase 1 reads the x rows + all of V (once, or once per tile when the
    #     rank is chunked), phase 2 reads its U tiles and writes its y tiles, plus a fixed
    #     launch/latency cost;
    #   critical path = waves * per-program traffic, waves = ceil(programs / num_sms)
    #     (each SM streams at its own share of bandwidth);
    #   aggregate = total traffic / (0.75 * num_sms): the memory system delivers less than
    #     num_sms x per-SM bandwidth, which caps how much redundant phase-1 traffic
    #     (V re-read by every split) is free. The 0.75 is a rough guess, not measured.
    # More splits shorten each program's phase 2 but every split re-runs phase 1, so the
    # optimum balances GPU fill against redundant phase-1 work. Ties go to fewer splits.
    m_tiles = _cdiv(max(M, 1), block_m)
    n_tiles = _cdiv(out_features, block_n)
    rank_work = _cdiv(rank, rank_pad) * rank_pad
    phase1 = in_features * (block_m + rank_work)
    per_tile = block_n * (rank_work + block_m)
    fixed_cost = 4096
    max_split = min(n_tiles, max(1, _cdiv(2 * num_sms, m_tiles)))
    best = None
    for split in range(1, max_split + 1):
        tiles_per_split = _cdiv(n_tiles, split)
        if _cdiv(n_tiles, tiles_per_split) != split:
            continue  # same work distribution as a smaller split count
        programs = m_tiles * split
        phase1_reps = tiles_per_split if chunked else 1
        per_program = phase1_reps * phase1 + tiles_per_split * per_tile + fixed_cost
        critical = _cdiv(programs, num_sms) * per_program
        aggregate = 4 * programs * per_program // (3 * num_sms)
        cost = max(critical, aggregate)
        if best is None or cost < best[0]:
            best = (cost, split)
    split_n = best[1] if best is not None else 1

    return (
        ("BLOCK_M", block_m),
        ("BLOCK_N", block_n),
        ("BLOCK_K", block_k),
        ("RANK_PAD", rank_pad),
        ("RANK_CHUNKED", chunked),
        ("SPLIT_N", split_n),
        ("num_warps", num_warps),
        ("num_stages", num_stages),
    )


def choose_config(
    M: int,
    in_features: int,
    out_features: int,
    rank: int,
    dtype: torch.dtype,
    num_sms: int,
    smem_budget: int | None = None,
) -> dict:
    """Launch configuration for ``launch_lowrank_linear`` (plain heuristic, no autotuning).

    Args:
        M, in_features, out_features, rank: problem sizes of
            ``y[M, out] = (x[M, in] @ V[rank, in].T) @ U[out, rank].T``.
        dtype: torch.float32, torch.float16 or torch.bfloat16.
        num_sms: number of streaming multiprocessors of the target device (use 1 for the
            CPU interpreter: fewest, largest programs).
        smem_budget: bytes of shared memory the estimate may use (only affects
            num_stages); defaults to a conservative 96 KiB.

    Returns:
        dict with BLOCK_M, BLOCK_N, BLOCK_K, RANK_PAD (power of two >= max(rank, 16), or
        the chunk width when rank > 512), RANK_CHUNKED, SPLIT_N, num_warps, num_stages.
    """
    if dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"lowrank: unsupported dtype {dtype}")
    budget = _DEFAULT_SMEM_BUDGET if smem_budget is None else int(smem_budget)
    return dict(
        _choose_config_cached(
            int(M),
            int(in_features),
            int(out_features),
            int(rank),
            dtype,
            max(1, int(num_sms)),
            budget,
        )
    )


@functools.cache
def _device_limits(device_type: str, index: int | None) -> tuple[int, int | None]:
    """(SM count, shared-memory budget) of a device; the CPU interpreter gets (1, None)."""
    if device_type == "cuda":
        idx = torch.cuda.current_device() if index is None else index
        props = torch.cuda.get_device_properties(idx)
        optin = getattr(props, "shared_memory_per_block_optin", 0) or _DEFAULT_SMEM_BUDGET
        # _smem_estimate is an upper bound already; keep 10% headroom for compiler drift.
        return props.multi_processor_count, int(optin * 0.9)
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
    (tests and benchmarks); it must contain the same keys.
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
        config = choose_config(M, in_features, out_features, rank, dtype, num_sms, smem_budget)
    block_m = config["BLOCK_M"]
    block_n = config["BLOCK_N"]
    n_tiles = _cdiv(out_features, block_n)
    tiles_per_split = _cdiv(n_tiles, max(1, min(config["SPLIT_N"], n_tiles)))
    split_n = _cdiv(n_tiles, tiles_per_split)  # no empty programs
    grid = (_cdiv(M, block_m), split_n)

    pad = 2 * max(block_m, block_n, config["BLOCK_K"], config["RANK_PAD"])
    tensors = (x2d, U, V, out) if bias is None else (x2d, U, V, out, bias)
    index_64 = any(_needs_int64(t, pad) for t in tensors)

    # bias=None: HAS_BIAS=False compiles the bias load away; `out` is a dummy pointer.
    bias_arg = out if bias is None else bias
    stride_b = 0 if bias is None else bias.stride(0)

    launchable(_lowrank_linear_kernel)[grid](
        x2d,
        V,
        U,
        bias_arg,
        out,
        M,
        in_features,
        out_features,
        rank,
        n_tiles,
        tiles_per_split,
        x2d.stride(0),
        x2d.stride(1),
        V.stride(0),
        V.stride(1),
        U.stride(0),
        U.stride(1),
        stride_b,
        out.stride(0),
        out.stride(1),
        HAS_BIAS=bias is not None,
        RANK_CHUNKED=bool(config["RANK_CHUNKED"]),
        IEEE_FP32=dtype == torch.float32,
        INDEX_64=index_64,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=config["BLOCK_K"],
        RANK_PAD=config["RANK_PAD"],
        num_warps=config["num_warps"],
        num_stages=config["num_stages"],
    )
