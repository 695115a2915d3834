// Small-M ("decode") path of y = (x · Vᵀ) · Uᵀ + bias, every dtype; also the float32 path at any
// M (no tensor cores: float32 products stay exact IEEE FMAs).
//
// Shapes (row-major, contiguous): x (M, in), V (rank, in), U (out, rank), bias (out) or none,
// y (M, out). Dtypes float32 / float16 / bfloat16, accumulation in float32. For 16-bit dtypes
// t = x · Vᵀ is rounded to the dtype before the second product, as the tensor-core path does.
//
// Two launches with a tiny float32 intermediate in global memory (L2-resident: S x M x rank):
//   down: partial[s, m, j] = sum over the s-th slice of `in` of x[m, k] * V[j, k]
//         grid (ceil(rank / 8), S, row chunks); one warp per V row j, lanes striding over k
//         with 16-byte loads where aligned; the block's x rows (<= 16) for a k tile are staged
//         in shared memory as float and all of them are accumulated against each V load, so V
//         is read once per row chunk. Deterministic: no atomics, each (s, m, j) written once.
//   up:   t[m, j] = sum_s partial[s, m, j] (fixed order, then rounded to the dtype), staged in
//         shared memory per rank chunk; one warp per 4 output rows n computes
//         y[m, n] = sum_j t[m, j] * U[n, j] + bias[n] for all rows m of the chunk with a
//         warp-shuffle reduction.
// Why two launches: the first product needs all of V for every output, the second all of t.
// Fusing them in one launch would make every block re-read all of V (rank x in) to rebuild t,
// or need a grid-wide barrier between the phases (cooperative launch, occupancy limits). The
// intermediate is only M x rank floats (x S slices), so the round trip through L2 is cheap.
// S (slices of `in`) exists so that small ranks still put enough blocks on the GPU to stream V
// at full bandwidth; it is capped so that S x rows-per-chunk <= 16, which bounds how much of
// the workspace each up-kernel block must re-read.
//
// M > 16 is handled by row chunks of 16 along gridDim.z (looped when more than 65535 chunks):
// every chunk re-reads V and U. Fine for a fallback; large 16-bit M uses the tensor-core path.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "lowrank_device_utils.cuh"
#include "lowrank_kernels.cuh"

namespace lrkernels {
namespace cuda {
namespace {

using detail::ceil_div;
using detail::kVecElems;
using detail::load_as_float;
using detail::min64;
using detail::to_float;
using detail::warp_sum;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kRowsPerChunk = 16;  // rows of x (and y) one block handles at once
constexpr int kUpRowsPerWarp = 4;  // output rows n per warp in the up kernel
constexpr int kUpRowsPerBlock = kWarps * kUpRowsPerWarp;
// Shared staging of both kernels: rows x tile floats (32 KiB, under the 48 KiB static limit).
// The tile width is kSmemFloats / rows rounded down to a multiple of kTileAlign, so one row
// of x (decode) gets a long tile and 16 rows still get 512.
constexpr int kSmemFloats = 8192;
constexpr int kTileAlign = 256;  // multiple of 32 lanes x 8 elements: keeps vector offsets aligned
constexpr int kMaxSplits = 8;
constexpr int64_t kMinSplitLen = 512;  // fewest `in` elements per slice worth a block
constexpr int64_t kMaxGridYZ = 65535;

__device__ __forceinline__ int tile_width(int rows) {
  return (kSmemFloats / rows) / kTileAlign * kTileAlign;  // rows <= 16 -> >= 512
}

// kVec: V rows can be read with 16-byte loads (in % kVecElems<T> == 0, V 16-byte aligned).
template <typename T, bool kVec>
__global__ void __launch_bounds__(kThreads)
    lowrank_down_kernel(const T* __restrict__ x, const T* __restrict__ V,
                        float* __restrict__ partial, int64_t M, int64_t in, int64_t rank,
                        int64_t split_len) {
  constexpr int kN = kVec ? kVecElems<T> : 1;
  __shared__ __align__(16) float xs[kSmemFloats];

  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kWarps + warp;
  const bool row_ok = j < rank;  // warp-uniform; idle warps still take part in the barriers
  const int64_t s = blockIdx.y;
  // This block's slice [k_begin, k_end) of `in`; empty (k_begin >= in) still writes zeros.
  // split_len is a multiple of 8, so slice starts keep 16-byte alignment of vector loads.
  const int64_t k_begin = s * split_len;
  const int64_t k_end = min64(in, k_begin + split_len);
  const int64_t num_chunks = (M + kRowsPerChunk - 1) / kRowsPerChunk;
  const T* v_row = V + (row_ok ? j : 0) * in;

  for (int64_t chunk = blockIdx.z; chunk < num_chunks; chunk += gridDim.z) {
    const int64_t m0 = chunk * kRowsPerChunk;
    const int rows = static_cast<int>(min64(kRowsPerChunk, M - m0));
    const int width = tile_width(rows);
    float acc[kRowsPerChunk];
#pragma unroll
    for (int m = 0; m < kRowsPerChunk; ++m) acc[m] = 0.f;

    for (int64_t k0 = k_begin; k0 < k_end; k0 += width) {
      const int len = static_cast<int>(min64(width, k_end - k0));
      __syncthreads();  // the previous tile (or row chunk) is no longer being read
      for (int i = threadIdx.x; i < rows * len; i += kThreads) {
        const int m = i / len;
        const int c = i - m * len;
        xs[m * width + c] = to_float(x[(m0 + m) * in + k0 + c]);
      }
      __syncthreads();
      if (row_ok) {
        // len is a multiple of kN in the vector case (in % kN == 0, k0 % 8 == 0).
        for (int c = lane * kN; c < len; c += 32 * kN) {
          float v[kN];
          load_as_float<T, kN>(v_row + k0 + c, v);
#pragma unroll
          for (int m = 0; m < kRowsPerChunk; ++m) {
            if (m < rows) {
              const float* xr = xs + m * width + c;  // 16-byte aligned when kN > 1
              float sum = acc[m];
              if constexpr (kN == 1) {
                sum = fmaf(xr[0], v[0], sum);
              } else {
#pragma unroll
                for (int q = 0; q < kN; q += 4) {
                  const float4 xv = *reinterpret_cast<const float4*>(xr + q);
                  sum = fmaf(xv.x, v[q], sum);
                  sum = fmaf(xv.y, v[q + 1], sum);
                  sum = fmaf(xv.z, v[q + 2], sum);
                  sum = fmaf(xv.w, v[q + 3], sum);
                }
              }
              acc[m] = sum;
            }
          }
        }
      }
    }

#pragma unroll
    for (int m = 0; m < kRowsPerChunk; ++m) {
      if (m < rows) {  // block-uniform, so every lane takes part in the shuffles
        const float total = warp_sum(acc[m]);
        if (row_ok && lane == 0) partial[(s * M + m0 + m) * rank + j] = total;
      }
    }
  }
}

// kVec: U rows can be read with 16-byte loads (rank % kVecElems<T> == 0, U 16-byte aligned).
// kRoundT: round t to T before the product (16-bit dtypes).
template <typename T, bool kVec, bool kRoundT>
__global__ void __launch_bounds__(kThreads)
    lowrank_up_kernel(const float* __restrict__ partial, int num_splits, const T* __restrict__ U,
                      const T* __restrict__ bias, T* __restrict__ y, int64_t M, int64_t out,
                      int64_t rank) {
  constexpr int kN = kVec ? kVecElems<T> : 1;
  __shared__ __align__(16) float ts[kSmemFloats];

  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  const int64_t n_first = static_cast<int64_t>(blockIdx.x) * kUpRowsPerBlock +
                          static_cast<int64_t>(warp) * kUpRowsPerWarp;
  const int64_t num_chunks = (M + kRowsPerChunk - 1) / kRowsPerChunk;

  for (int64_t chunk = blockIdx.z; chunk < num_chunks; chunk += gridDim.z) {
    const int64_t m0 = chunk * kRowsPerChunk;
    const int rows = static_cast<int>(min64(kRowsPerChunk, M - m0));
    const int width = tile_width(rows);
    float acc[kUpRowsPerWarp][kRowsPerChunk];
#pragma unroll
    for (int p = 0; p < kUpRowsPerWarp; ++p) {
#pragma unroll
      for (int m = 0; m < kRowsPerChunk; ++m) acc[p][m] = 0.f;
    }

    for (int64_t r0 = 0; r0 < rank; r0 += width) {
      const int len = static_cast<int>(min64(width, rank - r0));
      __syncthreads();  // the previous rank chunk (or row chunk) is no longer being read
      for (int i = threadIdx.x; i < rows * len; i += kThreads) {
        const int m = i / len;
        const int c = i - m * len;
        const float* src = partial + (m0 + m) * rank + r0 + c;
        float t = 0.f;
        for (int s = 0; s < num_splits; ++s) t += src[static_cast<int64_t>(s) * M * rank];
        if constexpr (kRoundT) t = to_float(detail::from_float<T>(t));
        ts[m * width + c] = t;
      }
      __syncthreads();
      // len is a multiple of kN in the vector case (rank % kN == 0, r0 % 256 == 0).
      for (int c = lane * kN; c < len; c += 32 * kN) {
        float u[kUpRowsPerWarp][kN];
#pragma unroll
        for (int p = 0; p < kUpRowsPerWarp; ++p) {
          const int64_t n = n_first + p;
          if (n < out) {
            load_as_float<T, kN>(U + n * rank + r0 + c, u[p]);
          } else {
#pragma unroll
            for (int q = 0; q < kN; ++q) u[p][q] = 0.f;
          }
        }
#pragma unroll
        for (int m = 0; m < kRowsPerChunk; ++m) {
          if (m < rows) {
            // One read of t serves all of the warp's output rows.
            float tv[kN];
            const float* tr = ts + m * width + c;  // 16-byte aligned when kN > 1
            if constexpr (kN == 1) {
              tv[0] = tr[0];
            } else {
#pragma unroll
              for (int q = 0; q < kN; q += 4) {
                const float4 t4 = *reinterpret_cast<const float4*>(tr + q);
                tv[q] = t4.x;
                tv[q + 1] = t4.y;
                tv[q + 2] = t4.z;
                tv[q + 3] = t4.w;
              }
            }
#pragma unroll
            for (int p = 0; p < kUpRowsPerWarp; ++p) {
              float sum = acc[p][m];
#pragma unroll
              for (int q = 0; q < kN; ++q) sum = fmaf(tv[q], u[p][q], sum);
              acc[p][m] = sum;
            }
          }
        }
      }
    }

#pragma unroll
    for (int p = 0; p < kUpRowsPerWarp; ++p) {
      const int64_t n = n_first + p;
      const float b = (bias != nullptr && n < out) ? to_float(bias[n]) : 0.f;
#pragma unroll
      for (int m = 0; m < kRowsPerChunk; ++m) {
        if (m < rows) {  // block-uniform, so every lane takes part in the shuffles
          const float total = warp_sum(acc[p][m]);
          if (lane == 0 && n < out) y[(m0 + m) * out + n] = detail::from_float<T>(total + b);
        }
      }
    }
  }
}

// Number of slices S of `in` for the down kernel: enough blocks for ~2 waves, at most
// kMaxSplits, at most 16 / rows-per-chunk (workspace re-read by the up kernel), at least
// kMinSplitLen elements per slice. Must be a pure function of (args, num_sms): the workspace
// size and the launch both call it.
int choose_num_splits(const LowRankArgs& a, int num_sms) {
  const int64_t rows = std::min<int64_t>(a.M, kRowsPerChunk);
  const int64_t chunks = std::min(ceil_div(a.M, kRowsPerChunk), kMaxGridYZ);
  const int64_t blocks = ceil_div(a.rank, kWarps) * chunks;
  int64_t s = ceil_div(2 * static_cast<int64_t>(std::max(num_sms, 1)), blocks);
  s = std::min<int64_t>(s, kMaxSplits);
  s = std::min<int64_t>(s, std::max<int64_t>(1, kRowsPerChunk / std::max<int64_t>(rows, 1)));
  s = std::min<int64_t>(s, std::max<int64_t>(1, ceil_div(a.in, kMinSplitLen)));
  return static_cast<int>(std::max<int64_t>(s, 1));
}

template <typename T>
cudaError_t launch_typed(const LowRankArgs& a, int num_splits, float* partial,
                         cudaStream_t stream) {
  const T* x = static_cast<const T*>(a.x);
  const T* U = static_cast<const T*>(a.U);
  const T* V = static_cast<const T*>(a.V);
  const T* bias = static_cast<const T*>(a.bias);
  T* y = static_cast<T*>(a.y);
  constexpr int kN = kVecElems<T>;

  // Slice length: a multiple of 8 elements so every slice start keeps vector alignment.
  const int64_t split_len = ceil_div(ceil_div(a.in, num_splits), 8) * 8;
  const unsigned grid_z = static_cast<unsigned>(std::min(ceil_div(a.M, kRowsPerChunk), kMaxGridYZ));

  const dim3 down_grid(static_cast<unsigned>(ceil_div(a.rank, kWarps)),
                       static_cast<unsigned>(num_splits), grid_z);
  const bool vec_v = a.in % kN == 0 && detail::is_aligned16(V);
  if (vec_v) {
    lowrank_down_kernel<T, true>
        <<<down_grid, kThreads, 0, stream>>>(x, V, partial, a.M, a.in, a.rank, split_len);
  } else {
    lowrank_down_kernel<T, false>
        <<<down_grid, kThreads, 0, stream>>>(x, V, partial, a.M, a.in, a.rank, split_len);
  }
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;

  constexpr bool kRound = !std::is_same<T, float>::value;
  const dim3 up_grid(static_cast<unsigned>(ceil_div(a.out, kUpRowsPerBlock)), 1, grid_z);
  const bool vec_u = a.rank % kN == 0 && detail::is_aligned16(U);
  if (vec_u) {
    lowrank_up_kernel<T, true, kRound>
        <<<up_grid, kThreads, 0, stream>>>(partial, num_splits, U, bias, y, a.M, a.out, a.rank);
  } else {
    lowrank_up_kernel<T, false, kRound>
        <<<up_grid, kThreads, 0, stream>>>(partial, num_splits, U, bias, y, a.M, a.out, a.rank);
  }
  return cudaGetLastError();
}

}  // namespace

size_t lowrank_gemv_workspace_bytes(const LowRankArgs& args, int num_sms) {
  if (args.M <= 0 || args.rank <= 0) return 0;
  const int num_splits = choose_num_splits(args, num_sms);
  return static_cast<size_t>(num_splits) * static_cast<size_t>(args.M) *
         static_cast<size_t>(args.rank) * sizeof(float);
}

cudaError_t launch_lowrank_gemv(const LowRankArgs& args, int num_sms, void* workspace,
                                size_t workspace_bytes, cudaStream_t stream) {
  if (args.M < 0 || args.in < 1 || args.out < 1 || args.rank < 1) return cudaErrorInvalidValue;
  if (args.M == 0) return cudaSuccess;
  if (args.x == nullptr || args.U == nullptr || args.V == nullptr || args.y == nullptr ||
      workspace == nullptr) {
    return cudaErrorInvalidValue;
  }
  if (workspace_bytes < lowrank_gemv_workspace_bytes(args, num_sms)) return cudaErrorInvalidValue;
  const int num_splits = choose_num_splits(args, num_sms);
  float* partial = static_cast<float*>(workspace);
  switch (args.dtype) {
    case DType::kFloat32:
      return launch_typed<float>(args, num_splits, partial, stream);
    case DType::kFloat16:
      return launch_typed<__half>(args, num_splits, partial, stream);
    case DType::kBFloat16:
      return launch_typed<__nv_bfloat16>(args, num_splits, partial, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace lrkernels
