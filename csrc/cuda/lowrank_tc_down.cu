// First kernel of the tensor-core low-rank path: t = x · Vᵀ (float16 / bfloat16, sm_80+), split
// over `in` inside the launch, t rounded to the dtype into a small workspace for lowrank_tc_up.cu.
//
// Grid: one block per (rank chunk, K slice, row tile), rank chunk fastest (the blocks that share
// an x slice run together and hit it in L2), as a 1-D grid (no 65535 limits). A block computes
// acc[BM x BN] = x[row tile, slice] · V[rank chunk, slice]ᵀ with the multistage cp.async ->
// ldmatrix -> mma.sync loop of lowrank_tc.cuh (4 stages of BK = 32; V read once per row tile).
// Tiles (lowrank_kernels.cuh, chosen per call by the planner's cost model):
//   16 x 32 (2 warps)  decode and small M: many blocks, tiny partials (only rows < M are kept);
//   64 x 64 (4 warps)  mid M;
//   128 x 128 (8 warps, 32 x 64 per warp: 0.375 ldmatrix.x4 per mma) large M.
// Split K: S slices when the row tiles x rank chunks alone leave SMs idle. Each slice stores its
// float32 partial (rows < M only) to the workspace; then, by the plan's Reduce:
//   kLastBlock: the last block to arrive at the tile's counter (common/splitk.cuh) sums the S
//               partials in slice order (its own read back too) and writes t; the counter is left
//               at zero;
//   kSeparate:  the block is done; lowrank_reduce_kernel (below, launched between `down` and `up`)
//               sums them in the same order, one thread per 4 columns of a row of t, over the
//               whole GPU instead of one block per tile.
// Deterministic, and the two give the same bits: the sum order never depends on arrival order.
// S == 1 writes t directly. t columns >= rank are exact zeros (V rows >= rank load as zero).
// PDL: the block waits for the previous kernel before reading x / V, and lets the next kernel
// (`reduce` or `up`) start once its prologue copies are issued.
//
// Expected (H200, bf16, in = 4096, rank 128; planner figures of lowrank_kernels.cuh, to be
// measured by bench/lowrank.py): the V stream (1 MiB) is latency-bound below M = 64, with
// >= 128 blocks each issuing all its copies at once: ~2 us at M = 1-16 (one DRAM round trip plus
// the reduction of <= 32 KiB of partials by the last block). M = 1024: x (8 MiB) + V through
// 128-256 blocks ~4 us. M = 8192: x (64 MiB) at ~3.5 TB/s ~19 us, MMA (8.6 GFLOP) at ~400
// TFLOP/s ~21 us: mma-bound by a little, ~22-25 us with 4 splits of 128 x 128 tiles (256 blocks).
// Separate reduction (M = 1024, rank 64, 19 slices of 64 x 64 tiles, 304 blocks): 4.9 MiB of
// partials read once by 128 blocks from L2, ~1 us plus one dependent launch (~1 us), where the
// last block of each tile would read 19 x 16 KiB through one SM (~3 us on the critical path).

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "common/convert.cuh"
#include "common/pdl.cuh"
#include "common/splitk.cuh"
#include "common/util.cuh"
#include "lowrank_kernels.cuh"
#include "lowrank_launch.cuh"
#include "lowrank_tc.cuh"

namespace lrkernels {
namespace cuda {
namespace lowrank_tc {
namespace {

template <typename T>
struct DownParams {
  Operand<T> x;  // rows M, ks in
  Operand<T> v;  // rows rank, ks in
  T* t;          // (M, ldt)
  int64_t ldt;
  float* partial;  // [tile][slice][BM x BN] float32, rows < M written
  unsigned* counters;
  int64_t slice;
  int64_t rank_chunks;
  int splits;
  bool separate_reduce;  // splits > 1: store the partial and leave the sum to lowrank_reduce
};

template <typename T, class S, Layout kX, Layout kV>
__global__ void __launch_bounds__(S::kThreads, S::kMinBlocks)
    lowrank_down_kernel(const DownParams<T> p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // mma.sync m16n8k16 needs sm_80; the planner never picks this path below 8.0
#else
  using Loop = Mainloop<T, S, kX, kV>;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  __shared__ int last_flag[1];
  T* smem = reinterpret_cast<T*>(smem_raw);

  const int64_t bid = blockIdx.x;
  const int64_t rc = bid % p.rank_chunks;
  const int64_t rest = bid / p.rank_chunks;
  const int s = static_cast<int>(rest % p.splits);
  const int64_t rt = rest / p.splits;
  const int64_t row0 = rt * S::kBM, col0 = rc * S::kBN;
  const int64_t k_begin = s * p.slice;
  const int64_t k_end = util::min64(p.x.ks, k_begin + p.slice);
  const int64_t M = p.x.rows;

  pdl::wait();  // x and V may be written by the previous kernel of the stream
  float acc[S::kMI][S::kNI][4];
  Loop::run(
      smem, p.x, row0, p.v, col0, k_begin, k_end, acc, [] {}, [] { pdl::launch_dependents(); });

  const int lane = static_cast<int>(threadIdx.x) & 31, warp = static_cast<int>(threadIdx.x) >> 5;
  const int wm0 = (warp / S::kWarpsN) * S::kWM, wn0 = (warp % S::kWarpsN) * S::kWN;
  const int g = lane >> 2, tq = lane & 3;
  // This thread's fragment element (mi, ni, h) sits at tile row wm0 + 16 mi + g + 8 h, columns
  // wn0 + 8 ni + 2 tq (+1): acc[mi][ni][2h], acc[mi][ni][2h + 1].

  if (p.splits > 1) {
    constexpr int64_t kTileFloats = S::kBM * S::kBN;
    const int64_t tile = rt * p.rank_chunks + rc;
    float* base = p.partial + tile * p.splits * kTileFloats;
    float* mine = base + s * kTileFloats;
#pragma unroll
    for (int mi = 0; mi < S::kMI; ++mi) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int r = wm0 + mi * 16 + g + 8 * h;
        if (row0 + r < M) {
#pragma unroll
          for (int ni = 0; ni < S::kNI; ++ni) {
            const int c = wn0 + ni * 8 + 2 * tq;
            *reinterpret_cast<float2*>(mine + r * S::kBN + c) =
                make_float2(acc[mi][ni][2 * h], acc[mi][ni][2 * h + 1]);
          }
        }
      }
    }
    if (p.separate_reduce) return;  // lowrank_reduce_kernel sums the partials
    if (!splitk::arrive_last(p.counters + tile, static_cast<unsigned>(p.splits), last_flag)) {
      return;
    }
    // Last block of the tile: t = partial_0 + partial_1 + ... in slice order (its own partial
    // read back too, so the order never depends on which block came last).
#pragma unroll
    for (int mi = 0; mi < S::kMI; ++mi) {
#pragma unroll
      for (int ni = 0; ni < S::kNI; ++ni) {
#pragma unroll
        for (int q = 0; q < 4; ++q) acc[mi][ni][q] = 0.f;
      }
    }
    for (int q = 0; q < p.splits; ++q) {
      const float* part = base + q * kTileFloats;
#pragma unroll
      for (int mi = 0; mi < S::kMI; ++mi) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int r = wm0 + mi * 16 + g + 8 * h;
          if (row0 + r < M) {
#pragma unroll
            for (int ni = 0; ni < S::kNI; ++ni) {
              const int c = wn0 + ni * 8 + 2 * tq;
              const float2 v = __ldcg(reinterpret_cast<const float2*>(part + r * S::kBN + c));
              acc[mi][ni][2 * h] += v.x;
              acc[mi][ni][2 * h + 1] += v.y;
            }
          }
        }
      }
    }
  }

  // t (rounded to T), rows < M; columns up to ldt (a whole number of rank chunks).
#pragma unroll
  for (int mi = 0; mi < S::kMI; ++mi) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t m = row0 + wm0 + mi * 16 + g + 8 * h;
      if (m < M) {
#pragma unroll
        for (int ni = 0; ni < S::kNI; ++ni) {
          const int64_t j = col0 + wn0 + ni * 8 + 2 * tq;
          *reinterpret_cast<uint32_t*>(p.t + m * p.ldt + j) =
              cvt::pack2<T>(acc[mi][ni][2 * h], acc[mi][ni][2 * h + 1]);
        }
      }
    }
  }
#endif
}

template <typename T>
struct ReduceParams {
  const float* partial;  // [tile][slice][bm x bn], rows < M of each tile written
  T* t;                  // (M, ldt)
  int64_t M, ldt, rank_chunks;
  int bm, bn, splits;
};

// The separate reduction (Reduce::kSeparate): t[m, j..j+3] = sum over slices s = 0, 1, ..., S-1
// of the partials, in slice order (the same sum, bit for bit, as the last-block reduction),
// rounded to T. One thread per 4 columns of a row, rows fastest across a warp's neighbours in
// memory (4 columns = one float4 of a partial row; bn % 4 == 0). Loads of 4 slices are issued
// before their adds: a few L2 round trips per thread instead of S. A programmatic dependent of
// `down`: waits for its partials, then lets `up` start streaming U.
template <typename T>
__global__ void __launch_bounds__(kReduceThreads) lowrank_reduce_kernel(const ReduceParams<T> p) {
  const int64_t quads = p.ldt / 4;
  const int64_t e = static_cast<int64_t>(blockIdx.x) * kReduceThreads + threadIdx.x;
  pdl::wait();  // the partials are written by `down`
  pdl::launch_dependents();
  if (e >= p.M * quads) return;
  const int64_t m = e / quads, j = (e % quads) * 4;
  const int64_t tile = (m / p.bm) * p.rank_chunks + j / p.bn;
  const int64_t tile_floats = static_cast<int64_t>(p.bm) * p.bn;
  const float* src = p.partial + tile * p.splits * tile_floats + (m % p.bm) * p.bn + j % p.bn;
  float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
  int s = 0;
  for (; s + 4 <= p.splits; s += 4) {
    float4 v[4];
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      v[q] = __ldcg(reinterpret_cast<const float4*>(src + (s + q) * tile_floats));
    }
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      acc.x += v[q].x;
      acc.y += v[q].y;
      acc.z += v[q].z;
      acc.w += v[q].w;
    }
  }
  for (; s < p.splits; ++s) {
    const float4 v = __ldcg(reinterpret_cast<const float4*>(src + s * tile_floats));
    acc.x += v.x;
    acc.y += v.y;
    acc.z += v.z;
    acc.w += v.w;
  }
  uint32_t* dst = reinterpret_cast<uint32_t*>(p.t + m * p.ldt + j);
  dst[0] = cvt::pack2<T>(acc.x, acc.y);
  dst[1] = cvt::pack2<T>(acc.z, acc.w);
}

template <typename T, class S, Layout kX, Layout kV>
cudaError_t launch_shape(const DownParams<T>& p, const LowRankPlan& plan, cudaStream_t stream) {
  constexpr auto kKernel = lowrank_down_kernel<T, S, kX, kV>;
  constexpr int kSmem = Mainloop<T, S, kX, kV>::kSmemBytes;
  const cudaError_t err = lowrank_launch::ensure_smem<kKernel>(kSmem);
  if (err != cudaSuccess) return err;
  return lowrank_launch::launch(plan.pdl, kKernel, dim3(static_cast<unsigned>(plan.down_blocks())),
                                dim3(S::kThreads), kSmem, stream, p);
}

template <typename T, Layout kX, Layout kV>
cudaError_t launch_layout(const DownParams<T>& p, const LowRankPlan& plan, cudaStream_t stream) {
  switch (plan.down_tile) {
    case Tile::k16:
      return launch_shape<T, Shape16, kX, kV>(p, plan, stream);
    case Tile::k64:
      return launch_shape<T, Shape64, kX, kV>(p, plan, stream);
    case Tile::k128:
      return launch_shape<T, Shape128, kX, kV>(p, plan, stream);
  }
  return cudaErrorInvalidValue;
}

template <typename T>
cudaError_t launch_typed(const LowRankArgs& a, const LowRankPlan& plan, void* t, float* partial,
                         unsigned* counters, cudaStream_t stream) {
  DownParams<T> p;
  p.x = {static_cast<const T*>(a.x), a.ldx, 1, a.M, a.in};
  p.v = {static_cast<const T*>(a.V), a.v_sj, a.v_sk, a.rank, a.in};
  p.t = static_cast<T*>(t);
  p.ldt = plan.ldt;
  p.partial = partial;
  p.counters = counters;
  p.slice = plan.slice;
  p.rank_chunks = plan.rank_chunks;
  p.splits = plan.splits;
  p.separate_reduce = plan.separate_reduce();
  if (plan.x_layout == Layout::kRows && plan.v_layout == Layout::kRows) {
    return launch_layout<T, Layout::kRows, Layout::kRows>(p, plan, stream);
  }
  if (plan.x_layout == Layout::kRows && plan.v_layout == Layout::kCols) {
    return launch_layout<T, Layout::kRows, Layout::kCols>(p, plan, stream);
  }
  if (plan.x_layout == Layout::kStrided && plan.v_layout == Layout::kStrided) {
    return launch_layout<T, Layout::kStrided, Layout::kStrided>(p, plan, stream);
  }
  return cudaErrorInvalidValue;
}

template <typename T>
cudaError_t launch_reduce_typed(const LowRankArgs& a, const LowRankPlan& plan, void* t,
                                const float* partial, cudaStream_t stream) {
  const TileDims d = tile_dims(plan.down_tile);
  ReduceParams<T> p;
  p.partial = partial;
  p.t = static_cast<T*>(t);
  p.M = a.M;
  p.ldt = plan.ldt;
  p.rank_chunks = plan.rank_chunks;
  p.bm = d.bm;
  p.bn = d.bn;
  p.splits = plan.splits;
  return lowrank_launch::launch(plan.pdl, lowrank_reduce_kernel<T>,
                                dim3(static_cast<unsigned>(plan.reduce_blocks(a.M))),
                                dim3(kReduceThreads), 0, stream, p);
}

}  // namespace

cudaError_t launch_tc_reduce(const LowRankArgs& args, const LowRankPlan& plan, void* t,
                             const float* partial, cudaStream_t stream) {
  if (!plan.separate_reduce() || plan.ldt % 4 != 0 || plan.reduce_blocks(args.M) > 0x7fffffff) {
    return cudaErrorInvalidValue;
  }
  switch (args.dtype) {
    case DType::kFloat16:
      return launch_reduce_typed<__half>(args, plan, t, partial, stream);
    case DType::kBFloat16:
      return launch_reduce_typed<__nv_bfloat16>(args, plan, t, partial, stream);
    case DType::kFloat32:
      break;
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_tc_down(const LowRankArgs& args, const LowRankPlan& plan, void* t,
                           float* partial, unsigned* counters, cudaStream_t stream) {
  const int64_t slices_needed = (args.in + plan.slice - 1) / plan.slice;
  const TileDims d = tile_dims(plan.down_tile);
  if (plan.splits < 1 || plan.slice % kTcBK != 0 || slices_needed != plan.splits ||
      plan.row_tiles != (args.M + d.bm - 1) / d.bm ||
      plan.rank_chunks != (args.rank + d.bn - 1) / d.bn || plan.ldt != plan.rank_chunks * d.bn ||
      plan.down_blocks() > 0x7fffffff || plan.reduce_blocks(args.M) > 0x7fffffff ||
      (plan.splits > 1 && !plan.separate_reduce() && counters == nullptr)) {
    return cudaErrorInvalidValue;
  }
  switch (args.dtype) {
    case DType::kFloat16:
      return launch_typed<__half>(args, plan, t, partial, counters, stream);
    case DType::kBFloat16:
      return launch_typed<__nv_bfloat16>(args, plan, t, partial, counters, stream);
    case DType::kFloat32:
      break;
  }
  return cudaErrorInvalidValue;
}

}  // namespace lowrank_tc
}  // namespace cuda
}  // namespace lrkernels
