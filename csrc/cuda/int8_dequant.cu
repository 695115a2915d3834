// W (N, K) = q · s from the packed int8 weight (layout 2), in float32 / float16 / bfloat16: the
// "dequantize once" half of the dequantize + cuBLAS path that large M takes (lrkernels/ops/
// int8.py), and what a caller that needs W itself uses.
//
// One thread per packed record (16 bytes: rows 8 j + g of a unit, j = 0..3, at the 4 columns
// 2t, 2t + 1, 2t + 8, 2t + 9): a warp covers one unit (32 rows x 16 columns) and writes, per
// row, 16 contiguous outputs (32 bytes for 16-bit: whole sectors). Each weight is float(q) · s
// in float32 (q by the byte-permute trick; exact for 16-bit s) rounded once to the dtype.
// Expected: reads 1 byte and writes 2 per weight at ~90% of copy bandwidth: ~12 us for 4096^2 on
// an H100/H200 (4.3 TB/s), i.e. ~7% of a bf16 4096^3 matmul.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "common/convert.cuh"
#include "common/int8_convert.cuh"
#include "common/util.cuh"
#include "int8_kernels.cuh"

namespace lrkernels {
namespace cuda {
namespace {

constexpr int kThreads = 256;

template <typename T>
struct DequantParams {
  const int8_t* q;
  const T* s;
  int64_t s_stride_n, s_stride_g;
  T* w;
  int64_t ldw;
  int64_t N, K, kbs;
  int gshift;  // 62 per channel: every column in group 0
  int64_t records;
};

template <typename T>
__device__ __forceinline__ void store_pair(T* dst, float a, float b) {
  if constexpr (sizeof(T) == 4) {
    *reinterpret_cast<float2*>(dst) = make_float2(a, b);
  } else {
    *reinterpret_cast<uint32_t*>(dst) = cvt::pack2<T>(a, b);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) int8_dequantize_kernel(const DequantParams<T> p) {
  const int64_t rec = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (rec >= p.records) return;
  const int lane = static_cast<int>(rec & 31);
  const int64_t unit = rec >> 5;
  const int64_t nb = unit / p.kbs;
  const int64_t kb = unit % p.kbs;
  const int g = lane >> 2;
  const int t = lane & 3;
  const uint4 v = __ldg(reinterpret_cast<const uint4*>(p.q) + rec);
  const uint32_t words[4] = {v.x, v.y, v.z, v.w};
  const int64_t k = kb * 16 + 2 * t;  // columns k, k + 1, k + 8, k + 9: one group
  const int64_t grp = k >> p.gshift;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int64_t n = nb * 32 + 8 * j + g;
    if (n >= p.N) continue;
    const float s = cvt::to_float(p.s[n * p.s_stride_n + grp * p.s_stride_g]);
    float q[4];
    i8::int8x4_to_float(words[j], q);
    T* dst = p.w + n * p.ldw + k;
    store_pair(dst, q[0] * s, q[1] * s);
    store_pair(dst + 8, q[2] * s, q[3] * s);
  }
}

template <typename T>
cudaError_t launch_typed(const Int8DequantArgs& a, cudaStream_t stream) {
  DequantParams<T> p;
  p.q = a.qpacked;
  p.s = static_cast<const T*>(a.scales);
  p.s_stride_n = a.s_stride_n;
  p.s_stride_g = a.group_size > 0 ? a.s_stride_g : 0;
  p.w = static_cast<T*>(a.w);
  p.ldw = a.ldw;
  p.N = a.N;
  p.K = a.K;
  p.kbs = a.K / 16;
  p.gshift = a.group_size == 32 ? 5 : (a.group_size == 64 ? 6 : (a.group_size == 128 ? 7 : 62));
  p.records = util::ceil_div(a.N, 32) * p.kbs * 32;
  const int64_t blocks = util::ceil_div(p.records, kThreads);
  if (blocks > 0x7fffffff) return cudaErrorInvalidConfiguration;
  int8_dequantize_kernel<T><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_int8_dequantize(const Int8DequantArgs& a, cudaStream_t stream) {
  if (a.N < 1 || a.K < 16 || a.K % 16 != 0) return cudaErrorInvalidValue;
  const int64_t G = a.group_size;
  if (G != 0 && G != 32 && G != 64 && G != 128) return cudaErrorInvalidValue;
  if (G != 0 && a.K % G != 0) return cudaErrorInvalidValue;
  if (a.qpacked == nullptr || a.scales == nullptr || a.w == nullptr) return cudaErrorInvalidValue;
  const size_t esize = a.dtype == Int8DType::kFloat32 ? 4 : 2;
  // Pair stores: w and its rows aligned to two elements.
  if ((reinterpret_cast<uintptr_t>(a.qpacked) & 15u) != 0 ||
      (reinterpret_cast<uintptr_t>(a.w) & (2 * esize - 1)) != 0 || a.ldw % 2 != 0 || a.ldw < a.K) {
    return cudaErrorInvalidValue;
  }
  switch (a.dtype) {
    case Int8DType::kFloat32:
      return launch_typed<float>(a, stream);
    case Int8DType::kFloat16:
      return launch_typed<__half>(a, stream);
    case Int8DType::kBFloat16:
      return launch_typed<__nv_bfloat16>(a, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace lrkernels
