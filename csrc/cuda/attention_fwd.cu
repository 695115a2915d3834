// Forward kernel of block-sparse attention (docs/attention.md) for float16 / bfloat16 and
// head_dim D in {32, 64, 96, 128}, compute capability >= 8.0.
//
// FlashAttention-2 scheme: one block of 128 threads (4 warps) per (query tile of kTileQ = 64
// rows, query head, batch); grid = (ceil(Sq / 64), Hq, B), query tiles in reverse order so that
// the (usually heavier) last tiles of a causal layout start first. A layout block of 128 query
// rows is served by two kernel tiles (layout row block = tile start / block_q). Each warp owns a
// 16-row strip of the tile. GQA: query head h reads kv head h / (Hq / Hkv).
//
// Key loop: the layout's FULL key blocks, then its PARTIAL ones, each cut into sub-tiles of
// kTileK = 64 keys (a block_k = 128 block is two sub-tiles). Sub-tiles that start at or past Sk,
// and partial sub-tiles that the window hides from every row of the tile, are skipped. Per
// sub-tile and warp:
//   S = Q · Kᵀ (16 x 64) on tensor cores (nvcuda::wmma 16x16x16, fp32 accumulators), stored to
//   the warp's fp32 scratch, since the accumulator layout is opaque. Lanes r and r + 16 own row
//   r, 32 columns each: pass 1 takes the row max of the scaled (scale·log2 e), masked scores
//   (keys >= Sk everywhere; the window on partial sub-tiles), pass 2 computes P = exp2(s - m)
//   in fp32, sums it, and writes P rounded to the dtype in place over the scores it has read.
//   O += P · V on tensor cores, O accumulating in fp32 fragments for the whole kernel.
//   Online softmax: rescaling O needs a fragment -> shared -> fragment round trip, so a row's
//   running max m is only raised when its new max exceeds m by more than kRescaleThreshold
//   (log2 units): P then stays <= 2^8 (harmless in fp16/bf16 and in the fp32 sums) and O is
//   rarely touched after the first sub-tiles. A row that has seen no key keeps m = -inf and
//   P = 0 (no NaN, no rescale).
// Q, K and V tiles (64 x D, row pitch D + 8 elements) have one shared buffer each, filled by
// 16-byte cp.async copies (rows past Sq / Sk zero-filled) and overlapped FlashAttention-2
// style: V(t) loads while S(t) and the softmax run, K(t + 1) while P · V(t) runs. Without
// 16-byte alignment (base pointers, or strides not multiples of 8 elements) a scalar path loads
// through registers instead (template flag picked at launch).
// Epilogue: out = O / l (0 where l == 0), lse = m·ln2 + log(l) (-inf where l == 0); rows >= Sq
// are computed on zero queries and never stored.
//
// Shared memory: 3 x 64 x (D + 8) x 2 bytes (Q, K, V) + 4 warps x 16 x 68 x 4 bytes (scratch)
// = 32 KB (D = 32), 44 KB (64), 56 KB (96), 68 KB (128; above 48 KB: opted in at launch).

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <atomic>
#include <cmath>
#include <cstdint>

#include "attention_device_utils.cuh"
#include "attention_kernels.cuh"
#include "lowrank_device_utils.cuh"

namespace lrkernels {
namespace cuda {
namespace {

namespace wmma = nvcuda::wmma;
using detail::ceil_div;
using detail::from_float;
using detail::pack8;
using detail::to_bits;

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;
constexpr int kTileQ = 64;  // query rows per block: kWarps strips of 16
constexpr int kTileK = 64;  // keys per sub-tile
// Per-warp fp32 scratch of 16 rows x kScratchLd floats: S of a sub-tile, then P in place (row
// pitch kPLd elements, the same 272 bytes: P columns [0, 32) at elements [0, 32), columns
// [32, 64) at elements [64, 96), so each half-row of P lands inside the bytes its lane has
// read), O fragments for rescaling and the epilogue. 68 = 4 mod 32 banks: rows 0..7 of a
// quarter warp's float4 accesses hit distinct banks.
constexpr int kScratchLd = 68;
constexpr int kPLd = 2 * kScratchLd;
constexpr int kScratchFloats = 16 * kScratchLd;
constexpr float kRescaleThreshold = 8.0f;  // log2 units: P <= 256 between rescales
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
static_assert(kTileQ == kWarps * 16 && kTileQ == kTileK, "Q, K and V tiles share load_tile");
static_assert(kScratchFloats * 4 % 128 == 0, "per-warp scratch stays 128-byte aligned");

template <int D>
struct TileGeom {
  static_assert(D % 16 == 0 && D >= 32 && D <= 128, "D in {32, 64, 96, 128}");
  static constexpr int kLd = D + 8;  // elements per K / V / Q row in shared memory
  static constexpr int kTileElems = kTileK * kLd;
  static constexpr int kFrags = D / 16;                      // 16-column slices of D
  static constexpr size_t kQkvBytes = 3u * kTileElems * 2u;  // Q, K and V tiles
  static constexpr size_t kSmemBytes = kQkvBytes + kWarps * kScratchFloats * 4u;
  static_assert(kTileElems * 2 % 128 == 0, "V buffer and scratch stay 128-byte aligned");
  // Resident blocks per SM asked of the register allocator (__launch_bounds__): what the shared
  // memory allows on an H100 (228 KB, 1 KB reserved per block: 6 / 5 / 4 / 3 blocks for
  // D = 32 / 64 / 96 / 128), one fewer for D = 64 and 96, where the tighter register cap
  // (96 / 128 registers) made ptxas spill.
  static constexpr int kMinBlocks = D == 32 ? 6 : (D == 64 ? 4 : 3);
};

template <typename T>
struct FwdParams {
  const T* q;
  const T* k;
  const T* v;
  T* out;
  float* lse;
  AttnStrides qs, ks, vs;
  BlockList kv;
  int64_t Hq, Sq, Sk;
  int64_t group;  // Hq / Hkv
  int64_t block_q;
  int subs_per_block;  // block_k / kTileK
  int64_t left, right;
  float scale_log2;  // scale * log2(e)
  bool out_vec;      // out 16-byte aligned: 8-element stores
};

// Copies rows [row0, row0 + 64) of a (rows, D) matrix with row stride `ld` (elements) into
// shared memory (row pitch kLd); rows >= nrows become zeros. kVec: cp.async of 16 bytes (g and
// ld 16-byte / 8-element aligned), else synchronous scalar loads.
template <typename T, int D, bool kVec>
__device__ __forceinline__ void load_tile(T* s, const T* __restrict__ g, int64_t ld, int64_t row0,
                                          int64_t nrows) {
  constexpr int kChunksPerRow = D / 8;
  constexpr int kChunks = kTileK * kChunksPerRow;
  static_assert(kChunks % kThreads == 0, "tile splits evenly into 16-byte chunks");
#pragma unroll
  for (int it = 0; it < kChunks / kThreads; ++it) {
    const int chunk = static_cast<int>(threadIdx.x) + it * kThreads;
    const int r = chunk / kChunksPerRow;
    const int c = (chunk % kChunksPerRow) * 8;
    const int64_t row = row0 + r;
    const bool valid = row < nrows;
    T* dst = s + r * TileGeom<D>::kLd + c;
    if constexpr (kVec) {
      attn::cp_async_16(dst, valid ? g + row * ld + c : g, valid);
    } else {
      uint32_t w[4] = {0u, 0u, 0u, 0u};
      if (valid) {
        const unsigned short* src = reinterpret_cast<const unsigned short*>(g + row * ld + c);
#pragma unroll
        for (int e = 0; e < 8; ++e) {
          w[e >> 1] |= static_cast<uint32_t>(__ldg(src + e)) << ((e & 1) * 16);
        }
      }
      *reinterpret_cast<uint4*>(dst) = make_uint4(w[0], w[1], w[2], w[3]);
    }
  }
}

template <typename T, int D, bool kVec>
__global__ void __launch_bounds__(kThreads, TileGeom<D>::kMinBlocks)
    block_sparse_attention_fwd_kernel(const FwdParams<T> p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // bf16 wmma and cp.async need sm_80; the launcher rejects older devices
#else
  using Geom = TileGeom<D>;
  constexpr int kLd = Geom::kLd;
  constexpr int kFrags = Geom::kFrags;
  using FragA = wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major>;
  using FragBc = wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major>;
  using FragBr = wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major>;
  using FragC = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;

  extern __shared__ __align__(128) unsigned char smem[];
  T* q_s = reinterpret_cast<T*>(smem);
  T* k_s = q_s + Geom::kTileElems;
  T* v_s = k_s + Geom::kTileElems;
  const int warp = static_cast<int>(threadIdx.x) >> 5;
  const int lane = static_cast<int>(threadIdx.x) & 31;
  float* scratch = reinterpret_cast<float*>(smem + Geom::kQkvBytes) + warp * kScratchFloats;
  T* p_s = reinterpret_cast<T*>(scratch);  // P aliases the scratch (see kPLd)

  // Row ownership: lane r (< 16) and lane r + 16 share strip row r; half hh owns the scratch
  // columns [32hh, 32hh + 32) of it.
  const int r = lane & 15;
  const int hh = lane >> 4;
  float* my_row = scratch + r * kScratchLd + 32 * hh;

  const int64_t tile = static_cast<int64_t>(gridDim.x) - 1 - blockIdx.x;
  const int64_t q0 = tile * kTileQ;
  const int64_t h = blockIdx.y;
  const int64_t b = blockIdx.z;
  const int64_t hk = h / p.group;
  const int64_t Sq = p.Sq, Sk = p.Sk;
  const T* qg = p.q + b * p.qs.batch + h * p.qs.head;
  const T* kg = p.k + b * p.ks.batch + hk * p.ks.head;
  const T* vg = p.v + b * p.vs.batch + hk * p.vs.head;
  const int64_t row = q0 + warp * 16 + r;  // this lane's query row

  // Block lists of this tile's layout row block. Counts are clamped to the list capacity and
  // negative indices skipped, so a malformed layout cannot make the kernel read out of bounds.
  const int64_t list = b * p.kv.batch_stride + h * p.kv.head_stride + q0 / p.block_q;
  int n_full = 0;
  const int32_t* full_idx = nullptr;
  if (p.kv.full_counts != nullptr && p.kv.full_indices != nullptr) {
    const int64_t c = __ldg(p.kv.full_counts + list);
    n_full = static_cast<int>(c < 0 ? 0 : (c > p.kv.max_full_blocks ? p.kv.max_full_blocks : c));
    full_idx = p.kv.full_indices + list * p.kv.max_full_blocks;
  }
  int n_part = 0;
  {
    const int64_t c = __ldg(p.kv.counts + list);
    n_part = static_cast<int>(c < 0 ? 0 : (c > p.kv.max_blocks ? p.kv.max_blocks : c));
  }
  const int32_t* part_idx = p.kv.indices + list * p.kv.max_blocks;
  const int spb = p.subs_per_block;
  const int n_full_sub = n_full * spb;
  const int n_sub = n_full_sub + n_part * spb;
  const int64_t tile_last = (q0 + kTileQ <= Sq ? q0 + kTileQ : Sq) - 1;
  const int64_t block_k = static_cast<int64_t>(spb) * kTileK;

  // Key start of sub-tile t, or -1 when it has nothing to contribute (block-uniform).
  auto sub_start = [&](int t) -> int64_t {
    const bool full = t < n_full_sub;
    const int u = full ? t : t - n_full_sub;
    const int32_t idx = __ldg((full ? full_idx : part_idx) + u / spb);
    if (idx < 0) return -1;
    const int64_t k0 = static_cast<int64_t>(idx) * block_k + (u % spb) * kTileK;
    if (k0 >= Sk) return -1;
    if (!full &&
        !attn::window_tile_visible(q0, tile_last, k0, k0 + kTileK - 1, Sq, Sk, p.left, p.right)) {
      return -1;
    }
    return k0;
  };
  auto next_sub = [&](int t) -> int {
    while (t < n_sub && sub_start(t) < 0) ++t;
    return t;
  };

  // Prologue: the Q tile and the first K sub-tile, waited for at the top of the first iteration.
  int t = next_sub(0);
  if (t < n_sub) {
    load_tile<T, D, kVec>(q_s, qg, p.qs.seq, q0, Sq);
    load_tile<T, D, kVec>(k_s, kg, p.ks.seq, sub_start(t), Sk);
    attn::cp_async_commit();
  }

  FragC o_acc[kFrags];
#pragma unroll
  for (int f = 0; f < kFrags; ++f) wmma::fill_fragment(o_acc[f], 0.f);
  float m_run = -INFINITY;  // running max of this row, log2 units (scale folded in)
  float l_run = 0.f;        // running sum of exp2(s - m_run)

  while (t < n_sub) {
    const int64_t k0 = sub_start(t);
    const bool full = t < n_full_sub;
    // K(t) (and Q) have landed; every warp is done with the V buffer (P·V of t - 1).
    attn::cp_async_wait_all();
    __syncthreads();
    load_tile<T, D, kVec>(v_s, vg, p.vs.seq, k0, Sk);
    attn::cp_async_commit();

    // ---- S = Q · Kᵀ (16 x 64 per warp) -> scratch ----
    {
      FragC s_acc[4];
#pragma unroll
      for (int n = 0; n < 4; ++n) wmma::fill_fragment(s_acc[n], 0.f);
#pragma unroll
      for (int f = 0; f < kFrags; ++f) {
        FragA qa;
        attn::load_frag_smem(qa, q_s + warp * 16 * kLd + f * 16, kLd);
#pragma unroll
        for (int n = 0; n < 4; ++n) {
          // Kᵀ: element (d, key) is k_s[key][d], column-major with ldm kLd.
          FragBc kb;
          attn::load_frag_smem(kb, k_s + n * 16 * kLd + f * 16, kLd);
          wmma::mma_sync(s_acc[n], qa, kb, s_acc[n]);
        }
      }
#pragma unroll
      for (int n = 0; n < 4; ++n) {
        wmma::store_matrix_sync(scratch + n * 16, s_acc[n], kScratchLd, wmma::mem_row_major);
      }
    }
    __syncwarp();

    // ---- online softmax of `row` over its columns [32hh, 32hh + 32) of the sub-tile ----
    // Visible columns [lo_rel, hi_rel): keys < Sk, and the window on partial sub-tiles.
    int lo_rel, hi_rel;
    {
      int64_t lo = 0, hi = Sk;
      if (!full) {
        const attn::KeyRange kr = attn::window_key_range(row, Sq, Sk, p.left, p.right);
        lo = kr.lo;
        hi = kr.hi;
      }
      lo -= k0 + 32 * hh;  // relative to this lane's first column
      hi -= k0 + 32 * hh;
      lo_rel = static_cast<int>(lo < 0 ? 0 : (lo > 32 ? 32 : lo));
      hi_rel = static_cast<int>(hi < 0 ? 0 : (hi > 32 ? 32 : hi));
    }
    // Pass 1: the row max of the scaled, masked scores (log2 units).
    float mx = -INFINITY;
#pragma unroll
    for (int c = 0; c < 8; ++c) {
      const float4 x = *reinterpret_cast<const float4*>(my_row + 4 * c);
      const float xs[4] = {x.x, x.y, x.z, x.w};
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int col = 4 * c + e;
        if (col >= lo_rel && col < hi_rel) mx = fmaxf(mx, xs[e] * p.scale_log2);
      }
    }
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 16));
    // Raise the running max only by more than the threshold (also from -inf to a first finite
    // max); O needs rescaling only where it may be non-zero (m_run finite).
    const float m_new = mx > m_run + kRescaleThreshold ? mx : m_run;
    const bool rescale = m_run != -INFINITY && m_new != m_run;
    const float alpha = rescale ? exp2f(m_run - m_new) : 1.f;
    // Pass 2: P = exp2(s - m_new) (0 where masked; m_new is finite wherever a column is
    // visible), rounded to T in place: P column 4c + e of this half goes to the bytes
    // [8c, 8c + 8) of the half's 128-byte span, which this lane read in step c / 2 <= c.
    float sum = 0.f;
    T* my_p = p_s + r * kPLd + 64 * hh;
#pragma unroll
    for (int c = 0; c < 8; ++c) {
      const float4 x = *reinterpret_cast<const float4*>(my_row + 4 * c);
      const float xs[4] = {x.x, x.y, x.z, x.w};
      float pv[4];
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int col = 4 * c + e;
        pv[e] = (col >= lo_rel && col < hi_rel) ? exp2f(xs[e] * p.scale_log2 - m_new) : 0.f;
        sum += pv[e];
      }
      const uint32_t w0 = to_bits(from_float<T>(pv[0])) | (to_bits(from_float<T>(pv[1])) << 16);
      const uint32_t w1 = to_bits(from_float<T>(pv[2])) | (to_bits(from_float<T>(pv[3])) << 16);
      *reinterpret_cast<uint2*>(my_p + 4 * c) = make_uint2(w0, w1);
      // Compiler fence: type-based alias analysis (uint2 stores vs float4 loads) would let the
      // compiler move a later store above the read of the bytes it overwrites.
      asm volatile("" ::: "memory");
    }
    sum += __shfl_xor_sync(0xffffffffu, sum, 16);
    l_run = l_run * alpha + sum;
    m_run = m_new;
    __syncwarp();  // P complete; the S values are consumed

    int any = rescale ? 1 : 0;  // warp-uniform decision
#pragma unroll
    for (int off = 1; off < 32; off <<= 1) any |= __shfl_xor_sync(0xffffffffu, any, off);
    if (any != 0) {
      // O *= alpha per row, two fragments at a time through the scratch columns that P leaves
      // free: floats [16, 32) and [48, 64) of each row (P uses bytes [0, 64) and [128, 192)).
#pragma unroll
      for (int f = 0; f < kFrags; f += 2) {
        wmma::store_matrix_sync(scratch + 16, o_acc[f], kScratchLd, wmma::mem_row_major);
        wmma::store_matrix_sync(scratch + 48, o_acc[f + 1], kScratchLd, wmma::mem_row_major);
        __syncwarp();
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          float4* x = reinterpret_cast<float4*>(my_row + 16 + 4 * c);
          float4 y = *x;
          y.x *= alpha;
          y.y *= alpha;
          y.z *= alpha;
          y.w *= alpha;
          *x = y;
        }
        __syncwarp();
        wmma::load_matrix_sync(o_acc[f], scratch + 16, kScratchLd, wmma::mem_row_major);
        wmma::load_matrix_sync(o_acc[f + 1], scratch + 48, kScratchLd, wmma::mem_row_major);
        __syncwarp();
      }
    }

    // V(t) has landed; every warp is done with the K buffer.
    const int t_next = next_sub(t + 1);
    attn::cp_async_wait_all();
    __syncthreads();
    if (t_next < n_sub) {
      load_tile<T, D, kVec>(k_s, kg, p.ks.seq, sub_start(t_next), Sk);
      attn::cp_async_commit();
    }

    // ---- O += P · V ----
#pragma unroll
    for (int kk = 0; kk < kTileK / 16; ++kk) {
      FragA pa;  // keys [16kk, 16kk + 16): P columns 32j + i live at element 64j + i of a row
      attn::load_frag_smem(pa, p_s + kk * 16 + (kk >> 1) * 32, kPLd);
#pragma unroll
      for (int f = 0; f < kFrags; ++f) {
        FragBr vb;  // V: element (key, d) is v_s[key][d], row-major with ldm kLd
        attn::load_frag_smem(vb, v_s + kk * 16 * kLd + f * 16, kLd);
        wmma::mma_sync(o_acc[f], pa, vb, o_acc[f]);
      }
    }
    t = t_next;
  }
  __syncwarp();  // every lane's P loads are done before the scratch is reused

  // ---- epilogue: out = O / l, lse ----
  const bool row_ok = row < Sq;
  const float inv_l = l_run > 0.f ? 1.f / l_run : 0.f;
  T* out_row = p.out + ((b * p.Hq + h) * Sq + (row_ok ? row : 0)) * D;
#pragma unroll
  for (int f0 = 0; f0 < kFrags; f0 += 4) {
    constexpr int kBatch = 4;
    const int nb = kFrags - f0 < kBatch ? kFrags - f0 : kBatch;  // 4, or 2 for D = 96's tail
#pragma unroll
    for (int f = 0; f < kBatch; ++f) {
      if (f < nb) {
        wmma::store_matrix_sync(scratch + f * 16, o_acc[f0 + f], kScratchLd, wmma::mem_row_major);
      }
    }
    __syncwarp();
    if (row_ok && 32 * hh < nb * 16) {
#pragma unroll
      for (int c = 0; c < 4; ++c) {  // columns f0 * 16 + 32hh + 8c + [0, 8)
        const float4 x0 = *reinterpret_cast<const float4*>(my_row + 8 * c);
        const float4 x1 = *reinterpret_cast<const float4*>(my_row + 8 * c + 4);
        const float v[8] = {x0.x * inv_l, x0.y * inv_l, x0.z * inv_l, x0.w * inv_l,
                            x1.x * inv_l, x1.y * inv_l, x1.z * inv_l, x1.w * inv_l};
        T* dst = out_row + f0 * 16 + 32 * hh + 8 * c;
        if (p.out_vec) {
          *reinterpret_cast<uint4*>(dst) = pack8<T>(v);
        } else {
#pragma unroll
          for (int e = 0; e < 8; ++e) dst[e] = from_float<T>(v[e]);
        }
      }
    }
    __syncwarp();
  }
  if (row_ok && hh == 0) {
    p.lse[(b * p.Hq + h) * Sq + row] = l_run > 0.f ? m_run * kLn2 + logf(l_run) : -INFINITY;
  }
#endif
}

template <typename T, int D, bool kVec>
cudaError_t launch_kernel(const FwdParams<T>& p, dim3 grid, cudaStream_t stream) {
  auto kernel = block_sparse_attention_fwd_kernel<T, D, kVec>;
  constexpr size_t smem = TileGeom<D>::kSmemBytes;
  if constexpr (smem > 48 * 1024) {
    // Opt-in above the 48 KB default, once per device for this instantiation (a race between
    // host threads only repeats the call).
    constexpr int kMaxDevices = 64;
    static std::atomic<bool> opted_in[kMaxDevices];
    int device = 0;
    cudaError_t err = cudaGetDevice(&device);
    if (err != cudaSuccess) return err;
    const bool cached = device >= 0 && device < kMaxDevices;
    if (!cached || !opted_in[device].load()) {
      err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                 static_cast<int>(smem));
      if (err != cudaSuccess) return err;
      if (cached) opted_in[device].store(true);
    }
  }
  kernel<<<grid, kThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

template <typename T, int D>
cudaError_t launch_d(const FwdParams<T>& p, bool vec, dim3 grid, cudaStream_t stream) {
  return vec ? launch_kernel<T, D, true>(p, grid, stream)
             : launch_kernel<T, D, false>(p, grid, stream);
}

bool aligned16(const void* ptr, const AttnStrides& s) {
  return detail::is_aligned16(ptr) && s.batch % 8 == 0 && s.head % 8 == 0 && s.seq % 8 == 0;
}

template <typename T>
cudaError_t launch_typed(const AttnFwdArgs& a, cudaStream_t stream) {
  const AttnShape& s = a.shape;
  FwdParams<T> p;
  p.q = static_cast<const T*>(a.q);
  p.k = static_cast<const T*>(a.k);
  p.v = static_cast<const T*>(a.v);
  p.out = static_cast<T*>(a.out);
  p.lse = a.lse;
  p.qs = a.q_strides;
  p.ks = a.k_strides;
  p.vs = a.v_strides;
  p.kv = a.kv;
  p.Hq = s.Hq;
  p.Sq = s.Sq;
  p.Sk = s.Sk;
  p.group = s.Hq / s.Hkv;
  p.block_q = s.block_q;
  p.subs_per_block = static_cast<int>(s.block_k / kTileK);
  p.left = s.window_left;
  p.right = s.window_right;
  p.scale_log2 = s.scale * kLog2e;
  p.out_vec = detail::is_aligned16(a.out);

  const bool vec =
      aligned16(a.q, a.q_strides) && aligned16(a.k, a.k_strides) && aligned16(a.v, a.v_strides);
  const dim3 grid(static_cast<unsigned>(ceil_div(s.Sq, kTileQ)), static_cast<unsigned>(s.Hq),
                  static_cast<unsigned>(s.B));
  switch (s.D) {
    case 32:
      return launch_d<T, 32>(p, vec, grid, stream);
    case 64:
      return launch_d<T, 64>(p, vec, grid, stream);
    case 96:
      return launch_d<T, 96>(p, vec, grid, stream);
    case 128:
      return launch_d<T, 128>(p, vec, grid, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace

cudaError_t launch_block_sparse_attention_fwd(const AttnFwdArgs& args, cudaStream_t stream) {
  const AttnShape& s = args.shape;
  if (s.B < 0 || s.Hq < 0 || s.Hkv < 1 || s.Sq < 0 || s.Sk < 0 || s.Hq % s.Hkv != 0 ||
      !attention_head_dim_supported(s.D) || (s.block_q != 64 && s.block_q != 128) ||
      (s.block_k != 64 && s.block_k != 128) || s.window_left < -1 || s.window_right < -1) {
    return cudaErrorInvalidValue;
  }
  if (s.B == 0 || s.Hq == 0 || s.Sq == 0) return cudaSuccess;
  // Sk == 0 needs no special case: every sub-tile is skipped, out = 0 and lse = -inf.
  // Index arrays may be null only when their capacity is 0 (an empty tensor); no full counts
  // means no full blocks.
  const BlockList& kv = args.kv;
  if (args.q == nullptr || args.k == nullptr || args.v == nullptr || args.out == nullptr ||
      args.lse == nullptr || kv.counts == nullptr || kv.max_blocks < 0 ||
      (kv.indices == nullptr && kv.max_blocks > 0) ||
      (kv.full_counts != nullptr &&
       (kv.max_full_blocks < 0 || (kv.full_indices == nullptr && kv.max_full_blocks > 0))) ||
      kv.n_row_blocks < ceil_div(s.Sq, s.block_q) || kv.batch_stride < 0 || kv.head_stride < 0) {
    return cudaErrorInvalidValue;
  }
  if (ceil_div(s.Sq, kTileQ) > 0x7fffffff || s.Hq > 65535 || s.B > 65535) {
    return cudaErrorInvalidConfiguration;  // grid limits
  }
  switch (s.dtype) {
    case AttnDType::kFloat16:
      return launch_typed<__half>(args, stream);
    case AttnDType::kBFloat16:
      return launch_typed<__nv_bfloat16>(args, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace lrkernels
