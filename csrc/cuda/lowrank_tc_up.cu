// Second kernel of the tensor-core low-rank path: y = t · Uᵀ + bias (float16 / bfloat16, sm_80+),
// t (M x ldt, the dtype) from lowrank_tc_down.cu's workspace; and the path's launcher.
//
// Grid: one block per (output-column tile, row tile), column tile fastest (the blocks that share
// a t row tile run together), 1-D. K = ldt (rank rounded up to the down kernel's rank chunk; the
// padding columns of t are exact zeros and U's load as zeros), through the same 4-stage cp.async
// -> ldmatrix -> mma.sync loop as `down`. U may be row-major (Layout::kRows), a transposed view
// such as the input gradient's Vᵀ (kCols: ldmatrix.trans, no copy) or anything else (kStrided).
// PDL: launched as a programmatic dependent of `down`; before it waits for t, a block loads its
// bias values and issues the copies of its first 3 U tiles (U and bias are never written by
// `down`), so U's DRAM latency and the launch overlap `down`'s tail. Epilogue: + bias in float32,
// rounded, staged through shared memory and written with 16-byte stores (element stores when
// `out` is odd or y misaligned).
//
// Expected (H200, bf16, out = 4096, rank 128; to be measured by bench/lowrank.py): M <= 64:
// U (1 MiB) streamed by 128-512 blocks, mostly hidden behind `down` by PDL: ~1-2 us after t is
// ready. M = 8192: y (64 MiB) written at ~3.5 TB/s ~19 us, MMA (8.6 GFLOP) ~21 us at ~400 TFLOP/s
// of mma.sync; 128 x 128 tiles, 2048 blocks (~8 waves of 2 per SM).

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "common/convert.cuh"
#include "common/pdl.cuh"
#include "common/util.cuh"
#include "lowrank_kernels.cuh"
#include "lowrank_launch.cuh"
#include "lowrank_tc.cuh"

namespace lrkernels {
namespace cuda {
namespace lowrank_tc {
namespace {

template <typename T>
struct UpParams {
  Operand<T> t;   // rows M, ks ldt
  Operand<T> u;   // rows out, ks rank
  const T* bias;  // nullptr: none
  T* y;           // (M, out) contiguous
  int64_t col_tiles;
  bool vec_out;  // out % 8 == 0 and y 16-byte aligned
};

template <typename T, class S, Layout kU>
__global__ void __launch_bounds__(S::kThreads, S::kMinBlocks)
    lowrank_up_kernel(const UpParams<T> p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // mma.sync m16n8k16 needs sm_80; the planner never picks this path below 8.0
#else
  using Loop = Mainloop<T, S, Layout::kRows, kU>;
  constexpr int kLdy = S::kBN + 8;  // staging pitch: 4-bank shift per row, 16-byte rows
  static_assert(S::kBM * kLdy * static_cast<int>(sizeof(T)) <= Loop::kSmemBytes,
                "the output tile fits in the pipeline's shared memory");
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* smem = reinterpret_cast<T*>(smem_raw);

  const int64_t bid = blockIdx.x;
  const int64_t ct = bid % p.col_tiles;
  const int64_t rt = bid / p.col_tiles;
  const int64_t row0 = rt * S::kBM, col0 = ct * S::kBN;
  const int64_t M = p.t.rows, out = p.u.rows;
  const int lane = static_cast<int>(threadIdx.x) & 31, warp = static_cast<int>(threadIdx.x) >> 5;
  const int wm0 = (warp / S::kWarpsN) * S::kWM, wn0 = (warp % S::kWarpsN) * S::kWN;
  const int g = lane >> 2, tq = lane & 3;

  // Bias of this thread's columns wn0 + 8 ni + 2 tq (+1): read before the wait.
  float bias_v[S::kNI][2];
#pragma unroll
  for (int ni = 0; ni < S::kNI; ++ni) {
#pragma unroll
    for (int q = 0; q < 2; ++q) {
      const int64_t n = col0 + wn0 + ni * 8 + 2 * tq + q;
      // Through L2 like U's cp.async.cg: no L1 line of an earlier kernel can be stale here.
      bias_v[ni][q] = (p.bias != nullptr && n < out) ? cvt::to_float(__ldcg(p.bias + n)) : 0.f;
    }
  }

  float acc[S::kMI][S::kNI][4];
  Loop::run(smem, p.t, row0, p.u, col0, 0, p.t.ks, acc, [] { pdl::wait(); }, [] {});
  pdl::launch_dependents();  // a dependent waits for this whole grid anyway

  // acc + bias, rounded, into the shared staging tile [BM][kLdy] (the pipeline is drained).
#pragma unroll
  for (int mi = 0; mi < S::kMI; ++mi) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int r = wm0 + mi * 16 + g + 8 * h;
#pragma unroll
      for (int ni = 0; ni < S::kNI; ++ni) {
        const int c = wn0 + ni * 8 + 2 * tq;
        *reinterpret_cast<uint32_t*>(smem + r * kLdy + c) = cvt::pack2<T>(
            acc[mi][ni][2 * h] + bias_v[ni][0], acc[mi][ni][2 * h + 1] + bias_v[ni][1]);
      }
    }
  }
  __syncthreads();

  constexpr int kChunksPerRow = S::kBN / 8;
  constexpr int kChunks = S::kBM * kChunksPerRow;
  static_assert(kChunks % S::kThreads == 0, "whole chunks per thread");
#pragma unroll
  for (int i = 0; i < kChunks / S::kThreads; ++i) {
    const int c = static_cast<int>(threadIdx.x) + i * S::kThreads;
    const int r = c / kChunksPerRow, cc = (c % kChunksPerRow) * 8;  // powers of two: shifts
    const int64_t m = row0 + r, n = col0 + cc;
    if (m < M && n < out) {
      const T* src = smem + r * kLdy + cc;
      T* dst = p.y + m * out + n;
      if (p.vec_out) {
        *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src);
      } else {
#pragma unroll
        for (int q = 0; q < 8; ++q) {
          if (n + q < out) dst[q] = src[q];
        }
      }
    }
  }
#endif
}

template <typename T, class S, Layout kU>
cudaError_t launch_shape(const UpParams<T>& p, const LowRankPlan& plan, cudaStream_t stream) {
  constexpr auto kKernel = lowrank_up_kernel<T, S, kU>;
  constexpr int kSmem = Mainloop<T, S, Layout::kRows, kU>::kSmemBytes;
  const cudaError_t err = lowrank_launch::ensure_smem<kKernel>(kSmem);
  if (err != cudaSuccess) return err;
  return lowrank_launch::launch(plan.pdl, kKernel, dim3(static_cast<unsigned>(plan.up_blocks())),
                                dim3(S::kThreads), kSmem, stream, p);
}

template <typename T, Layout kU>
cudaError_t launch_layout(const UpParams<T>& p, const LowRankPlan& plan, cudaStream_t stream) {
  switch (plan.up_tile) {
    case Tile::k16:
      return launch_shape<T, Shape16, kU>(p, plan, stream);
    case Tile::k64:
      return launch_shape<T, Shape64, kU>(p, plan, stream);
    case Tile::k128:
      return launch_shape<T, Shape128, kU>(p, plan, stream);
  }
  return cudaErrorInvalidValue;
}

template <typename T>
cudaError_t launch_typed(const LowRankArgs& a, const LowRankPlan& plan, const void* t,
                         cudaStream_t stream) {
  UpParams<T> p;
  p.t = {static_cast<const T*>(t), plan.ldt, 1, a.M, plan.ldt};
  p.u = {static_cast<const T*>(a.U), a.u_sn, a.u_sj, a.out, a.rank};
  p.bias = static_cast<const T*>(a.bias);
  p.y = static_cast<T*>(a.y);
  p.col_tiles = plan.up_col_tiles;
  p.vec_out = a.out % 8 == 0 && plan_detail::aligned16(a.y);
  switch (plan.u_layout) {
    case Layout::kRows:
      return launch_layout<T, Layout::kRows>(p, plan, stream);
    case Layout::kCols:
      return launch_layout<T, Layout::kCols>(p, plan, stream);
    case Layout::kStrided:
      return launch_layout<T, Layout::kStrided>(p, plan, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t launch_tc_up(const LowRankArgs& args, const LowRankPlan& plan, const void* t,
                         cudaStream_t stream) {
  const TileDims d = tile_dims(plan.up_tile);
  if (plan.up_row_tiles != (args.M + d.bm - 1) / d.bm ||
      plan.up_col_tiles != (args.out + d.bn - 1) / d.bn || plan.ldt % kTcBK != 0 ||
      plan.ldt < args.rank || plan.up_blocks() > 0x7fffffff) {
    return cudaErrorInvalidValue;
  }
  switch (args.dtype) {
    case DType::kFloat16:
      return launch_typed<__half>(args, plan, t, stream);
    case DType::kBFloat16:
      return launch_typed<__nv_bfloat16>(args, plan, t, stream);
    case DType::kFloat32:
      break;
  }
  return cudaErrorInvalidValue;
}

}  // namespace lowrank_tc

cudaError_t launch_lowrank_tc(const LowRankArgs& args, const LowRankPlan& plan, void* workspace,
                              unsigned* counters, cudaStream_t stream) {
  float* partial =
      reinterpret_cast<float*>(static_cast<unsigned char*>(workspace) + partial_offset(plan));
  cudaError_t err = lowrank_tc::launch_tc_down(args, plan, workspace, partial, counters, stream);
  if (err == cudaSuccess && plan.separate_reduce()) {
    err = lowrank_tc::launch_tc_reduce(args, plan, workspace, partial, stream);
  }
  if (err != cudaSuccess) return err;
  return lowrank_tc::launch_tc_up(args, plan, workspace, stream);
}

}  // namespace cuda
}  // namespace lrkernels
