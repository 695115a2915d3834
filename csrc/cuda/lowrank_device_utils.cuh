// Legacy: the low-rank kernels use csrc/cuda/common/ now; only attention_fwd.cu still includes
// this header (delete it when attention moves to common/, as the attention rewrite does).
// Device helpers once shared by the low-rank kernels:
// float <-> storage-dtype conversions, 16-byte vector loads unpacked to float, packing of 8
// 16-bit values, and a warp sum. Only explicit intrinsics are used for conversions, because
// torch builds define __CUDA_NO_HALF_CONVERSIONS__ / __CUDA_NO_BFLOAT16_CONVERSIONS__ (no
// implicit casts between float and __half / __nv_bfloat16).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace lrkernels {
namespace cuda {
namespace detail {

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

// Round-to-nearest-even conversion from the float32 accumulator to the storage dtype.
template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __half from_float<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// Raw 16 bits of a 16-bit element and back.
__device__ __forceinline__ uint32_t to_bits(__half v) { return __half_as_ushort(v); }
__device__ __forceinline__ uint32_t to_bits(__nv_bfloat16 v) { return __bfloat16_as_ushort(v); }
template <typename T>
__device__ __forceinline__ T from_bits(uint32_t bits);
template <>
__device__ __forceinline__ __half from_bits<__half>(uint32_t bits) {
  return __ushort_as_half(static_cast<unsigned short>(bits & 0xffffu));
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_bits<__nv_bfloat16>(uint32_t bits) {
  return __ushort_as_bfloat16(static_cast<unsigned short>(bits & 0xffffu));
}

// Elements of T in one 16-byte vector.
template <typename T>
constexpr int kVecElems = static_cast<int>(16 / sizeof(T));

// Loads kN consecutive elements at p and widens them to float. kN == 1 is a scalar load (any
// alignment); kN == kVecElems<T> is one 16-byte load, so p must be 16-byte aligned.
template <typename T, int kN>
__device__ __forceinline__ void load_as_float(const T* __restrict__ p, float (&v)[kN]) {
  if constexpr (kN == 1) {
    v[0] = to_float(__ldg(p));
  } else {
    static_assert(kN == kVecElems<T>, "vector loads are exactly 16 bytes");
    const uint4 raw = __ldg(reinterpret_cast<const uint4*>(p));
    const uint32_t w[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      if constexpr (sizeof(T) == 4) {
        v[i] = __uint_as_float(w[i]);
      } else {
        // Little-endian: the element with the lower index is in the low half-word.
        v[2 * i] = to_float(from_bits<T>(w[i]));
        v[2 * i + 1] = to_float(from_bits<T>(w[i] >> 16));
      }
    }
  }
}

// Rounds 8 floats to the 16-bit dtype T and packs them into one 16-byte vector (element 0 in
// the low half-word of .x).
template <typename T>
__device__ __forceinline__ uint4 pack8(const float (&v)[8]) {
  uint32_t w[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    w[i] = to_bits(from_float<T>(v[2 * i])) | (to_bits(from_float<T>(v[2 * i + 1])) << 16);
  }
  return make_uint4(w[0], w[1], w[2], w[3]);
}

// Sum over the 32 lanes of a warp; every lane gets the total. All lanes must call it.
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

__host__ __device__ constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
__host__ __device__ constexpr int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

inline bool is_aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

}  // namespace detail
}  // namespace cuda
}  // namespace lrkernels
