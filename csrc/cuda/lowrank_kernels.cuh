// Launch API of the low-rank CUDA kernels. Deliberately free of torch headers: the .cu files
// that implement it include only CUDA headers, which keeps nvcc compile times small; the torch
// side (argument checks, allocation, streams) lives in lowrank_cuda.cpp, compiled by the host
// compiler.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace lrkernels {
namespace cuda {

enum class DType { kFloat32, kFloat16, kBFloat16 };

// y = (x · Vᵀ) · Uᵀ + bias, every tensor contiguous row-major:
//   x (M, in), V (rank, in), U (out, rank), bias (out) or nullptr, y (M, out).
// All in `dtype`; accumulation in float32. For float16/bfloat16 the intermediate t = x · Vᵀ is
// rounded to `dtype` before the second product (the numerics of two torch matmuls).
// Requirements: M >= 0, in >= 1, out >= 1, rank >= 1; y must not alias any input.
struct LowRankArgs {
  const void* x;
  const void* U;
  const void* V;
  const void* bias;  // nullptr: no bias
  void* y;
  int64_t M;
  int64_t in;
  int64_t out;
  int64_t rank;
  DType dtype;
};

// Rows up to which the two-launch gemv path is the right choice for 16-bit dtypes (decode).
constexpr int64_t kGemvMaxRows = 16;

// Bytes of float32 workspace the gemv path needs for these arguments on a device with
// `num_sms` multiprocessors (0 when M == 0). Pass the same num_sms to launch_lowrank_gemv.
size_t lowrank_gemv_workspace_bytes(const LowRankArgs& args, int num_sms);

// Small-M path (decode, M <= kGemvMaxRows), every dtype; also the float32 path at any M.
// `workspace` (16-byte aligned, e.g. from the caching allocator) must hold at least
// lowrank_gemv_workspace_bytes(args, num_sms) bytes; workspace_bytes is its actual size and is
// checked (cudaErrorInvalidValue when too small). Launches nothing when M == 0.
cudaError_t launch_lowrank_gemv(const LowRankArgs& args, int num_sms, void* workspace,
                                size_t workspace_bytes, cudaStream_t stream);

// Tensor-core fused path (float16 / bfloat16, rank <= kMaxFusedRank, compute capability >= 8.0):
// the rank-r intermediate of a row tile stays in shared memory and is multiplied by Uᵀ without a
// global round trip. Returns cudaErrorInvalidValue for float32 or rank > kMaxFusedRank.
// Launches nothing when M == 0.
constexpr int64_t kMaxFusedRank = 512;
cudaError_t launch_lowrank_fused_tc(const LowRankArgs& args, int num_sms, cudaStream_t stream);

}  // namespace cuda
}  // namespace lrkernels
