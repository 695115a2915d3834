// Softmax pieces for kernels that keep scores in mma.sync m16n8 accumulators (common/ptx.cuh
// layout: lane (g = lane / 4, t = lane % 4) holds rows g and g + 8, columns 2t and 2t + 1 of each
// 8-column tile; element e of an accumulator is row g + 8 (e / 2), column 2t + e % 2). Written
// once for every flash-style kernel. CUDA headers only.
//
// exp2: ex2.approx.ftz.f32 (one MUFU.EX2). exp2f() without --use_fast_math adds a compare and two
// predicated multiplies around it for subnormal results, which a softmax never needs (a weight
// below 2^-126 is 0 either way); the relative error of ex2.approx is 2^-22.
#pragma once

#include <cuda_runtime.h>

#include "util.cuh"

namespace lrkernels {
namespace cuda {
namespace softmax {

// 2^x, flushing subnormal inputs and results to 0; ex2(-inf) = 0.
__device__ __forceinline__ float ex2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// Row maxima of an N-tile accumulator row pair (rows g and g + 8), over the four lanes that share
// the rows: mx[0] for row g, mx[1] for row g + 8, each starting from init[row] (e.g. a running
// maximum; -inf for none).
template <int N>
__device__ __forceinline__ void row_max(const float (&acc)[N][4], const float (&init)[2],
                                        float (&mx)[2]) {
  mx[0] = init[0];
  mx[1] = init[1];
#pragma unroll
  for (int n = 0; n < N; ++n) {
    mx[0] = fmaxf(mx[0], fmaxf(acc[n][0], acc[n][1]));
    mx[1] = fmaxf(mx[1], fmaxf(acc[n][2], acc[n][3]));
  }
  mx[0] = util::quad_max(mx[0]);
  mx[1] = util::quad_max(mx[1]);
}

// acc = 2^(acc - sub[row]) in place; returns this lane's partial row sums in sum[0], sum[1] (the
// quad reduction is left to the caller, once at the end of a row's loop).
template <int N>
__device__ __forceinline__ void exp2_rows(float (&acc)[N][4], const float (&sub)[2],
                                          float (&sum)[2]) {
  sum[0] = 0.f;
  sum[1] = 0.f;
#pragma unroll
  for (int n = 0; n < N; ++n) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      acc[n][e] = ex2(acc[n][e] - sub[e >> 1]);
      sum[e >> 1] += acc[n][e];
    }
  }
}

// acc[row] *= f[row] (rescaling an output accumulator when the running maximum moves).
template <int N>
__device__ __forceinline__ void scale_rows(float (&acc)[N][4], const float (&f)[2]) {
#pragma unroll
  for (int n = 0; n < N; ++n) {
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[n][e] *= f[e >> 1];
  }
}

}  // namespace softmax
}  // namespace cuda
}  // namespace lrkernels
