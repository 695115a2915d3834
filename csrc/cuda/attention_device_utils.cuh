// Device helpers of the block-sparse attention kernels (attention_fwd.cuh, attention_bwd.cuh)
// that are attention's own: the window arithmetic of docs/attention.md, reading a CSR-like block
// list, staging (rows x D) tiles in shared memory with cp.async, and the ldmatrix lane addresses
// of mma.sync m16n8k16 fragments read from such tiles. The generic primitives (ldmatrix, mma,
// cp.async, conversions, reductions, exp2) are in common/. CUDA headers only.
//
// Shared-memory tiles: row-major, each row of D elements followed by kPad = 8 elements (16 bytes)
// of padding. The row pitch 2D + 16 bytes is then an odd multiple of 16 bytes (D a multiple of
// 32), so the eight 16-byte row segments one ldmatrix phase reads (with or without .trans) and
// the 16-byte cp.async writes of eight consecutive rows fall in eight distinct 16-byte bank
// groups: no bank conflicts, without a swizzle.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>

#include "attention_kernels.cuh"
#include "common/convert.cuh"
#include "common/ptx.cuh"

namespace lrkernels {
namespace cuda {
namespace attn {

constexpr int kPad = 8;  // elements of padding after each shared-memory row

// ------------------------------------------------------------------------------------ window

// The window of docs/attention.md: query i sees key j iff lo(i) <= j < hi(i) with
//   lo(i) = i + Sk - Sq - left (0 if left < 0),  hi(i) = i + Sk - Sq + right + 1 (Sk if right < 0),
// clipped to [0, Sk]. Empty (lo >= hi) when the row sees no key.
struct KeyRange {
  int64_t lo, hi;
};
__host__ __device__ __forceinline__ KeyRange window_key_range(int64_t i, int64_t Sq, int64_t Sk,
                                                              int64_t left, int64_t right) {
  const int64_t diag = i + Sk - Sq;
  int64_t lo = 0, hi = Sk;
  if (left >= 0 && diag - left > lo) lo = diag - left;
  if (right >= 0 && diag + right + 1 < hi) hi = diag + right + 1;
  return {lo, hi};
}

// True when some query of rows [i0, i1] (i0 <= i1) sees some key of [j0, j1] under the window:
// the union of the rows' ranges is the interval [lo(i0), hi(i1)) since lo and hi are
// non-decreasing in i and every unclipped range is non-empty (left, right >= 0 or unbounded).
__host__ __device__ __forceinline__ bool window_tile_visible(int64_t i0, int64_t i1, int64_t j0,
                                                             int64_t j1, int64_t Sq, int64_t Sk,
                                                             int64_t left, int64_t right) {
  const int64_t lo = window_key_range(i0, Sq, Sk, left, right).lo;
  const int64_t hi = window_key_range(i1, Sq, Sk, left, right).hi;
  return j0 < hi && j1 >= lo && lo < hi;
}

// ------------------------------------------------------------------------------- block lists

// One row (batch, query head, row block) of a BlockList's partial or full list: its indices and
// count, clamped to [0, list width] (a malformed layout cannot make a kernel read out of bounds;
// callers skip indices out of range).
struct ListRow {
  const int32_t* idx;
  int count;
  int width;
};
__device__ __forceinline__ ListRow list_row(const BlockList& l, int64_t b, int64_t h, int64_t blk,
                                            bool full) {
  const int32_t* counts = full ? l.full_counts : l.counts;
  const int32_t* indices = full ? l.full_indices : l.indices;
  const int64_t width = full ? l.max_full_blocks : l.max_blocks;
  if (counts == nullptr || indices == nullptr || width <= 0) return {nullptr, 0, 0};
  const int64_t row = b * l.batch_stride + h * l.head_stride + blk;
  int64_t n = __ldg(counts + row);
  n = n < 0 ? 0 : (n > width ? width : n);
  return {indices + row * width, static_cast<int>(n), static_cast<int>(width)};
}

// --------------------------------------------------------------------------- tile staging

// Starts copying rows [row0, row0 + rows) of a (nrows x D) matrix with row stride `ld` elements
// (unit column stride; base and ld 16-byte aligned) into shared memory `s` (pitch D + kPad);
// rows >= nrows become zeros. The nthreads threads of the block share the 16-byte chunks.
template <typename T, int D>
__device__ __forceinline__ void load_tile_async(T* s, const T* __restrict__ g, int64_t ld,
                                                int64_t row0, int rows, int64_t nrows, int tid,
                                                int nthreads) {
  constexpr int kChunksPerRow = D / 8;
  const int chunks = rows * kChunksPerRow;
  for (int c = tid; c < chunks; c += nthreads) {
    const int r = c / kChunksPerRow;
    const int col = (c % kChunksPerRow) * 8;
    const int64_t row = row0 + r;
    const bool valid = row < nrows;
    ptx::cp_async_16(s + r * (D + kPad) + col, valid ? g + row * ld + col : g, valid);
  }
}

// Starts copying `n` floats (n a multiple of 4, src 16-byte aligned) to shared memory.
__device__ __forceinline__ void load_floats_async(float* s, const float* __restrict__ g, int n,
                                                  int tid, int nthreads) {
  for (int c = tid; c < n / 4; c += nthreads) ptx::cp_async_16(s + 4 * c, g + 4 * c, true);
}

// -------------------------------------------------------- fragment addresses (ldmatrix .x4)
// Tiles of 16 x 16 elements at (r0, c0) of a shared-memory tile with pitch `ld` elements; each
// lane passes the address of the row ldmatrix asks it for (lanes 8i .. 8i + 7: matrix i).

// A operand (16 rows m x 16 columns k) of a row-major tile: registers a0..a3 of
// mma_m16n8k16 (matrices: rows 0-7 / 8-15 x columns 0-7, then the same for columns 8-15).
template <typename T>
__device__ __forceinline__ uint32_t frag_a_addr(const T* s, int ld, int r0, int c0, int lane) {
  return ptx::smem_addr(s + (r0 + (lane & 15)) * ld + c0 + ((lane >> 4) << 3));
}

// B operands of two n-tiles (n0 .. n0 + 15) x 16 k from a tile stored [n][k] (k contiguous, as
// K is for S = Q·Kᵀ), without .trans: registers {b0, b1} of n-tile n0, then of n0 + 8.
template <typename T>
__device__ __forceinline__ uint32_t frag_b_nk_addr(const T* s, int ld, int n0, int k0, int lane) {
  return ptx::smem_addr(s + (n0 + ((lane >> 4) << 3) + (lane & 7)) * ld + k0 +
                        (((lane >> 3) & 1) << 3));
}

// B operands of two n-tiles from a tile stored [k][n] (n contiguous, as V is for O = P·V), with
// .trans: registers {b0, b1} of n-tile n0, then of n0 + 8.
template <typename T>
__device__ __forceinline__ uint32_t frag_b_kn_addr(const T* s, int ld, int k0, int n0, int lane) {
  return ptx::smem_addr(s + (k0 + (((lane >> 3) & 1) << 3) + (lane & 7)) * ld + n0 +
                        ((lane >> 4) << 3));
}

// A operand (16 m x 16 k) from a tile stored transposed, [k][m] (m contiguous), with .trans.
template <typename T>
__device__ __forceinline__ uint32_t frag_a_km_addr(const T* s, int ld, int m0, int k0, int lane) {
  return ptx::smem_addr(s + (k0 + ((lane >> 4) << 3) + (lane & 7)) * ld + m0 +
                        (((lane >> 3) & 1) << 3));
}

// Register p of the A operand of a k-step of 16 columns taken from an accumulator pair (n-tiles
// 2kk and 2kk + 1 of a 16-row accumulator): how P = softmax(S) feeds P·V without leaving
// registers. a0 = rows g, cols 2t..; a1 = rows g + 8; a2, a3 = the same for columns 8 + 2t...
template <typename T>
__device__ __forceinline__ void acc_to_frag_a(const float (&lo)[4], const float (&hi)[4],
                                              uint32_t (&a)[4]) {
  a[0] = cvt::pack2<T>(lo[0], lo[1]);
  a[1] = cvt::pack2<T>(lo[2], lo[3]);
  a[2] = cvt::pack2<T>(hi[0], hi[1]);
  a[3] = cvt::pack2<T>(hi[2], hi[3]);
}

// ------------------------------------------------------------------------------------ host

// Raises kKernel's dynamic shared memory limit to `bytes` when that is above the 48 KB default,
// once per device and kernel (the largest value set is remembered; a race between host threads
// only repeats the call).
template <auto kKernel>
cudaError_t opt_in_smem(size_t bytes) {
  if (bytes <= 48 * 1024) return cudaSuccess;
  constexpr int kMaxDevices = 64;
  static std::atomic<int> opted_in[kMaxDevices];
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  const bool cached = device >= 0 && device < kMaxDevices;
  if (cached && opted_in[device].load() >= static_cast<int>(bytes)) return cudaSuccess;
  err = cudaFuncSetAttribute(kKernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             static_cast<int>(bytes));
  if (err != cudaSuccess) return err;
  if (cached) {
    int prev = opted_in[device].load();
    while (prev < static_cast<int>(bytes) &&
           !opted_in[device].compare_exchange_weak(prev, static_cast<int>(bytes))) {
    }
  }
  return cudaSuccess;
}

}  // namespace attn
}  // namespace cuda
}  // namespace lrkernels
