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

Numerics. Each weight tile is dequantized in registers as ``q.to(float32) * s`` (float32),
then cast to the activation dtype and fed to ``tl.dot`` together with the activation tile;
the dot accumulates in float32, the bias is added to the float32 accumulator and the result
is cast once at the end. Rounding the dequantized weight to the activation dtype is exactly
what materialising ``W = (q.float() * s).to(dtype)`` and calling ``F.linear(x, W, bias)``
does, so the kernels match torch's dequantize-then-matmul up to summation order. The
full-precision weight is never written to global memory: only int8 bytes (plus the scales)
are streamed, which is the point of weight-only quantization for memory-bound shapes.
float32 dots use ``input_precision="ieee"`` (no TF32).

Design:

* Forward: a program owns a (BLOCK_M, BLOCK_N) tile of y and walks its K range in BLOCK_K
  steps. The q tile is read as its transpose (BLOCK_K, BLOCK_N), so the product is a plain
  ``x_tile @ w_tile``. Per-channel scales are loaded once per program; with groups,
  BLOCK_K divides G, so a k-tile lies inside one group and needs a single scale column,
  loaded once per k step as a (BLOCK_N,) vector.
* Input gradient: a program owns a (BLOCK_M, BLOCK_K) tile of dx and walks N in BLOCK_N
  steps, reading q tiles (BLOCK_N, BLOCK_K) as stored (contiguous along K). Per-channel
  scales are one value per row of the tile. With groups, when BLOCK_K divides G the tile
  again needs one scale column (a (BLOCK_N,) load); otherwise the scales are gathered
  element-wise, ``s[n, k // G]`` as a masked 2-D load.
* Split reduction (both kernels): when the output tiles alone cannot fill the GPU (decode:
  M <= 16 gives one row tile), the reduction dimension is split over SPLIT programs. Each
  writes a float32 partial into a workspace (SPLIT, M, cols) allocated by the launcher; a
  second small kernel sums the partials in a fixed order (split 0, 1, ...), adds the bias
  and casts. The result is deterministic (no atomics). With SPLIT == 1 the main kernel
  adds the bias and writes the output itself; both cases share one kernel body, since a
  partial is "the output without bias, in float32".
* Every load is masked and zero-filled (activations, int8 weights and scales), so M, N, K
  need not be multiples of the blocks.

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

__all__ = ["choose_config", "launch_int8_linear", "launch_int8_linear_grad_input"]

_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Offsets at or beyond this need 64-bit index arithmetic.
_INT32_LIMIT = 2**31 - 1
# Default shared-memory budget of choose_config (fits consumer GPUs as well as A100/H100);
# the launchers pass a budget derived from the device.
_DEFAULT_SMEM_BUDGET = 96 * 1024
# Split reduction: at least this many reduction steps per split, at most this many splits.
_MIN_STEPS_PER_SPLIT = 4
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
def _int8_linear_fwd_kernel(
    x_ptr,
    q_ptr,
    s_ptr,
    bias_ptr,
    out_ptr,
    M,
    N,
    K,
    k_per_split,
    stride_xm,
    stride_xk,
    stride_qn,
    stride_qk,
    stride_sn,
    stride_sg,
    stride_b,
    stride_os,
    stride_om,
    stride_on,
    GROUP_SIZE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    IEEE_FP32: tl.constexpr,
    INDEX_64: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """out[pid_s] (M, N) = x[:, ks] @ dequant(q[:, ks], s).T (+ bias), ks = split pid_s's K range.

    Grid (cdiv(M, BLOCK_M), cdiv(N, BLOCK_N), SPLIT). Split pid_s covers
    K in [pid_s * k_per_split, min(+k_per_split, K)); k_per_split is a multiple of BLOCK_K.
    Without a split, stride_os is 0 and out is y itself; with one, out is the float32
    workspace and HAS_BIAS is False (the reduce kernel adds it).
    GROUP_SIZE == 0: per-channel scales s (N,); else s (N, K / GROUP_SIZE) and BLOCK_K
    divides GROUP_SIZE, so the k-tile starting at k0 uses the single scale column k0 // G.
    """
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

    x_rows = x_ptr + offs_m[:, None] * stride_xm
    # q (N, K) read as its transpose: a (BLOCK_K, BLOCK_N) tile per step.
    qt_cols = q_ptr + offs_n[None, :] * stride_qn
    s_rows = s_ptr + offs_n * stride_sn

    if GROUP_SIZE == 0:
        # Per-channel scales: one float32 vector for the whole K loop. Masked lanes read 0.
        scale = tl.load(s_rows, mask=n_mask, other=0.0).to(tl.float32)

    k_begin = pid_s * k_per_split
    k_end = tl.minimum(k_begin + k_per_split, K)
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
            scale = tl.load(s_rows + group * stride_sg, mask=n_mask, other=0.0).to(tl.float32)
        # Dequantize in float32, then round to the activation dtype: the same rounding as
        # materialising W = (q.float() * s).to(dtype) for torch's F.linear.
        w_tile = (q_tile.to(tl.float32) * scale[None, :]).to(x_ptr.dtype.element_ty)
        acc = _dot_acc(x_tile, w_tile, acc, IEEE_FP32)

    _write_tile(
        acc, out_ptr + pid_s * stride_os, bias_ptr, offs_m, m_mask, offs_n, n_mask,
        stride_om, stride_on, stride_b, HAS_BIAS,
    )  # fmt: skip


@triton.jit
def _int8_linear_grad_input_kernel(
    dy_ptr,
    q_ptr,
    s_ptr,
    out_ptr,
    M,
    N,
    K,
    n_per_split,
    stride_dym,
    stride_dyn,
    stride_qn,
    stride_qk,
    stride_sn,
    stride_sg,
    stride_os,
    stride_om,
    stride_ok,
    GROUP_SIZE: tl.constexpr,
    SCALE_PER_TILE: tl.constexpr,
    IEEE_FP32: tl.constexpr,
    INDEX_64: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """out[pid_s] (M, K) = dy[:, ns] @ dequant(q[ns, :], s), ns = split pid_s's N range.

    Grid (cdiv(M, BLOCK_M), cdiv(K, BLOCK_K), SPLIT); BLOCK_K is the width of the program's
    dx tile, BLOCK_N the reduction step. n_per_split is a multiple of BLOCK_N.
    Scales: GROUP_SIZE == 0 -> s[n] per tile row. GROUP_SIZE > 0 and SCALE_PER_TILE (BLOCK_K
    divides G) -> the tile lies in one group: s[n, k_start // G] per row. Otherwise each
    element gathers s[n, k // G] (masked 2-D load).
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

    n_begin = pid_s * n_per_split
    n_end = tl.minimum(n_begin + n_per_split, N)
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(n_begin, n_end, BLOCK_N):
        offs_n = n0 + offs_n0
        n_mask = offs_n < N
        dy_tile = tl.load(
            dy_rows + offs_n[None, :] * stride_dyn,
            mask=m_mask[:, None] & n_mask[None, :],
            other=0.0,
        )
        q_tile = tl.load(
            q_cols + offs_n[:, None] * stride_qn,
            mask=n_mask[:, None] & k_mask[None, :],
            other=0,
        )
        if GROUP_SIZE == 0:
            scale = tl.load(s_ptr + offs_n * stride_sn, mask=n_mask, other=0.0)
            w32 = q_tile.to(tl.float32) * scale.to(tl.float32)[:, None]
        elif SCALE_PER_TILE:
            scale = tl.load(s_col + offs_n * stride_sn, mask=n_mask, other=0.0)
            w32 = q_tile.to(tl.float32) * scale.to(tl.float32)[:, None]
        else:
            scale = tl.load(
                s_cols + offs_n[:, None] * stride_sn,
                mask=n_mask[:, None] & k_mask[None, :],
                other=0.0,
            )
            w32 = q_tile.to(tl.float32) * scale.to(tl.float32)
        # Same rounding as a materialised W in the activation dtype (see the forward).
        w_tile = w32.to(dy_ptr.dtype.element_ty)
        acc = _dot_acc(dy_tile, w_tile, acc, IEEE_FP32)

    # No bias in the input gradient: HAS_BIAS=False compiles the bias load away.
    _write_tile(
        acc, out_ptr + pid_s * stride_os, out_ptr, offs_m, m_mask, offs_k, k_mask,
        stride_om, stride_ok, 0, False,
    )  # fmt: skip


@triton.jit
def _split_reduce_kernel(
    ws_ptr,
    bias_ptr,
    out_ptr,
    M,
    C,
    SPLIT,
    stride_ws,
    stride_wm,
    stride_wc,
    stride_b,
    stride_om,
    stride_oc,
    HAS_BIAS: tl.constexpr,
    INDEX_64: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """out (M, C) = sum_s ws[s] (+ bias), summed in the fixed order s = 0, 1, ..., SPLIT-1.

    The fixed order (no atomics) makes split results bitwise reproducible run to run.
    """
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    if INDEX_64:
        offs_m = offs_m.to(tl.int64)
        offs_c = offs_c.to(tl.int64)
    m_mask = offs_m < M
    c_mask = offs_c < C
    mask = m_mask[:, None] & c_mask[None, :]
    ptrs = ws_ptr + offs_m[:, None] * stride_wm + offs_c[None, :] * stride_wc
    acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    for _ in range(0, SPLIT):
        acc += tl.load(ptrs, mask=mask, other=0.0)
        # Pointer increments never form split * stride in 32-bit arithmetic.
        ptrs += stride_ws
    _write_tile(
        acc, out_ptr, bias_ptr, offs_m, m_mask, offs_c, c_mask,
        stride_om, stride_oc, stride_b, HAS_BIAS,
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
) -> tuple:
    esize = 4 if dtype == torch.float32 else 2
    # Output columns and reduction length of the product this config is for.
    cols, red = (K, N) if transposed else (N, K)
    small_m = M <= 16

    # BLOCK_M: 16 is the smallest dot tile (decode, M <= 16); otherwise cover M up to 128.
    # float32 runs the IEEE (FMA) dot with operands in registers: at most 64.
    block_m = 16 if small_m else min(128, _next_pow2(M))
    if esize == 4:
        block_m = min(block_m, 64)

    # Output-column tile: wide (128) for compute-heavy 16-bit shapes; 64 for float32 and
    # for small M, where narrower tiles give more programs for the same weight stream.
    block_c = 128 if (esize == 2 and not small_m) else 64
    block_c = min(block_c, max(16, _next_pow2(cols)))

    # Reduction step: small M is bandwidth-bound on the int8 weight, so take long steps
    # (more bytes in flight per program); large M keeps the x/dy tile in check.
    if esize == 2:
        block_r = 128 if small_m else 64
    else:
        block_r = 32
    block_r = min(block_r, max(16, _next_pow2(red)))

    if group_size:
        if not transposed:
            # Forward: a k-tile must lie inside one group (one scale column per step).
            block_r = _pow2_divisor_at_most(group_size, block_r)
        elif group_size >= 64:
            # Gradient: a dx tile inside one group loads its scales as a vector instead of
            # gathering them per element. Not for G = 32: the tile would get too narrow
            # (dy is re-read once per column tile), so G = 32 uses the 2-D gather.
            block_c = min(block_c, _pow2_divisor_at_most(group_size, block_c))

    # SPLIT: split the reduction when the output tiles fill less than two waves of the GPU.
    # Limits: >= _MIN_STEPS_PER_SPLIT steps per split (amortises the per-program setup),
    # and the workspace round trip (8 bytes per partial element: float32 write + read)
    # stays <= 1/4 of the int8 weight bytes streamed: 8 * SPLIT * M * cols <= cols * red / 4.
    m_tiles = _cdiv(max(M, 1), block_m)
    tiles = m_tiles * _cdiv(cols, block_c)
    steps = _cdiv(red, block_r)
    target = 2 * num_sms
    split = 1
    if num_sms > 1 and tiles < target:
        split = min(
            _cdiv(target, tiles),
            steps // _MIN_STEPS_PER_SPLIT,
            red // (32 * max(M, 1)),
            _MAX_SPLIT,
        )
        split = max(1, split)
        split = _cdiv(steps, _cdiv(steps, split))  # no empty splits

    # num_warps: 8 for the big 128 x 128 16-bit tiles, else 4.
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
) -> dict:
    """Launch configuration of the int8 kernels (plain heuristic, no autotuning).

    Args:
        M: rows of x (forward) or dy (gradient).
        N, K: qweight's shape (out_features, in_features).
        group_size: 0 for per-channel scales, else the group size G.
        dtype: activation dtype, torch.float32, torch.float16 or torch.bfloat16.
        num_sms: streaming multiprocessors of the target device (1 for the CPU
            interpreter: no split, fewest and largest programs).
        transposed: False for the forward (y = x @ W.T, reduction over K), True for the
            input gradient (dx = dy @ W, reduction over N).
        smem_budget: bytes of shared memory the estimate may use (only affects
            num_stages); defaults to a conservative 96 KiB.

    Returns:
        dict with BLOCK_M, BLOCK_N, BLOCK_K (powers of two >= 16), SPLIT, num_warps,
        num_stages. BLOCK_N / BLOCK_K tile qweight's dimensions: in the forward BLOCK_N is
        the output tile and BLOCK_K the reduction step (dividing G with groups); in the
        gradient BLOCK_K is the output (dx column) tile and BLOCK_N the reduction step.
        SPLIT is the number of programs the reduction dimension is split over.
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


def _check_weight(
    op: str,
    act: torch.Tensor,
    act_name: str,
    act_features: int,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    out: torch.Tensor,
    out_shape: tuple[int, int],
    group_size: int,
) -> None:
    """Shape / dtype / device checks shared by both launchers (errors name the op)."""
    if act.dim() != 2 or qweight.dim() != 2 or out.dim() != 2:
        raise ValueError(f"{op}: {act_name}, qweight and out must be 2-D")
    if qweight.dtype != torch.int8:
        raise TypeError(f"{op}: qweight must be int8, got {qweight.dtype}")
    N, K = qweight.shape
    if N < 1 or K < 1:
        raise ValueError(f"{op}: qweight must have N, K >= 1, got {tuple(qweight.shape)}")
    if act.shape[1] != act_features:
        raise ValueError(
            f"{op}: {act_name} has shape {tuple(act.shape)}, expected (M, {act_features})"
        )
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


def _scale_strides(scales: torch.Tensor) -> tuple[int, int]:
    """(stride along N, stride along groups); the group stride is unused per channel."""
    return scales.stride(0), (scales.stride(1) if scales.dim() == 2 else 0)


def _split_plan(red: int, block_r: int, split: int) -> tuple[int, int]:
    """(split count without empty splits, reduction length per split, a multiple of block_r)."""
    steps = _cdiv(red, block_r)
    steps_per_split = _cdiv(steps, max(1, min(int(split), steps)))
    return _cdiv(steps, steps_per_split), steps_per_split * block_r


def _launch_reduce(
    ws: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor, index_64: bool
) -> None:
    """out = ws.sum(0) (+ bias) in a fixed order, cast to out's dtype."""
    split, M, C = ws.shape
    block_m = min(16, _next_pow2(M))
    block_c = min(256, _next_pow2(C))
    grid = (_cdiv(M, block_m), _cdiv(C, block_c))
    launchable(_split_reduce_kernel)[grid](
        ws,
        out if bias is None else bias,  # dummy pointer when there is no bias
        out,
        M,
        C,
        split,
        ws.stride(0),
        ws.stride(1),
        ws.stride(2),
        0 if bias is None else bias.stride(0),
        out.stride(0),
        out.stride(1),
        HAS_BIAS=bias is not None,
        INDEX_64=index_64,
        BLOCK_M=block_m,
        BLOCK_C=block_c,
        num_warps=4,
    )


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

    x2d (M, K); qweight (N, K) int8; scales (N,) per channel or (N, K // group_size) per
    group; bias (N,) or None; out (M, N) preallocated. x2d, scales, bias and out share one
    dtype (float32, float16 or bfloat16) and device; any strides. Dequantized weights are
    rounded to the dtype before the float32-accumulated product (as torch's
    dequantize-then-F.linear). ``config`` overrides :func:`choose_config` (tests and
    benchmarks) and must hold the same keys.
    """
    op = "int8_linear"
    group_size = int(group_size)
    N, K = qweight.shape if qweight.dim() == 2 else (-1, -1)
    M = x2d.shape[0]
    _check_weight(op, x2d, "x2d", K, qweight, scales, out, (M, N), group_size)
    if bias is not None:
        if bias.dim() != 1 or bias.shape[0] != N:
            raise ValueError(f"{op}: bias must have shape ({N},), got {tuple(bias.shape)}")
        if bias.dtype != x2d.dtype or bias.device != x2d.device:
            raise TypeError(f"{op}: bias must have x2d's dtype and device")
    if M == 0:
        return  # nothing to write: no launch

    if config is None:
        num_sms, smem = _device_limits(x2d.device.type, x2d.device.index)
        config = choose_config(M, N, K, group_size, x2d.dtype, num_sms, False, smem)
    block_m, block_n, block_k = config["BLOCK_M"], config["BLOCK_N"], config["BLOCK_K"]
    if group_size and group_size % block_k != 0:
        raise ValueError(f"{op}: BLOCK_K={block_k} must divide group_size={group_size}")
    split, k_per_split = _split_plan(K, block_k, config["SPLIT"])

    pad = 2 * max(block_m, block_n, block_k)
    tensors = [x2d, qweight, scales, out] + ([] if bias is None else [bias])
    index_64 = any(_spans_int32(t, pad) for t in tensors)
    if split > 1:
        # Float32 partials, one (M, N) slab per split; the reduce kernel adds the bias.
        dest = torch.empty((split, M, N), dtype=torch.float32, device=x2d.device)
        index_64 = index_64 or _spans_int32(dest, pad)
        dest_strides = dest.stride()
    else:
        dest = out
        dest_strides = (0, out.stride(0), out.stride(1))
    stride_sn, stride_sg = _scale_strides(scales)
    grid = (_cdiv(M, block_m), _cdiv(N, block_n), split)
    launchable(_int8_linear_fwd_kernel)[grid](
        x2d,
        qweight,
        scales,
        out if bias is None else bias,  # dummy pointer when there is no bias
        dest,
        M,
        N,
        K,
        k_per_split,
        x2d.stride(0),
        x2d.stride(1),
        qweight.stride(0),
        qweight.stride(1),
        stride_sn,
        stride_sg,
        0 if bias is None else bias.stride(0),
        dest_strides[0],
        dest_strides[1],
        dest_strides[2],
        GROUP_SIZE=group_size,
        HAS_BIAS=bias is not None and split == 1,
        IEEE_FP32=x2d.dtype == torch.float32,
        INDEX_64=index_64,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        num_warps=config["num_warps"],
        num_stages=config["num_stages"],
    )
    if split > 1:
        _launch_reduce(dest, bias, out, index_64)


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

    dy2d (M, N); qweight (N, K) int8; scales (N,) per channel (group_size 0) or
    (N, K // group_size) per group; out (M, K) preallocated. dy2d, scales and out share one
    dtype (float32, float16 or bfloat16) and device; any strides. float32 accumulation over
    N; dequantized weights are rounded to the dtype first (as torch's dequantize-then-mm).
    ``config`` overrides :func:`choose_config` (with transposed=True).
    """
    op = "int8_linear_grad_input"
    group_size = int(group_size)
    N, K = qweight.shape if qweight.dim() == 2 else (-1, -1)
    M = dy2d.shape[0]
    _check_weight(op, dy2d, "dy2d", N, qweight, scales, out, (M, K), group_size)
    if M == 0:
        return

    if config is None:
        num_sms, smem = _device_limits(dy2d.device.type, dy2d.device.index)
        config = choose_config(M, N, K, group_size, dy2d.dtype, num_sms, True, smem)
    block_m, block_n, block_k = config["BLOCK_M"], config["BLOCK_N"], config["BLOCK_K"]
    split, n_per_split = _split_plan(N, block_n, config["SPLIT"])

    pad = 2 * max(block_m, block_n, block_k)
    index_64 = any(_spans_int32(t, pad) for t in (dy2d, qweight, scales, out))
    if split > 1:
        dest = torch.empty((split, M, K), dtype=torch.float32, device=dy2d.device)
        index_64 = index_64 or _spans_int32(dest, pad)
        dest_strides = dest.stride()
    else:
        dest = out
        dest_strides = (0, out.stride(0), out.stride(1))
    stride_sn, stride_sg = _scale_strides(scales)
    grid = (_cdiv(M, block_m), _cdiv(K, block_k), split)
    launchable(_int8_linear_grad_input_kernel)[grid](
        dy2d,
        qweight,
        scales,
        dest,
        M,
        N,
        K,
        n_per_split,
        dy2d.stride(0),
        dy2d.stride(1),
        qweight.stride(0),
        qweight.stride(1),
        stride_sn,
        stride_sg,
        dest_strides[0],
        dest_strides[1],
        dest_strides[2],
        GROUP_SIZE=group_size,
        SCALE_PER_TILE=group_size > 0 and group_size % block_k == 0,
        IEEE_FP32=dy2d.dtype == torch.float32,
        INDEX_64=index_64,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        num_warps=config["num_warps"],
        num_stages=config["num_stages"],
    )
    if split > 1:
        _launch_reduce(dest, None, out, index_64)
