// Device helpers shared by the int8 weight-only kernels (int8_gemv.cu, int8_gemm_tc.cu):
// float <-> storage-dtype conversions, exact int8 -> float32 dequantization, int8 vector loads,
// packing of 8 16-bit values and a warp sum. Conversions use explicit intrinsics only: torch
// builds define __CUDA_NO_HALF_CONVERSIONS__ / __CUDA_NO_BFLOAT16_CONVERSIONS__.
// Own namespace (int8_detail), so that nothing clashes with the low-rank kernels' helpers.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace lrkernels {
namespace cuda {
namespace int8_detail {

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

// Round-to-nearest-even conversion from float32 to the storage dtype.
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

// Raw 16 bits of a 16-bit element.
__device__ __forceinline__ uint32_t to_bits(__half v) { return __half_as_ushort(v); }
__device__ __forceinline__ uint32_t to_bits(__nv_bfloat16 v) { return __bfloat16_as_ushort(v); }

// Rounds 8 floats to the 16-bit dtype T and packs them into one 16-byte vector (element 0 in
// the low half-word of .x, i.e. memory order on a little-endian device).
template <typename T>
__device__ __forceinline__ uint4 pack8(const float* v) {
  uint32_t w[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    w[i] = to_bits(from_float<T>(v[2 * i])) | (to_bits(from_float<T>(v[2 * i + 1])) << 16);
  }
  return make_uint4(w[0], w[1], w[2], w[3]);
}

// out[j] = float(q_j) * s for the four int8 values packed in w (q_j = byte j, little-endian),
// rounded once, exactly like float(q) * s in float32. The int8 -> float conversion avoids the
// slow I2F unit (16 per clock per SM, below what HBM delivers in int8 weights): flipping the
// sign bit gives the byte q + 128 (0..255); placed in the mantissa of 2^23 it is the float
// 2^23 + q + 128, and subtracting 2^23 + 128 is exact (integers below 2^24).
__device__ __forceinline__ void dequant4(uint32_t w, float s, float* out) {
  const uint32_t biased = w ^ 0x80808080u;
  // __byte_perm selector: result byte 0 = input byte j of `biased`, bytes 1, 2 = 0x00 and
  // byte 3 = 0x4B (bytes 4..7 are those of 0x4B000000, low first).
  out[0] = __fmul_rn(
      __fsub_rn(__uint_as_float(__byte_perm(biased, 0x4B000000u, 0x7440u)), 8388736.0f), s);
  out[1] = __fmul_rn(
      __fsub_rn(__uint_as_float(__byte_perm(biased, 0x4B000000u, 0x7441u)), 8388736.0f), s);
  out[2] = __fmul_rn(
      __fsub_rn(__uint_as_float(__byte_perm(biased, 0x4B000000u, 0x7442u)), 8388736.0f), s);
  out[3] = __fmul_rn(
      __fsub_rn(__uint_as_float(__byte_perm(biased, 0x4B000000u, 0x7443u)), 8388736.0f), s);
}

// kBytes (4, 8 or 16) consecutive int8 at p as kBytes / 4 words, one vector load: p must be
// kBytes-aligned.
template <int kBytes>
__device__ __forceinline__ void load_q_vec(const int8_t* __restrict__ p, uint32_t* w) {
  static_assert(kBytes == 4 || kBytes == 8 || kBytes == 16, "vector loads of 4, 8 or 16 bytes");
  if constexpr (kBytes == 16) {
    const uint4 v = __ldg(reinterpret_cast<const uint4*>(p));
    w[0] = v.x;
    w[1] = v.y;
    w[2] = v.z;
    w[3] = v.w;
  } else if constexpr (kBytes == 8) {
    const uint2 v = __ldg(reinterpret_cast<const uint2*>(p));
    w[0] = v.x;
    w[1] = v.y;
  } else {
    w[0] = __ldg(reinterpret_cast<const unsigned int*>(p));
  }
}

// The same with byte loads (any alignment): bytes j < nvalid are read, the rest are zero.
template <int kBytes>
__device__ __forceinline__ void load_q_scalar(const int8_t* __restrict__ p, int nvalid,
                                              uint32_t* w) {
#pragma unroll
  for (int i = 0; i < kBytes / 4; ++i) w[i] = 0u;
  const unsigned char* b = reinterpret_cast<const unsigned char*>(p);
#pragma unroll
  for (int j = 0; j < kBytes; ++j) {
    if (j < nvalid) w[j >> 2] |= static_cast<uint32_t>(__ldg(b + j)) << (8 * (j & 3));
  }
}

// Sum over the 32 lanes of a warp; every lane gets the total. All lanes must call it.
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

__host__ __device__ constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
__host__ __device__ constexpr int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
__host__ __device__ constexpr int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

inline bool is_aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// Scale lookup shared by both kernels: scale of W[n, k] is scales[n * scale_ld + (k >> gshift)].
// Per group: scale_ld = K / G, gshift = log2(G). Per channel: scale_ld = 1 and gshift = 62, so
// that every k < 2^62 falls in "group" 0.
inline void scale_layout(int64_t K, int64_t group_size, int64_t* scale_ld, int* gshift) {
  if (group_size <= 0) {
    *scale_ld = 1;
    *gshift = 62;
    return;
  }
  *scale_ld = K / group_size;
  int s = 0;
  while ((int64_t{1} << s) < group_size) ++s;
  *gshift = s;
}

}  // namespace int8_detail
}  // namespace cuda
}  // namespace lrkernels
