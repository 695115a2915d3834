"""The GPU the report is for (an H200, the GPU machine's) and what a kernel's resources allow on it.

Occupancy follows the CUDA occupancy calculator (cuda_occupancy.h) for compute capability 9.0:
registers are allocated per warp in units of 256 and per SM sub-partition (4 per SM, 16,384
registers each, warps assigned round-robin); shared memory per block is static + dynamic + the 1 KiB
the runtime reserves per block, in units of 128 bytes, against 228 KiB per SM (the largest
carveout) and 227 KiB per block (the opt-in maximum); at most 2,048 threads and 32 blocks per SM.
"""

from __future__ import annotations

import dataclasses
import math


@dataclasses.dataclass(frozen=True)
class Gpu:
    name: str = "NVIDIA H200 (sm_90)"
    sms: int = 132
    regs_per_sm: int = 65536
    regs_per_block: int = 65536
    reg_alloc_unit: int = 256  # registers per warp are allocated in these units
    sub_partitions: int = 4
    smem_per_sm: int = 233472  # 228 KiB, the largest carveout
    smem_per_block_optin: int = 232448  # 227 KiB: static + dynamic, with cudaFuncSetAttribute
    smem_reserved_per_block: int = 1024  # the runtime's per-block reservation (sm_80+)
    smem_alloc_unit: int = 128
    threads_per_sm: int = 2048
    blocks_per_sm: int = 32
    warp_size: int = 32
    # Measured on the GPU machine (/work/shared/ENVIRONMENT.md, "The GPU machine"): a
    # device-to-device copy (bytes read + written) and an 8192^3 bf16 matmul on random data.
    bandwidth_bytes_per_s: float = 4.3e12
    bf16_flops_per_s: float = 770e12


H200 = Gpu()


def _round_up(x: int, unit: int) -> int:
    return -(-x // unit) * unit


@dataclasses.dataclass(frozen=True)
class Occupancy:
    blocks_per_sm: int  # 0: the block cannot run at all
    limiter: str  # which resource sets blocks_per_sm ("regs", "smem", "threads", "blocks", ...)
    limits: dict  # resource -> blocks per SM it alone allows


def occupancy(
    threads: int, regs: int, static_smem: int, dynamic_smem: int, gpu: Gpu = H200
) -> Occupancy:
    """Resident blocks per SM of a kernel with `threads` threads per block, `regs` registers per
    thread and the given shared memory per block (bytes, without the runtime's reservation)."""
    warps = -(-threads // gpu.warp_size)
    limits = {
        "blocks": gpu.blocks_per_sm,
        "threads": gpu.threads_per_sm // gpu.warp_size // warps if warps else 0,
    }
    if regs > 0:
        per_warp = _round_up(regs * gpu.warp_size, gpu.reg_alloc_unit)
        if per_warp * _round_up(warps, gpu.sub_partitions) > gpu.regs_per_block:
            limits["regs"] = 0  # too many registers for one block (launch fails)
        else:
            per_sub = gpu.regs_per_sm // gpu.sub_partitions // per_warp
            limits["regs"] = per_sub * gpu.sub_partitions // warps
    smem = static_smem + dynamic_smem
    if smem > gpu.smem_per_block_optin:
        limits["smem"] = 0
    elif smem > 0:
        per_block = _round_up(smem + gpu.smem_reserved_per_block, gpu.smem_alloc_unit)
        limits["smem"] = gpu.smem_per_sm // per_block
    blocks = min(limits.values())
    limiter = "/".join(k for k, v in limits.items() if v == blocks)
    return Occupancy(blocks, limiter, limits)


def grid_blocks(grid) -> int:
    return math.prod(int(g) for g in grid)


def waves(grid, blocks_per_sm: int, gpu: Gpu = H200) -> float | None:
    """Blocks of the grid / blocks the whole GPU holds at once (0.25: a quarter of the SMs'
    slots busy; 2.1: two full waves and a tail). None when no block fits."""
    if blocks_per_sm <= 0:
        return None
    return grid_blocks(grid) / (blocks_per_sm * gpu.sms)


def floor_time(flops: float, nbytes: float, gpu: Gpu = H200) -> tuple[float, str]:
    """(seconds, bound) of the roofline at the measured peaks: the slower of the bf16 tensor-core
    time and the memory time; bound is "memory" or "compute"."""
    t_mem = nbytes / gpu.bandwidth_bytes_per_s
    t_cmp = flops / gpu.bf16_flops_per_s
    return (t_mem, "memory") if t_mem >= t_cmp else (t_cmp, "compute")
