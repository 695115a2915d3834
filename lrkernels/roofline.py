"""Roofline model: FLOP and minimum-byte counts of the ops, and measured device peaks.

The peaks are *measured* on the machine that runs the benchmark (a device-to-device copy for
bandwidth, a large matrix product for the arithmetic rate), never copied from a datasheet, so a
roofline fraction says how close a kernel gets to what this very device demonstrably sustains.
"""

from __future__ import annotations

import dataclasses
import platform
import statistics
import time

import torch

__all__ = [
    "DevicePeaks",
    "attention_cost",
    "dense_linear_cost",
    "device_name",
    "int8_linear_cost",
    "lora_linear_cost",
    "lowrank_linear_cost",
    "measure_peaks",
    "roofline_fraction",
    "roofline_time",
]


def lowrank_linear_cost(
    M: int, in_f: int, out_f: int, rank: int, dtype_bytes: int, bias: bool = True
) -> tuple[int, int]:
    """(flops, minimum bytes) of y = (x·Vᵀ)·Uᵀ + b with x (M, in), V (rank, in), U (out, rank).

    Two multiply-adds per product term; the bias adds one FLOP per output element. The byte count
    is the floor of any implementation: every operand read once, y written once, and the rank-r
    intermediate kept on chip (it never touches memory).
    """
    flops = 2 * M * in_f * rank + 2 * M * rank * out_f
    elems = M * in_f + rank * in_f + out_f * rank + M * out_f
    if bias:
        flops += M * out_f
        elems += out_f
    return flops, elems * dtype_bytes


def dense_linear_cost(
    M: int, in_f: int, out_f: int, dtype_bytes: int, bias: bool = True
) -> tuple[int, int]:
    """(flops, minimum bytes) of the dense baseline y = x·Wᵀ + b with W (out, in)."""
    flops = 2 * M * in_f * out_f
    elems = M * in_f + out_f * in_f + M * out_f
    if bias:
        flops += M * out_f
        elems += out_f
    return flops, elems * dtype_bytes


def int8_linear_cost(
    M: int,
    in_f: int,
    out_f: int,
    dtype_bytes: int,
    group_size: int = 0,
    bias: bool = True,
    *,
    scale_bytes: int | None = None,
) -> tuple[int, int]:
    """(flops, minimum bytes) of the int8 weight-only linear y = x·Wᵀ + b, W = dequant(q, s),
    with x (M, in) and y (M, out) in the activation dtype (`dtype_bytes` each), q int8
    (out, in) and scales (out,) per channel (``group_size`` 0) or (out, in / group_size).

    FLOPs: two per multiply-add of the product plus one per output element for the bias, the
    same count as `dense_linear_cost`, so TFLOP/s compare directly with the dense layer; the
    dequantization multiplies are not counted. Bytes: the floor of any implementation, every
    operand read once and y written once: 1 byte per weight, the scales (``scale_bytes`` each,
    by default the activation's size, as `lrkernels.quant` stores them), x, y and the bias.
    """
    if group_size < 0 or (group_size and in_f % group_size):
        raise ValueError(f"group_size must be 0 or divide in_f ({in_f}), got {group_size}")
    n_scales = out_f * (in_f // group_size if group_size else 1)
    flops = 2 * M * in_f * out_f
    act_elems = M * in_f + M * out_f
    if bias:
        flops += M * out_f
        act_elems += out_f
    s_bytes = dtype_bytes if scale_bytes is None else scale_bytes
    return flops, out_f * in_f + n_scales * s_bytes + act_elems * dtype_bytes


# FLOPs of each pass in halves of the forward's (the backward is 2.5x): integer arithmetic
_ATTENTION_PASS_FACTOR = {"fwd": 2, "bwd": 5, "fwd+bwd": 7}


def attention_cost(
    B: int,
    Hq: int,
    Hkv: int,
    Sq: int,
    Sk: int,
    D: int,
    dtype_bytes: int,
    *,
    visible_pairs: int,
    computed_blocks: int,
    block_q: int = 128,
    block_k: int = 128,
    pass_: str = "fwd",
    lse: bool = True,
) -> tuple[int, int, int]:
    """(useful flops, computed-block flops, minimum bytes) of softmax attention restricted to a
    set of (query, key) pairs: q (B, Hq, Sq, D), k and v (B, Hkv, Sk, D), out like q.

    ``visible_pairs`` and ``computed_blocks`` are totals over all B·Hq (batch, query head)
    pairs: the (i, j) the mask lets through, and the block_q × block_k tiles a block-sparse
    kernel computes (partial and full, each a whole tile even where it overhangs the sequence).

    FLOPs, FlashAttention's convention: the forward does two matmuls (S = q·kᵀ and out = P·v),
    2 FLOPs per multiply-add, so 4·D per visible pair; softmax and masking are not counted. The
    backward does five (q·kᵀ recomputed, dv, dp, dq, dk): 2.5× the forward. ``pass_`` is
    "fwd", "bwd" or "fwd+bwd" (3.5×). Useful FLOPs count the visible pairs, computed-block FLOPs
    4·D·block_q·block_k per listed tile (the work a block-sparse kernel actually does).

    Bytes, the floor of any implementation (each tensor read or written once): the forward
    reads q, k, v and writes out (and the float32 log-sum-exp when ``lse``); the backward reads
    q, k, v, out, dout (and lse) and writes dq, dk, dv; "fwd+bwd" is the sum of the two.
    """
    if pass_ not in _ATTENTION_PASS_FACTOR:
        raise ValueError(f"pass_ must be one of {sorted(_ATTENTION_PASS_FACTOR)}, got {pass_!r}")
    if Hkv < 1 or Hq % Hkv:
        raise ValueError(f"Hq ({Hq}) must be a multiple of Hkv ({Hkv})")
    halves = _ATTENTION_PASS_FACTOR[pass_]
    useful = 2 * D * visible_pairs * halves
    computed = 2 * D * block_q * block_k * computed_blocks * halves
    q_elems = B * Hq * Sq * D  # q, out, dout, dq: one each
    kv_elems = B * Hkv * Sk * D  # k, v, dk, dv: one each
    lse_bytes = 4 * B * Hq * Sq if lse else 0
    fwd = (2 * q_elems + 2 * kv_elems) * dtype_bytes + lse_bytes
    bwd = (4 * q_elems + 4 * kv_elems) * dtype_bytes + lse_bytes
    nbytes = {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[pass_]
    return useful, computed, nbytes


@dataclasses.dataclass(frozen=True)
class DevicePeaks:
    """What one device sustains: bytes/s of a copy and FLOP/s of a matmul in one dtype."""

    name: str
    bandwidth_bytes_per_s: float
    flops_per_s: float
    measured: bool
    how: str


def roofline_time(flops: float, bytes_: float, peaks: DevicePeaks) -> float:
    """Lower bound in seconds: the slower of the compute time and the memory time at the peaks."""
    return max(flops / peaks.flops_per_s, bytes_ / peaks.bandwidth_bytes_per_s)


def roofline_fraction(flops: float, bytes_: float, peaks: DevicePeaks, seconds: float) -> float:
    """roofline_time / measured time: 1.0 means the kernel runs at the bound."""
    return roofline_time(flops, bytes_, peaks) / seconds


_CACHE: dict[tuple[str, torch.dtype], DevicePeaks] = {}
_BANDWIDTH: dict[str, float] = {}


def device_name(device: torch.device) -> str:
    """torch.cuda.get_device_name on a GPU; the CPU model name (or platform.processor()) else."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def _median_seconds(fn, device: torch.device, warmup: int, runs: int) -> float:
    """Median wall time of fn() in seconds (CUDA events on a GPU, perf_counter on a CPU)."""
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(runs):
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
    else:
        for _ in range(runs):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure_peaks(device: torch.device | str, dtype: torch.dtype) -> DevicePeaks:
    """Measure copy bandwidth and matmul rate of `device` in `dtype`; cached per (device, dtype).

    CUDA: clone of a 1 GiB buffer (bytes read + written) and an 8192³ matmul in `dtype`.
    CPU: clone of a 256 MiB buffer and a 1024³ matmul, the better of float32 and `dtype` (a
    kernel may always compute in float32). Medians of several runs after warm-up.
    """
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    key = (str(device), dtype)
    if key in _CACHE:
        return _CACHE[key]

    on_gpu = device.type == "cuda"
    copy_bytes = (1 << 30) if on_gpu else (256 << 20)
    n = 8192 if on_gpu else 1024
    runs = 10 if on_gpu else 5

    if str(device) not in _BANDWIDTH:  # the same for every dtype
        src = torch.empty(copy_bytes, dtype=torch.uint8, device=device)
        src.fill_(1)
        copy_s = _median_seconds(src.clone, device, warmup=2, runs=runs)
        _BANDWIDTH[str(device)] = 2 * copy_bytes / copy_s
        del src
    bandwidth = _BANDWIDTH[str(device)]

    def matmul_rate(dt: torch.dtype) -> float:
        gen = torch.Generator(device=device).manual_seed(0)
        a = torch.randn(n, n, device=device, generator=gen).to(dt)
        b = torch.randn(n, n, device=device, generator=gen).to(dt)
        if not on_gpu:  # a dtype without a fast CPU kernel can take seconds: one trial first
            t0 = time.perf_counter()
            a @ b
            trial = time.perf_counter() - t0
            if trial > 0.5:
                return 2 * n**3 / trial
        return 2 * n**3 / _median_seconds(lambda: a @ b, device, warmup=3, runs=runs)

    dname = str(dtype).replace("torch.", "")
    if on_gpu:
        flops = matmul_rate(dtype)
        mm_how = f"{n}^3 {dname}"
    else:
        # Any CPU kernel may compute in float32, so the CPU peak is the better of the two rates.
        flops = matmul_rate(torch.float32)
        mm_how = f"{n}^3, best of float32 and {dname}" if dtype != torch.float32 else f"{n}^3"
        if dtype != torch.float32:
            try:
                flops = max(flops, matmul_rate(dtype))
            except RuntimeError:  # no CPU matmul for this dtype
                mm_how = f"{n}^3 float32 ({dname} has no CPU matmul)"

    how = (
        f"copy: clone of {copy_bytes >> 20} MiB, read+written, median of {runs}; "
        f"matmul: {mm_how}, random data, median of {runs}"
    )
    peaks = DevicePeaks(
        name=device_name(device),
        bandwidth_bytes_per_s=bandwidth,
        flops_per_s=flops,
        measured=True,
        how=how,
    )
    _CACHE[key] = peaks
    return peaks


def lora_linear_cost(
    M: int,
    in_f: int,
    out_f: int,
    rank: int,
    dtype_bytes: int,
    *,
    bias: bool = True,
    group_size: int | None = None,
    n_adapters: int = 1,
    backward: bool = False,
) -> tuple[int, int]:
    """(flops, minimum bytes) of LoRA ``y = x·Wᵀ + s·(drop(x)·Aᵀ)·Bᵀ + b``: x (M, in), W
    (out, in) dense (``group_size`` None) or int8 (``group_size`` 0 per channel, else G, scales
    of the activation's size), ``n_adapters`` adapters A (r, in), B (out, r) each read once.

    Forward FLOPs: the base product plus the shrink (2·M·in·r) and the expand (2·M·r·out),
    plus the bias. ``backward=True`` counts the forward and the backward of a frozen base:
    dx = dy·W + (s·dy·B)·A (2·M·out·in + 2·M·out·r + 2·M·r·in), dA (2·r·M·in), dB (2·out·M·r),
    dbias (M·out). Bytes, the floor of any implementation: forward reads x, W, the adapters,
    the bias and writes y (t = M·r stays on chip); the backward reads dy, W, x (for dA) and
    the adapters again and writes dx, dA, dB, dbias.
    """
    e = dtype_bytes
    if group_size is None:
        w_bytes = out_f * in_f * e
    else:
        w_bytes = (
            int8_linear_cost(1, in_f, out_f, e, group_size, bias=False)[1] - (in_f + out_f) * e
        )
    adapter_bytes = n_adapters * rank * (in_f + out_f) * e
    flops = 2 * M * in_f * out_f + 2 * M * in_f * rank + 2 * M * rank * out_f
    nbytes = (M * in_f + M * out_f) * e + w_bytes + adapter_bytes
    if bias:
        flops += M * out_f
        nbytes += out_f * e
    if backward:
        flops += 2 * M * out_f * in_f + 2 * M * out_f * rank + 2 * M * rank * in_f
        flops += 2 * rank * M * in_f + 2 * out_f * M * rank
        nbytes += (M * out_f + 2 * M * in_f) * e + w_bytes + 2 * adapter_bytes
        if bias:
            flops += M * out_f
            nbytes += out_f * e
    return flops, nbytes
