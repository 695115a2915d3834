// Backward of block-sparse attention (docs/attention.md) for float16 / bfloat16, head_dim D in
// {32, 64, 96, 128}, compute capability >= 8.0 (bf16 tensor cores). FlashAttention-2 style:
// the softmax is recomputed from the saved lse, nothing of size S x S is stored, and no atomics
// are used, so the result is bitwise deterministic (fixed summation orders everywhere).
//
//   P  = exp(scale · Q Kᵀ − lse)   (0 where masked, and for a row with lse = −inf)
//   dV = Pᵀ dO,   dP = dO Vᵀ,   dS = P ∘ (dP − Δ),   Δ = rowsum(dO ∘ O),
//   dQ = scale · dS K,   dK = scale · dSᵀ Q.
//
// Three launches on the caller's stream:
//   1. delta: Δ[b, h, i] = Σ_d dO · O in float32, one warp per row.
//   2. dk/dv: one block per (64-key tile, kv head, batch); gridDim.x = ceil(Sk / 64). K and V
//      tiles stay in shared memory; the block walks every query head of its GQA group and, per
//      head, the query blocks of the TRANSPOSED lists (args.q_blocks: full first, then partial)
//      in 64-row sub-tiles, accumulating dK and dV in registers (wmma fragments). Every key row
//      of the tile is written (zeros when no query reads it).
//   3. dq: one block per (64-query tile, query head, batch). Q, dO, lse and Δ of the tile stay
//      in shared memory; the block walks the forward lists (args.kv: full, then partial) in
//      64-key sub-tiles, accumulating dQ in registers.
// Per (64 x 64) query/key tile pair, each of the 8 warps owns a 16-row strip (wr = warp & 3) and
// two 16-key column fragments (wc + 2f, wc = warp >> 2): it computes S = Q Kᵀ and dP = dO Vᵀ
// (wmma 16x16x16, fp32 accumulators) over D, then goes through a per-warp 16x16 float32 scratch
// (the fragment layout is opaque) to apply the mask and form P and dS elementwise in float32.
// P and dS are rounded to the dtype into shared memory (64 x 64 each) for the next products:
// dV += Pᵀ dO and dK += dSᵀ Q (dk/dv kernel), dQ += dS K (dq kernel). The output tile 64 x D is
// split as 4 warp rows x 2 warp columns of D / 32 fragments each. A block size of 128 (block_q
// or block_k) is handled by iterating its 64-row halves; a partial block's sub-tile that the
// window cannot reach at all is skipped (its contribution is exactly zero).
// Masks: full blocks only the bounds i < Sq, j < Sk; partial blocks also the window
// Sk − Sq − left ≤ j − i ≤ Sk − Sq + right (−1: unbounded). Out-of-range rows load as zeros and
// have lse = −inf, Δ = 0 in shared memory, so they contribute exact zeros.
// Shared memory rows are padded by 8 elements (16 bytes): wmma ldm stays a multiple of 8,
// fragment pointers stay 32-byte aligned and consecutive rows shift banks. Global tiles are
// staged with 16-byte loads when the tensor's base and strides allow it, scalar loads otherwise.
// Block-list counts are clamped to the list width and indices outside [0, number of blocks)
// are skipped (the Python callers validate layouts; this only keeps a bad layout in bounds).
// Resources (256 threads): dynamic shared memory per block, D = 32 / 64 / 96 / 128:
// dk/dv 46.5 / 62.5 / 78.5 / 94.5 KB, dq 37.5 / 53.5 / 69.5 / 85.5 KB (opt-in above 48 KB).
// The dq kernel is compiled for 2 blocks per SM (<= 128 registers), the dk/dv kernel for 2 at
// D = 32 and 1 otherwise (its 2 x D / 32 accumulator fragments per warp would spill). The
// reduction loops are not unrolled: wmma fragment addresses are 64-bit, and unrolling only
// hoisted them into registers (spills) without removing work.
// Global loads are synchronous (no cp.async double buffering yet): a tile's loads overlap only
// with other resident blocks' compute.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <atomic>
#include <cmath>
#include <cstdint>

#include "attention_kernels.cuh"

namespace lrkernels {
namespace cuda {
namespace {

namespace wmma = nvcuda::wmma;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kTile = 64;              // query rows and key rows per tile
constexpr int kPad = 8;                // shared-memory row padding (elements)
constexpr int kLdP = kTile + kPad;     // 72: P / dS tiles (query x key)
constexpr int kStageFloats = 16 * 16;  // per-warp float32 scratch of one fragment
constexpr int kDeltaRowsPerBlock = kThreads / 32;
constexpr float kLog2e = 1.4426950408889634f;
// Window bounds of "unbounded": far outside any j − i, yet with room for the arithmetic below.
constexpr int64_t kNoLowerBound = -(int64_t{1} << 62);
constexpr int64_t kNoUpperBound = int64_t{1} << 62;

static_assert(kWarps == 8 && kTile == 64, "warp layout: 4 warp rows x 2 warp columns");

// ------------------------------------------------------------------------- element helpers
// Explicit intrinsics only: torch builds define __CUDA_NO_HALF_CONVERSIONS__ and friends.

__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ __half from_float<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

__device__ __forceinline__ uint32_t to_bits(__half v) { return __half_as_ushort(v); }
__device__ __forceinline__ uint32_t to_bits(__nv_bfloat16 v) { return __bfloat16_as_ushort(v); }

// Rounds 8 floats to T and packs them into 16 bytes (element 0 in the low half of .x).
template <typename T>
__device__ __forceinline__ uint4 pack8(const float (&v)[8]) {
  uint32_t w[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    w[i] = to_bits(from_float<T>(v[2 * i])) | (to_bits(from_float<T>(v[2 * i + 1])) << 16);
  }
  return make_uint4(w[0], w[1], w[2], w[3]);
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// 8 consecutive floats at p (16-byte aligned) as two 16-byte shared-memory reads.
__device__ __forceinline__ void read8(const float* p, float (&v)[8]) {
  const float4 a = *reinterpret_cast<const float4*>(p);
  const float4 b = *reinterpret_cast<const float4*>(p + 4);
  v[0] = a.x;
  v[1] = a.y;
  v[2] = a.z;
  v[3] = a.w;
  v[4] = b.x;
  v[5] = b.y;
  v[6] = b.z;
  v[7] = b.w;
}

__host__ __device__ constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
__host__ __device__ constexpr int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

bool is_aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// ------------------------------------------------------------------------------ parameters

template <typename T>
struct BwdParams {
  const T* q;
  const T* k;
  const T* v;
  const T* dout;  // (B, Hq, Sq, D) contiguous
  const float* lse;
  const float* delta;
  T* dq;  // (B, Hq, Sq, D) contiguous
  T* dk;  // (B, Hkv, Sk, D) contiguous
  T* dv;
  AttnStrides qs, ks, vs;
  BlockList kv;  // per query block: key blocks
  BlockList ql;  // per key block: query blocks
  int64_t Hq, Hkv, Sq, Sk;
  int64_t group;           // Hq / Hkv
  int64_t block_q;         // 64 or 128
  int64_t block_k;         // 64 or 128
  int64_t n_qblocks;       // ceil(Sq / block_q)
  int64_t n_kblocks;       // ceil(Sk / block_k)
  int64_t win_lo, win_hi;  // partial blocks: win_lo <= j - i <= win_hi
  float scale;
  float scale_log2;                  // scale * log2(e)
  bool vec_q, vec_k, vec_v, vec_do;  // 16-byte loads allowed
  bool vec_store;                    // dq / dk / dv 16-byte aligned
};

// ---------------------------------------------------------------------------- tile staging

// Copies rows [row0, row0 + 64) of an (nrows x kD) matrix (row stride ld elements, unit column
// stride) into shared memory with row stride kD + kPad. Rows >= nrows are zeros. vec: 16-byte
// loads, which needs a 16-byte aligned base and ld % 8 == 0 (chunks start at multiples of 8).
template <typename T, int kD>
__device__ __forceinline__ void load_tile(T* __restrict__ s, const T* __restrict__ g, int64_t ld,
                                          int64_t row0, int64_t nrows, bool vec) {
  constexpr int kChunksPerRow = kD / 8;
  constexpr int kChunks = kTile * kChunksPerRow;
  static_assert(kD % 8 == 0 && kChunks % kThreads == 0, "tile must split evenly");
  constexpr int kLd = kD + kPad;
#pragma unroll
  for (int n = 0; n < kChunks / kThreads; ++n) {
    const int chunk = static_cast<int>(threadIdx.x) + n * kThreads;
    const int r = chunk / kChunksPerRow;
    const int c = (chunk % kChunksPerRow) * 8;
    const int64_t row = row0 + r;
    uint4 val = make_uint4(0u, 0u, 0u, 0u);
    if (row < nrows) {
      const T* src = g + row * ld + c;
      if (vec) {
        val = __ldg(reinterpret_cast<const uint4*>(src));
      } else {
        const unsigned short* s16 = reinterpret_cast<const unsigned short*>(src);
        uint32_t w[4];
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          w[e] = static_cast<uint32_t>(__ldg(s16 + 2 * e)) |
                 (static_cast<uint32_t>(__ldg(s16 + 2 * e + 1)) << 16);
        }
        val = make_uint4(w[0], w[1], w[2], w[3]);
      }
    }
    *reinterpret_cast<uint4*>(s + r * kLd + c) = val;
  }
}

// lse (pre-multiplied by log2 e) and Δ of the 64 query rows from i0; rows >= Sq get lse = −inf
// (P = 0) and Δ = 0. Threads 0..63 write; the caller's next __syncthreads publishes them.
__device__ __forceinline__ void load_row_stats(float* lse_s, float* delta_s, const float* lse,
                                               const float* delta, int64_t i0, int64_t Sq) {
  const int t = static_cast<int>(threadIdx.x);
  if (t < kTile) {
    const int64_t i = i0 + t;
    lse_s[t] = i < Sq ? __ldg(lse + i) * kLog2e : -INFINITY;
    delta_s[t] = i < Sq ? __ldg(delta + i) : 0.f;
  }
}

// Whether any (i, j) of rows [i0, i_end) x keys [j0, j_end) (both non-empty) satisfies
// lo <= j - i <= hi.
__device__ __forceinline__ bool window_reaches(int64_t i0, int64_t i_end, int64_t j0, int64_t j_end,
                                               int64_t lo, int64_t hi) {
  return (j_end - 1) - i0 >= lo && j0 - (i_end - 1) <= hi;
}

// One row (batch, query head, row block) of a BlockList's full or partial list: its indices and
// count, clamped to [0, list width]. The caller skips indices out of range.
struct ListRow {
  const int32_t* idx;
  int64_t count;
};
__device__ __forceinline__ ListRow list_row(const BlockList& l, int64_t b, int64_t h, int64_t blk,
                                            bool partial) {
  const int32_t* counts = partial ? l.counts : l.full_counts;
  const int32_t* indices = partial ? l.indices : l.full_indices;
  const int64_t width = partial ? l.max_blocks : l.max_full_blocks;
  if (counts == nullptr || indices == nullptr || width <= 0) return {nullptr, 0};
  const int64_t row = b * l.batch_stride + h * l.head_stride + blk;
  int64_t n = __ldg(counts + row);
  n = n < 0 ? 0 : (n > width ? width : n);
  return {indices + row * width, n};
}

// --------------------------------------------------------------- the shared S / dP stage

template <typename T>
using FragA = wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major>;
template <typename T>
using FragAt = wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::col_major>;
template <typename T>
using FragB = wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major>;
template <typename T>
using FragBt = wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major>;
using FragC = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;

// For the tile pair (queries i0.., keys j0..) with q_s, do_s (query x D), k_s, v_s (key x D),
// lse_s, delta_s in shared memory: this warp's S and dP fragments, then P (if p_s != nullptr)
// and dS rounded to T into p_s / ds_s (query x key, row stride kLdP). Only this warp's strip is
// written; the caller's __syncthreads publishes it.
template <typename T, int kD>
__device__ __forceinline__ void compute_p_ds(const BwdParams<T>& p, const T* q_s, const T* do_s,
                                             const T* k_s, const T* v_s, const float* lse_s,
                                             const float* delta_s, T* p_s, T* ds_s, float* stage,
                                             int64_t i0, int64_t j0, bool partial) {
  constexpr int kLd = kD + kPad;
  const int warp = static_cast<int>(threadIdx.x) >> 5;
  const int lane = static_cast<int>(threadIdx.x) & 31;
  const int wr = warp & 3;
  const int wc = warp >> 2;

  FragC s_acc[2], dp_acc[2];
#pragma unroll
  for (int f = 0; f < 2; ++f) {
    wmma::fill_fragment(s_acc[f], 0.f);
    wmma::fill_fragment(dp_acc[f], 0.f);
  }
#pragma unroll 1  // unrolling only raises register pressure (wmma addresses are 64-bit)
  for (int kk = 0; kk < kD; kk += 16) {
    FragA<T> a_q, a_do;
    wmma::load_matrix_sync(a_q, q_s + wr * 16 * kLd + kk, kLd);
    wmma::load_matrix_sync(a_do, do_s + wr * 16 * kLd + kk, kLd);
#pragma unroll
    for (int f = 0; f < 2; ++f) {
      const int col = (wc + 2 * f) * 16;  // key column of the fragment
      // Kᵀ / Vᵀ as B (D x key): element (d, j) is K_s[j][d], column-major with ldm kLd.
      FragBt<T> b;
      wmma::load_matrix_sync(b, k_s + col * kLd + kk, kLd);
      wmma::mma_sync(s_acc[f], a_q, b, s_acc[f]);
      wmma::load_matrix_sync(b, v_s + col * kLd + kk, kLd);
      wmma::mma_sync(dp_acc[f], a_do, b, dp_acc[f]);
    }
  }

  // Elementwise: lane owns row lr, columns lc .. lc + 7 of each 16 x 16 fragment.
  const int lr = lane >> 1;
  const int lc = (lane & 1) * 8;
  const int r = wr * 16 + lr;  // query row in the tile
  const int64_t i = i0 + r;
  const float lse_l2 = lse_s[r];
  const float dlt = delta_s[r];
  const bool row_live = lse_l2 > -INFINITY;  // also false for rows >= Sq
#pragma unroll
  for (int f = 0; f < 2; ++f) {
    const int col = (wc + 2 * f) * 16 + lc;
    const int64_t jb = j0 + col;  // key of element 0
    const int64_t db = jb - i;    // j - i of element 0
    unsigned visible = 0;
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      bool vis = row_live && jb + e < p.Sk;
      if (partial) vis = vis && db + e >= p.win_lo && db + e <= p.win_hi;
      visible |= vis ? (1u << e) : 0u;
    }
    wmma::store_matrix_sync(stage, s_acc[f], 16, wmma::mem_row_major);
    __syncwarp();
    float pv[8];
    read8(stage + lr * 16 + lc, pv);  // S
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      pv[e] = ((visible >> e) & 1u) != 0u ? exp2f(fmaf(pv[e], p.scale_log2, -lse_l2)) : 0.f;
    }
    if (p_s != nullptr) *reinterpret_cast<uint4*>(p_s + r * kLdP + col) = pack8<T>(pv);
    __syncwarp();  // all lanes read S before dP overwrites the scratch
    wmma::store_matrix_sync(stage, dp_acc[f], 16, wmma::mem_row_major);
    __syncwarp();
    float dsv[8];
    read8(stage + lr * 16 + lc, dsv);  // dP
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      dsv[e] = ((visible >> e) & 1u) != 0u ? pv[e] * (dsv[e] - dlt) : 0.f;
    }
    *reinterpret_cast<uint4*>(ds_s + r * kLdP + col) = pack8<T>(dsv);
    __syncwarp();  // the scratch is reused by the next fragment
  }
}

// Writes a 64 x kD float32 result held as fragments (this warp: rows wr*16.., columns
// (wc + 2f)*16) times `mul`, rounded to T, into rows [row0, row0 + 64) ∩ [0, nrows) of the
// contiguous (nrows x kD) matrix g.
template <typename T, int kD>
__device__ __forceinline__ void store_result(T* g, int64_t row0, int64_t nrows,
                                             const FragC (&acc)[kD / 32], float mul, float* stage,
                                             bool vec) {
  const int warp = static_cast<int>(threadIdx.x) >> 5;
  const int lane = static_cast<int>(threadIdx.x) & 31;
  const int wr = warp & 3;
  const int wc = warp >> 2;
  const int lr = lane >> 1;
  const int lc = (lane & 1) * 8;
  const int64_t row = row0 + wr * 16 + lr;
#pragma unroll
  for (int f = 0; f < kD / 32; ++f) {
    const int col = (wc + 2 * f) * 16 + lc;
    wmma::store_matrix_sync(stage, acc[f], 16, wmma::mem_row_major);
    __syncwarp();
    if (row < nrows) {
      float val[8];
      read8(stage + lr * 16 + lc, val);
#pragma unroll
      for (int e = 0; e < 8; ++e) val[e] *= mul;
      T* dst = g + row * kD + col;
      if (vec) {
        *reinterpret_cast<uint4*>(dst) = pack8<T>(val);
      } else {
#pragma unroll
        for (int e = 0; e < 8; ++e) dst[e] = from_float<T>(val[e]);
      }
    }
    __syncwarp();
  }
}

template <int kD>
constexpr size_t dkdv_smem_bytes() {
  return (4 * kTile * (kD + kPad) + 2 * kTile * kLdP) * 2 + kWarps * kStageFloats * 4 +
         2 * kTile * 4;
}
template <int kD>
constexpr size_t dq_smem_bytes() {
  return (4 * kTile * (kD + kPad) + kTile * kLdP) * 2 + kWarps * kStageFloats * 4 + 2 * kTile * 4;
}

// ---------------------------------------------------------------------------------- kernels

// Δ = rowsum(dO ∘ O) in float32, one warp per row of the (rows x D) contiguous matrices.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    attn_bwd_delta_kernel(const T* __restrict__ out, const T* __restrict__ dout,
                          float* __restrict__ delta, int64_t rows, int d) {
  const int warp = static_cast<int>(threadIdx.x) >> 5;
  const int lane = static_cast<int>(threadIdx.x) & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kDeltaRowsPerBlock + warp;
  if (row >= rows) return;  // warp-uniform: the whole warp leaves together
  const T* o = out + row * d;
  const T* g = dout + row * d;
  float s = 0.f;
  for (int c = lane; c < d; c += 32) s = fmaf(to_float(__ldg(o + c)), to_float(__ldg(g + c)), s);
  s = warp_sum(s);
  if (lane == 0) delta[row] = s;
}

// Blocks per SM the dk/dv kernel is compiled for: the dK and dV accumulators (2 x D / 32
// fragments per warp) and the S / dP fragments fit 128 registers without spilling only at D = 32.
template <int kD>
constexpr int dkdv_min_blocks() {
  return kD <= 32 ? 2 : 1;
}

template <typename T, int kD>
__global__ void __launch_bounds__(kThreads, dkdv_min_blocks<kD>())
    attn_bwd_dkdv_kernel(const BwdParams<T> p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // bf16 wmma needs sm_80; the launcher rejects older devices
#else
  constexpr int kLd = kD + kPad;
  constexpr int kNF = kD / 32;  // output fragments per warp and gradient
  extern __shared__ __align__(128) unsigned char smem[];
  // [ K | V | Q | dO : 64 x kLd each | P | dS : 64 x kLdP each | scratch | lse | Δ ]; every
  // region size is a multiple of 128 bytes.
  T* k_s = reinterpret_cast<T*>(smem);
  T* v_s = k_s + kTile * kLd;
  T* q_s = v_s + kTile * kLd;
  T* do_s = q_s + kTile * kLd;
  T* p_s = do_s + kTile * kLd;
  T* ds_s = p_s + kTile * kLdP;
  float* stage_all = reinterpret_cast<float*>(ds_s + kTile * kLdP);
  float* lse_s = stage_all + kWarps * kStageFloats;
  float* delta_s = lse_s + kTile;

  const int warp = static_cast<int>(threadIdx.x) >> 5;
  const int wr = warp & 3;
  const int wc = warp >> 2;
  float* stage = stage_all + warp * kStageFloats;

  const int64_t j0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int64_t kvh = blockIdx.y;
  const int64_t b = blockIdx.z;
  const int64_t kb = j0 / p.block_k;  // layout key block of this tile
  const int64_t j_end = min64(j0 + kTile, p.Sk);

  load_tile<T, kD>(k_s, p.k + b * p.ks.batch + kvh * p.ks.head, p.ks.seq, j0, p.Sk, p.vec_k);
  load_tile<T, kD>(v_s, p.v + b * p.vs.batch + kvh * p.vs.head, p.vs.seq, j0, p.Sk, p.vec_v);

  FragC dk_acc[kNF], dv_acc[kNF];
#pragma unroll
  for (int f = 0; f < kNF; ++f) {
    wmma::fill_fragment(dk_acc[f], 0.f);
    wmma::fill_fragment(dv_acc[f], 0.f);
  }

  for (int64_t g = 0; g < p.group; ++g) {
    const int64_t h = kvh * p.group + g;
    const int64_t bh = b * p.Hq + h;
    for (int pass = 0; pass < 2; ++pass) {
      const bool partial = pass == 1;
      const ListRow lr = list_row(p.ql, b, h, kb, partial);
      for (int64_t e = 0; e < lr.count; ++e) {
        const int64_t qb = __ldg(lr.idx + e);
        if (qb < 0 || qb >= p.n_qblocks) continue;
        const int64_t q_end = min64((qb + 1) * p.block_q, p.Sq);
        for (int64_t i0 = qb * p.block_q; i0 < q_end; i0 += kTile) {
          if (partial &&
              !window_reaches(i0, min64(i0 + kTile, p.Sq), j0, j_end, p.win_lo, p.win_hi)) {
            continue;  // block-uniform
          }
          // (Base pointers formed only here: with Sq == 0 the query-side tensors may be null.)
          load_tile<T, kD>(q_s, p.q + b * p.qs.batch + h * p.qs.head, p.qs.seq, i0, p.Sq, p.vec_q);
          load_tile<T, kD>(do_s, p.dout + bh * p.Sq * kD, kD, i0, p.Sq, p.vec_do);
          load_row_stats(lse_s, delta_s, p.lse + bh * p.Sq, p.delta + bh * p.Sq, i0, p.Sq);
          __syncthreads();  // tiles (and K / V on the first pass) visible
          compute_p_ds<T, kD>(p, q_s, do_s, k_s, v_s, lse_s, delta_s, p_s, ds_s, stage, i0, j0,
                              partial);
          __syncthreads();  // P and dS complete
          // dV += Pᵀ dO, dK += dSᵀ Q over the 64 queries of the tile. Pᵀ as A (key x query):
          // element (j, i) is P_s[i][j], column-major with ldm kLdP.
#pragma unroll 1
          for (int kk = 0; kk < kTile; kk += 16) {
            FragAt<T> a_p, a_ds;
            wmma::load_matrix_sync(a_p, p_s + kk * kLdP + wr * 16, kLdP);
            wmma::load_matrix_sync(a_ds, ds_s + kk * kLdP + wr * 16, kLdP);
#pragma unroll
            for (int f = 0; f < kNF; ++f) {
              const int n = (wc + 2 * f) * 16;
              FragB<T> bm;
              wmma::load_matrix_sync(bm, do_s + kk * kLd + n, kLd);
              wmma::mma_sync(dv_acc[f], a_p, bm, dv_acc[f]);
              wmma::load_matrix_sync(bm, q_s + kk * kLd + n, kLd);
              wmma::mma_sync(dk_acc[f], a_ds, bm, dk_acc[f]);
            }
          }
          __syncthreads();  // before the next tile overwrites Q, dO, P, dS, lse, Δ
        }
      }
    }
  }

  const int64_t kv_off = (b * p.Hkv + kvh) * p.Sk * kD;
  store_result<T, kD>(p.dv + kv_off, j0, p.Sk, dv_acc, 1.f, stage, p.vec_store);
  store_result<T, kD>(p.dk + kv_off, j0, p.Sk, dk_acc, p.scale, stage, p.vec_store);
#endif
}

// Two blocks per SM (<= 128 registers; shared memory <= 87.5 KB per block).
template <typename T, int kD>
__global__ void __launch_bounds__(kThreads, 2) attn_bwd_dq_kernel(const BwdParams<T> p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();
#else
  constexpr int kLd = kD + kPad;
  constexpr int kNF = kD / 32;
  extern __shared__ __align__(128) unsigned char smem[];
  // [ Q | dO | K | V : 64 x kLd each | dS : 64 x kLdP | scratch | lse | Δ ]
  T* q_s = reinterpret_cast<T*>(smem);
  T* do_s = q_s + kTile * kLd;
  T* k_s = do_s + kTile * kLd;
  T* v_s = k_s + kTile * kLd;
  T* ds_s = v_s + kTile * kLd;
  float* stage_all = reinterpret_cast<float*>(ds_s + kTile * kLdP);
  float* lse_s = stage_all + kWarps * kStageFloats;
  float* delta_s = lse_s + kTile;

  const int warp = static_cast<int>(threadIdx.x) >> 5;
  const int wr = warp & 3;
  const int wc = warp >> 2;
  float* stage = stage_all + warp * kStageFloats;

  const int64_t i0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int64_t h = blockIdx.y;
  const int64_t b = blockIdx.z;
  const int64_t kvh = h / p.group;
  const int64_t qb = i0 / p.block_q;  // layout query block of this tile
  const int64_t i_end = min64(i0 + kTile, p.Sq);
  const int64_t bh = b * p.Hq + h;

  load_tile<T, kD>(q_s, p.q + b * p.qs.batch + h * p.qs.head, p.qs.seq, i0, p.Sq, p.vec_q);
  load_tile<T, kD>(do_s, p.dout + bh * p.Sq * kD, kD, i0, p.Sq, p.vec_do);
  load_row_stats(lse_s, delta_s, p.lse + bh * p.Sq, p.delta + bh * p.Sq, i0, p.Sq);

  FragC dq_acc[kNF];
#pragma unroll
  for (int f = 0; f < kNF; ++f) wmma::fill_fragment(dq_acc[f], 0.f);

  for (int pass = 0; pass < 2; ++pass) {
    const bool partial = pass == 1;
    const ListRow lr = list_row(p.kv, b, h, qb, partial);
    for (int64_t e = 0; e < lr.count; ++e) {
      const int64_t kb = __ldg(lr.idx + e);
      if (kb < 0 || kb >= p.n_kblocks) continue;
      const int64_t k_end = min64((kb + 1) * p.block_k, p.Sk);
      for (int64_t j0 = kb * p.block_k; j0 < k_end; j0 += kTile) {
        if (partial &&
            !window_reaches(i0, i_end, j0, min64(j0 + kTile, p.Sk), p.win_lo, p.win_hi)) {
          continue;  // block-uniform
        }
        // (Base pointers formed only here: with Sk == 0 the key-side tensors may be null.)
        load_tile<T, kD>(k_s, p.k + b * p.ks.batch + kvh * p.ks.head, p.ks.seq, j0, p.Sk, p.vec_k);
        load_tile<T, kD>(v_s, p.v + b * p.vs.batch + kvh * p.vs.head, p.vs.seq, j0, p.Sk, p.vec_v);
        __syncthreads();  // K, V (and Q, dO, lse, Δ on the first tile) visible
        compute_p_ds<T, kD>(p, q_s, do_s, k_s, v_s, lse_s, delta_s, nullptr, ds_s, stage, i0, j0,
                            partial);
        __syncthreads();  // dS complete
        // dQ += dS K: A = dS (query x key) row-major, B = K (key x D) row-major.
#pragma unroll 1
        for (int kk = 0; kk < kTile; kk += 16) {
          FragA<T> a_ds;
          wmma::load_matrix_sync(a_ds, ds_s + wr * 16 * kLdP + kk, kLdP);
#pragma unroll
          for (int f = 0; f < kNF; ++f) {
            FragB<T> bm;
            wmma::load_matrix_sync(bm, k_s + kk * kLd + (wc + 2 * f) * 16, kLd);
            wmma::mma_sync(dq_acc[f], a_ds, bm, dq_acc[f]);
          }
        }
        __syncthreads();  // before the next tile overwrites K, V, dS
      }
    }
  }

  store_result<T, kD>(p.dq + bh * p.Sq * kD, i0, p.Sq, dq_acc, p.scale, stage, p.vec_store);
#endif
}

// ---------------------------------------------------------------------------------- launch

// Raises the kernel's dynamic shared memory limit when above 48 KB (per kernel and device; the
// largest value set is remembered so that repeated launches skip the call).
template <typename Kernel>
cudaError_t opt_in_smem(Kernel kernel, size_t smem, int device, std::atomic<int>* opted_in) {
  if (smem <= 48 * 1024) return cudaSuccess;
  if (device >= 0 && opted_in[device].load() >= static_cast<int>(smem)) return cudaSuccess;
  const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                               static_cast<int>(smem));
  if (err != cudaSuccess) return err;
  if (device >= 0) {
    int prev = opted_in[device].load();
    while (prev < static_cast<int>(smem) &&
           !opted_in[device].compare_exchange_weak(prev, static_cast<int>(smem))) {
    }
  }
  return cudaSuccess;
}

constexpr int kMaxDevices = 64;

template <typename T, int kD>
cudaError_t launch_gradients(const BwdParams<T>& p, int64_t B, int device, int smem_optin,
                             cudaStream_t stream) {
  const size_t dkdv_smem = dkdv_smem_bytes<kD>();
  const size_t dq_smem = dq_smem_bytes<kD>();
  if (dkdv_smem > static_cast<size_t>(smem_optin) || dq_smem > static_cast<size_t>(smem_optin)) {
    return cudaErrorInvalidConfiguration;
  }
  const int dev = device >= 0 && device < kMaxDevices ? device : -1;
  if (p.Sk > 0) {
    static std::atomic<int> opted_in[kMaxDevices];
    auto kernel = attn_bwd_dkdv_kernel<T, kD>;
    cudaError_t err = opt_in_smem(kernel, dkdv_smem, dev, opted_in);
    if (err != cudaSuccess) return err;
    const dim3 grid(static_cast<unsigned>(ceil_div(p.Sk, kTile)), static_cast<unsigned>(p.Hkv),
                    static_cast<unsigned>(B));
    kernel<<<grid, kThreads, dkdv_smem, stream>>>(p);
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  if (p.Sq > 0) {
    static std::atomic<int> opted_in[kMaxDevices];
    auto kernel = attn_bwd_dq_kernel<T, kD>;
    cudaError_t err = opt_in_smem(kernel, dq_smem, dev, opted_in);
    if (err != cudaSuccess) return err;
    const dim3 grid(static_cast<unsigned>(ceil_div(p.Sq, kTile)), static_cast<unsigned>(p.Hq),
                    static_cast<unsigned>(B));
    kernel<<<grid, kThreads, dq_smem, stream>>>(p);
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

// An AttnStrides allows 16-byte row loads: base aligned, every stride a multiple of 8 elements.
bool vec_ok(const void* base, const AttnStrides& s) {
  return is_aligned16(base) && s.batch % 8 == 0 && s.head % 8 == 0 && s.seq % 8 == 0;
}

template <typename T>
cudaError_t launch_typed(const AttnBwdArgs& a, cudaStream_t stream) {
  const AttnShape& sh = a.shape;
  BwdParams<T> p;
  p.q = static_cast<const T*>(a.q);
  p.k = static_cast<const T*>(a.k);
  p.v = static_cast<const T*>(a.v);
  p.dout = static_cast<const T*>(a.dout);
  p.lse = a.lse;
  p.delta = a.delta;
  p.dq = static_cast<T*>(a.dq);
  p.dk = static_cast<T*>(a.dk);
  p.dv = static_cast<T*>(a.dv);
  p.qs = a.q_strides;
  p.ks = a.k_strides;
  p.vs = a.v_strides;
  p.kv = a.kv;
  p.ql = a.q_blocks;  // the transposed lists (see the header)
  p.Hq = sh.Hq;
  p.Hkv = sh.Hkv;
  p.Sq = sh.Sq;
  p.Sk = sh.Sk;
  p.group = sh.Hq / sh.Hkv;
  p.block_q = sh.block_q;
  p.block_k = sh.block_k;
  p.n_qblocks = ceil_div(sh.Sq, sh.block_q);
  p.n_kblocks = ceil_div(sh.Sk, sh.block_k);
  p.win_lo = sh.window_left < 0 ? kNoLowerBound : sh.Sk - sh.Sq - sh.window_left;
  p.win_hi = sh.window_right < 0 ? kNoUpperBound : sh.Sk - sh.Sq + sh.window_right;
  p.scale = sh.scale;
  p.scale_log2 = sh.scale * kLog2e;
  p.vec_q = vec_ok(a.q, a.q_strides);
  p.vec_k = vec_ok(a.k, a.k_strides);
  p.vec_v = vec_ok(a.v, a.v_strides);
  p.vec_do = is_aligned16(a.dout);  // contiguous, D % 8 == 0
  p.vec_store = is_aligned16(a.dq) && is_aligned16(a.dk) && is_aligned16(a.dv);

  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  int cc_major = 0;
  err = cudaDeviceGetAttribute(&cc_major, cudaDevAttrComputeCapabilityMajor, device);
  if (err != cudaSuccess) return err;
  if (cc_major < 8) return cudaErrorInvalidDevice;
  int smem_optin = 0;
  err = cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (err != cudaSuccess) return err;

  // 1. Δ (needed by both gradient kernels; the dq kernel reads it even when Sk == 0).
  if (sh.Sq > 0) {
    const int64_t rows = sh.B * sh.Hq * sh.Sq;
    const int64_t blocks = ceil_div(rows, kDeltaRowsPerBlock);
    if (blocks > 0x7fffffff) return cudaErrorInvalidConfiguration;
    attn_bwd_delta_kernel<T><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        static_cast<const T*>(a.out), p.dout, a.delta, rows, static_cast<int>(sh.D));
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  // 2, 3. dk / dv and dq. With Sq == 0 the dk/dv kernel only writes zeros; with Sk == 0 the dq
  // kernel does (no layout index is in range then).
  switch (sh.D) {
    case 32:
      return launch_gradients<T, 32>(p, sh.B, device, smem_optin, stream);
    case 64:
      return launch_gradients<T, 64>(p, sh.B, device, smem_optin, stream);
    case 96:
      return launch_gradients<T, 96>(p, sh.B, device, smem_optin, stream);
    case 128:
      return launch_gradients<T, 128>(p, sh.B, device, smem_optin, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace

cudaError_t launch_block_sparse_attention_bwd(const AttnBwdArgs& args, cudaStream_t stream) {
  const AttnShape& sh = args.shape;
  if (sh.B < 0 || sh.Hq < 0 || sh.Hkv < 1 || sh.Sq < 0 || sh.Sk < 0 || sh.Hq % sh.Hkv != 0 ||
      !attention_head_dim_supported(sh.D) || (sh.block_q != 64 && sh.block_q != 128) ||
      (sh.block_k != 64 && sh.block_k != 128) || sh.window_left < -1 || sh.window_right < -1) {
    return cudaErrorInvalidValue;
  }
  if (sh.B == 0 || sh.Hq == 0 || (sh.Sq == 0 && sh.Sk == 0)) return cudaSuccess;
  if (sh.B > 65535 || sh.Hq > 65535 || ceil_div(sh.Sq, kTile) > 0x7fffffff ||
      ceil_div(sh.Sk, kTile) > 0x7fffffff) {
    return cudaErrorInvalidConfiguration;  // grid limits
  }
  // Empty tensors may have null data: only the sides with rows must be present.
  if ((sh.Sq > 0 &&
       (args.q == nullptr || args.out == nullptr || args.dout == nullptr || args.lse == nullptr ||
        args.delta == nullptr || args.dq == nullptr || args.kv.counts == nullptr)) ||
      (sh.Sk > 0 && (args.k == nullptr || args.v == nullptr || args.dk == nullptr ||
                     args.dv == nullptr || args.q_blocks.counts == nullptr))) {
    return cudaErrorInvalidValue;
  }
  switch (sh.dtype) {
    case AttnDType::kFloat16:
      return launch_typed<__half>(args, stream);
    case AttnDType::kBFloat16:
      return launch_typed<__nv_bfloat16>(args, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace lrkernels
