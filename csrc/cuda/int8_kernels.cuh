// Launch API of the int8 weight-only (W8A16) CUDA kernels. Torch-free, like lowrank_kernels.cuh:
// the .cu files include only CUDA headers; int8_cuda.cpp (host compiler) does the torch side.
//
// The kernels read the packed weight (layout version 2, lrkernels/quant.py): q (N, K) int8,
// K % 16 == 0, as units of 32 rows x 16 columns, 512 bytes each, unit (nb, kb) at
// qpacked + (nb * K / 16 + kb) * 512, byte 16 L + 4 j + b of a unit holding
// q[32 nb + 8 j + L / 4, 16 kb + 2 (L % 4) + (b & 1) + 8 (b >> 1)] (rows past N are zero).
// Scales in the activation dtype: per output channel s[n], or per group of G in {32, 64, 128}
// input features s[n, k / G], the latter stored group-major: element (n, grp) at
// scales[grp * sld + n]. W[n, k] = q[n, k] * s. Dequantization happens on chip; W in 16 bits
// never exists in global memory (except in int8_dequantize, which is there to produce it).
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace lrkernels {
namespace cuda {

enum class Int8DType { kFloat32, kFloat16, kBFloat16 };

// An optional low-rank addend of the forward product (the LoRA expand of csrc/cuda/lora_cuda.cpp,
// fused into the epilogue so that y is written once):
//   y[m, n] += s_m · Σ_{j < r_m} round(t[m, j]) · B[a_m, n, j],   t = Σ_s t_partial[s]
// t_partial (t_splits, M, rank) float32 (the LoRA shrink's output; summed in split order 0, 1, ...
// and rounded to the activation dtype, as lora_gemv.cu does); B (n_sets, N, rank) in the activation
// dtype, contiguous. Row m uses set a_m = index[m] (index == nullptr: 0; outside [0, n_sets): no
// addend for that row), the first r_m = ranks[a_m] columns clamped to [0, rank] (ranks ==
// nullptr: rank) and s_m = scales[a_m] (scales == nullptr: scale). Columns of B at or past r_m
// are never multiplied (they may hold anything). t_out (M, rank) in the activation dtype, when
// not nullptr, receives round(t) (rows without a set: 0).
struct Int8LowRankAddend {
  const float* t_partial;
  int64_t t_splits;
  int64_t rank;  // 1..kInt8MaxAddendRank
  const void* B;
  const int32_t* index;
  const int32_t* ranks;
  const float* scales;
  float scale;
  int64_t n_sets;
  void* t_out;
};
constexpr int64_t kInt8MaxAddendRank = 64;

// One tensor-core GEMM C (M, C) = A (M, R) · B (R, C) + bias with B derived from the weight:
//   forward    (transposed = false): A = x (M, K),  B[k, n] = W[n, k], R = K, C = N, + bias
//   transposed (transposed = true):  A = dy (M, N), B[n, k] = W[n, k], R = N, C = K (no bias)
// Requirements (else cudaErrorInvalidValue, nothing written): dtype float16 or bfloat16; a
// 16-byte aligned, lda % 8 == 0, R % 8 == 0; qpacked 16-byte aligned; K % 16 == 0, N >= 1;
// group_size 0, 32, 64 or 128 dividing K. Scales that are staged in shared memory (group scales,
// and the per-channel scales of the transposed product) must be 16-byte aligned with
// sld % 8 == 0, sld >= N, every group row readable up to ceil(N / 8) * 8 elements; the
// per-channel scales of the forward (read in the epilogue) and the bias may have any alignment.
// y: rows of ldy >= C elements, any alignment (pairs of outputs are stored as one 32-bit word
// when y and ldy allow it).
struct Int8MmaArgs {
  const void* a;
  int64_t lda;
  const int8_t* qpacked;
  const void* scales;
  int64_t sld;       // group-major row stride of group scales (unused per channel)
  const void* bias;  // (N,) forward only, or nullptr
  void* y;
  int64_t ldy;
  int64_t M;
  int64_t N;
  int64_t K;
  int64_t group_size;  // 0: per output channel
  bool transposed;
  Int8DType dtype;
  int splits;  // 0: chosen by the plan; > 0: forced (tests, benchmarks), clamped to the k steps
  // Forward only: the low-rank addend (above), or nullptr. t_partial, B, index, ranks, scales
  // and t_out must not alias y.
  const Int8LowRankAddend* addend = nullptr;
  // Forward with an addend only (the LoRA ops' dense base): when set, the weight is this dense
  // W (N, K) in the activation dtype, row stride ldw (16-byte aligned, ldw % 8 == 0, K % 8 ==
  // 0 suffices), and qpacked, scales and group_size are unused (group_size must be 0). The same
  // tiles, pipeline and split-K; the stage holds 16 KiB of weights instead of 8.
  const void* dense_weight = nullptr;
  int64_t ldw = 0;
  // With an addend only: launch as a programmatic dependent (common/pdl.cuh; compute capability
  // 9.0 and newer) of the previous kernel in the stream (the LoRA shrink, t_partial's producer),
  // which must not write the activations, the weight or the scales: the main loop overlaps it,
  // and everything after it (split-K buffers, the epilogue, t) waits for its completion.
  bool pdl = false;
};

// How a problem is cut: tiles of bm x 128 outputs, the reduction in steps of 64, split over
// `splits` CTAs per tile (split-K); grid = tiles * splits CTAs of `threads` threads. With
// splits > 1 each CTA writes its float32 partial sums to the workspace and increments its tile's
// counter; the last to arrive adds the partials in split order (deterministic), applies the
// epilogue and resets the counter to 0. Counters must be zero before the first launch (they are
// again after every completed launch); launches sharing counters must not overlap (one stream).
struct Int8MmaPlan {
  int bm;             // 16 (M <= 16), 64, or 128 (when 128-row tiles alone fill the GPU)
  int bn;             // 128
  int threads;        // 256 for bm = 128, else 128
  int stages;         // cp.async pipeline depth
  int blocks_per_sm;  // the occupancy the split choice assumes (__launch_bounds__ minimum)
  int64_t m_tiles;
  int64_t n_tiles;
  int64_t tiles;
  int64_t steps;            // ceil(R / 64)
  int64_t steps_per_split;  // the longest split (steps / splits, one more for steps % splits)
  int splits;
  int64_t grid;
  size_t smem_bytes;        // dynamic shared memory per CTA
  size_t workspace_floats;  // float32 partials, 0 when splits == 1
  int64_t counters;         // int32 counters, 0 when splits == 1
};

constexpr int kInt8MmaBK = 64;     // reduction per pipeline stage
constexpr int kInt8MmaStages = 4;  // cp.async stages (3 in flight while one is consumed)
constexpr int kInt8MmaBN = 128;    // output columns per tile: 4 warps x 32
constexpr int kInt8MmaMaxSplits = 64;

inline int64_t int8_ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Tile and split-K choice. Tiles: 16 rows for M <= 16, else 64 rows; 4 warps, each 16 or 64 rows
// x 32 columns (at 64 rows each converted weight fragment feeds 4 MMAs). (A 128-row tile of 8
// warps would halve the weight's shared-memory traffic per MMA, but with 2 CTAs per SM its
// 128-register cap spills; 3 CTAs of the 64-row tile give the same 12 warps per SM.) Memory-bound
// shapes need every SM streaming and the tiles alone rarely give that at small M (N = 4096: 32
// tiles), so the reduction is split until the grid covers at least 2 CTAs per SM (>= 2 waves of
// the SM count), all resident at once (grid <= slots = SMs x blocks_per_sm: no tail wave).
// Among the split counts that do, the plan takes the one that loads the SMs most evenly: the
// least ceil(grid / SMs) / splits (the busiest SM's CTAs, each 1/splits of a tile's work; N =
// 4096 at M = 64: 9 splits -> 288 CTAs, 3 on some SMs, 0.33 of a tile each; 12 -> 384, 0.25),
// the fewest splits on a tie. Limits: >= 4 steps (256 of the reduction) per split, relaxed to 2
// when the tiles would leave most SMs idle; the reducing CTA reads at most 256 KiB of partials
// per tile (the serial tail: one L2 round trip per round, ~0.2-0.3 us; a round is 4 partials of
// a 16-row tile or one of a 64-row tile, 32 KiB, which is also about what one SM can pull from
// L2 in that time). At M = 64 on 4096^2 that is 9 rounds, ~2 us against a ~4 us weight stream:
// whether 9 splits (2.2 CTAs/SM) beat 5 (1.2 CTAs/SM, 4 rounds) is for the GPU run to say
// (LRKERNELS_INT8_SPLITS forces a count).
inline Int8MmaPlan int8_mma_plan(const Int8MmaArgs& a, int num_sms) {
  Int8MmaPlan p{};
  const int64_t R = a.transposed ? a.N : a.K;
  const int64_t C = a.transposed ? a.K : a.N;
  const int64_t sms = num_sms > 0 ? num_sms : 1;
  p.bn = kInt8MmaBN;
  p.stages = kInt8MmaStages;
  p.n_tiles = int8_ceil_div(C, p.bn);
  const bool dense = a.dense_weight != nullptr;
  p.bm = a.M <= 16 ? 16 : 64;
  p.threads = 128;
  p.blocks_per_sm = (p.bm == 16 ? 4 : 3) - (dense ? 1 : 0);  // dense: twice the weight bytes
  p.m_tiles = int8_ceil_div(a.M > 0 ? a.M : 0, p.bm);
  p.tiles = p.m_tiles * p.n_tiles;
  p.steps = int8_ceil_div(R, kInt8MmaBK);
  int64_t splits = 1;
  if (a.splits > 0) {
    splits = a.splits;
  } else if (p.tiles > 0 && p.tiles < 2 * sms) {
    const int64_t slots = sms * p.blocks_per_sm;
    const int64_t min_steps = p.tiles * 2 < sms ? 2 : 4;
    // Partials read by the reducing CTA: (splits - 1) x rows x 128 x 4 bytes <= 256 KiB.
    const int64_t rows = a.M < 1 ? 1 : (a.M < p.bm ? a.M : p.bm);
    int64_t hi = 1 + (256 * 1024) / (rows * p.bn * 4);
    hi = hi < p.steps / min_steps ? hi : p.steps / min_steps;
    hi = hi < slots / p.tiles ? hi : slots / p.tiles;
    hi = hi < kInt8MmaMaxSplits ? hi : kInt8MmaMaxSplits;
    const int64_t lo = int8_ceil_div(2 * sms, p.tiles);
    // Without a count in [lo, hi] (short reductions), as many as the limits allow.
    splits = hi > 1 ? hi : 1;
    int64_t best_num = 0, best_den = 1;  // ceil(grid / SMs) / splits as a fraction
    for (int64_t s = lo; s <= hi; ++s) {
      const int64_t busiest = int8_ceil_div(p.tiles * s, sms);
      if (best_num == 0 || busiest * best_den < best_num * s) {
        best_num = busiest;
        best_den = s;
        splits = s;
      }
    }
  }
  if (splits > kInt8MmaMaxSplits) splits = kInt8MmaMaxSplits;
  if (splits > p.steps) splits = p.steps;
  if (splits < 1) splits = 1;
  p.splits = static_cast<int>(splits);
  p.steps_per_split = int8_ceil_div(p.steps, splits);  // the longest split
  p.grid = p.tiles * p.splits;
  const size_t stage = static_cast<size_t>(p.bm) * kInt8MmaBK * 2                  // activations
                       + static_cast<size_t>(p.bn) * kInt8MmaBK * (dense ? 2 : 1)  // weights
                       + (dense ? 0 : 512);                                        // scales
  p.smem_bytes = stage * p.stages;
  if (p.splits > 1) {
    p.workspace_floats = static_cast<size_t>(p.grid) * p.bm * p.bn;
    p.counters = p.tiles;
  }
  return p;
}

// Runs the GEMM with `plan` (from int8_mma_plan on the same args). workspace: plan.
// workspace_floats floats (any contents); counters: plan.counters int32, zero (see above).
cudaError_t launch_int8_mma(const Int8MmaArgs& args, const Int8MmaPlan& plan, float* workspace,
                            int* counters, cudaStream_t stream);

// W (N, K) in `dtype` (float32, float16 or bfloat16), row-major with row stride ldw: each weight
// q * s formed in float32 and rounded once (the "dequantize once" half of dequantize + cuBLAS).
// Scales: element (n, grp) at scales[n * s_stride_n + grp * s_stride_g] (any strides; per
// channel: s_stride_g = 0, group_size = 0). qpacked 16-byte aligned, K % 16 == 0.
struct Int8DequantArgs {
  const int8_t* qpacked;
  const void* scales;
  int64_t s_stride_n;
  int64_t s_stride_g;
  void* w;
  int64_t ldw;
  int64_t N;
  int64_t K;
  int64_t group_size;
  Int8DType dtype;
};
cudaError_t launch_int8_dequantize(const Int8DequantArgs& args, cudaStream_t stream);

}  // namespace cuda
}  // namespace lrkernels
