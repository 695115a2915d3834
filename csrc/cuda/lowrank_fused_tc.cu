// Tensor-core fused path of y = (x · Vᵀ) · Uᵀ + bias for float16 / bfloat16, rank <= 512,
// compute capability >= 8.0 (bf16 wmma).
//
// Shapes (row-major, contiguous): x (M, in), V (rank, in), U (out, rank), bias (out) or none,
// y (M, out). Products on tensor cores (nvcuda::wmma 16x16x16) with float32 accumulators; t is
// rounded to the input dtype before the second product (two-matmul numerics); the bias is added
// to the float32 accumulator before the final rounding.
//
// Tiling: a block of 256 threads (8 warps) owns BM = 64 rows of x; grid = (ceil(M/64), S).
//   Phase 1: t[64, rank_pad] = x_tile · Vᵀ, rank_pad = rank rounded up to 16. The rank is done
//     in passes of 128 columns (4 accumulator fragments per warp, registers stay bounded); each
//     pass loops over `in` in BK = 32 steps with x and V tiles double-buffered in shared memory
//     (next tile prefetched into registers while the current one is multiplied). t is rounded
//     to the dtype and kept in shared memory for the whole block (64 x (rank_pad + 8) elements,
//     66.5 KB at rank 512); columns rank..rank_pad-1 are exact zeros.
//   Phase 2: for each of this block's output tiles of BN = 64 columns (tiles s, s + S, ...):
//     acc = t · U_tileᵀ, U tiles of 64 x 64 double-buffered through shared memory along rank;
//     the epilogue adds bias, rounds, and writes y with bounds checks.
// Split S: `out` is split across S blocks per row tile so that small M still fills the GPU.
//   Every split recomputes its row tile's t. Phase 1 costs ~in·rank MACs per row (V comes
//   from L2 after the first split reads it), while phase 2 streams U and writes y; the split
//   count is chosen by a cost model (same as the Triton kernel's) that charges waves x
//   (phase-1 traffic + tiles x phase-2 traffic), so the recomputation is only bought when it
//   shortens the critical path, e.g. few row tiles and a wide `out`.
// Zero fill: rows >= M, k >= in, rank padding and columns >= out load as zeros; stores are
// bounds-checked. 16-byte global loads are used when a row length is a multiple of 8 elements
// and the base pointers are 16-byte aligned (template flags picked at launch), scalar loads
// otherwise.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <atomic>
#include <cstdint>

#include "lowrank_device_utils.cuh"
#include "lowrank_kernels.cuh"

namespace lrkernels {
namespace cuda {
namespace {

namespace wmma = nvcuda::wmma;
using detail::ceil_div;
using detail::from_float;
using detail::pack8;
using detail::to_float;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kBM = 64;            // rows of x per block: 4 warp rows of 16
constexpr int kBN = 64;            // output columns per phase-2 tile: 2 warp columns x 2 fragments
constexpr int kBK = 32;            // phase-1 step along `in`
constexpr int kRankPass = 128;     // phase-1 columns of t per pass: 2 warp columns x 4 fragments
constexpr int kBKU = 64;           // phase-2 step along rank
constexpr int kPad = 8;            // row padding (elements): ldm stays a multiple of 8, rows stay
                                   // 16-byte aligned, consecutive rows shift by 4 banks
constexpr int kLdK = kBK + kPad;   // 40: x / V tiles
constexpr int kLdU = kBKU + kPad;  // 72: U tiles
constexpr int kXsElems = kBM * kLdK;
constexpr int kVsElems = kRankPass * kLdK;
constexpr int kP1BufElems = kXsElems + kVsElems;  // one phase-1 stage (x tile + V tile)
constexpr int kUsElems = kBN * kLdU;              // one phase-2 stage (U tile)
constexpr int kStageFloats = 16 * 16;             // per-warp fp32 scratch for one fragment
constexpr int kElemBytes = 2;                     // float16 / bfloat16

constexpr int cmax(int a, int b) { return a > b ? a : b; }
// The pipeline buffers of the two phases and the per-warp fragment scratch share one region:
// they are never live at the same time (separated by __syncthreads).
constexpr int kPipeBytes =
    cmax(cmax(2 * kP1BufElems * kElemBytes, 2 * kUsElems * kElemBytes), kWarps * kStageFloats * 4);
static_assert(kXsElems * kElemBytes % 128 == 0 && kP1BufElems * kElemBytes % 128 == 0 &&
                  kUsElems * kElemBytes % 128 == 0,
              "stage buffers must stay 128-byte aligned (wmma needs 32)");
static_assert(kLdK % 8 == 0 && kLdU % 8 == 0, "wmma ldm for 16-bit types: multiple of 8");
static_assert(kBM == 4 * 16 && kWarps == 8, "warp layout: 4 warp rows x 2 warp columns");

// Leading dimension of t in shared memory: rank_pad + 8 keeps it a multiple of 8 (wmma ldm),
// rows 16-byte aligned, fragment rows (16 x ldt x 2 bytes) 32-byte aligned.
int64_t t_ld(int64_t rank_pad) { return rank_pad + kPad; }
size_t smem_bytes(int64_t rank_pad) {
  return static_cast<size_t>(kBM * t_ld(rank_pad) * kElemBytes) + kPipeBytes;
}

template <typename T>
struct FusedParams {
  const T* x;
  const T* U;
  const T* V;
  const T* bias;  // nullptr: no bias
  T* y;
  int64_t M, in, out, rank;
  int rank_pad;  // rank rounded up to 16
  int ldt;       // t_ld(rank_pad)
  bool vec_out;  // out % 8 == 0 and y 16-byte aligned: 16-byte stores
};

// Moves a kRows x kCols tile (kCols a multiple of 8) of a row-major global matrix into shared
// memory through registers, so the global load of the next tile can be issued before the
// current one is multiplied. Each thread owns kPerThread 8-element chunks. Elements outside
// [0, nrows) x [0, ncols) are zero. kVec: 16-byte loads; requires ncols % 8 == 0, col0 % 8 == 0
// and a 16-byte aligned base, so a chunk is entirely inside or outside the matrix.
template <typename T, bool kVec, int kRows, int kCols>
struct TileLoader {
  static constexpr int kChunksPerRow = kCols / 8;
  static constexpr int kChunks = kRows * kChunksPerRow;
  static_assert(kCols % 8 == 0 && kChunks % kThreads == 0, "tile must split evenly");
  static constexpr int kPerThread = kChunks / kThreads;
  uint4 reg[kPerThread];

  __device__ __forceinline__ void load(const T* __restrict__ g, int64_t ld, int64_t row0,
                                       int64_t nrows, int64_t col0, int64_t ncols) {
#pragma unroll
    for (int i = 0; i < kPerThread; ++i) {
      const int chunk = static_cast<int>(threadIdx.x) + i * kThreads;
      const int64_t r = row0 + chunk / kChunksPerRow;
      const int64_t c = col0 + (chunk % kChunksPerRow) * 8;
      uint4 v = make_uint4(0u, 0u, 0u, 0u);
      if (r < nrows) {
        if constexpr (kVec) {
          if (c < ncols) v = __ldg(reinterpret_cast<const uint4*>(g + r * ld + c));
        } else {
          const unsigned short* src = reinterpret_cast<const unsigned short*>(g) + r * ld;
          uint32_t w[4] = {0u, 0u, 0u, 0u};
#pragma unroll
          for (int q = 0; q < 8; ++q) {
            if (c + q < ncols)
              w[q >> 1] |= static_cast<uint32_t>(__ldg(src + c + q)) << ((q & 1) * 16);
          }
          v = make_uint4(w[0], w[1], w[2], w[3]);
        }
      }
      reg[i] = v;
    }
  }

  __device__ __forceinline__ void store(T* s, int lds) const {
#pragma unroll
    for (int i = 0; i < kPerThread; ++i) {
      const int chunk = static_cast<int>(threadIdx.x) + i * kThreads;
      const int r = chunk / kChunksPerRow;
      const int c = (chunk % kChunksPerRow) * 8;
      *reinterpret_cast<uint4*>(s + r * lds + c) = reg[i];
    }
  }
};

// kVecIn: x and V rows use 16-byte loads (in % 8 == 0, both 16-byte aligned).
// kVecRank: U rows use 16-byte loads (rank % 8 == 0, U 16-byte aligned).
template <typename T, bool kVecIn, bool kVecRank>
__global__ void __launch_bounds__(kThreads, 2) lowrank_fused_tc_kernel(const FusedParams<T> p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // bf16 wmma needs sm_80; the launcher never selects this path below 8.0
#else
  using FragA = wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major>;
  using FragB = wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major>;
  using FragC = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;

  extern __shared__ __align__(128) unsigned char smem[];
  // [ t: kBM x ldt elements | pipeline region: kPipeBytes ]. kBM * ldt * 2 bytes is a multiple
  // of 1024 (ldt % 8 == 0), so the pipeline region stays 128-byte aligned.
  T* t_s = reinterpret_cast<T*>(smem);
  T* pipe = reinterpret_cast<T*>(smem + static_cast<size_t>(kBM) * p.ldt * kElemBytes);

  const int warp = static_cast<int>(threadIdx.x) >> 5;
  const int lane = static_cast<int>(threadIdx.x) & 31;
  const int wr = warp & 3;   // warp row: rows wr*16 .. wr*16+15 of the tile
  const int wc = warp >> 2;  // warp column: fragment columns interleaved as (2f + wc) * 16
  // Per-warp fp32 scratch, aliasing the pipeline buffers: used only between a k loop's final
  // barrier and the barrier that follows the epilogue.
  float* stage = reinterpret_cast<float*>(pipe) + warp * kStageFloats;
  // This lane's 8 consecutive elements of a 16 x 16 fragment in the scratch.
  const int lr = lane >> 1;
  const int lc = (lane & 1) * 8;

  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kBM;

  // ---- Phase 1: t = round(x_tile · Vᵀ), rank_pad columns in passes of kRankPass. ----
  {
    TileLoader<T, kVecIn, kBM, kBK> x_ld;
    TileLoader<T, kVecIn, kRankPass, kBK> v_ld;
    const int64_t nk = ceil_div(p.in, kBK);
    for (int c0 = 0; c0 < p.rank_pad; c0 += kRankPass) {
      FragC acc[4];
#pragma unroll
      for (int f = 0; f < 4; ++f) wmma::fill_fragment(acc[f], 0.f);

      x_ld.load(p.x, p.in, row0, p.M, 0, p.in);
      v_ld.load(p.V, p.in, c0, p.rank, 0, p.in);
      x_ld.store(pipe, kLdK);
      v_ld.store(pipe + kXsElems, kLdK);
      __syncthreads();

      for (int64_t kt = 0; kt < nk; ++kt) {
        const T* buf = pipe + (kt & 1) * kP1BufElems;
        const bool more = kt + 1 < nk;
        if (more) {  // prefetch the next k tile into registers
          x_ld.load(p.x, p.in, row0, p.M, (kt + 1) * kBK, p.in);
          v_ld.load(p.V, p.in, c0, p.rank, (kt + 1) * kBK, p.in);
        }
#pragma unroll
        for (int ks = 0; ks < kBK; ks += 16) {
          FragA a;
          wmma::load_matrix_sync(a, buf + wr * 16 * kLdK + ks, kLdK);
#pragma unroll
          for (int f = 0; f < 4; ++f) {
            const int col = (2 * f + wc) * 16;  // within the pass
            if (c0 + col < p.rank_pad) {        // warp-uniform
              // B = Vᵀ: element (k, j) is V_tile[j][k], i.e. column-major with ldm kLdK.
              FragB b;
              wmma::load_matrix_sync(b, buf + kXsElems + col * kLdK + ks, kLdK);
              wmma::mma_sync(acc[f], a, b, acc[f]);
            }
          }
        }
        if (more) {  // the other buffer was last read before the previous barrier
          T* next = pipe + ((kt + 1) & 1) * kP1BufElems;
          x_ld.store(next, kLdK);
          v_ld.store(next + kXsElems, kLdK);
        }
        __syncthreads();
      }

      // Round this pass of t to T into t_s (through the per-warp fp32 scratch, since the
      // accumulator fragment layout is opaque). Padding columns (>= rank) are stored as exact
      // zeros so that nothing (not even inf * 0 from x) leaks into phase 2.
#pragma unroll
      for (int f = 0; f < 4; ++f) {
        const int col = c0 + (2 * f + wc) * 16;
        if (col < p.rank_pad) {
          wmma::store_matrix_sync(stage, acc[f], 16, wmma::mem_row_major);
          __syncwarp();
          float v[8];
#pragma unroll
          for (int q = 0; q < 8; ++q) {
            v[q] = (col + lc + q < p.rank) ? stage[lr * 16 + lc + q] : 0.f;
          }
          *reinterpret_cast<uint4*>(t_s + (wr * 16 + lr) * p.ldt + col + lc) = pack8<T>(v);
          __syncwarp();
        }
      }
      __syncthreads();  // scratch aliases the pipeline buffers reused by the next pass / phase 2
    }
  }

  // ---- Phase 2: y tile = t · U_tileᵀ + bias for tiles blockIdx.y, blockIdx.y + S, ... ----
  {
    TileLoader<T, kVecRank, kBN, kBKU> u_ld;
    const int64_t n_tiles = ceil_div(p.out, kBN);
    const int nku = (p.rank_pad + kBKU - 1) / kBKU;
    for (int64_t tile = blockIdx.y; tile < n_tiles; tile += gridDim.y) {
      const int64_t n0 = tile * kBN;
      FragC acc[2];
#pragma unroll
      for (int f = 0; f < 2; ++f) wmma::fill_fragment(acc[f], 0.f);

      u_ld.load(p.U, p.rank, n0, p.out, 0, p.rank);
      u_ld.store(pipe, kLdU);
      __syncthreads();  // also orders phase 1's t_s writes before the reads below

      for (int kt = 0; kt < nku; ++kt) {
        const T* buf = pipe + (kt & 1) * kUsElems;
        const bool more = kt + 1 < nku;
        if (more) u_ld.load(p.U, p.rank, n0, p.out, static_cast<int64_t>(kt + 1) * kBKU, p.rank);
        const int k0 = kt * kBKU;
#pragma unroll
        for (int ks = 0; ks < kBKU; ks += 16) {
          if (k0 + ks < p.rank_pad) {  // block-uniform: the last step may be partial
            FragA a;
            wmma::load_matrix_sync(a, t_s + wr * 16 * p.ldt + k0 + ks, p.ldt);
#pragma unroll
            for (int f = 0; f < 2; ++f) {
              // B = U_tileᵀ: element (k, n) is U_tile[n][k], column-major with ldm kLdU.
              FragB b;
              wmma::load_matrix_sync(b, buf + (2 * f + wc) * 16 * kLdU + ks, kLdU);
              wmma::mma_sync(acc[f], a, b, acc[f]);
            }
          }
        }
        if (more) u_ld.store(pipe + ((kt + 1) & 1) * kUsElems, kLdU);
        __syncthreads();
      }

      // Epilogue: fragment -> scratch -> +bias -> round -> y (bounds-checked).
#pragma unroll
      for (int f = 0; f < 2; ++f) {
        wmma::store_matrix_sync(stage, acc[f], 16, wmma::mem_row_major);
        __syncwarp();
        const int64_t m = row0 + wr * 16 + lr;
        const int64_t n = n0 + (2 * f + wc) * 16 + lc;
        if (m < p.M && n < p.out) {
          float v[8];
#pragma unroll
          for (int q = 0; q < 8; ++q) {
            const float b = (p.bias != nullptr && n + q < p.out) ? to_float(p.bias[n + q]) : 0.f;
            v[q] = stage[lr * 16 + lc + q] + b;
          }
          T* dst = p.y + m * p.out + n;
          if (p.vec_out) {  // out % 8 == 0 and n % 8 == 0: all 8 columns are inside
            *reinterpret_cast<uint4*>(dst) = pack8<T>(v);
          } else {
#pragma unroll
            for (int q = 0; q < 8; ++q) {
              if (n + q < p.out) dst[q] = from_float<T>(v[q]);
            }
          }
        }
        __syncwarp();
      }
      __syncthreads();  // scratch aliases the U buffers of the next tile
    }
  }
#endif
}

// Column splits per row tile: minimise waves x per-block traffic (elements), the same model as
// the Triton kernel's choose_config. More splits shorten each block's phase 2 but every split
// re-runs phase 1. Ties go to fewer splits.
int choose_num_splits(int64_t M, int64_t in, int64_t out, int64_t rank_pad, int num_sms) {
  const int64_t sms = num_sms > 0 ? num_sms : 1;
  const int64_t m_tiles = ceil_div(M, kBM);
  const int64_t n_tiles = ceil_div(out, kBN);
  const int64_t phase1 = in * (kBM + rank_pad);
  const int64_t per_tile = kBN * (rank_pad + kBM);
  const int64_t fixed_cost = 4096;
  int64_t max_split = ceil_div(2 * sms, m_tiles);
  if (max_split > n_tiles) max_split = n_tiles;
  if (max_split > 65535) max_split = 65535;  // gridDim.y limit
  int64_t best_split = 1;
  int64_t best_cost = -1;
  for (int64_t split = 1; split <= max_split; ++split) {
    const int64_t tiles_per_split = ceil_div(n_tiles, split);
    if (ceil_div(n_tiles, tiles_per_split) != split) continue;  // same as a smaller split
    const int64_t waves = ceil_div(m_tiles * split, sms);
    const int64_t cost = waves * (phase1 + tiles_per_split * per_tile + fixed_cost);
    if (best_cost < 0 || cost < best_cost) {
      best_cost = cost;
      best_split = split;
    }
  }
  return static_cast<int>(best_split);
}

template <typename T, bool kVecIn, bool kVecRank>
cudaError_t launch_kernel(const FusedParams<T>& p, dim3 grid, size_t smem, int device,
                          cudaStream_t stream) {
  auto kernel = lowrank_fused_tc_kernel<T, kVecIn, kVecRank>;
  if (smem > 48 * 1024) {
    // Dynamic shared memory above 48 KB needs an explicit opt-in, per kernel and per device.
    // Remember the largest value set per device so that repeated launches skip the call (a
    // race between host threads only repeats it).
    constexpr int kMaxDevices = 64;
    static std::atomic<int> opted_in[kMaxDevices];
    const bool cached = device >= 0 && device < kMaxDevices;
    if (!cached || opted_in[device].load() < static_cast<int>(smem)) {
      const cudaError_t err = cudaFuncSetAttribute(
          kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
      if (err != cudaSuccess) return err;
      if (cached) {
        int prev = opted_in[device].load();
        while (prev < static_cast<int>(smem) &&
               !opted_in[device].compare_exchange_weak(prev, static_cast<int>(smem))) {
        }
      }
    }
  }
  kernel<<<grid, kThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_typed(const LowRankArgs& a, int num_sms, cudaStream_t stream) {
  FusedParams<T> p;
  p.x = static_cast<const T*>(a.x);
  p.U = static_cast<const T*>(a.U);
  p.V = static_cast<const T*>(a.V);
  p.bias = static_cast<const T*>(a.bias);
  p.y = static_cast<T*>(a.y);
  p.M = a.M;
  p.in = a.in;
  p.out = a.out;
  p.rank = a.rank;
  p.rank_pad = static_cast<int>(ceil_div(a.rank, 16) * 16);
  p.ldt = static_cast<int>(t_ld(p.rank_pad));
  p.vec_out = a.out % 8 == 0 && detail::is_aligned16(p.y);

  const size_t smem = smem_bytes(p.rank_pad);
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  int smem_optin = 0;
  err = cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (err != cudaSuccess) return err;
  if (smem > static_cast<size_t>(smem_optin)) return cudaErrorInvalidConfiguration;

  const int64_t m_tiles = ceil_div(a.M, kBM);
  if (m_tiles > 0x7fffffff) return cudaErrorInvalidConfiguration;  // gridDim.x limit
  const int splits = choose_num_splits(a.M, a.in, a.out, p.rank_pad, num_sms);
  const dim3 grid(static_cast<unsigned>(m_tiles), static_cast<unsigned>(splits), 1);

  const bool vec_in = a.in % 8 == 0 && detail::is_aligned16(p.x) && detail::is_aligned16(p.V);
  const bool vec_rank = a.rank % 8 == 0 && detail::is_aligned16(p.U);
  if (vec_in) {
    return vec_rank ? launch_kernel<T, true, true>(p, grid, smem, device, stream)
                    : launch_kernel<T, true, false>(p, grid, smem, device, stream);
  }
  return vec_rank ? launch_kernel<T, false, true>(p, grid, smem, device, stream)
                  : launch_kernel<T, false, false>(p, grid, smem, device, stream);
}

}  // namespace

cudaError_t launch_lowrank_fused_tc(const LowRankArgs& args, int num_sms, cudaStream_t stream) {
  if (args.M < 0 || args.in < 1 || args.out < 1 || args.rank < 1 || args.rank > kMaxFusedRank) {
    return cudaErrorInvalidValue;
  }
  if (args.M == 0) return cudaSuccess;
  if (args.x == nullptr || args.U == nullptr || args.V == nullptr || args.y == nullptr) {
    return cudaErrorInvalidValue;
  }
  switch (args.dtype) {
    case DType::kFloat16:
      return launch_typed<__half>(args, num_sms, stream);
    case DType::kBFloat16:
      return launch_typed<__nv_bfloat16>(args, num_sms, stream);
    case DType::kFloat32:
      break;
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace lrkernels
