// The LoRA dropout mask: a counter-based hash of (seed, row, column) that the CPU kernels, the
// CUDA kernels, the Triton kernels and the torch reference compute bit-identically, so that no
// mask is ever stored (the backward regenerates it). The definition (lrkernels/reference.py):
//
//   mix32(v)  = lowbias32: v ^= v >> 16; v *= 0x7feb352d; v ^= v >> 15; v *= 0x846ca68b;
//               v ^= v >> 16                                   (arithmetic mod 2**32)
//   rowkey    = mix32(seed32 ^ mix32(row))                     row of x flattened to (M, K)
//   word      = mix32(rowkey + (col >> 1) * 0x9e3779b9)        one word per two columns
//   keep      = ((word >> (16 * (col & 1))) & 0xffff) >= threshold
//
// Torch-free and usable from host and device code.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define LRK_LORA_HD __host__ __device__ __forceinline__
#else
#define LRK_LORA_HD inline
#endif

namespace lrkernels {
namespace lora {

LRK_LORA_HD uint32_t mix32(uint32_t v) {
  v ^= v >> 16;
  v *= 0x7feb352du;
  v ^= v >> 15;
  v *= 0x846ca68bu;
  v ^= v >> 16;
  return v;
}

LRK_LORA_HD uint32_t dropout_rowkey(uint64_t seed, int64_t row) {
  return mix32(static_cast<uint32_t>(seed) ^ mix32(static_cast<uint32_t>(row)));
}

// The hash word shared by columns 2j and 2j + 1.
LRK_LORA_HD uint32_t dropout_word(uint32_t rowkey, int64_t col) {
  return mix32(rowkey + static_cast<uint32_t>(col >> 1) * 0x9e3779b9u);
}

LRK_LORA_HD bool dropout_keep_from_word(uint32_t word, int64_t col, uint32_t threshold) {
  return ((word >> (16 * (col & 1))) & 0xffffu) >= threshold;
}

LRK_LORA_HD bool dropout_keep(uint32_t rowkey, int64_t col, uint32_t threshold) {
  return dropout_keep_from_word(dropout_word(rowkey, col), col, threshold);
}

}  // namespace lora
}  // namespace lrkernels
