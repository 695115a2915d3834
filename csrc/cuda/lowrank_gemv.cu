// CUDA-core path of y = (x · Vᵀ) · Uᵀ + bias: float32 at any M (exact IEEE FMAs: no TF32), and
// float16 / bfloat16 on GPUs below compute capability 8.0 (no mma.sync m16n8k16). Same structure
// as the tensor-core path (lowrank_kernels.cuh): a split-K `down` kernel with a deterministic
// last-block reduction writing t (float32, rounded to the dtype for 16-bit) to a small workspace,
// then `up`, launched as a programmatic dependent on sm_90.
//
// down: one block per (rank chunk of 8 V rows, K slice, chunk of <= 8 rows of x), 1-D grid, one
//   warp per V row. The block stages its x rows for a k tile in shared memory as float32 (16-byte
//   loads when rows are aligned; no division anywhere: rows and chunks are loop counters), then
//   each lane streams 16-byte pieces of its V row and accumulates all x rows against each piece,
//   so V is read once per row chunk. Warp sums give the 8 x 8 partial; the last of the S slices
//   to arrive (common/splitk.cuh) adds the S partials in slice order and writes t. The split
//   count depends on the block count alone: S = min(ceil(2 SMs / blocks), 16, in / 256).
// up: one block per (32 outputs, row chunk); each warp owns 4 outputs: it loads their first 256
//   U entries (16-byte pieces) before waiting for `down`, then stages t for the row chunk and
//   accumulates; warp-shuffle sums, + bias, rounded.
//
// Expected (H200, in = out = 4096, rank 128, float32, M = 1): V and U are 2 MiB each, streamed by
// >= 128 blocks per kernel: ~3 us per kernel, ~5 us per call with PDL (torch's two float32 GEMVs
// ~8 us, to be measured). Large M is a fallback (every row chunk re-reads V and U from L2):
// float32 at M >= 64 is left to torch by the dispatch (lrkernels/ops/lowrank.py).

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "common/convert.cuh"
#include "common/pdl.cuh"
#include "common/splitk.cuh"
#include "common/util.cuh"
#include "lowrank_kernels.cuh"
#include "lowrank_launch.cuh"

namespace lrkernels {
namespace cuda {
namespace {

using cvt::kVecElems;
using cvt::to_float;
using util::min64;
using util::warp_sum;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
static_assert(kWarps == kGemvRank && kWarps * 4 == kGemvOutRows, "one warp per V row / 4 outputs");
constexpr int kRows = kGemvRows;  // rows of x per block
constexpr int kTileK = 1024;      // x tile width (floats per row): 8 x 1024 x 4 = 32 KiB
constexpr int kUpTile = 256;      // rank entries per step of `up`
static_assert(kRows * kTileK * 4 <= 48 * 1024, "static shared memory");

// Loads kN consecutive elements at p as float. kN == 1: any alignment; kN == kVecElems<T>: one
// 16-byte load (p 16-byte aligned). Through L2 (__ldcg): on sm_90 `up` runs these loads while
// `down` may still be running, and they must never hit a line another kernel left in L1.
template <typename T, int kN>
__device__ __forceinline__ void load_floats(const T* p, float (&v)[kN]) {
  if constexpr (kN == 1) {
    v[0] = to_float(p[0]);
  } else {
    static_assert(kN == kVecElems<T>, "vector loads are exactly 16 bytes");
    const uint4 raw = __ldcg(reinterpret_cast<const uint4*>(p));
    const uint32_t w[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      if constexpr (sizeof(T) == 4) {
        v[i] = __uint_as_float(w[i]);
      } else {
        v[2 * i] = cvt::unpack_lo<T>(w[i]);
        v[2 * i + 1] = cvt::unpack_hi<T>(w[i]);
      }
    }
  }
}

template <typename T>
struct GemvParams {
  const T* x;
  const T* V;  // row-major (rank, in)
  const T* U;  // row-major (out, rank)
  const T* bias;
  T* y;
  float* t;  // (M, ldt) float32
  float* partial;
  unsigned* counters;
  int64_t M, in, out, rank, ldx, ldt;
  int64_t slice, rank_chunks, up_col_blocks;
  int splits;
};

// kVecX: x rows 16-byte loadable (in and ldx multiples of kVecElems<T>, x 16-byte aligned);
// kVecV: V rows likewise. kRound: round t to T (16-bit dtypes).
template <typename T, bool kVecX, bool kVecV, bool kRound>
__global__ void __launch_bounds__(kThreads, 2) lowrank_gemv_down_kernel(const GemvParams<T> p) {
  constexpr int kNX = kVecX ? kVecElems<T> : 1;
  constexpr int kNV = kVecV ? kVecElems<T> : 1;
  __shared__ __align__(16) float xs[kRows * kTileK];
  __shared__ int last_flag[1];

  const int warp = static_cast<int>(threadIdx.x) >> 5;
  const int lane = static_cast<int>(threadIdx.x) & 31;
  const int64_t bid = blockIdx.x;
  const int64_t rc = bid % p.rank_chunks;
  const int64_t rest = bid / p.rank_chunks;
  const int s = static_cast<int>(rest % p.splits);
  const int64_t chunk = rest / p.splits;
  const int64_t m0 = chunk * kRows;
  const int rows = static_cast<int>(min64(kRows, p.M - m0));
  const int64_t j = rc * kGemvRank + warp;
  const bool row_ok = j < p.rank;  // warp-uniform; idle warps still take part in the barriers
  const T* v_row = p.V + (row_ok ? j : 0) * p.in;
  const int64_t k_begin = s * p.slice;
  const int64_t k_end = min64(p.in, k_begin + p.slice);

  pdl::wait();  // x and V may be written by the previous kernel of the stream
  pdl::launch_dependents();

  float acc[kRows];
#pragma unroll
  for (int m = 0; m < kRows; ++m) acc[m] = 0.f;

  for (int64_t k0 = k_begin; k0 < k_end; k0 += kTileK) {
    const int len = static_cast<int>(min64(kTileK, k_end - k0));  // a multiple of kNX
    __syncthreads();  // the previous tile is no longer being read
    for (int m = 0; m < rows; ++m) {
      const T* src = p.x + (m0 + m) * p.ldx + k0;
      float* dst = xs + m * kTileK;
      for (int c = static_cast<int>(threadIdx.x) * kNX; c < len; c += kThreads * kNX) {
        float v[kNX];
        load_floats<T, kNX>(src + c, v);
#pragma unroll
        for (int q = 0; q < kNX; ++q) dst[c + q] = v[q];
      }
    }
    __syncthreads();
    if (row_ok) {
      for (int c = lane * kNV; c < len; c += 32 * kNV) {  // len % kNV == 0 when kVecV
        float v[kNV];
        load_floats<T, kNV>(v_row + k0 + c, v);
#pragma unroll
        for (int m = 0; m < kRows; ++m) {
          if (m < rows) {
            const float* xr = xs + m * kTileK + c;
            float sum = acc[m];
#pragma unroll
            for (int q = 0; q < kNV; ++q) sum = fmaf(xr[q], v[q], sum);
            acc[m] = sum;
          }
        }
      }
    }
  }
#pragma unroll
  for (int m = 0; m < kRows; ++m) acc[m] = warp_sum(acc[m]);  // every lane holds the sums

  if (p.splits > 1) {
    constexpr int kTileFloats = kRows * kGemvRank;
    const int64_t tile = chunk * p.rank_chunks + rc;
    float* base = p.partial + tile * p.splits * kTileFloats;
    if (lane == 0) {
#pragma unroll
      for (int m = 0; m < kRows; ++m) {
        if (m < rows) base[s * kTileFloats + m * kGemvRank + warp] = acc[m];
      }
    }
    if (!splitk::arrive_last(p.counters + tile, static_cast<unsigned>(p.splits), last_flag)) {
      return;
    }
    const int t_id = static_cast<int>(threadIdx.x);
    if (t_id < rows * kGemvRank) {  // one (row, V row) element per thread, in slice order
      float sum = 0.f;
      for (int q = 0; q < p.splits; ++q) sum += __ldcg(base + q * kTileFloats + t_id);
      const int m = t_id / kGemvRank, w = t_id % kGemvRank;  // powers of two: shifts
      if constexpr (kRound) sum = to_float(cvt::from_float<T>(sum));
      p.t[(m0 + m) * p.ldt + rc * kGemvRank + w] = sum;
    }
    return;
  }
  if (lane == 0) {
#pragma unroll
    for (int m = 0; m < kRows; ++m) {
      if (m < rows) {
        const float total = kRound ? to_float(cvt::from_float<T>(acc[m])) : acc[m];
        p.t[(m0 + m) * p.ldt + j] = total;  // j < ldt; rows j >= rank get exact zeros
      }
    }
  }
}

// kVecU: U rows 16-byte loadable (rank % kVecElems == 0, U aligned).
template <typename T, bool kVecU>
__global__ void __launch_bounds__(kThreads, 2) lowrank_gemv_up_kernel(const GemvParams<T> p) {
  constexpr int kN = kVecU ? kVecElems<T> : 1;
  constexpr int kPieces = kUpTile / (32 * kN);  // pieces of kN per lane per step
  __shared__ __align__(16) float ts[kRows * kUpTile];

  const int warp = static_cast<int>(threadIdx.x) >> 5;
  const int lane = static_cast<int>(threadIdx.x) & 31;
  const int64_t bid = blockIdx.x;
  const int64_t nb = bid % p.up_col_blocks;
  const int64_t chunk = bid / p.up_col_blocks;
  const int64_t m0 = chunk * kRows;
  const int rows = static_cast<int>(min64(kRows, p.M - m0));
  const int64_t n_first = nb * kGemvOutRows + warp * 4;

  float acc[4][kRows];
#pragma unroll
  for (int o = 0; o < 4; ++o) {
#pragma unroll
    for (int m = 0; m < kRows; ++m) acc[o][m] = 0.f;
  }
  float u[4][kPieces][kN];
  auto load_u = [&](int64_t r0) {
#pragma unroll
    for (int o = 0; o < 4; ++o) {
#pragma unroll
      for (int i = 0; i < kPieces; ++i) {
        const int64_t c = r0 + (i * 32 + lane) * kN;
        if (n_first + o < p.out && c < p.rank) {
          load_floats<T, kN>(p.U + (n_first + o) * p.rank + c, u[o][i]);
        } else {
#pragma unroll
          for (int q = 0; q < kN; ++q) u[o][i][q] = 0.f;
        }
      }
    }
  };
  load_u(0);    // U is never written by `down`: stream it before waiting
  pdl::wait();  // t is
  pdl::launch_dependents();

  for (int64_t r0 = 0; r0 < p.ldt; r0 += kUpTile) {
    const int width = static_cast<int>(min64(kUpTile, p.ldt - r0));  // a multiple of 8
    if (r0 > 0) load_u(r0);
    __syncthreads();  // the previous step's t is no longer being read
    for (int m = 0; m < rows; ++m) {
      for (int c = static_cast<int>(threadIdx.x) * 4; c < width; c += kThreads * 4) {
        *reinterpret_cast<float4*>(ts + m * kUpTile + c) =
            __ldcg(reinterpret_cast<const float4*>(p.t + (m0 + m) * p.ldt + r0 + c));
      }
    }
    __syncthreads();
#pragma unroll
    for (int i = 0; i < kPieces; ++i) {
      const int c = (i * 32 + lane) * kN;
      if (c < width) {  // U pieces past `rank` are zeros, t columns past `rank` too
#pragma unroll
        for (int m = 0; m < kRows; ++m) {
          if (m < rows) {
            const float* tr = ts + m * kUpTile + c;
#pragma unroll
            for (int o = 0; o < 4; ++o) {
              float sum = acc[o][m];
#pragma unroll
              for (int q = 0; q < kN; ++q) sum = fmaf(tr[q], u[o][i][q], sum);
              acc[o][m] = sum;
            }
          }
        }
      }
    }
  }

#pragma unroll
  for (int o = 0; o < 4; ++o) {
    const int64_t n = n_first + o;
    const float b = (p.bias != nullptr && n < p.out) ? to_float(p.bias[n]) : 0.f;
#pragma unroll
    for (int m = 0; m < kRows; ++m) {
      if (m < rows) {  // block-uniform, so every lane takes part in the shuffles
        const float total = warp_sum(acc[o][m]);
        if (lane == 0 && n < p.out) p.y[(m0 + m) * p.out + n] = cvt::from_float<T>(total + b);
      }
    }
  }
}

template <typename T>
cudaError_t launch_typed(const LowRankArgs& a, const LowRankPlan& plan, void* workspace,
                         unsigned* counters, cudaStream_t stream) {
  GemvParams<T> p;
  p.x = static_cast<const T*>(a.x);
  p.V = static_cast<const T*>(a.V);
  p.U = static_cast<const T*>(a.U);
  p.bias = static_cast<const T*>(a.bias);
  p.y = static_cast<T*>(a.y);
  p.t = static_cast<float*>(workspace);
  p.partial =
      reinterpret_cast<float*>(static_cast<unsigned char*>(workspace) + partial_offset(plan));
  p.counters = counters;
  p.M = a.M;
  p.in = a.in;
  p.out = a.out;
  p.rank = a.rank;
  p.ldx = a.ldx;
  p.ldt = plan.ldt;
  p.slice = plan.slice;
  p.rank_chunks = plan.rank_chunks;
  p.up_col_blocks = plan.up_col_tiles;
  p.splits = plan.splits;

  constexpr int kN = kVecElems<T>;
  constexpr bool kRound = !std::is_same<T, float>::value;
  const bool vec_x = a.in % kN == 0 && a.ldx % kN == 0 && plan_detail::aligned16(a.x);
  const bool vec_v = a.in % kN == 0 && plan_detail::aligned16(a.V);
  const bool vec_u = a.rank % kN == 0 && plan_detail::aligned16(a.U);
  const dim3 down_grid(static_cast<unsigned>(plan.down_blocks()));
  const dim3 up_grid(static_cast<unsigned>(plan.up_blocks()));
  using lowrank_launch::launch;
  cudaError_t err;
  if (vec_x && vec_v) {
    err = launch(plan.pdl, lowrank_gemv_down_kernel<T, true, true, kRound>, down_grid, kThreads, 0,
                 stream, p);
  } else if (vec_v) {
    err = launch(plan.pdl, lowrank_gemv_down_kernel<T, false, true, kRound>, down_grid, kThreads, 0,
                 stream, p);
  } else {
    err = launch(plan.pdl, lowrank_gemv_down_kernel<T, false, false, kRound>, down_grid, kThreads,
                 0, stream, p);
  }
  if (err != cudaSuccess) return err;
  if (vec_u) {
    return launch(plan.pdl, lowrank_gemv_up_kernel<T, true>, up_grid, kThreads, 0, stream, p);
  }
  return launch(plan.pdl, lowrank_gemv_up_kernel<T, false>, up_grid, kThreads, 0, stream, p);
}

}  // namespace

cudaError_t launch_lowrank_gemv(const LowRankArgs& args, const LowRankPlan& plan, void* workspace,
                                unsigned* counters, cudaStream_t stream) {
  // This path reads V and U row-major (the torch launcher copies other layouts) and keeps the
  // slices a multiple of 8 elements (16-byte aligned x / V pieces).
  if (args.v_sk != 1 || args.v_sj != args.in || args.u_sj != 1 || args.u_sn != args.rank ||
      plan.slice % 8 != 0 || (args.in + plan.slice - 1) / plan.slice != plan.splits ||
      plan.row_tiles != (args.M + kRows - 1) / kRows ||
      plan.rank_chunks != (args.rank + kGemvRank - 1) / kGemvRank ||
      plan.ldt != plan.rank_chunks * kGemvRank ||
      plan.up_col_tiles != (args.out + kGemvOutRows - 1) / kGemvOutRows ||
      plan.up_row_tiles != plan.row_tiles || plan.down_blocks() > 0x7fffffff ||
      plan.up_blocks() > 0x7fffffff || (plan.splits > 1 && counters == nullptr)) {
    return cudaErrorInvalidValue;
  }
  switch (args.dtype) {
    case DType::kFloat32:
      return launch_typed<float>(args, plan, workspace, counters, stream);
    case DType::kFloat16:
      return launch_typed<__half>(args, plan, workspace, counters, stream);
    case DType::kBFloat16:
      return launch_typed<__nv_bfloat16>(args, plan, workspace, counters, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace lrkernels
