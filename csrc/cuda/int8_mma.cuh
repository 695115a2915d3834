// The tensor-core kernel family of the int8 weight-only ops (float16 / bfloat16 activations,
// every M, both directions), included by int8_mma_fwd.cu and int8_mma_tr.cu:
//   forward    (kTrans = false): y (M, N) = x (M, K) · Wᵀ + bias
//   transposed (kTrans = true):  dx (M, K) = dy (M, N) · W            (the input gradient)
// W[n, k] = q[n, k] · s, q read in the packed layout 2 (int8_kernels.cuh, lrkernels/quant.py).
//
// Structure (per CTA: a tile of kBM rows x 128 output columns, a slice of the reduction):
//   * A 4-stage cp.async pipeline streams, per step of 64 along the reduction, the activation
//     tile (kBM x 64, 16-bit, rows XOR-swizzled by 16-byte chunk), the int8 weight tile (16
//     packed units = 8 KiB: forward 128 n x 64 k, transposed 64 n x 128 k; contiguous runs of
//     2-4 KiB in global memory) and, when needed, the scales of that step (group scales:
//     group-major rows of 128 n (forward) or 64 n (transposed); per-channel scales of the
//     transposed product). Three stages are in flight while the fourth is consumed.
//   * Activation fragments: ldmatrix.x4 (the mma A operand, rows padded to 16 with zeros).
//   * Weight fragments, forward: one 16-byte shared load per lane per 32 x 16 unit gives the
//     lane exactly its B registers for 4 n8 tiles (the packed record); each 4-byte word becomes
//     two 16-bit registers by byte permutes (common/int8_convert.cuh), no conversion instruction.
//     Group scales multiply the pairs (HMUL2, one rounding: round(q · s), the dequantize-then-
//     matmul numerics), loaded once per group from the staged tile; per-channel scales are
//     applied in the epilogue to the float32 sums (s · Σ x·q: one rounding less than the
//     reference).
//   * Weight fragments, transposed: the B operand is W itself (4 rows n x 1 column k per lane);
//     those bytes sit in the records of lanes 2t and 2t + 1, so a lane reads two 16-byte records
//     per unit (2 n16 halves x 2 k8 tiles of fragments) and gathers its bytes with 4 PRMT per 8
//     weights. Scales (per n, or per (n, group)) multiply the pairs as above.
//     Shared-memory records are placed at slot L ^ (L >> 3) within their 8-record row, which
//     makes both the forward (lanes 8i..8i+7 read records 8i..8i+7) and the transposed reads
//     (records 8t + x for t = 0..3) free of bank conflicts.
//   * mma.sync.m16n8k16 with float32 accumulators; 4 warps side by side along the columns, warp
//     tile kBM x 32 (kBM = 16 for M <= 16, else 64).
//   * Split-K in one launch: each of `splits` CTAs of a tile writes its float32 partial sums (in
//     fragment order: coalesced, rows >= M skipped) to the workspace, then increments the tile's
//     counter; the last one adds all partials in split order 0, 1, ... (its own read back too),
//     one whole partial per round (all its loads in flight): deterministic, no atomics on
//     values. It resets the counter for the next launch.
//   * The low-rank addend (kAddend, forward; int8_kernels.cuh Int8LowRankAddend: the LoRA
//     expand), in the CTA that writes the tile, on the tensor cores too: t of the tile's rows is
//     summed from the shrink's partials, rounded and staged in shared memory (the pipeline's
//     buffers, free by then), then for each distinct set (adapter) among the tile's rows one
//     pass of m16n8k16 MMAs over k = rank: A = the staged t with the rows of other sets zeroed
//     in the fragment, B = the set's 128 B rows, staged in shared memory a chunk of sets at a
//     time (columns past the set's rank zeroed), into a fresh float32 fragment that is
//     scaled by the set's s and added to the accumulators (per-channel scales are applied to the
//     accumulators first: they belong to the base product alone). Rows of other sets add an
//     exact +0, so the order of the passes never changes a result. One adapter: one pass of
//     rank / 16 MMAs per n8 tile, against the tile's K / 16 of the main loop.
//   * Epilogue from registers: (per-channel scale,) bias, one rounding, 32-bit pair stores.
//
// Expected performance (H100/H200 SXM, bf16, 4.3 TB/s copy, ~660 TFLOP/s mma.sync; to be
// confirmed by bench/int8.py): the weight is read once, 1 byte per weight (+ 1/16-1/64 for group
// scales); at M <= 16 the kernels are bound by that stream: M = 1, 8192^2: ~16 us + ~2 us launch
// and tail = ~88% of copy bandwidth; M <= 16 vs bf16 F.linear (2 bytes per weight): ~1.8x at
// 8192^2, ~1.5x at 4096^2 (launch overhead weighs more). At M = 64 the MMAs and the conversion
// (bf16: ~3 instructions per weight, amortised over the 4 m16 tiles of a warp) take about as long
// as the stream: ~1.3x. At M = 4096 mma.sync reaches at best ~2/3 of cuBLAS's wgmma rate: ~0.6x,
// so large M goes to dequantize + cuBLAS (lrkernels/ops/int8.py, expected ~0.93x).
// With the low-rank addend (LoRA, 4096^2, r = 16): the epilogue CTA of a tile adds one pass of
// 4 x kFM MMAs per distinct adapter (+0.4% of the tile's MMAs for one adapter), reads its t
// partials (<= 16 KiB) and stages 4 KiB of B per adapter. After the shrink the kernel is launched
// as its programmatic dependent (args.pdl, common/pdl.cuh): the weight stream overlaps the
// shrink and only the epilogue waits for it, so one adapter at M = 16 is expected at ~1.1x
// int8_linear alone (~4 us of weight, ~0.5 us of epilogue; goal 1.05x; ~1.3x with a plain
// kernel boundary). 64 adapters at M = 64: 256 KiB of B per epilogue CTA, staged 9 adapters a
// chunk (one latency per chunk), ~1-2 us on 32 SMs: ~1.3-1.5x the base (goal 1.6x).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "common/convert.cuh"
#include "common/int8_convert.cuh"
#include "common/pdl.cuh"
#include "common/ptx.cuh"
#include "common/util.cuh"
#include "int8_kernels.cuh"
#include "lowrank_launch.cuh"

namespace lrkernels {
namespace cuda {
namespace int8_mma {

constexpr int kBK = kInt8MmaBK;  // reduction per stage: 4 k16 steps
constexpr int kStages = kInt8MmaStages;
constexpr int kBN = kInt8MmaBN;     // output columns per tile
constexpr int kUnitBytes = 512;     // one packed unit: 32 rows x 16 columns
constexpr int kUnitsPerStage = 16;  // forward 4 x 4, transposed 2 x 8
constexpr int kScaleBytes = 512;    // staged scales per stage (<= 256 values)

// kDense: the weight is a 16-bit W (N, K) (the LoRA ops' dense base), staged like the
// activations (128 rows x 8 chunks of 16 bytes, XOR-swizzled), no scales. Twice the weight bytes
// per stage: one CTA fewer per SM (int8_mma_plan).
template <int kBM, bool kDense = false>
struct Cfg {
  static_assert(kBM == 16 || kBM == 64, "16- or 64-row tiles");
  static constexpr int kWM = 1;  // warps along M
  static constexpr int kWN = 4;  // warps along the output columns, 32 each
  static constexpr int kThreads = 32 * kWM * kWN;
  static constexpr int kFM = kBM / (16 * kWM);  // m16 tiles per warp: 1 or 4
  static constexpr int kMinBlocks = (kBM == 16 ? 4 : 3) - (kDense ? 1 : 0);
  static constexpr int kABytes = kBM * kBK * 2;
  static constexpr int kWBytes = kUnitsPerStage * kUnitBytes * (kDense ? 2 : 1);
  static constexpr int kStageBytes = kABytes + kWBytes + (kDense ? 0 : kScaleBytes);
  static constexpr int kSmemBytes = kStageBytes * kStages;
  static_assert(kWBytes == kBN * kBK * (kDense ? 2 : 1), "a stage holds 128 x 64 weights");
};

template <typename T>
struct Params {
  const T* a;  // (M, R), row stride lda
  int64_t lda;
  const int8_t* q;  // packed units
  const T* w;       // kDense: W (N, K), row stride ldw
  int64_t ldw;
  int64_t nbs;  // row units: ceil(N / 32)
  int64_t kbs;  // column units: K / 16
  const T* s;   // scales (see int8_kernels.cuh)
  int64_t sld;
  int64_t groups;  // K / G (group scales), 1 per channel
  int gshift;      // log2 G (group scales)
  const T* bias;   // forward only; nullptr: none
  T* y;
  int64_t ldy;
  int64_t M, N, R, C;
  int64_t n_tiles;
  int splits;
  int64_t steps;
  float* ws;      // splits > 1: grid x kBM x kBN partial sums
  int* counters;  // splits > 1: one per tile
  bool pair_stores;
  Int8LowRankAddend addend;  // kAddend instantiations only
  int rank_pad;              // addend.rank rounded up to 16 (the MMA's k)
  bool pdl;                  // host side: launched as a programmatic dependent (args.pdl)
};

// Slot of record L of a unit in shared memory (see the header comment).
__device__ __forceinline__ int record_slot(int rec) {
  return (rec & ~7) | ((rec & 7) ^ (rec >> 3));
}

// Byte offset of chunk c (8 elements) of row r of a swizzled activation tile (rows of 64).
__device__ __forceinline__ int a_chunk_offset(int r, int c) { return (r * 8 + (c ^ (r & 7))) * 16; }

template <typename T>
__device__ __forceinline__ uint32_t bits16(T v) {
  return cvt::to_bits(v);
}

// acc = 0 (the float32 accumulators of a warp tile: kFM m16 tiles x 4 n8 tiles x 4).
template <int kFM>
__device__ __forceinline__ void zero_accumulators(float (&acc)[kFM][4][4]) {
#pragma unroll
  for (int i = 0; i < kFM; ++i) {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.f;
    }
  }
}

// f(i, j, h, offset) for each accumulator pair (acc[i][j][2h], acc[i][j][2h + 1]) of this thread
// whose row (row0 + 16 i + 8 h) is below M; offset: the pair's float index in a split-K partial,
// stored in fragment order [i][j][h][thread] (coalesced float2 stores and loads).
template <int kFM, int kThreads, class F>
__device__ __forceinline__ void for_each_partial_pair(int64_t row0, int64_t M, int tid, F&& f) {
#pragma unroll
  for (int i = 0; i < kFM; ++i) {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        if (row0 + 16 * i + 8 * h < M) {
          f(i, j, h, ((static_cast<size_t>(i * 4 + j) * 2 + h) * kThreads + tid) * 2);
        }
      }
    }
  }
}

// Rows row0 .. row0 + kRows of a row-major 16-bit matrix (row stride ld), columns col0 ..
// col0 + 64, into a tile of kRows x 8 XOR-swizzled 16-byte chunks (a_chunk_offset); rows >= rows
// and columns >= cols are zero-filled (cols % 8 == 0).
template <typename T, int kRows, int kThreads>
__device__ __forceinline__ void load_rows_async(unsigned char* dst, const T* src, int64_t ld,
                                                int64_t row0, int64_t rows, int64_t col0,
                                                int64_t cols) {
  for (int q = static_cast<int>(threadIdx.x); q < kRows * 8; q += kThreads) {
    const int r = q >> 3;
    const int c = q & 7;
    const int64_t row = row0 + r;
    const int64_t col = col0 + 8 * c;
    const bool ok = row < rows && col < cols;
    ptx::cp_async_16(dst + a_chunk_offset(r, c), ok ? src + row * ld + col : src, ok);
  }
}

template <typename T, int kBM, bool kTrans, bool kGroup, bool kDense>
__device__ __forceinline__ void load_stage(const Params<T>& p, unsigned char* base, int64_t st,
                                           int64_t m0, int64_t c0) {
  using Cf = Cfg<kBM, kDense>;
  const int tid = static_cast<int>(threadIdx.x);
  // Activations: kBM rows x 8 chunks; rows >= M and chunks >= R are zero-filled.
  load_rows_async<T, kBM, Cf::kThreads>(base, p.a, p.lda, m0, p.M, st * kBK, p.R);
  unsigned char* wbase = base + Cf::kABytes;
  if constexpr (kDense) {  // 128 rows n x 8 chunks k, swizzled like the activations
    load_rows_async<T, kBN, Cf::kThreads>(wbase, p.w, p.ldw, c0, p.N, st * kBK, p.R);
    return;
  }
  // Weights: 16 units x 32 records.
  for (int q = tid; q < kUnitsPerStage * 32; q += Cf::kThreads) {
    const int u = q >> 5;
    const int rec = q & 31;
    int64_t nb, kb;
    if constexpr (kTrans) {
      nb = st * 2 + (u >> 3);
      kb = c0 / 16 + (u & 7);
    } else {
      nb = c0 / 32 + (u >> 2);
      kb = st * 4 + (u & 3);
    }
    const bool ok = nb < p.nbs && kb < p.kbs;
    const int8_t* src = ok ? p.q + (nb * p.kbs + kb) * kUnitBytes + rec * 16 : p.q;
    ptx::cp_async_16(wbase + u * kUnitBytes + record_slot(rec) * 16, src, ok);
  }
  // Scales: forward group scales of this step (1 group, or 2 for G = 32) x 128 n; transposed
  // scales of the 64 n of this step x the tile's groups (128 / G of them; 1 per channel).
  if constexpr (kGroup || kTrans) {
    T* sbase = reinterpret_cast<T*>(base + Cf::kABytes + Cf::kWBytes);
    constexpr int kRowChunks = kTrans ? 8 : 16;
    const int rows = kTrans ? (kGroup ? kBN >> p.gshift : 1) : (p.gshift == 5 ? 2 : 1);
    for (int q = tid; q < rows * kRowChunks; q += Cf::kThreads) {
      const int i = q / kRowChunks;
      const int c = q % kRowChunks;
      int64_t grp, n;
      if constexpr (kTrans) {
        grp = kGroup ? (c0 >> p.gshift) + i : 0;
        n = st * kBK + 8 * c;
      } else {
        grp = ((st * kBK) >> p.gshift) + i;
        n = c0 + 8 * c;
      }
      const bool ok = n < p.N && grp < p.groups;
      ptx::cp_async_16(sbase + i * (kRowChunks * 8) + 8 * c, ok ? p.s + grp * p.sld + n : p.s, ok);
    }
  }
}

template <typename T, int kBM>
__device__ __forceinline__ void load_a_fragments(uint32_t a_base, int row0, int chunk0,
                                                 uint32_t (&af)[Cfg<kBM>::kFM][4]) {
  const int lane = static_cast<int>(threadIdx.x) & 31;
#pragma unroll
  for (int i = 0; i < Cfg<kBM>::kFM; ++i) {
    const int row = row0 + 16 * i + (lane & 15);
    ptx::ldmatrix_x4(af[i], a_base + a_chunk_offset(row, chunk0 + (lane >> 4)));
  }
}

template <typename T, int kBM, bool kGroup, bool kDense>
__device__ __forceinline__ void compute_forward(const Params<T>& p, const unsigned char* base,
                                                float (&acc)[Cfg<kBM>::kFM][4][4]) {
  using Cf = Cfg<kBM, kDense>;
  const int lane = static_cast<int>(threadIdx.x) & 31;
  const int warp = static_cast<int>(threadIdx.x) >> 5;
  const int wm = warp / Cf::kWN;
  const int wn = warp % Cf::kWN;
  const int g = lane >> 2;
  const uint32_t a_base = ptx::smem_addr(base);
  const unsigned char* wbase = base + Cf::kABytes;
  const T* sbase = reinterpret_cast<const T*>(base + Cf::kABytes + Cf::kWBytes);
  uint32_t sp[4];  // the scale pair of each n8 tile (rows wn * 32 + 8 j + g)
#pragma unroll
  for (int kk = 0; kk < kBK / 16; ++kk) {
    if constexpr (kGroup) {
      if (kk == 0 || (kk == 2 && p.gshift == 5)) {  // a new group starts (G = 32: every 32)
        const int gi = p.gshift == 5 ? kk >> 1 : 0;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          sp[j] = i8::broadcast_pair(bits16(sbase[gi * kBN + wn * 32 + 8 * j + g]));
        }
      }
    }
    uint32_t af[Cf::kFM][4];
    load_a_fragments<T, kBM>(a_base, wm * 16 * Cf::kFM, 2 * kk, af);
    if constexpr (kDense) {
      // ldmatrix.x4 per pair of n8 tiles: matrices (n8 tile 2jj, k 0-7), (2jj, k 8-15),
      // (2jj + 1, k 0-7), (2jj + 1, k 8-15) of the k16 step; rows of W are the mma's B columns,
      // so the non-transposed load gives each lane its (n = g, k = 2t, 2t + 1) pairs.
      const uint32_t w_base = ptx::smem_addr(wbase);
      const int mat = lane >> 3;
#pragma unroll
      for (int jj = 0; jj < 2; ++jj) {
        uint32_t b[4];
        const int row = wn * 32 + jj * 16 + (lane & 7) + ((mat >> 1) << 3);
        ptx::ldmatrix_x4(b, w_base + a_chunk_offset(row, 2 * kk + (mat & 1)));
#pragma unroll
        for (int i = 0; i < Cf::kFM; ++i) {
          ptx::mma_m16n8k16<T>(acc[i][2 * jj], af[i], b[0], b[1]);
          ptx::mma_m16n8k16<T>(acc[i][2 * jj + 1], af[i], b[2], b[3]);
        }
      }
      continue;
    }
    const uint4 rec = *reinterpret_cast<const uint4*>(wbase + (wn * 4 + kk) * kUnitBytes +
                                                      record_slot(lane) * 16);
    const uint32_t words[4] = {rec.x, rec.y, rec.z, rec.w};
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      uint32_t b0, b1;
      i8::int8x4_to_pairs<T>(words[j], b0, b1);
      if constexpr (kGroup) {
        b0 = i8::mul_pairs<T>(b0, sp[j]);
        b1 = i8::mul_pairs<T>(b1, sp[j]);
      }
#pragma unroll
      for (int i = 0; i < Cf::kFM; ++i) ptx::mma_m16n8k16<T>(acc[i][j], af[i], b0, b1);
    }
  }
}

template <typename T, int kBM, bool kGroup>
__device__ __forceinline__ void compute_transposed(const Params<T>& p, const unsigned char* base,
                                                   float (&acc)[Cfg<kBM>::kFM][4][4]) {
  using Cf = Cfg<kBM>;
  const int lane = static_cast<int>(threadIdx.x) & 31;
  const int warp = static_cast<int>(threadIdx.x) >> 5;
  const int wm = warp / Cf::kWN;
  const int wn = warp % Cf::kWN;
  const int g = lane >> 2;
  const int t = lane & 3;
  const uint32_t a_base = ptx::smem_addr(base);
  const unsigned char* wbase = base + Cf::kABytes;
  const T* sbase = reinterpret_cast<const T*>(base + Cf::kABytes + Cf::kWBytes);
  // Records of forward lanes (2t, g / 2) and (2t + 1, g / 2): rows 2t (+1) + 8 j of the unit,
  // columns 2 (g / 2) + {0, 1, 8, 9}; this lane wants byte g % 2 (column g) and g % 2 + 2
  // (column g + 8) of each.
  const int slot_a = record_slot(8 * t + (g >> 1)) * 16;
  const int slot_b = record_slot(8 * t + 4 + (g >> 1)) * 16;
  const uint32_t bp = static_cast<uint32_t>(g & 1);
  const uint32_t sel = bp | ((4 + bp) << 4) | ((2 + bp) << 8) | ((6 + bp) << 12);
#pragma unroll
  for (int r = 0; r < 2; ++r) {  // the two 32-row units of the step
    uint4 ra[2], rb[2];
#pragma unroll
    for (int uu = 0; uu < 2; ++uu) {
      const unsigned char* unit = wbase + (r * 8 + wn * 2 + uu) * kUnitBytes;
      ra[uu] = *reinterpret_cast<const uint4*>(unit + slot_a);
      rb[uu] = *reinterpret_cast<const uint4*>(unit + slot_b);
    }
#pragma unroll
    for (int h = 0; h < 2; ++h) {  // n16 halves: reduction rows 32 r + 16 h ..
      uint32_t af[Cf::kFM][4];
      load_a_fragments<T, kBM>(a_base, wm * 16 * Cf::kFM, 4 * r + 2 * h, af);
#pragma unroll
      for (int uu = 0; uu < 2; ++uu) {
        const uint32_t wa0 = h == 0 ? ra[uu].x : ra[uu].z;  // rows 16 h + 2t
        const uint32_t wa1 = h == 0 ? ra[uu].y : ra[uu].w;  // rows 16 h + 8 + 2t
        const uint32_t wb0 = h == 0 ? rb[uu].x : rb[uu].z;
        const uint32_t wb1 = h == 0 ? rb[uu].y : rb[uu].w;
        const uint32_t x = __byte_perm(wa0, wb0, sel);  // rows 2t, 2t+1 at columns g, g + 8
        const uint32_t y = __byte_perm(wa1, wb1, sel);  // rows 2t+8, 2t+9
        // Scale pairs of rows (2t, 2t+1) and (2t+8, 2t+9) for this unit's group.
        const int gi = kGroup ? (wn * 32 + uu * 16) >> p.gshift : 0;
        const T* srow = sbase + gi * kBK + 32 * r + 16 * h + 2 * t;
        const uint32_t sp0 = *reinterpret_cast<const uint32_t*>(srow);
        const uint32_t sp1 = *reinterpret_cast<const uint32_t*>(srow + 8);
#pragma unroll
        for (int c = 0; c < 2; ++c) {  // k8 tiles: columns 16 uu + 8 c + (0..7)
          uint32_t b0, b1;
          i8::int8x4_to_pairs<T>(__byte_perm(x, y, c == 0 ? 0x5410u : 0x7632u), b0, b1);
          b0 = i8::mul_pairs<T>(b0, sp0);
          b1 = i8::mul_pairs<T>(b1, sp1);
#pragma unroll
          for (int i = 0; i < Cf::kFM; ++i) {
            ptx::mma_m16n8k16<T>(acc[i][uu * 2 + c], af[i], b0, b1);
          }
        }
      }
    }
  }
}

// Clamped rank of addend set a (0 <= a < n_sets).
__device__ __forceinline__ int addend_rank(const Int8LowRankAddend& ad, int a) {
  const int64_t r = ad.ranks != nullptr ? ad.ranks[a] : ad.rank;
  return static_cast<int>(r < 0 ? 0 : (r > ad.rank ? ad.rank : r));
}

// Shared memory of the addend (in the pipeline's buffers): t rows (kBM x (rank_pad + 8) in T:
// the 8-element pad puts the fragment reads of rows g = 0..7 in distinct banks), the set of each
// row, the distinct sets and their count.
template <typename T, int kBM>
__device__ __forceinline__ size_t addend_smem_bytes(int rank_pad) {
  return static_cast<size_t>(kBM) * (rank_pad + 8) * sizeof(T) + (2 * kBM + 1) * sizeof(int);
}

// acc (the tile's float32 sums, per-channel scales already applied) += the low-rank addend of
// rows m0 .. m0 + kBM, columns c0 .. c0 + 128. Called by every thread of the CTA that writes the
// tile (it has barriers); `smem` is the pipeline's shared memory, no longer in use.
template <typename T, int kBM, bool kDense>
__device__ __forceinline__ void add_low_rank(const Params<T>& p, unsigned char* smem, int64_t m0,
                                             int64_t c0, float (&acc)[Cfg<kBM>::kFM][4][4]) {
  using Cf = Cfg<kBM, kDense>;
  const Int8LowRankAddend& ad = p.addend;
  const int R = static_cast<int>(ad.rank);
  const int RP = p.rank_pad;
  const int ts_ld = RP + 8;
  T* ts = reinterpret_cast<T*>(smem);
  int* row_set = reinterpret_cast<int*>(smem + static_cast<size_t>(kBM) * ts_ld * sizeof(T));
  int* sets = row_set + kBM;
  int* n_sets = sets + kBM;
  const int tid = static_cast<int>(threadIdx.x);

  __syncthreads();  // every warp is done with the pipeline's buffers
  if (tid == 0) *n_sets = 0;
  for (int r = tid; r < kBM; r += Cf::kThreads) {
    const int64_t m = m0 + r;
    int a = -1;
    if (m < p.M) {
      const int64_t v = ad.index != nullptr ? ad.index[m] : 0;
      a = v >= 0 && v < ad.n_sets ? static_cast<int>(v) : -1;
    }
    row_set[r] = a;
  }
  __syncthreads();
  // t = round(Σ_s partial[s]) in split order for j < the row's rank; zeros elsewhere (no set,
  // past the rank, the padding to rank_pad). The column-0 tiles also write t_out.
  const bool write_t = ad.t_out != nullptr && c0 == 0;
  for (int q = tid; q < kBM * RP; q += Cf::kThreads) {
    const int r = q / RP;
    const int j = q % RP;
    const int a = row_set[r];
    const int64_t m = m0 + r;
    float v = 0.f;
    if (a >= 0 && j < addend_rank(ad, a)) {
      for (int64_t s = 0; s < ad.t_splits; ++s) v += ad.t_partial[(s * p.M + m) * R + j];
    }
    const T tv = cvt::from_float<T>(v);
    ts[r * ts_ld + j] = tv;
    if (write_t && m < p.M && j < R) static_cast<T*>(ad.t_out)[m * R + j] = tv;
  }
  // The distinct sets of the tile: each row that is its set's first claims a slot (slot order
  // is arbitrary, and harmless: see the header comment).
  for (int r = tid; r < kBM; r += Cf::kThreads) {
    const int a = row_set[r];
    bool first = a >= 0;
    for (int r2 = 0; r2 < r && first; ++r2) first = row_set[r2] != a;
    if (first) sets[atomicAdd(n_sets, 1)] = a;
  }
  __syncthreads();

  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int wm = warp / Cf::kWN;
  const int wn = warp % Cf::kWN;
  const int g = lane >> 2;
  const int t = lane & 3;
  const T* Bbase = static_cast<const T*>(ad.B);
  const int count = *n_sets;
  // B rows of the tile's columns, a chunk of sets at a time, staged in shared memory behind
  // the t rows: every load of a chunk is in flight at once (one latency per chunk, not per set;
  // 64 distinct adapters at r = 16 are 7 chunks on a 64-row tile), and the block is one
  // contiguous (128 x rank) run of global memory per set. Zeros past the set's rank and past N.
  const int bs_ld = RP + 8;  // 8-element pad: the fragment reads of n = g hit distinct banks
  const int per_set = kBN * bs_ld;
  const size_t b_off = (addend_smem_bytes<T, kBM>(RP) + 15) / 16 * 16;
  T* bs = reinterpret_cast<T*>(smem + b_off);
  const int chunk = static_cast<int>((Cf::kSmemBytes - b_off) / (per_set * sizeof(T)));
  const T zero = cvt::from_float<T>(0.f);
#pragma unroll 1
  for (int d0 = 0; d0 < count; d0 += chunk) {
    const int nd = count - d0 < chunk ? count - d0 : chunk;
    __syncthreads();  // the previous chunk's fragments are read
    for (int q = tid; q < nd * kBN * RP; q += Cf::kThreads) {
      const int dl = q / (kBN * RP);
      const int nl = (q / RP) % kBN;
      const int k = q % RP;
      const int a = sets[d0 + dl];
      const int64_t n = c0 + nl;
      bs[dl * per_set + nl * bs_ld + k] = n < p.N && k < addend_rank(ad, a)
                                              ? Bbase[(static_cast<int64_t>(a) * p.N + n) * R + k]
                                              : zero;
    }
    __syncthreads();
#pragma unroll 1
    for (int dl = 0; dl < nd; ++dl) {
      const int a = sets[d0 + dl];
      const float sa = ad.scales != nullptr ? ad.scales[a] : ad.scale;
      const T* bset = bs + dl * per_set;
#pragma unroll  // j must be static: acc[i][j] indexed at run time would live in local memory
      for (int j = 0; j < 4; ++j) {
        const T* brow = bset + (wn * 32 + 8 * j + g) * bs_ld;  // this lane's B column
        float part[Cf::kFM][4];
#pragma unroll
        for (int i = 0; i < Cf::kFM; ++i) {
#pragma unroll
          for (int e = 0; e < 4; ++e) part[i][e] = 0.f;
        }
#pragma unroll 1
        for (int k16 = 0; k16 < RP; k16 += 16) {
          const uint32_t b0 = *reinterpret_cast<const uint32_t*>(brow + k16 + 2 * t);
          const uint32_t b1 = *reinterpret_cast<const uint32_t*>(brow + k16 + 8 + 2 * t);
#pragma unroll
          for (int i = 0; i < Cf::kFM; ++i) {
            const int r0 = wm * 16 * Cf::kFM + 16 * i + g;  // rows r0 and r0 + 8 of the tile
            const bool in0 = row_set[r0] == a;
            const bool in1 = row_set[r0 + 8] == a;
            const T* t0 = ts + r0 * ts_ld + k16 + 2 * t;
            const T* t1 = t0 + 8 * ts_ld;
            const uint32_t af[4] = {in0 ? *reinterpret_cast<const uint32_t*>(t0) : 0u,
                                    in1 ? *reinterpret_cast<const uint32_t*>(t1) : 0u,
                                    in0 ? *reinterpret_cast<const uint32_t*>(t0 + 8) : 0u,
                                    in1 ? *reinterpret_cast<const uint32_t*>(t1 + 8) : 0u};
            ptx::mma_m16n8k16<T>(part[i], af, b0, b1);
          }
        }
#pragma unroll
        for (int i = 0; i < Cf::kFM; ++i) {
#pragma unroll
          for (int e = 0; e < 4; ++e) acc[i][j][e] = fmaf(sa, part[i][e], acc[i][j][e]);
        }
      }
    }
  }
}

template <typename T, int kBM, bool kTrans, bool kGroup, bool kAddend, bool kDense>
__global__ void __launch_bounds__(Cfg<kBM, kDense>::kThreads, Cfg<kBM, kDense>::kMinBlocks)
    int8_mma_kernel(const Params<T> p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // bf16 mma and cp.async need sm_80; the launcher never selects this below 8.0
#else
  static_assert(!kDense || (!kTrans && !kGroup && kAddend), "dense weights: the LoRA forward");
  using Cf = Cfg<kBM, kDense>;
  extern __shared__ __align__(128) unsigned char smem[];
  __shared__ int last_split;

  const int tid = static_cast<int>(threadIdx.x);
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int wm = warp / Cf::kWN;
  const int wn = warp % Cf::kWN;
  const int g = lane >> 2;
  const int t = lane & 3;
  const int64_t bid = blockIdx.x;
  const int split = static_cast<int>(bid % p.splits);
  const int64_t tile = bid / p.splits;
  const int64_t m0 = (tile / p.n_tiles) * kBM;
  const int64_t c0 = (tile % p.n_tiles) * kBN;
  // Split `split` covers steps [st0, st0 + nst): steps / splits each, the first steps % splits
  // splits one more (the plan keeps splits <= steps: none is empty).
  const int64_t per_split = p.steps / p.splits, extra = p.steps % p.splits;
  const int64_t st0 = split * per_split + util::min64(split, extra);
  const int nst = static_cast<int>(per_split + (split < extra ? 1 : 0));

  float acc[Cf::kFM][4][4];
  zero_accumulators(acc);

  // Pipeline: stage `it` lives in slot it % kStages; kStages - 1 stages are in flight.
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < nst) {
      load_stage<T, kBM, kTrans, kGroup, kDense>(p, smem + s * Cf::kStageBytes, st0 + s, m0, c0);
    }
    ptx::cp_async_commit();
  }
  for (int it = 0; it < nst; ++it) {
    ptx::cp_async_wait<kStages - 2>();  // this thread's copies of stage `it` have landed
    __syncthreads();  // everyone's have; everyone is done with the slot refilled below
    const int next = it + kStages - 1;
    if (next < nst) {
      load_stage<T, kBM, kTrans, kGroup, kDense>(p, smem + (next % kStages) * Cf::kStageBytes,
                                                 st0 + next, m0, c0);
    }
    ptx::cp_async_commit();
    const unsigned char* stage = smem + (it % kStages) * Cf::kStageBytes;
    if constexpr (kTrans) {
      compute_transposed<T, kBM, kGroup>(p, stage, acc);
    } else {
      compute_forward<T, kBM, kGroup, kDense>(p, stage, acc);
    }
  }
  ptx::cp_async_wait<0>();
  // Launched as a programmatic dependent (args.pdl): only the main loop above, which reads x and
  // the weight, overlaps the previous kernel; the split-K buffers, y and t wait for it here.
  if constexpr (kAddend) pdl::wait();

  const int64_t row0 = m0 + wm * 16 * Cf::kFM + g;  // + 16 i + 8 half
  const int64_t col0 = c0 + wn * 32 + 2 * t;        // + 8 j (+ 1)

  if (p.splits > 1) {
    // Partial sums in fragment order: [i][j][half][thread] float2, rows >= M skipped.
    const size_t block_floats = static_cast<size_t>(kBM) * kBN;
    float* mine = p.ws + static_cast<size_t>(bid) * block_floats;
    for_each_partial_pair<Cf::kFM, Cf::kThreads>(
        row0, p.M, tid, [&](int i, int j, int h, size_t off) {
          *reinterpret_cast<float2*>(mine + off) =
              make_float2(acc[i][j][2 * h], acc[i][j][2 * h + 1]);
        });
    __threadfence();  // the partials are visible device-wide before the count says so
    __syncthreads();
    if (tid == 0) last_split = atomicAdd(p.counters + tile, 1) == p.splits - 1;
    __syncthreads();
    if (!last_split) return;
    __threadfence();
    // The sum in split order 0, 1, ... (its own partial read back too, so the order never
    // depends on which CTA came last: deterministic). Splits outermost, so that each round
    // issues all the loads of kRound whole partials at once (kFM x 8 per thread and partial)
    // instead of one load chain per fragment element: a round is one L2 round trip. 16-row
    // tiles take 4 partials a round (16 registers each); 64-row tiles one (64 registers: the
    // 168-register cap of 3 CTAs per SM leaves no room for a second).
    constexpr int kRound = Cf::kFM == 1 ? 4 : 1;
    const float* first = p.ws + static_cast<size_t>(tile) * p.splits * block_floats;
    zero_accumulators(acc);
    for (int s0 = 0; s0 < p.splits; s0 += kRound) {
      float2 v[kRound][Cf::kFM][4][2];  // all of the round's loads first, then the adds
#pragma unroll
      for (int r = 0; r < kRound; ++r) {
        if (s0 + r < p.splits) {
          const float* part = first + (s0 + r) * block_floats;
          for_each_partial_pair<Cf::kFM, Cf::kThreads>(
              row0, p.M, tid, [&](int i, int j, int h, size_t off) {
                v[r][i][j][h] = __ldcg(reinterpret_cast<const float2*>(part + off));
              });
        }
      }
#pragma unroll
      for (int r = 0; r < kRound; ++r) {
        if (s0 + r < p.splits) {
          for_each_partial_pair<Cf::kFM, Cf::kThreads>(row0, p.M, tid,
                                                       [&](int i, int j, int h, size_t) {
                                                         acc[i][j][2 * h] += v[r][i][j][h].x;
                                                         acc[i][j][2 * h + 1] += v[r][i][j][h].y;
                                                       });
        }
      }
    }
    if (tid == 0) p.counters[tile] = 0;  // ready for the next launch
  }

  if constexpr (kAddend) {
    if constexpr (!kGroup && !kDense) {  // per-channel scales scale the base product only
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int64_t col = col0 + 8 * j;
        const float s0 = col < p.C ? cvt::to_float(p.s[col]) : 0.f;
        const float s1 = col + 1 < p.C ? cvt::to_float(p.s[col + 1]) : 0.f;
#pragma unroll
        for (int i = 0; i < Cf::kFM; ++i) {
          acc[i][j][0] *= s0;
          acc[i][j][1] *= s1;
          acc[i][j][2] *= s0;
          acc[i][j][3] *= s1;
        }
      }
    }
    add_low_rank<T, kBM, kDense>(p, smem, m0, c0, acc);
  }

  // Epilogue: (per-channel scale,) bias, round, store.
#pragma unroll
  for (int i = 0; i < Cf::kFM; ++i) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t row = row0 + 16 * i + 8 * h;
      if (row >= p.M) continue;
      T* yrow = p.y + row * p.ldy;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int64_t col = col0 + 8 * j;
        if (col >= p.C) continue;
        const bool second = col + 1 < p.C;
        float v0 = acc[i][j][2 * h];
        float v1 = acc[i][j][2 * h + 1];
        if constexpr (!kTrans) {
          const float s0 = kGroup || kAddend ? 1.f : cvt::to_float(p.s[col]);
          const float s1 = kGroup || kAddend || !second ? 1.f : cvt::to_float(p.s[col + 1]);
          const float b0 = p.bias != nullptr ? cvt::to_float(p.bias[col]) : 0.f;
          const float b1 = p.bias != nullptr && second ? cvt::to_float(p.bias[col + 1]) : 0.f;
          v0 = fmaf(v0, s0, b0);
          v1 = fmaf(v1, s1, b1);
        }
        if (p.pair_stores && second) {
          *reinterpret_cast<uint32_t*>(yrow + col) = cvt::pack2<T>(v0, v1);
        } else {
          yrow[col] = cvt::from_float<T>(v0);
          if (second) yrow[col + 1] = cvt::from_float<T>(v1);
        }
      }
    }
  }
#endif
}

template <typename T, int kBM, bool kTrans, bool kGroup, bool kAddend, bool kDense>
cudaError_t launch_config(const Params<T>& p, const Int8MmaPlan& plan, cudaStream_t stream) {
  using Cf = Cfg<kBM, kDense>;
  auto* kernel = int8_mma_kernel<T, kBM, kTrans, kGroup, kAddend, kDense>;
  constexpr int kSmem = Cf::kSmemBytes;
  if (static_cast<size_t>(kSmem) != plan.smem_bytes || Cf::kThreads != plan.threads ||
      Cf::kMinBlocks != plan.blocks_per_sm) {
    return cudaErrorInvalidValue;  // the plan and the kernel disagree: a bug, not a user error
  }
  // The addend's t rows and at least one set of B rows must fit in the pipeline's buffers.
  if (kAddend && (addend_smem_bytes<T, kBM>(p.rank_pad) + 15) / 16 * 16 +
                         static_cast<size_t>(kBN) * (p.rank_pad + 8) * sizeof(T) >
                     static_cast<size_t>(kSmem)) {
    return cudaErrorInvalidValue;  // cannot happen for ranks <= kInt8MaxAddendRank
  }
  if (kSmem > 48 * 1024) {
    const cudaError_t err =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem);
    if (err != cudaSuccess) return err;
  }
  return lowrank_launch::launch(p.pdl, kernel, dim3(static_cast<unsigned>(plan.grid)),
                                dim3(Cf::kThreads), kSmem, stream, p);
}

template <typename T, bool kTrans, bool kGroup, bool kAddend, bool kDense>
cudaError_t launch_bm(const Params<T>& p, const Int8MmaPlan& plan, cudaStream_t stream) {
  switch (plan.bm) {
    case 16:
      return launch_config<T, 16, kTrans, kGroup, kAddend, kDense>(p, plan, stream);
    case 64:
      return launch_config<T, 64, kTrans, kGroup, kAddend, kDense>(p, plan, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

// Fills Params from checked args (see launch_int8_mma) and launches direction kTrans (kAddend:
// the forward with args.addend; kDense: with args.dense_weight).
template <typename T, bool kTrans, bool kAddend = false, bool kDense = false>
cudaError_t launch_direction(const Int8MmaArgs& a, const Int8MmaPlan& plan, float* ws,
                             int* counters, cudaStream_t stream) {
  Params<T> p;
  p.a = static_cast<const T*>(a.a);
  p.lda = a.lda;
  p.q = a.qpacked;
  p.w = static_cast<const T*>(a.dense_weight);
  p.ldw = a.ldw;
  p.nbs = util::ceil_div(a.N, 32);
  p.kbs = a.K / 16;
  p.s = static_cast<const T*>(a.scales);
  p.sld = a.sld;
  p.groups = a.group_size > 0 ? a.K / a.group_size : 1;
  p.gshift = a.group_size == 32 ? 5 : (a.group_size == 64 ? 6 : 7);
  p.bias = kTrans ? nullptr : static_cast<const T*>(a.bias);
  p.y = static_cast<T*>(a.y);
  p.ldy = a.ldy;
  p.M = a.M;
  p.N = a.N;
  p.R = kTrans ? a.N : a.K;
  p.C = kTrans ? a.K : a.N;
  p.n_tiles = plan.n_tiles;
  p.splits = plan.splits;
  p.steps = plan.steps;
  p.ws = ws;
  p.counters = counters;
  p.pair_stores = (reinterpret_cast<uintptr_t>(a.y) & 3u) == 0 && a.ldy % 2 == 0;
  p.addend = kAddend ? *a.addend : Int8LowRankAddend{};
  p.rank_pad = kAddend ? static_cast<int>(util::ceil_div(a.addend->rank, 16) * 16) : 0;
  p.pdl = kAddend && a.pdl;
  if constexpr (kDense) {
    return launch_bm<T, false, false, true, true>(p, plan, stream);
  } else {
    return a.group_size > 0 ? launch_bm<T, kTrans, true, kAddend, false>(p, plan, stream)
                            : launch_bm<T, kTrans, false, kAddend, false>(p, plan, stream);
  }
}

// The direction-specific entry points (int8_mma_fwd.cu, int8_mma_tr.cu).
cudaError_t launch_forward(const Int8MmaArgs& a, const Int8MmaPlan& plan, float* ws, int* counters,
                           cudaStream_t stream);
cudaError_t launch_transposed(const Int8MmaArgs& a, const Int8MmaPlan& plan, float* ws,
                              int* counters, cudaStream_t stream);
cudaError_t launch_forward_addend(const Int8MmaArgs& a, const Int8MmaPlan& plan, float* ws,
                                  int* counters, cudaStream_t stream);
cudaError_t launch_forward_dense(const Int8MmaArgs& a, const Int8MmaPlan& plan, float* ws,
                                 int* counters, cudaStream_t stream);

}  // namespace int8_mma
}  // namespace cuda
}  // namespace lrkernels
