// Device helpers shared by the block-sparse attention kernels (attention_fwd.cu, and the
// backward if it wants them): asynchronous 16-byte global -> shared copies (cp.async, sm_80+),
// wmma fragment loads from shared memory that stay ldmatrix-fast for bf16, and the window-mask
// arithmetic of docs/attention.md. CUDA headers only.
//
// cp.async: on sm_80+ the copy is asynchronous; the destination may be read only after
// cp_async_wait_all() and, by other threads, after the __syncthreads() that follows it. Anywhere
// else (host pass, the CPU emulation in tests/cuda_emulation) the copy is done synchronously at
// issue, which is a valid schedule of the same program.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <cstdint>
#include <type_traits>

namespace lrkernels {
namespace cuda {
namespace attn {

// Copies 16 bytes from global `src` to shared `dst` (both 16-byte aligned). When !valid nothing
// is read and `dst` gets zeros; `src` must still be a valid address of the tensor (pass its base).
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, bool valid) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned dst_addr = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  const int src_bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst_addr), "l"(src),
               "r"(src_bytes)
               : "memory");
#else
  *static_cast<uint4*>(dst) = valid ? *static_cast<const uint4*>(src) : make_uint4(0u, 0u, 0u, 0u);
#endif
}

// Closes the group of copies issued since the previous commit.
__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

// Waits until every copy this thread issued has landed (its own view; other threads need a
// __syncthreads() after this).
__device__ __forceinline__ void cp_async_wait_all() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group 0;\n" ::: "memory");
#endif
}

// wmma::load_matrix_sync of a 16x16x16 A or B fragment from SHARED memory (p 32-byte aligned,
// ldm in elements, a multiple of 8). For __half this is load_matrix_sync itself. For
// __nv_bfloat16, nvcc (13.0) emits the generic-address form of wmma.load (no .shared), which
// ptxas turns into per-register generic loads plus movmatrix transposes instead of ldmatrix and
// which costs registers; on sm_80+ the .shared form is issued directly instead, filling the
// fragment's storage (8 bf16 = 4 x b32 registers) exactly as load_matrix_sync would.
template <class Use, class Layout>
__device__ __forceinline__ void load_frag_smem(
    nvcuda::wmma::fragment<Use, 16, 16, 16, __half, Layout>& f, const __half* p, unsigned ldm) {
  nvcuda::wmma::load_matrix_sync(f, p, ldm);
}
template <class Use, class Layout>
__device__ __forceinline__ void load_frag_smem(
    nvcuda::wmma::fragment<Use, 16, 16, 16, __nv_bfloat16, Layout>& f, const __nv_bfloat16* p,
    unsigned ldm) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  static_assert(sizeof(f.x) == 16, "bf16 m16n16k16 A/B fragment: 4 registers");
  uint32_t* reg = reinterpret_cast<uint32_t*>(&f.x[0]);
  const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(p));
  constexpr bool kA = std::is_same_v<Use, nvcuda::wmma::matrix_a>;
  constexpr bool kRow = std::is_same_v<Layout, nvcuda::wmma::row_major>;
  static_assert(kA || std::is_same_v<Use, nvcuda::wmma::matrix_b>, "A or B fragments only");
  // volatile + "memory": never merged with, or moved across, the barriers that guard the buffer.
  if constexpr (kA && kRow) {
    asm volatile("wmma.load.a.sync.aligned.row.m16n16k16.shared.bf16 {%0, %1, %2, %3}, [%4], %5;\n"
                 : "=r"(reg[0]), "=r"(reg[1]), "=r"(reg[2]), "=r"(reg[3])
                 : "r"(addr), "r"(ldm)
                 : "memory");
  } else if constexpr (kA) {
    asm volatile("wmma.load.a.sync.aligned.col.m16n16k16.shared.bf16 {%0, %1, %2, %3}, [%4], %5;\n"
                 : "=r"(reg[0]), "=r"(reg[1]), "=r"(reg[2]), "=r"(reg[3])
                 : "r"(addr), "r"(ldm)
                 : "memory");
  } else if constexpr (kRow) {
    asm volatile("wmma.load.b.sync.aligned.row.m16n16k16.shared.bf16 {%0, %1, %2, %3}, [%4], %5;\n"
                 : "=r"(reg[0]), "=r"(reg[1]), "=r"(reg[2]), "=r"(reg[3])
                 : "r"(addr), "r"(ldm)
                 : "memory");
  } else {
    asm volatile("wmma.load.b.sync.aligned.col.m16n16k16.shared.bf16 {%0, %1, %2, %3}, [%4], %5;\n"
                 : "=r"(reg[0]), "=r"(reg[1]), "=r"(reg[2]), "=r"(reg[3])
                 : "r"(addr), "r"(ldm)
                 : "memory");
  }
#else
  nvcuda::wmma::load_matrix_sync(f, p, ldm);
#endif
}

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

}  // namespace attn
}  // namespace cuda
}  // namespace lrkernels
