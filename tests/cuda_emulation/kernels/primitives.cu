// One warp checks the shared primitives of csrc/cuda/common/ptx.cuh under the emulation:
// cp.async (with zero-fill, two commit groups and a partial wait), ldmatrix .x1/.x2/.x4 with and
// without .trans, and mma.sync m16n8k16 in f16 and bf16. Test-only (tests/cuda_emulation).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "common/ptx.cuh"
#include "primitives.cuh"

namespace emu_check {
namespace {

namespace ptx = lrkernels::cuda::ptx;

template <class T>
__global__ void primitives_kernel(const T* a, const T* b, const T* bt, int kvalid, float* d) {
  __shared__ __align__(16) T sa[16 * 16];
  __shared__ __align__(16) T sb[16 * 8];
  __shared__ __align__(16) T sbt[8 * 16];
  const int lane = threadIdx.x;
  // Group 0: a (32 chunks of 8 elements, one per lane) and b (16 chunks: rows of 8).
  ptx::cp_async_16(sa + 8 * lane, a + 8 * lane, true);
  if (lane < 16) ptx::cp_async_16(sb + 8 * lane, lane < kvalid ? b + 8 * lane : b, lane < kvalid);
  ptx::cp_async_commit();
  // Group 1: bt (16 chunks: row n = lane / 2, columns 8 (lane % 2) .. + 7).
  if (lane < 16) {
    const int n = lane / 2, k0 = 8 * (lane % 2);
    const bool valid = k0 < kvalid;  // kvalid is a multiple of 8 for bt's zero-fill
    ptx::cp_async_16(sbt + 16 * n + k0, valid ? bt + 16 * n + k0 : bt, valid);
  }
  ptx::cp_async_commit();
  ptx::cp_async_wait<1>();  // group 0 has landed, group 1 may still be in flight
  __syncwarp();

  uint32_t fa[4];
  ptx::ldmatrix_x4(fa, ptx::smem_addr(sa + 16 * (lane % 16) + 8 * (lane / 16)));
  uint32_t b0, b1;
  ptx::ldmatrix_x2_trans(b0, b1, ptx::smem_addr(sb + 8 * (lane % 16)));
  float acc[3][4] = {};
  ptx::mma_m16n8k16<T>(acc[0], fa, b0, b1);

  ptx::cp_async_wait<0>();
  __syncwarp();
  ptx::ldmatrix_x2(b0, b1, ptx::smem_addr(sbt + 16 * (lane % 8) + 8 * ((lane / 8) % 2)));
  ptx::mma_m16n8k16<T>(acc[1], fa, b0, b1);
  ptx::ldmatrix_x1(b0, ptx::smem_addr(sbt + 16 * (lane % 8)));
  ptx::ldmatrix_x1(b1, ptx::smem_addr(sbt + 16 * (lane % 8) + 8));
  ptx::mma_m16n8k16<T>(acc[2], fa, b0, b1);

  // .x4.trans and .x1.trans: transpose the a tile's top-left 8 x 8 block back through shared
  // memory is not needed; check them by reloading sa transposed and comparing bit patterns.
  uint32_t ta[4], t1;
  ptx::ldmatrix_x4_trans(ta, ptx::smem_addr(sa + 16 * (lane % 16) + 8 * (lane / 16)));
  ptx::ldmatrix_x1_trans(t1, ptx::smem_addr(sa + 16 * (lane % 8)));
  // Lane l holds, of matrix 0 (rows 0..7, cols 0..7 of a) transposed, elements
  // (2 (l % 4) + h, l / 4) = a(l / 4, 2 (l % 4) + h)ᵀ ... i.e. a[(2t + h) * 16 + g]: the same as
  // the x1.trans load of that matrix.
  const bool trans_ok = ta[0] == t1;

  const int g = lane / 4, t = lane % 4;
  for (int v = 0; v < 3; ++v) {
    float* dv = d + v * 128;
    dv[g * 8 + 2 * t] = trans_ok ? acc[v][0] : __uint_as_float(0x7fc00000u);
    dv[g * 8 + 2 * t + 1] = acc[v][1];
    dv[(g + 8) * 8 + 2 * t] = acc[v][2];
    dv[(g + 8) * 8 + 2 * t + 1] = acc[v][3];
  }
}

}  // namespace

template <class T>
cudaError_t launch_primitives_check(const T* a, const T* b, const T* bt, int kvalid, float* d) {
  primitives_kernel<T><<<1, 32>>>(a, b, bt, kvalid, d);
  return cudaGetLastError();
}

template cudaError_t launch_primitives_check<__half>(const __half*, const __half*, const __half*,
                                                     int, float*);
template cudaError_t launch_primitives_check<__nv_bfloat16>(const __nv_bfloat16*,
                                                            const __nv_bfloat16*,
                                                            const __nv_bfloat16*, int, float*);

}  // namespace emu_check
