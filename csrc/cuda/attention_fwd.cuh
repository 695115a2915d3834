// Forward kernel of block-sparse attention (docs/attention.md), FlashAttention-2 class, for
// float16 / bfloat16, head_dim D in {32, 64, 96, 128}, compute capability >= 8.0. Instantiated
// per (dtype, D) in attention_fwd_*.cu; launched by attention_fwd.cu.
//
// One block per (layout query block, query head, batch): the tile is the layout's block_q rows
// (128: 8 warps, 64: 4 warps; one block size per tile, since the key lists are per query block),
// each warp owning 16 rows; grid = (ceil(Sq / block_q), Hq, B), the last query blocks first (the
// heaviest under a causal layout). GQA: query head h reads kv head h / (Hq / Hkv), in place.
//
// Per warp, everything between the loads and the output stays in registers (mma.sync m16n8k16,
// common/ptx.cuh): the 16 x D slice of Q as A fragments, loaded once by ldmatrix; per 64-key
// sub-tile, S = Q·Kᵀ (16 x 64, eight fp32 accumulators of 16 x 8; K fragments by ldmatrix), the
// scale·log2(e) multiply, the element mask only on sub-tiles that need it (partial blocks, and
// the sub-tile that crosses Sk), the online softmax in exp2 (row max over the quad, rescale of O
// and of the row sums), then P re-packed from the S accumulators as the A operand of O += P·V
// (V fragments by ldmatrix .trans). O (16 x D fp32) accumulates over the sub-tiles.
// Key loop: the layout's FULL key blocks, then its PARTIAL ones, in sub-tiles of 64 keys (a
// block_k = 128 block is two); sub-tiles at or past Sk, or that the window hides from every row
// of the tile, are skipped. K and V are double-buffered: the sub-tile t + 1 is copied by
// cp.async while t is computed; one barrier per sub-tile. A row that sees no key keeps max =
// -inf, subtracts 0 instead (no NaN) and ends with out = 0, lse = -inf. Rows >= Sq are computed
// on zero-filled queries and never stored.
// Inputs must be 16-byte aligned with strides that are multiples of 8 elements (cp.async); the
// torch launcher copies the rare tensors that are not.
//
// Resources (sm_90a, ptxas; see the static report): shared memory (block_q + 4·64) x (D + 8) x 2
// bytes = 104 KB at block_q = 128, D = 128 (Q staged once, K and V two stages each).
//
// Expected speed (H100/H200 SXM, bf16, 132 SMs at ~1.75 GHz, computed blocks only): each warp
// reads, per 64-key sub-tile, its K and V tiles from shared memory once (2 x 64 x D x 2 bytes) for
// 4 x 16 x 64 x D FLOP: 1/16 byte per FLOP at any D. At 128 bytes/clock/SM of shared-memory
// bandwidth that caps the kernel at 2048 FLOP/clock/SM, ~470 TFLOP/s; mma.sync itself reaches
// ~660 on these parts. The softmax adds per score ~6 FMA-pipe instructions and one MUFU.EX2
// (16/clock/SM: 512 clocks per 128 x 64 sub-tile against ~1600 of tensor work at D = 128, on
// another pipe). With one 8-warp block per SM at D = 128 (registers) and the barrier per sub-tile,
// the estimate is 300-340 TFLOP/s at D = 128 on the S = 16k causal-window-512 problem (the
// issue's goal: >= 300), ~250-300 at D = 64 (the softmax's share doubles per FLOP). block_q = 64
// tiles read K/V from L2 twice as often per FLOP (64 FLOP per byte: ~9 TB/s of L2 traffic at
// 300 TFLOP/s, above the L2's ~5.5-7): 128-row tiles are the fast path, 64 a compatibility one.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "attention_device_utils.cuh"
#include "attention_kernels.cuh"
#include "common/convert.cuh"
#include "common/ptx.cuh"
#include "common/softmax.cuh"
#include "common/util.cuh"

namespace lrkernels {
namespace cuda {
namespace attn {

constexpr int kFwdTileK = 64;        // keys per sub-tile
constexpr int kFwdMaxThreads = 256;  // 8 warps: block_q = 128
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

template <typename T>
struct FwdParams {
  const T* q;
  const T* k;
  const T* v;
  T* out;      // (B, Hq, Sq, D) contiguous
  float* lse;  // (B, Hq, Sq)
  AttnStrides qs, ks, vs;
  BlockList kv;  // per query block: key blocks
  int64_t Hq, Sq, Sk;
  int64_t group;  // Hq / Hkv
  int64_t left, right;
  int subs_per_block;  // block_k / kFwdTileK
  float scale_log2;    // scale · log2(e)
};

// Shared memory of a block of `rows` query rows: the Q tile and two stages of K and V.
template <int D>
constexpr size_t fwd_smem_bytes(int rows) {
  return static_cast<size_t>(rows + 4 * kFwdTileK) * (D + kPad) * 2;
}

// Blocks of 256 threads per SM asked of the register allocator (__launch_bounds__): two at
// D <= 64 (<= 128 registers), one above (Q, O and S fragments alone take 128 registers at D = 128).
template <int D>
constexpr int fwd_min_blocks() {
  return D <= 64 ? 2 : 1;
}

template <typename T, int D>
__global__ void __launch_bounds__(kFwdMaxThreads, fwd_min_blocks<D>())
    block_sparse_attention_fwd_kernel(const FwdParams<T> p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // bf16 mma.sync and cp.async need sm_80; the launcher rejects older devices
#else
  static_assert(D % 32 == 0 && D >= 32 && D <= 128, "D in {32, 64, 96, 128}");
  constexpr int kLd = D + kPad;
  constexpr int kSteps = D / 16;  // k-steps of Q·Kᵀ; also 16-column pairs of O
  constexpr int kStage = 2 * kFwdTileK * kLd;
  extern __shared__ __align__(128) unsigned char smem[];
  const int tid = static_cast<int>(threadIdx.x);
  const int nthreads = static_cast<int>(blockDim.x);
  const int warp = tid >> 5;
  const int lane = tid & 31;
  const int g = lane >> 2;        // accumulator rows g and g + 8 of the warp's strip
  const int tq = lane & 3;        // accumulator columns 2 tq, 2 tq + 1 of each 8-column tile
  const int rows = nthreads / 2;  // the tile: 16 rows per warp, = block_q
  T* q_s = reinterpret_cast<T*>(smem);
  T* kv_s = q_s + rows * kLd;  // stage st: K at kv_s + st·kStage, V after it

  const int64_t tile = static_cast<int64_t>(gridDim.x) - 1 - blockIdx.x;
  const int64_t q0 = tile * rows;
  const int64_t h = blockIdx.y;
  const int64_t b = blockIdx.z;
  const int64_t hk = h / p.group;
  const int64_t Sq = p.Sq, Sk = p.Sk;
  const T* qg = p.q + b * p.qs.batch + h * p.qs.head;
  const T* kg = p.k + b * p.ks.batch + hk * p.ks.head;
  const T* vg = p.v + b * p.vs.batch + hk * p.vs.head;

  // Sub-tile u of the key loop: the full blocks' sub-tiles, then the partial blocks'.
  const ListRow full_l = list_row(p.kv, b, h, tile, true);
  const ListRow part_l = list_row(p.kv, b, h, tile, false);
  const int spb = p.subs_per_block;
  const int n_full_sub = full_l.count * spb;
  const int n_sub = n_full_sub + part_l.count * spb;
  const int64_t tile_last = (q0 + rows <= Sq ? q0 + rows : Sq) - 1;
  // Key start of sub-tile u, or -1 when it contributes nothing (block-uniform).
  auto sub_start = [&](int u) -> int64_t {
    const bool full = u < n_full_sub;
    const int v = full ? u : u - n_full_sub;
    const int32_t idx = __ldg((full ? full_l.idx : part_l.idx) + v / spb);
    if (idx < 0) return -1;
    const int64_t k0 = (static_cast<int64_t>(idx) * spb + v % spb) * kFwdTileK;
    if (k0 >= Sk) return -1;
    if (!full &&
        !window_tile_visible(q0, tile_last, k0, k0 + kFwdTileK - 1, Sq, Sk, p.left, p.right)) {
      return -1;
    }
    return k0;
  };
  struct Sub {
    int u;
    int64_t k0;
  };
  auto next_sub = [&](int u) -> Sub {
    for (; u < n_sub; ++u) {
      const int64_t k0 = sub_start(u);
      if (k0 >= 0) return {u, k0};
    }
    return {n_sub, 0};
  };
  auto issue_kv = [&](int64_t k0, int stage) {
    T* ks = kv_s + stage * kStage;
    load_tile_async<T, D>(ks, kg, p.ks.seq, k0, kFwdTileK, Sk, tid, nthreads);
    load_tile_async<T, D>(ks + kFwdTileK * kLd, vg, p.vs.seq, k0, kFwdTileK, Sk, tid, nthreads);
  };

  // Visible keys of this lane's two rows under the window (partial sub-tiles).
  const int64_t row0 = q0 + warp * 16 + g;
  KeyRange win[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) win[r] = window_key_range(row0 + 8 * r, Sq, Sk, p.left, p.right);

  float o[2 * kSteps][4];
#pragma unroll
  for (int n = 0; n < 2 * kSteps; ++n) {
#pragma unroll
    for (int e = 0; e < 4; ++e) o[n][e] = 0.f;
  }
  float m_run[2] = {-INFINITY, -INFINITY};  // running row max, log2 units (scale folded in)
  float l_run[2] = {0.f, 0.f};              // this lane's share of the running row sums
  uint32_t qf[kSteps][4];

  Sub cur = next_sub(0);
  if (cur.u < n_sub) {  // prologue: Q and the first K / V; Q goes to registers
    load_tile_async<T, D>(q_s, qg, p.qs.seq, q0, rows, Sq, tid, nthreads);
    issue_kv(cur.k0, 0);
    ptx::cp_async_commit();
    ptx::cp_async_wait<0>();
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kSteps; ++kk) {
      ptx::ldmatrix_x4(qf[kk], frag_a_addr(q_s, kLd, warp * 16, kk * 16, lane));
    }
  }
  int stage = 0;
  while (cur.u < n_sub) {
    const bool full = cur.u < n_full_sub;
    const int64_t k0 = cur.k0;
    const Sub nxt = next_sub(cur.u + 1);
    if (nxt.u < n_sub) {  // prefetch into the other stage (free since the last barrier)
      issue_kv(nxt.k0, stage ^ 1);
      ptx::cp_async_commit();
    }
    const T* ks = kv_s + stage * kStage;
    const T* vs = ks + kFwdTileK * kLd;

    // ---- S = Q·Kᵀ: 16 x 64 per warp, s[n] = keys 8n .. 8n + 7 ----
    float s[8][4];
#pragma unroll
    for (int n = 0; n < 8; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) s[n][e] = 0.f;
    }
#pragma unroll
    for (int kk = 0; kk < kSteps; ++kk) {
#pragma unroll
      for (int np = 0; np < 4; ++np) {
        uint32_t kb[4];
        ptx::ldmatrix_x4(kb, frag_b_nk_addr(ks, kLd, np * 16, kk * 16, lane));
        ptx::mma_m16n8k16<T>(s[2 * np], qf[kk], kb[0], kb[1]);
        ptx::mma_m16n8k16<T>(s[2 * np + 1], qf[kk], kb[2], kb[3]);
      }
    }

    // ---- scale (log2 units) and mask: only partial sub-tiles and the one crossing Sk ----
    if (!full || k0 + kFwdTileK > Sk) {
      int lo[2], hi[2];  // visible columns [lo, hi) of each row, relative to column 2 tq
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int64_t base = k0 + 2 * tq;
        const int64_t l64 = (full ? 0 : win[r].lo) - base;
        const int64_t h64 = (full ? Sk : win[r].hi) - base;
        lo[r] = static_cast<int>(l64 < 0 ? 0 : (l64 > kFwdTileK ? kFwdTileK : l64));
        hi[r] = static_cast<int>(h64 < 0 ? 0 : (h64 > kFwdTileK ? kFwdTileK : h64));
      }
#pragma unroll
      for (int n = 0; n < 8; ++n) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int c = 8 * n + (e & 1);
          const int r = e >> 1;
          s[n][e] = c >= lo[r] && c < hi[r] ? s[n][e] * p.scale_log2 : -INFINITY;
        }
      }
    } else {
#pragma unroll
      for (int n = 0; n < 8; ++n) {
#pragma unroll
        for (int e = 0; e < 4; ++e) s[n][e] *= p.scale_log2;
      }
    }

    // ---- online softmax ----
    float m_new[2], m_use[2], alpha[2], psum[2];
    softmax::row_max(s, m_run, m_new);
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      m_use[r] = m_new[r] == -INFINITY ? 0.f : m_new[r];  // a row that has seen no key yet
      alpha[r] = softmax::ex2(m_run[r] - m_use[r]);       // 0 while m_run = -inf
      m_run[r] = m_new[r];
    }
    softmax::exp2_rows(s, m_use, psum);
#pragma unroll
    for (int r = 0; r < 2; ++r) l_run[r] = l_run[r] * alpha[r] + psum[r];
    softmax::scale_rows(o, alpha);

    // ---- O += P·V: P from the S accumulators, V fragments by ldmatrix .trans ----
#pragma unroll
    for (int kk = 0; kk < kFwdTileK / 16; ++kk) {
      uint32_t pa[4];
      acc_to_frag_a<T>(s[2 * kk], s[2 * kk + 1], pa);
#pragma unroll
      for (int dp = 0; dp < kSteps; ++dp) {
        uint32_t vb[4];
        ptx::ldmatrix_x4_trans(vb, frag_b_kn_addr(vs, kLd, kk * 16, dp * 16, lane));
        ptx::mma_m16n8k16<T>(o[2 * dp], pa, vb[0], vb[1]);
        ptx::mma_m16n8k16<T>(o[2 * dp + 1], pa, vb[2], vb[3]);
      }
    }

    // The next stage has landed and every warp is done with this one.
    ptx::cp_async_wait<0>();
    __syncthreads();
    stage ^= 1;
    cur = nxt;
  }

  // ---- epilogue: out = O / l (0 where l = 0), lse = (m + log2 l)·ln 2 (-inf where l = 0) ----
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const float l = util::quad_sum(l_run[r]);
    const int64_t row = row0 + 8 * r;
    if (row >= Sq) continue;
    const float inv_l = l > 0.f ? 1.f / l : 0.f;
    T* out_row = p.out + ((b * p.Hq + h) * Sq + row) * D + 2 * tq;
#pragma unroll
    for (int n = 0; n < 2 * kSteps; ++n) {
      *reinterpret_cast<uint32_t*>(out_row + 8 * n) =
          cvt::pack2<T>(o[n][2 * r] * inv_l, o[n][2 * r + 1] * inv_l);
    }
    if (tq == 0) {
      p.lse[(b * p.Hq + h) * Sq + row] = l > 0.f ? (m_run[r] + log2f(l)) * kLn2 : -INFINITY;
    }
  }
#endif
}

// Launches the kernel for one (dtype, D): block_q / 16 warps per block.
template <typename T, int D>
cudaError_t launch_fwd(const FwdParams<T>& p, int64_t B, int block_q, cudaStream_t stream) {
  constexpr auto kKernel = block_sparse_attention_fwd_kernel<T, D>;
  const cudaError_t err = opt_in_smem<kKernel>(fwd_smem_bytes<D>(kFwdMaxThreads / 2));
  if (err != cudaSuccess) return err;
  const dim3 grid(static_cast<unsigned>(util::ceil_div(p.Sq, block_q)), static_cast<unsigned>(p.Hq),
                  static_cast<unsigned>(B));
  kKernel<<<grid, 2 * block_q, fwd_smem_bytes<D>(block_q), stream>>>(p);
  return cudaGetLastError();
}

// Instantiated in attention_fwd_<dtype>.cu.
#define LRK_ATTN_FWD_INSTANTIATE(T, D) \
  template cudaError_t launch_fwd<T, D>(const FwdParams<T>&, int64_t, int, cudaStream_t);

}  // namespace attn
}  // namespace cuda
}  // namespace lrkernels
