// First include of every generated kernel file (see generate.py): the CUDA host headers (types
// such as __half, __nv_bfloat16, uint4, dim3 and their host-side conversion functions), the
// emulation runtime, and macros that map the CUDA keywords and device intrinsics the kernels use
// onto it. The CUDA headers come first so that the macros never touch them. An intrinsic that is
// not mapped here fails to compile or link: add it to emu.h rather than working around it.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>

#include "emu.h"
#include "intrinsics.h"
#include "launch.h"
#include "ptx.h"

using std::fmaf;  // device fmaf: one rounding, like std::fmaf

#undef __global__
#undef __device__
#undef __host__
#undef __forceinline__
#undef __shared__
#undef __constant__
#undef __launch_bounds__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
// The generator rewrites every __shared__ declaration; one it could not parse stops here.
#define __shared__ EMU_UNSUPPORTED_SHARED_DECLARATION
#define __constant__ EMU_CONSTANT_MEMORY_NOT_EMULATED
#define __launch_bounds__(...)

#define threadIdx (emu::thread_idx())
#define blockIdx (emu::block_idx())
#define blockDim (emu::block_dim())
#define gridDim (emu::grid_dim())
#define warpSize (emu::kWarpSize)

#define __syncthreads emu::syncthreads
#define __syncwarp emu::syncwarp
#define __shfl_xor_sync emu::shfl_xor_sync
#define __shfl_down_sync emu::shfl_down_sync
#define __shfl_sync emu::shfl_sync
#define __ldg emu::ldg
#define __ldcg emu::ldg
#define __uint_as_float emu::uint_as_float
#define __float_as_uint emu::float_as_uint
#define __fmul_rn emu::fmul_rn
#define __fadd_rn emu::fadd_rn
#define __fsub_rn emu::fsub_rn
#define __byte_perm emu::byte_perm
#define __trap emu::trap
#define __cvta_generic_to_shared emu::cvta_generic_to_shared
#define atomicAdd emu::atomic_add
#define atomicExch emu::atomic_exch
#define atomicCAS emu::atomic_cas
#define atomicMax emu::atomic_max
#define __threadfence emu::threadfence
#define __nanosleep emu::nanosleep

#define cudaGetLastError emu::get_last_error
#define cudaPeekAtLastError emu::peek_at_last_error
#define cudaGetDevice emu::get_device
#define cudaDeviceGetAttribute emu::device_get_attribute
#define cudaFuncSetAttribute emu::func_set_attribute
#define cudaLaunchKernelEx emu::launch_kernel_ex
