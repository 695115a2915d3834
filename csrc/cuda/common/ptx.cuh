// Warp-level tensor-core and asynchronous-copy primitives (PTX, sm_80+), written once for every
// kernel family. CUDA headers only. Each asm statement has one exact form that the CPU emulation
// (tests/cuda_emulation: generate.py PTX_FORMS, runtime/ptx.h) knows, with the PTX ISA's lane
// layouts, so a kernel's fragment index arithmetic and its cp.async waits are tested in CI.
//
// Fragment layouts (g = lane / 4, t = lane % 4, h = 0, 1 = low, high half of a 32-bit register):
//   ldmatrix .x{1,2,4}: lanes 8i .. 8i + 7 give the 16-byte row addresses of 8x8 matrix i (lanes
//     of matrices beyond .xN are ignored); register i of lane l gets elements (l / 4, 2 (l % 4) +
//     h) of matrix i, or with .trans (2 (l % 4) + h, l / 4).
//   mma m16n8k16 (row.col, f32 accumulate):
//     a0: A(g, 2t + h)  a1: A(g + 8, 2t + h)  a2: A(g, 2t + 8 + h)  a3: A(g + 8, 2t + 8 + h)
//     b0: B(2t + h, g)  b1: B(2t + 8 + h, g)          (B is k x n, "col": its columns contiguous)
//     d0, d1: D(g, 2t), D(g, 2t + 1)   d2, d3: D(g + 8, 2t), D(g + 8, 2t + 1)
//
// cp.async: cp_async_16 starts a 16-byte global -> shared copy; cp_async_commit closes the group
// of copies this thread issued since the last commit; cp_async_wait<N> returns once at most the N
// most recent committed groups of this thread are still in flight. Other threads may read the
// data only after a __syncthreads() that follows the wait.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

namespace lrkernels {
namespace cuda {
namespace ptx {

// The shared-window address of a pointer into shared memory (what ldmatrix / cp.async take).
__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// The "memory" clobbers keep shared-memory reads and copies between the surrounding barriers.
__device__ __forceinline__ void ldmatrix_x1(uint32_t& r0, uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];\n"
               : "=r"(r0)
               : "r"(addr)
               : "memory");
}
__device__ __forceinline__ void ldmatrix_x1_trans(uint32_t& r0, uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16 {%0}, [%1];\n"
               : "=r"(r0)
               : "r"(addr)
               : "memory");
}
__device__ __forceinline__ void ldmatrix_x2(uint32_t& r0, uint32_t& r1, uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n"
               : "=r"(r0), "=r"(r1)
               : "r"(addr)
               : "memory");
}
__device__ __forceinline__ void ldmatrix_x2_trans(uint32_t& r0, uint32_t& r1, uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n"
               : "=r"(r0), "=r"(r1)
               : "r"(addr)
               : "memory");
}
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr)
               : "memory");
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr)
               : "memory");
}

// d (16 x 8, float32) += a (16 x 16) · b (16 x 8); T is __half or __nv_bfloat16.
template <typename T>
__device__ __forceinline__ void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                             uint32_t b1) {
  static_assert(std::is_same<T, __half>::value || std::is_same<T, __nv_bfloat16>::value,
                "mma_m16n8k16 takes __half or __nv_bfloat16 operands");
  if constexpr (std::is_same<T, __half>::value) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

// Starts copying 16 bytes from global `src` to shared `dst` (both 16-byte aligned), bypassing L1
// (.cg). When !valid nothing is read and `dst` gets zeros (the src-size operand is 0); `src` must
// still be a mapped address (pass the tensor's base pointer).
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, bool valid) {
  const uint32_t dst_addr = smem_addr(dst);
  const uint32_t src_bytes = valid ? 16u : 0u;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst_addr), "l"(src),
               "r"(src_bytes)
               : "memory");
}

__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}

template <int N>
__device__ __forceinline__ void cp_async_wait() {
  static_assert(N >= 0 && N <= 7, "cp.async.wait_group takes 0..7");
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

}  // namespace ptx
}  // namespace cuda
}  // namespace lrkernels
