// Conversions between float32 and the 16-bit storage dtypes, raw bits and packed pairs, written
// once for every kernel family. CUDA headers only. Only explicit intrinsics: torch builds define
// __CUDA_NO_HALF_CONVERSIONS__ / __CUDA_NO_BFLOAT16_CONVERSIONS__ (no implicit casts).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace lrkernels {
namespace cuda {
namespace cvt {

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

// Round-to-nearest-even conversion from a float32 accumulator to the storage dtype.
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

// Two floats rounded to T and packed in one 32-bit register, `lo` in the low half (the order of
// an mma fragment register: element 2t in the low half, 2t + 1 in the high half).
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  return to_bits(from_float<T>(lo)) | (to_bits(from_float<T>(hi)) << 16);
}

// The two 16-bit elements of a packed register as floats.
template <typename T>
__device__ __forceinline__ float unpack_lo(uint32_t w) {
  return to_float(from_bits<T>(w));
}
template <typename T>
__device__ __forceinline__ float unpack_hi(uint32_t w) {
  return to_float(from_bits<T>(w >> 16));
}

// Elements of T in one 16-byte vector.
template <typename T>
constexpr int kVecElems = static_cast<int>(16 / sizeof(T));

}  // namespace cvt
}  // namespace cuda
}  // namespace lrkernels
