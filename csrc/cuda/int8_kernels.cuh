// Launch API of the int8 weight-only (W8A16) CUDA kernels. Torch-free, like lowrank_kernels.cuh:
// the .cu files include only CUDA headers; int8_cuda.cpp (host compiler) does the torch side.
//
// Weights are symmetric int8 q (N, K), row-major, with scales s in the activation dtype:
//   per output channel: s (N,),         W[n, k] = q[n, k] * s[n]
//   per group of K:     s (N, K / G),   W[n, k] = q[n, k] * s[n, k / G],  G in {32, 64, 128}
// Dequantization happens on chip (int8 -> float in registers); W in full precision never exists
// in global memory.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace lrkernels {
namespace cuda {

enum class Int8DType { kFloat32, kFloat16, kBFloat16 };

// Forward:  y (M, N) = a (M, K) · Wᵀ + bias          (transposed = false, a = x)
// Backward: y (M, K) = a (M, N) · W                  (transposed = true,  a = dy, no bias)
// Every tensor contiguous row-major; a, scales, bias and y in `dtype`; accumulation in float32.
struct Int8Args {
  const void* a;
  const int8_t* qweight;  // (N, K)
  const void* scales;     // (N,) or (N, K / group_size)
  const void* bias;       // (N,) or nullptr; forward only
  void* y;
  int64_t M;
  int64_t N;
  int64_t K;
  int64_t group_size;  // 0: per output channel
  bool transposed;
  Int8DType dtype;
};

// Small-M path (M <= 16): streams the weight once at full bandwidth, split over the reduction
// dimension when the grid would otherwise be too small. Every dtype, both directions.
size_t int8_gemv_workspace_bytes(const Int8Args& args, int num_sms);
cudaError_t launch_int8_gemv(const Int8Args& args, void* workspace, int num_sms,
                             cudaStream_t stream);

// Tensor-core GEMM path (float16 / bfloat16, any M): int8 tiles dequantized while staged to
// shared memory, then mma. Both directions.
cudaError_t launch_int8_gemm_tc(const Int8Args& args, int num_sms, cudaStream_t stream);

}  // namespace cuda
}  // namespace lrkernels
