// int8 -> 16-bit / 32-bit float conversions by bit manipulation, and the 16-bit pair arithmetic
// that applies int8 scales, for the weight-only int8 kernels. CUDA headers only; the CPU
// emulation runs them as written (__byte_perm, __uint_as_float, __fsub_rn, __hsub2 and __hmul2
// have exact host versions).
//
// Why not the conversion instructions: I2F runs at 16 results per clock per SM on sm_80/sm_90,
// a quarter of what the weight stream of a memory-bound W8A16 product needs (~19 weights per
// clock per SM at 4.3 TB/s on 132 SMs). The tricks below use the byte-permute and 16-bit
// arithmetic pipes instead:
//   * flipping the sign bit of each byte gives u = q + 128 in 0..255;
//   * float16: the half 0x64uu is 1024 + u exactly (10 mantissa bits), so 0x64uu - 1152 = q, two
//     weights per HSUB2;
//   * bfloat16 has 7 mantissa bits (too few for u), so u goes through float32: 0x4B0000uu is
//     2^23 + u, minus 2^23 + 128 gives q exactly, and q (|q| <= 128) is exact in bfloat16, so its
//     upper 16 bits are the bfloat16 and two of them pair up with one byte permute.
// Per 4 weights: float16 1 LOP3 + 2 PRMT + 2 HADD2; bfloat16 1 LOP3 + 4 PRMT + 4 FADD + 2 PRMT.
//
// Register order: a 32-bit "pair" holds two 16-bit values, element 0 in the low half (the order
// of an mma.sync fragment register, and of memory).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

namespace lrkernels {
namespace cuda {
namespace i8 {

template <typename V>
__device__ __forceinline__ V from_bits32(uint32_t u) {
  static_assert(sizeof(V) == 4, "32-bit values only");
  V v;
  memcpy(&v, &u, 4);
  return v;
}
template <typename V>
__device__ __forceinline__ uint32_t to_bits32(V v) {
  static_assert(sizeof(V) == 4, "32-bit values only");
  uint32_t u;
  memcpy(&u, &v, 4);
  return u;
}

// The four int8 of w (byte j = q_j) as two pairs of T, exactly: lo = (q0, q1), hi = (q2, q3).
template <typename T>
__device__ __forceinline__ void int8x4_to_pairs(uint32_t w, uint32_t& lo, uint32_t& hi) {
  static_assert(std::is_same<T, __half>::value || std::is_same<T, __nv_bfloat16>::value,
                "int8x4_to_pairs makes __half or __nv_bfloat16 pairs");
  const uint32_t u = w ^ 0x80808080u;  // q + 128 per byte
  if constexpr (std::is_same<T, __half>::value) {
    // Selector 0x5140: bytes (u0, 0x64, u1, 0x64) -> halves 1024 + u0, 1024 + u1.
    const __half2 bias = from_bits32<__half2>(0x64806480u);  // (1152, 1152)
    lo = to_bits32(__hsub2(from_bits32<__half2>(__byte_perm(u, 0x64646464u, 0x5140u)), bias));
    hi = to_bits32(__hsub2(from_bits32<__half2>(__byte_perm(u, 0x64646464u, 0x7362u)), bias));
  } else {
    // Selector 0x765j: bytes (u_j, 0, 0, 0x4B) -> the float 2^23 + u_j.
    const float q0 = __fsub_rn(__uint_as_float(__byte_perm(u, 0x4B000000u, 0x7650u)), 8388736.f);
    const float q1 = __fsub_rn(__uint_as_float(__byte_perm(u, 0x4B000000u, 0x7651u)), 8388736.f);
    const float q2 = __fsub_rn(__uint_as_float(__byte_perm(u, 0x4B000000u, 0x7652u)), 8388736.f);
    const float q3 = __fsub_rn(__uint_as_float(__byte_perm(u, 0x4B000000u, 0x7653u)), 8388736.f);
    // Selector 0x7632: the upper halves of the two floats (exact: q has <= 8 significant bits).
    lo = __byte_perm(__float_as_uint(q0), __float_as_uint(q1), 0x7632u);
    hi = __byte_perm(__float_as_uint(q2), __float_as_uint(q3), 0x7632u);
  }
}

// The four int8 of w as floats, exactly (float32 outputs; same trick without the packing).
__device__ __forceinline__ void int8x4_to_float(uint32_t w, float* out) {
  const uint32_t u = w ^ 0x80808080u;
  out[0] = __fsub_rn(__uint_as_float(__byte_perm(u, 0x4B000000u, 0x7650u)), 8388736.f);
  out[1] = __fsub_rn(__uint_as_float(__byte_perm(u, 0x4B000000u, 0x7651u)), 8388736.f);
  out[2] = __fsub_rn(__uint_as_float(__byte_perm(u, 0x4B000000u, 0x7652u)), 8388736.f);
  out[3] = __fsub_rn(__uint_as_float(__byte_perm(u, 0x4B000000u, 0x7653u)), 8388736.f);
}

// Element-wise product of two pairs of T, each rounded once to T (HMUL2; on sm_80 bfloat16 it is
// an HFMA2 with a -0 addend, also one rounding). With q exact in one operand and a scale s in the
// other, the result is round_T(q * s): the same value as forming q * s in float32 (exact for
// 16-bit s) and rounding that, which is what dequantize-then-matmul computes.
template <typename T>
__device__ __forceinline__ uint32_t mul_pairs(uint32_t a, uint32_t b) {
  if constexpr (std::is_same<T, __half>::value) {
    return to_bits32(__hmul2(from_bits32<__half2>(a), from_bits32<__half2>(b)));
  } else {
    return to_bits32(__hmul2(from_bits32<__nv_bfloat162>(a), from_bits32<__nv_bfloat162>(b)));
  }
}

// A 16-bit value (raw bits) in both halves of a pair.
__device__ __forceinline__ uint32_t broadcast_pair(uint32_t bits16) {
  return (bits16 & 0xffffu) * 0x10001u;
}

}  // namespace i8
}  // namespace cuda
}  // namespace lrkernels
