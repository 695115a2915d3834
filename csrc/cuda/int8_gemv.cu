// Small-M ("decode") path of the int8 weight-only ops, every dtype (float32 / float16 /
// bfloat16), both directions; also the float32 path at any M (CUDA cores, exact FMAs).
//
//   forward    (transposed = false): y (M, N) = a (M, K) · Wᵀ + bias,  a = x
//   transposed (transposed = true):  y (M, K) = a (M, N) · W,          a = dy, no bias
//   W[n, k] = float(q[n, k]) · float(s[n, k >> gshift]) in float32 registers (q int8 (N, K),
//   row-major); float32 accumulation; bias added to the float32 sum; one final rounding.
//
// Rows of a are processed in chunks of kRows (the next power of two >= M, capped at 16; template
// parameter, so that M = 1 does not pay registers for 16 rows). M > 16 loops over chunks of 16
// along gridDim.z: each chunk re-reads W (fine for the float32 fallback).
//
// Forward kernel: grid (ceil(N / (8 R)), S, chunks), 256 threads. Each warp owns R rows n
//   (R = 4; 2 when kRows = 16, for registers), its lanes stride over k: with 16-byte int8 loads
//   (K % 16 == 0, q 16-byte aligned) lane l reads k = c + 16 l .. c + 16 l + 15 of each of its
//   rows (one 512-byte coalesced segment per row per warp), dequantizes them once and
//   multiplies them against all kRows rows of a, staged per k tile (8192 / kRows floats per
//   row) in shared memory as float (XOR-swizzled within 16-float chunks, so that the lanes'
//   float4 reads, 64 bytes apart, hit distinct banks). Otherwise scalar byte loads, one k per
//   lane. Warp-shuffle reduction at the end.
// Transposed kernel: grid (ceil(K / (32 kCols)), S, chunks), 256 threads. Thread = kCols
//   consecutive columns k (kCols = 16, 8 or 4 as kRows grows, keeping kRows x kCols <= 64
//   accumulators), the 8 warps share the block's 32 kCols columns and take the rows n of the
//   block's slice in turn (warp w: rows w, w + 8, ...), up to 8 rows' loads in flight per warp.
//   The a values of a tile of rows n are staged in shared memory as [n][m] float (warp-uniform
//   broadcast reads). The 8 warps' column sums are added in shared memory in warp order at the
//   end.
// Registers: every kernel fits 128 per thread (two 256-thread blocks per SM) without spills.
// Split S of the reduction dimension (K forward, N transposed) over gridDim.y when the other
//   dimensions give fewer than ~2 waves of blocks: each split writes its float32 partial sums
//   to the workspace (S, M, out) and a second tiny kernel adds them in split order, adds the
//   bias and converts (deterministic, no atomics). S == 1 writes y directly.
// Group boundaries: G in {32, 64, 128} is a multiple of 16 and every vector or per-thread
//   column chunk starts at a multiple of its (<= 16) length, so one chunk has one scale.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "int8_device_utils.cuh"
#include "int8_kernels.cuh"

namespace lrkernels {
namespace cuda {
namespace {

using int8_detail::ceil_div;
using int8_detail::dequant4;
using int8_detail::from_float;
using int8_detail::min64;
using int8_detail::to_float;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kMaxRows = 16;       // rows of a per chunk
constexpr int kSmemFloats = 8192;  // 32 KiB of staged activations (static shared memory)
constexpr int kFwdStep = 32 * 16;  // k covered by one warp step of 16-byte loads
constexpr int kMaxGridYZ = 65535;
// Split limits: at most kFwdMaxSplits slices of K of >= kFwdStep elements; at most
// kTrMaxSplits slices of N of >= kTrMinSplitRows rows (16 per warp), which bounds the partial
// sums written (S x M x K floats) against the weight read (N x K bytes).
constexpr int kFwdMaxSplits = 16;
constexpr int kTrMaxSplits = 64;
constexpr int64_t kTrMinSplitRows = 128;
constexpr int kTargetBlocksPerSm = 4;  // ~2 waves of 2 resident 256-thread blocks per SM

// Forward: rows n per warp. Each shared-memory read of a serves all of them, so 4 balances the
// float4 reads against the FMAs; 16 rows of a keep 2 (64 + 64 accumulators would exceed the
// 128 registers of two blocks per SM).
constexpr int fwd_rows_per_warp(int rows) { return rows >= 16 ? 2 : 4; }
constexpr int fwd_rows_per_block(int rows) { return kWarps * fwd_rows_per_warp(rows); }
// Transposed: columns k per thread (kRows x kCols <= 64 accumulators) and rows n of W in flight
// per warp (64 bytes per thread, at most 8 rows).
constexpr int tr_cols(int rows) { return rows <= 4 ? 16 : 64 / rows; }
constexpr int tr_rows_in_flight(int rows) {
  return 64 / tr_cols(rows) < 8 ? 64 / tr_cols(rows) : 8;
}

template <typename T>
struct GemvParams {
  const T* a;
  const int8_t* q;
  const T* scales;
  const T* bias;   // forward only; nullptr: none
  T* y;            // written when partial == nullptr (S == 1)
  float* partial;  // (S, M, out) float32 partial sums when S > 1
  int64_t M, N, K;
  int64_t scale_ld;   // scales per row of W
  int gshift;         // scale of W[n, k]: scales[n * scale_ld + (k >> gshift)]
  int64_t split_len;  // elements of the reduction dimension per split
};

// Position of float c of a staged forward row: the four float4 slots of each 16-float chunk are
// XOR-permuted by bits 1..2 of the chunk index. Lanes l and l + 2 read chunks 2 apart (128
// bytes: the same banks); the permutation sends their reads of logical slot j to different
// physical slots, so each quarter-warp's float4 reads cover all 32 banks once.
__device__ __forceinline__ int fwd_swizzle(int c) {
  const int chunk = c >> 4;
  const int slot = (c >> 2) & 3;
  return (chunk << 4) | ((slot ^ ((chunk >> 1) & 3)) << 2) | (c & 3);
}

// Writes one output (or partial) element of row m (absolute) and column col.
template <typename T>
__device__ __forceinline__ void write_out(const GemvParams<T>& p, int64_t out_cols, int64_t m,
                                          int64_t col, float sum) {
  if (p.partial != nullptr) {
    p.partial[(static_cast<int64_t>(blockIdx.y) * p.M + m) * out_cols + col] = sum;
  } else {
    const float b = p.bias != nullptr ? to_float(p.bias[col]) : 0.f;
    p.y[m * out_cols + col] = from_float<T>(sum + b);
  }
}

// ---------------------------------------------------------------------------------- forward

template <typename T, int kRows, bool kVec>
__global__ void __launch_bounds__(kThreads, 2) int8_gemv_fwd_kernel(const GemvParams<T> p) {
  constexpr int kR = fwd_rows_per_warp(kRows);
  constexpr int kW = kSmemFloats / kRows;  // staged k tile: 512 (16 rows) .. 8192 (1 row)
  static_assert(kW % kFwdStep == 0, "tiles are whole warp steps (keeps the swizzle per lane)");
  __shared__ __align__(16) float xs[kSmemFloats];

  const int warp = static_cast<int>(threadIdx.x) >> 5;
  const int lane = static_cast<int>(threadIdx.x) & 31;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * fwd_rows_per_block(kRows) + warp * kR;
  const bool warp_active = n0 < p.N;  // warp-uniform; idle warps still join the barriers
  // This block's slice [k_begin, k_end) of K; an empty slice writes zeros. split_len and kW
  // are multiples of 16, so every vector offset below is a multiple of 16.
  const int64_t k_begin = static_cast<int64_t>(blockIdx.y) * p.split_len;
  const int64_t k_end = min64(p.K, k_begin + p.split_len);
  // In the vector path lane l always reads chunk l (mod 32) of a tile, so its physical float4
  // offsets within a chunk are fixed: 4 * (j ^ sw).
  const int sw = (lane >> 1) & 3;
  const int64_t num_chunks = ceil_div(p.M, kRows);

  for (int64_t chunk = blockIdx.z; chunk < num_chunks; chunk += gridDim.z) {
    const int64_t m0 = chunk * kRows;
    const int rows = static_cast<int>(min64(kRows, p.M - m0));
    float acc[kR][kRows];
#pragma unroll
    for (int r = 0; r < kR; ++r) {
#pragma unroll
      for (int m = 0; m < kRows; ++m) acc[r][m] = 0.f;
    }

    for (int64_t k0 = k_begin; k0 < k_end; k0 += kW) {
      const int len = static_cast<int>(min64(kW, k_end - k0));
      __syncthreads();  // the previous tile (or chunk) is no longer being read
      for (int m = 0; m < rows; ++m) {
        const T* src = p.a + (m0 + m) * p.K + k0;
        float* dst = xs + m * kW;
        for (int c = static_cast<int>(threadIdx.x); c < len; c += kThreads) {
          dst[fwd_swizzle(c)] = to_float(src[c]);
        }
      }
      __syncthreads();
      if (!warp_active) continue;

      if constexpr (kVec) {
        // len % 16 == 0 here (K % 16 == 0), so the 16 k of a lane are all inside the tile.
        for (int c = lane * 16; c < len; c += kFwdStep) {
          const int64_t k = k0 + c;
          uint32_t raw[kR][4];
          float sc[kR];
#pragma unroll
          for (int r = 0; r < kR; ++r) {
            const int64_t n = n0 + r;
            if (n < p.N) {
              int8_detail::load_q_vec<16>(p.q + n * p.K + k, raw[r]);
              sc[r] = to_float(p.scales[n * p.scale_ld + (k >> p.gshift)]);
            } else {
#pragma unroll
              for (int i = 0; i < 4; ++i) raw[r][i] = 0u;
              sc[r] = 0.f;
            }
          }
          const float* xb = xs + c;  // this lane's 16-float chunk of row 0
#pragma unroll
          for (int j = 0; j < 4; ++j) {  // weights k + 4j .. k + 4j + 3
            float w[kR][4];
#pragma unroll
            for (int r = 0; r < kR; ++r) dequant4(raw[r][j], sc[r], w[r]);
            const int off = 4 * (j ^ sw);
#pragma unroll
            for (int m = 0; m < kRows; ++m) {
              if (m < rows) {
                const float4 xv = *reinterpret_cast<const float4*>(xb + m * kW + off);
#pragma unroll
                for (int r = 0; r < kR; ++r) {
                  float s = acc[r][m];
                  s = fmaf(xv.x, w[r][0], s);
                  s = fmaf(xv.y, w[r][1], s);
                  s = fmaf(xv.z, w[r][2], s);
                  s = fmaf(xv.w, w[r][3], s);
                  acc[r][m] = s;
                }
              }
            }
          }
        }
      } else {
        for (int c = lane; c < len; c += 32) {
          const int64_t k = k0 + c;
          float w[kR];
#pragma unroll
          for (int r = 0; r < kR; ++r) {
            const int64_t n = n0 + r;
            w[r] = 0.f;
            if (n < p.N) {
              const float sc = to_float(p.scales[n * p.scale_ld + (k >> p.gshift)]);
              w[r] = __fmul_rn(static_cast<float>(p.q[n * p.K + k]), sc);
            }
          }
          const float* xb = xs + fwd_swizzle(c);
#pragma unroll
          for (int m = 0; m < kRows; ++m) {
            if (m < rows) {
              const float xv = xb[m * kW];
#pragma unroll
              for (int r = 0; r < kR; ++r) acc[r][m] = fmaf(xv, w[r], acc[r][m]);
            }
          }
        }
      }
    }

    if (warp_active) {
#pragma unroll
      for (int r = 0; r < kR; ++r) {
#pragma unroll
        for (int m = 0; m < kRows; ++m) {
          if (m < rows) {  // block-uniform: every lane takes part in the shuffles
            const float total = int8_detail::warp_sum(acc[r][m]);
            const int64_t n = n0 + r;
            if (lane == 0 && n < p.N) write_out(p, p.N, m0 + m, n, total);
          }
        }
      }
    }
  }
}

// ------------------------------------------------------------------------------- transposed

// Staged a of the transposed kernel: element (n, m) of a tile at n * kRows + m, with the float4
// quads of a row (kRows >= 8) XOR-permuted by row so that the staging stores (one thread per
// row n, rows kRows floats apart) spread over all banks. Reads fetch whole quads.
template <int kRows>
__device__ __forceinline__ int tr_quad_swizzle(int n) {
  if constexpr (kRows >= 8) {
    constexpr int kQuads = kRows / 4;
    return (n / (8 / kQuads)) % kQuads;
  } else {
    return 0;
  }
}

template <typename T, int kRows, bool kVec>
__global__ void __launch_bounds__(kThreads, 2) int8_gemv_tr_kernel(const GemvParams<T> p) {
  constexpr int kCols = tr_cols(kRows);      // columns k per thread: 16, 8 or 4
  constexpr int kColsPerBlock = 32 * kCols;  // shared by the block's 8 warps
  // Rows n of W in flight per warp; the byte-load fallback keeps 4 (registers).
  constexpr int kU = kVec ? tr_rows_in_flight(kRows) : 4;
  constexpr int kTN = kSmemFloats / kRows;  // rows n per staged tile: 512 .. 8192
  static_assert(kWarps * kColsPerBlock <= kSmemFloats, "reduction buffer fits the staging one");
  static_assert(kTN % kThreads == 0, "staging: whole rounds of rows");
  __shared__ __align__(16) float as[kSmemFloats];

  const int warp = static_cast<int>(threadIdx.x) >> 5;
  const int lane = static_cast<int>(threadIdx.x) & 31;
  const int64_t col0 = static_cast<int64_t>(blockIdx.x) * kColsPerBlock + lane * kCols;
  const bool col_ok = col0 < p.K;
  // Columns of this thread inside W: all kCols in the vector path (K % 16 == 0), else clipped.
  const int nvalid = col_ok ? static_cast<int>(min64(kCols, p.K - col0)) : 0;
  const int64_t sgroup = col_ok ? (col0 >> p.gshift) : 0;  // one group for all kCols columns
  const int64_t n_begin = static_cast<int64_t>(blockIdx.y) * p.split_len;
  const int64_t n_end = min64(p.N, n_begin + p.split_len);
  const int64_t num_chunks = ceil_div(p.M, kRows);

  for (int64_t chunk = blockIdx.z; chunk < num_chunks; chunk += gridDim.z) {
    const int64_t m0 = chunk * kRows;
    const int rows = static_cast<int>(min64(kRows, p.M - m0));
    float acc[kRows][kCols];
#pragma unroll
    for (int m = 0; m < kRows; ++m) {
#pragma unroll
      for (int j = 0; j < kCols; ++j) acc[m][j] = 0.f;
    }

    for (int64_t t0 = n_begin; t0 < n_end; t0 += kTN) {
      const int tlen = static_cast<int>(min64(kTN, n_end - t0));
      __syncthreads();  // the previous tile (or the reduction buffer) is no longer being read
      // One thread per row n: kRows coalesced loads (rows m >= `rows` are zero), then whole
      // quads to shared memory.
      for (int nl = static_cast<int>(threadIdx.x); nl < tlen; nl += kThreads) {
        float v[kRows];
#pragma unroll
        for (int m = 0; m < kRows; ++m) {
          v[m] = m < rows ? to_float(p.a[(m0 + m) * p.N + t0 + nl]) : 0.f;
        }
        float* dst = as + nl * kRows;
        if constexpr (kRows >= 4) {
          const int sw = tr_quad_swizzle<kRows>(nl);
#pragma unroll
          for (int qd = 0; qd < kRows / 4; ++qd) {
            *reinterpret_cast<float4*>(dst + 4 * (qd ^ sw)) =
                make_float4(v[4 * qd], v[4 * qd + 1], v[4 * qd + 2], v[4 * qd + 3]);
          }
        } else if constexpr (kRows == 2) {
          *reinterpret_cast<float2*>(dst) = make_float2(v[0], v[1]);
        } else {
          dst[0] = v[0];
        }
      }
      __syncthreads();

      for (int nb = warp; nb < tlen; nb += kWarps * kU) {
        uint32_t raw[kU][kCols / 4];
        float sc[kU];
#pragma unroll
        for (int u = 0; u < kU; ++u) {  // issue all kU row loads before using any
          const int nl = nb + u * kWarps;
          const int64_t n = t0 + nl;
          if (nl < tlen && col_ok) {
            const int8_t* src = p.q + n * p.K + col0;
            if constexpr (kVec) {
              int8_detail::load_q_vec<kCols>(src, raw[u]);
            } else {
              int8_detail::load_q_scalar<kCols>(src, nvalid, raw[u]);
            }
            sc[u] = to_float(p.scales[n * p.scale_ld + sgroup]);
          } else {
#pragma unroll
            for (int i = 0; i < kCols / 4; ++i) raw[u][i] = 0u;
            sc[u] = 0.f;
          }
        }
#pragma unroll
        for (int u = 0; u < kU; ++u) {
          const int nl = nb + u * kWarps;
          if (nl < tlen) {  // warp-uniform
            float w[kCols];
#pragma unroll
            for (int i = 0; i < kCols / 4; ++i) dequant4(raw[u][i], sc[u], w + 4 * i);
            const float* ar = as + nl * kRows;  // warp-uniform address: broadcast reads
            float av[kRows];
            if constexpr (kRows >= 4) {
              const int sw = tr_quad_swizzle<kRows>(nl);
#pragma unroll
              for (int qd = 0; qd < kRows / 4; ++qd) {
                const float4 f = *reinterpret_cast<const float4*>(ar + 4 * (qd ^ sw));
                av[4 * qd] = f.x;
                av[4 * qd + 1] = f.y;
                av[4 * qd + 2] = f.z;
                av[4 * qd + 3] = f.w;
              }
            } else if constexpr (kRows == 2) {
              const float2 f = *reinterpret_cast<const float2*>(ar);
              av[0] = f.x;
              av[1] = f.y;
            } else {
              av[0] = ar[0];
            }
#pragma unroll
            for (int m = 0; m < kRows; ++m) {
              if (m < rows) {
#pragma unroll
                for (int j = 0; j < kCols; ++j) acc[m][j] = fmaf(av[m], w[j], acc[m][j]);
              }
            }
          }
        }
      }
    }

    // Sum the 8 warps' columns in warp order (deterministic), one row m at a time, through the
    // staging buffer: red[w][c] for the block's kColsPerBlock columns c.
    float* red = as;
#pragma unroll
    for (int m = 0; m < kRows; ++m) {
      if (m < rows) {     // block-uniform, so the barriers are reached by every thread
        __syncthreads();  // staging tile / previous row of red no longer read
        float* dst = red + warp * kColsPerBlock + lane * kCols;
#pragma unroll
        for (int j = 0; j < kCols; j += 4) {
          *reinterpret_cast<float4*>(dst + j) =
              make_float4(acc[m][j], acc[m][j + 1], acc[m][j + 2], acc[m][j + 3]);
        }
        __syncthreads();
        for (int c = static_cast<int>(threadIdx.x); c < kColsPerBlock; c += kThreads) {
          const int64_t col = static_cast<int64_t>(blockIdx.x) * kColsPerBlock + c;
          if (col < p.K) {
            float total = 0.f;
#pragma unroll
            for (int w = 0; w < kWarps; ++w) total += red[w * kColsPerBlock + c];
            write_out(p, p.K, m0 + m, col, total);
          }
        }
      }
    }
  }
}

// ------------------------------------------------------------------------- split reduction

// y[i] = sum over s of partial[s][i] (split order) + bias[i % cols], rounded; i < M * cols.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    int8_splitk_reduce_kernel(const float* __restrict__ partial, int splits,
                              const T* __restrict__ bias, T* __restrict__ y, int64_t total,
                              int64_t cols) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < total;
       i += stride) {
    float sum = 0.f;
    for (int s = 0; s < splits; ++s) sum += partial[static_cast<int64_t>(s) * total + i];
    const float b = bias != nullptr ? to_float(bias[i % cols]) : 0.f;
    y[i] = from_float<T>(sum + b);
  }
}

// ------------------------------------------------------------------------------------ host

int rows_per_chunk(int64_t M) {
  int r = 1;
  while (r < kMaxRows && r < M) r <<= 1;
  return r;
}

struct Plan {
  int rows;           // kRows
  int64_t blocks_x;   // gridDim.x
  int splits;         // S (gridDim.y)
  int64_t split_len;  // elements of the reduction dimension per split
  unsigned grid_z;    // row-chunk blocks (looped beyond 65535)
  int64_t out_cols;   // N forward, K transposed
};

// A pure function of (args, num_sms): the workspace size and the launch both call it.
Plan make_plan(const Int8Args& a, int num_sms) {
  Plan pl;
  pl.rows = rows_per_chunk(a.M);
  const int64_t chunks = std::min<int64_t>(ceil_div(a.M, pl.rows), kMaxGridYZ);
  pl.grid_z = static_cast<unsigned>(chunks);
  const int64_t target = static_cast<int64_t>(kTargetBlocksPerSm) * std::max(num_sms, 1);
  int64_t s = 1;
  if (!a.transposed) {
    pl.blocks_x = ceil_div(a.N, fwd_rows_per_block(pl.rows));
    pl.out_cols = a.N;
    s = ceil_div(target, pl.blocks_x * chunks);
    s = std::min<int64_t>(s, std::min<int64_t>(kFwdMaxSplits, ceil_div(a.K, kFwdStep)));
    s = std::max<int64_t>(s, 1);
    // Whole warp steps (512, a multiple of 16: vector offsets stay aligned), so that no lane
    // idles inside a slice; then only as many slices as that takes (none empty).
    pl.split_len = ceil_div(ceil_div(a.K, s), kFwdStep) * kFwdStep;
    s = ceil_div(a.K, pl.split_len);
  } else {
    pl.blocks_x = ceil_div(a.K, 32 * tr_cols(pl.rows));
    pl.out_cols = a.K;
    s = ceil_div(target, pl.blocks_x * chunks);
    s = std::min<int64_t>(s, std::min<int64_t>(kTrMaxSplits, ceil_div(a.N, kTrMinSplitRows)));
    s = std::max<int64_t>(s, 1);
    pl.split_len = ceil_div(a.N, s);
    s = ceil_div(a.N, pl.split_len);  // no empty slice
  }
  pl.splits = static_cast<int>(s);
  return pl;
}

bool valid_args(const Int8Args& a) {
  if (a.M < 0 || a.N < 1 || a.K < 1) return false;
  if (a.group_size != 0 && a.group_size != 32 && a.group_size != 64 && a.group_size != 128) {
    return false;
  }
  if (a.group_size != 0 && a.K % a.group_size != 0) return false;
  if (a.transposed && a.bias != nullptr) return false;
  return true;
}

template <typename T, int kRows>
cudaError_t launch_main(const GemvParams<T>& p, const Plan& pl, bool vec, bool transposed,
                        cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(pl.blocks_x), static_cast<unsigned>(pl.splits), pl.grid_z);
  if (transposed) {
    if (vec) {
      int8_gemv_tr_kernel<T, kRows, true><<<grid, kThreads, 0, stream>>>(p);
    } else {
      int8_gemv_tr_kernel<T, kRows, false><<<grid, kThreads, 0, stream>>>(p);
    }
  } else {
    if (vec) {
      int8_gemv_fwd_kernel<T, kRows, true><<<grid, kThreads, 0, stream>>>(p);
    } else {
      int8_gemv_fwd_kernel<T, kRows, false><<<grid, kThreads, 0, stream>>>(p);
    }
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_typed(const Int8Args& a, void* workspace, int num_sms, cudaStream_t stream) {
  const Plan pl = make_plan(a, num_sms);
  if (pl.blocks_x > 0x7fffffff) return cudaErrorInvalidConfiguration;  // gridDim.x limit
  GemvParams<T> p;
  p.a = static_cast<const T*>(a.a);
  p.q = a.qweight;
  p.scales = static_cast<const T*>(a.scales);
  p.bias = a.transposed ? nullptr : static_cast<const T*>(a.bias);
  p.y = static_cast<T*>(a.y);
  p.partial = pl.splits > 1 ? static_cast<float*>(workspace) : nullptr;
  if (pl.splits > 1 && workspace == nullptr) return cudaErrorInvalidValue;
  p.M = a.M;
  p.N = a.N;
  p.K = a.K;
  int8_detail::scale_layout(a.K, a.group_size, &p.scale_ld, &p.gshift);
  p.split_len = pl.split_len;
  // Row starts n * K are 16-byte aligned iff K % 16 == 0 (and the base is).
  const bool vec = a.K % 16 == 0 && int8_detail::is_aligned16(a.qweight);

  cudaError_t err = cudaErrorInvalidValue;
  switch (pl.rows) {
    case 1:
      err = launch_main<T, 1>(p, pl, vec, a.transposed, stream);
      break;
    case 2:
      err = launch_main<T, 2>(p, pl, vec, a.transposed, stream);
      break;
    case 4:
      err = launch_main<T, 4>(p, pl, vec, a.transposed, stream);
      break;
    case 8:
      err = launch_main<T, 8>(p, pl, vec, a.transposed, stream);
      break;
    case 16:
      err = launch_main<T, 16>(p, pl, vec, a.transposed, stream);
      break;
  }
  if (err != cudaSuccess || pl.splits == 1) return err;

  const int64_t total = a.M * pl.out_cols;
  const int64_t blocks = std::max<int64_t>(
      1, std::min<int64_t>(ceil_div(total, kThreads), 8LL * std::max(num_sms, 1)));
  int8_splitk_reduce_kernel<T><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      p.partial, pl.splits, p.bias, p.y, total, pl.out_cols);
  return cudaGetLastError();
}

}  // namespace

size_t int8_gemv_workspace_bytes(const Int8Args& args, int num_sms) {
  if (!valid_args(args) || args.M == 0) return 0;
  const Plan pl = make_plan(args, num_sms);
  if (pl.splits <= 1) return 0;
  return static_cast<size_t>(pl.splits) * static_cast<size_t>(args.M) *
         static_cast<size_t>(pl.out_cols) * sizeof(float);
}

cudaError_t launch_int8_gemv(const Int8Args& args, void* workspace, int num_sms,
                             cudaStream_t stream) {
  if (!valid_args(args)) return cudaErrorInvalidValue;
  if (args.M == 0) return cudaSuccess;
  if (args.a == nullptr || args.qweight == nullptr || args.scales == nullptr || args.y == nullptr) {
    return cudaErrorInvalidValue;
  }
  switch (args.dtype) {
    case Int8DType::kFloat32:
      return launch_typed<float>(args, workspace, num_sms, stream);
    case Int8DType::kFloat16:
      return launch_typed<__half>(args, workspace, num_sms, stream);
    case Int8DType::kBFloat16:
      return launch_typed<__nv_bfloat16>(args, workspace, num_sms, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace lrkernels
