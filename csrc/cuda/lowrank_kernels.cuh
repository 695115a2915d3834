// Launch API of the low-rank CUDA kernels: y = (x · Vᵀ) · Uᵀ + bias. Deliberately free of torch
// headers: the .cu files that implement it include only CUDA headers (fast nvcc builds), the torch
// side (argument checks, allocation, the persistent split counters, streams) lives in
// lowrank_cuda.cpp, and the CPU emulation's driver calls it directly.
//
// Two kernels per call (three when a split `down` is reduced by its own kernel):
//   down: t = x · Vᵀ, split over `in` (K slices) when the row tiles alone would not fill the GPU;
//         the slices of a tile store float32 partials, reduced in slice order (deterministic)
//         into t, rounded to the dtype, in a small workspace (M x ldt elements: 1 MiB at
//         M = 4096, rank 128, bf16; L2-sized). Who reduces (plan.reduce):
//           kLastBlock: the last block to arrive at the tile's counter, inside `down`. One block
//                       per tile reads every partial: cheap for small tiles (decode), but its
//                       bandwidth into one SM bounds the split count for large ones;
//           kSeparate:  `reduce`, a third kernel between the two (a programmatic dependent of
//                       `down`), spreads the sum over the whole GPU: one thread per 4 columns
//                       of a row of t. Costs one more dependent launch (~1 us), saves the serial
//                       read of S x BM x BN x 4 bytes through one SM (M = 1024, rank 64, 19
//                       slices of 128 x 64 tiles: 608 KiB, ~6 us at ~100 GB/s into an SM).
//   up:   y = t · Uᵀ + bias, launched as a programmatic dependent of `down` on sm_90 (PDL): its
//         blocks start while `down` finishes and stream their U tiles and bias before they wait
//         for t, so the second launch costs neither a launch gap nor U's latency.
// Why not one launch: every output needs all of t, and t needs all of V, so a single grid needs
// either a grid-wide wait (a spin-wait on other blocks: needs co-residency; not allowed here) or
// the last block of each row tile doing the whole `up` product alone (one block per row tile
// streaming all of U and writing out x BM outputs: ~10x slower at M <= 1024 than spreading it).
// See lowrank_tc_down.cu / lowrank_tc_up.cu / lowrank_gemv.cu for each kernel's design and the
// times it should reach.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>

namespace lrkernels {
namespace cuda {

enum class DType { kFloat32, kFloat16, kBFloat16 };

// Every tensor in `dtype`, accumulation in float32; for float16/bfloat16 the intermediate
// t = x · Vᵀ is rounded to `dtype` before the second product (the numerics of two torch matmuls).
//   x (M, in):      element (m, k) at x[m * ldx + k]           (unit stride along `in`)
//   V (rank, in):   element (j, k) at V[j * v_sj + k * v_sk]   (any strides: e.g. Uᵀ of a forward)
//   U (out, rank):  element (n, j) at U[n * u_sn + j * u_sj]   (any strides: e.g. Vᵀ)
//   bias (out) contiguous or nullptr; y (M, out) contiguous, not aliasing any input.
// Requirements: M >= 0, in, out, rank >= 1, ldx >= in, strides >= 1.
struct LowRankArgs {
  const void* x;
  const void* U;
  const void* V;
  const void* bias;
  void* y;
  int64_t M, in, out, rank;
  int64_t ldx;
  int64_t v_sj, v_sk;
  int64_t u_sn, u_sj;
  DType dtype;
};

// How a kernel reads an operand tile (reduction dimension k):
//   kRows:    16-byte cp.async of rows contiguous along k (row-major x, V, U);
//   kCols:    16-byte cp.async of rows contiguous along the other dimension (a transposed view
//             such as the Vᵀ / Uᵀ of the input gradient), transposed by ldmatrix.trans;
//   kStrided: element loads at any strides and alignment (odd sizes, misaligned views).
enum class Layout : int { kRows = 0, kCols = 1, kStrided = 2 };

enum class Path : int {
  kTensorCore = 0,  // float16 / bfloat16 on compute capability >= 8.0: mma.sync tiles
  kGemv = 1,        // float32 (exact FMAs, no TF32), or 16-bit below 8.0: CUDA-core GEMV tiles
};

// Who sums the partials of a split tensor-core `down` (see the top of this file).
enum class Reduce : int { kLastBlock = 0, kSeparate = 1 };
constexpr int kReduceThreads = 128;  // reduce kernel: threads per block, 4 columns of t each

// Tile shapes of the tensor-core kernels (both kernels use the same three; BN is the rank chunk
// of `down` and the output-column tile of `up`).
enum class Tile : int { k16 = 0, k64 = 1, k128 = 2 };
struct TileDims {
  int bm, bn, threads;
  int blocks_per_sm;  // resident blocks per SM on sm_90 (ptxas registers and shared memory:
                      // 16: 44-64 regs, 16.5 KB -> 13; 64: 80-106 regs, 41 KB -> 4-5;
                      // 128: 124-128 regs, 77-83 KB -> 2)
};
constexpr TileDims tile_dims(Tile t) {
  return t == Tile::k16   ? TileDims{16, 32, 64, 12}
         : t == Tile::k64 ? TileDims{64, 64, 128, 4}
                          : TileDims{128, 128, 256, 2};
}
constexpr int kTcBK = 32;         // k step of both tensor-core kernels
constexpr int kGemvRows = 8;      // gemv: rows of x per block
constexpr int kGemvRank = 8;      // gemv down: V rows (rank) per block, one per warp
constexpr int kGemvOutRows = 32;  // gemv up: outputs per block (8 warps x 4)

struct LowRankPlan {
  Path path;
  Tile down_tile, up_tile;  // tensor-core path
  int splits;               // K slices of `down` (1: no partials, no counters)
  Reduce reduce;            // tensor-core path with splits > 1: who sums the partials
  int64_t slice;            // elements of `in` per slice (a multiple of 32, or 8 on gemv)
  int64_t row_tiles;        // down: row tiles (gemv: row chunks of kGemvRows)
  int64_t rank_chunks;      // down: rank chunks (bn wide; gemv: kGemvRank)
  int64_t up_row_tiles, up_col_tiles;
  int64_t ldt;  // leading dimension of t in the workspace (elements, rank rounded up)
  Layout x_layout, v_layout, u_layout;
  bool pdl;              // launch `up` (and `down`) as programmatic dependents (sm_90+)
  size_t t_bytes;        // workspace: t (dtype on the tensor-core path, float32 on gemv)
  size_t partial_bytes;  // workspace: float32 partials of the split tiles (0 when splits == 1)
  size_t counters;       // uint32 counters that must be zero at launch (0 unless the last
                         // block of a split tile reduces it)

  int64_t down_blocks() const { return row_tiles * rank_chunks * splits; }
  bool separate_reduce() const {
    return path == Path::kTensorCore && splits > 1 && reduce == Reduce::kSeparate;
  }
  // Reduce kernel blocks: one thread per 4 columns of a row of t.
  int64_t reduce_blocks(int64_t M) const {
    return separate_reduce() ? (M * (ldt / 4) + kReduceThreads - 1) / kReduceThreads : 0;
  }
  int64_t up_blocks() const { return up_row_tiles * up_col_tiles; }
  size_t workspace_bytes() const { return t_bytes + partial_bytes; }
};

struct DeviceCaps {
  int num_sms;
  int cc_major;
};

// Overrides for tests and benchmarks; 0 / -1 keep the planner's choice.
struct PlanOptions {
  int splits = 0;          // force this many K slices (clamped so that none is empty)
  int tile = -1;           // force Tile(tile) for both tensor-core kernels
  int path = -1;           // force Path(path) (the tensor-core path still needs a 16-bit dtype)
  int reduce = -1;         // force Reduce(reduce) for split tensor-core plans
  double fill_margin = 0;  // > 0: replaces plan_detail::kFillMargin (1.0: the model's best)
};

namespace plan_detail {

constexpr int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }
constexpr int64_t round_up(int64_t a, int64_t b) { return cdiv(a, b) * b; }

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// Layout of a (rows x ks) operand whose element (r, k) is at p[r * s_r + k * s_k], 16-bit.
inline Layout operand_layout(const void* p, int64_t rows, int64_t ks, int64_t s_r, int64_t s_k) {
  if (!aligned16(p)) return Layout::kStrided;
  if (s_k == 1 && (s_r % 8 == 0 || rows == 1) && ks % 8 == 0) return Layout::kRows;
  if (s_r == 1 && (s_k % 8 == 0 || ks == 1) && rows % 8 == 0) return Layout::kCols;
  return Layout::kStrided;
}

// Planning figures for an H100/H200-class GPU with 132 SMs (scaled by the SM count): to be
// replaced by the measured dispatch table, they only rank candidate tilings against each other.
constexpr double kHbmBytesPerUs = 3.5e6;   // 3.5 TB/s achievable HBM reads
constexpr double kL2BytesPerUs = 8.0e6;    // 8 TB/s L2 -> SM
constexpr double kMmaFlopsPerUs = 4.0e8;   // 400 TFLOP/s of mma.sync (wgmma peak ~790 measured)
constexpr double kSmL2BytesPerUs = 1.0e5;  // 100 GB/s into one SM (the last block's reduction)
constexpr double kWaveUs = 1.0;            // per wave: DRAM latency + pipeline fill + epilogue
constexpr double kRefSms = 132;

// Warps an SM needs resident to keep mma.sync / ldmatrix / cp.async latencies covered (below,
// the MMA rate falls in proportion).
constexpr double kLatencyWarps = 8;
// A grid of >= 2 blocks per SM is taken when its estimate is at most this factor of the best.
constexpr double kFillMargin = 1.25;

// Share of its MMA rate an SM reaches, and how much longer the busiest SM works than the mean,
// for `blocks` blocks of `warps` warps, at most `per_sm` resident per SM: the factor the MMA time
// of a perfectly spread grid is multiplied by. Below one block per SM it is 1 / fill (idle SMs);
// above, the busiest SM runs ceil(blocks / SMs) blocks against a mean of blocks / SMs (288
// blocks on 132 SMs: 3 on some, 2.18 on average), and too few resident warps per SM (one 4-warp
// block) leave MMA latency exposed.
inline double mma_spread(int64_t blocks, int warps, int per_sm, int num_sms) {
  const int64_t busiest = cdiv(std::max<int64_t>(blocks, 1), num_sms);
  const double imbalance = static_cast<double>(busiest) * num_sms / std::max<int64_t>(blocks, 1);
  const int64_t resident = std::min<int64_t>(busiest, per_sm);
  const double occupancy = std::min(1.0, static_cast<double>(resident * warps) / kLatencyWarps);
  return imbalance / occupancy;
}

// Estimated microseconds of summing the partials of a split `down` (0 when splits == 1).
//   kLastBlock: the critical path of one block reading the S partials of its tile (rows < M)
//               through one SM;
//   kSeparate:  every partial read once over the GPU (L2 bandwidth, or the bandwidth into the
//               SMs that have reduce blocks), t written, plus one more dependent launch.
inline double reduce_cost_us(int64_t M, int64_t rank, Tile tile, int64_t splits, Reduce reduce,
                             int num_sms) {
  if (splits <= 1) return 0.0;
  const TileDims d = tile_dims(tile);
  if (reduce == Reduce::kLastBlock) {
    const double rows = static_cast<double>(std::min<int64_t>(M, d.bm));
    return 4.0 * splits * rows * d.bn / kSmL2BytesPerUs;
  }
  const int64_t ldt = cdiv(rank, d.bn) * d.bn;
  const double bytes = 4.0 * splits * M * ldt + 2.0 * M * ldt;
  const int64_t blocks = std::max<int64_t>(cdiv(M * ldt / 4, kReduceThreads), 1);
  const double per_sm = bytes / std::min<int64_t>(blocks, num_sms);
  return std::max(bytes / (kL2BytesPerUs * num_sms / kRefSms), per_sm / kSmL2BytesPerUs) + kWaveUs;
}

// Estimated microseconds of `down` for a tile, split count and reduction (a cost model: bytes
// through HBM and L2 over the SMs that have work, MMA time spread over the busiest SM, waves, and
// the reduction of the partials).
inline double down_cost_us(int64_t M, int64_t in, int64_t rank, Tile tile, int64_t splits,
                           Reduce reduce, int num_sms) {
  const TileDims d = tile_dims(tile);
  const int64_t rt = cdiv(M, d.bm), rc = cdiv(rank, d.bn);
  const int64_t blocks = rt * rc * splits;
  const double scale = num_sms / kRefSms;
  const double x_b = 2.0 * M * in, v_b = 2.0 * rank * in;
  const double partial_b = splits > 1 ? 4.0 * splits * M * rc * d.bn : 0.0;
  const double hbm = (x_b + v_b) / (kHbmBytesPerUs * scale);
  const double l2 = (x_b * rc + v_b * rt + 2 * partial_b) / (kL2BytesPerUs * scale);
  const double mma = 2.0 * rt * d.bm * rc * d.bn * in / (kMmaFlopsPerUs * scale);
  const double fill = std::min(1.0, static_cast<double>(blocks) / num_sms);
  const double spread = mma_spread(blocks, d.threads / 32, d.blocks_per_sm, num_sms);
  const int64_t waves = cdiv(blocks, static_cast<int64_t>(num_sms) * d.blocks_per_sm);
  return std::max({hbm / fill, l2 / fill, mma * spread}) + kWaveUs * waves +
         reduce_cost_us(M, rank, tile, splits, reduce, num_sms);
}

inline double up_cost_us(int64_t M, int64_t out, int64_t ldt, Tile tile, int num_sms) {
  const TileDims d = tile_dims(tile);
  const int64_t rt = cdiv(M, d.bm), nt = cdiv(out, d.bn);
  const double scale = num_sms / kRefSms;
  const double u_b = 2.0 * out * ldt, y_b = 2.0 * M * out, t_b = 2.0 * M * ldt;
  const double hbm = (u_b + y_b) / (kHbmBytesPerUs * scale);
  const double l2 = (u_b * rt + t_b * nt + y_b) / (kL2BytesPerUs * scale);
  const double mma = 2.0 * rt * d.bm * nt * d.bn * ldt / (kMmaFlopsPerUs * scale);
  const double fill = std::min(1.0, static_cast<double>(rt * nt) / num_sms);
  const double spread = mma_spread(rt * nt, d.threads / 32, d.blocks_per_sm, num_sms);
  const int64_t waves = cdiv(rt * nt, static_cast<int64_t>(num_sms) * d.blocks_per_sm);
  return std::max({hbm / fill, l2 / fill, mma * spread}) + kWaveUs * waves;
}

// Slices of `in` for a requested split count: equal slices, a multiple of `align` long, none
// empty. Returns the slice length; *splits becomes the number of slices actually used.
inline int64_t slice_for(int64_t in, int64_t* splits, int64_t align) {
  const int64_t slice = round_up(cdiv(in, std::max<int64_t>(*splits, 1)), align);
  *splits = cdiv(in, slice);
  return slice;
}

}  // namespace plan_detail

// The plan of a call: path, tiles, split count, workspace sizes. A pure function of the
// arguments' sizes, strides, alignment and the device, so the host can size the workspace and
// the launch uses the same plan.
inline LowRankPlan plan_lowrank(const LowRankArgs& args, const DeviceCaps& dev,
                                const PlanOptions& opt = {}) {
  using namespace plan_detail;
  LowRankPlan p{};
  LowRankArgs a = args;  // sizes below 1 are invalid (launch_lowrank rejects them): plan as 1
  a.in = std::max<int64_t>(a.in, 1);
  a.out = std::max<int64_t>(a.out, 1);
  a.rank = std::max<int64_t>(a.rank, 1);
  const int sms = std::max(dev.num_sms, 1);
  const bool tc_ok = a.dtype != DType::kFloat32 && dev.cc_major >= 8;
  p.path = tc_ok ? Path::kTensorCore : Path::kGemv;
  if (opt.path == static_cast<int>(Path::kGemv)) p.path = Path::kGemv;
  p.pdl = dev.cc_major >= 9;
  const int64_t M = std::max<int64_t>(a.M, 0);

  if (p.path == Path::kGemv) {
    // CUDA cores: 8 rows x 8 V rows per block; splits bring the grid to ~2 blocks per SM.
    p.row_tiles = cdiv(M, kGemvRows);
    p.rank_chunks = cdiv(a.rank, kGemvRank);
    int64_t splits =
        opt.splits > 0
            ? opt.splits
            : std::min<int64_t>({cdiv(2 * sms, std::max<int64_t>(p.row_tiles * p.rank_chunks, 1)),
                                 16, cdiv(a.in, 256)});
    p.slice = slice_for(a.in, &splits, 8);
    p.splits = static_cast<int>(splits);
    p.ldt = p.rank_chunks * kGemvRank;
    p.up_row_tiles = p.row_tiles;
    p.up_col_tiles = cdiv(a.out, kGemvOutRows);
    p.t_bytes = static_cast<size_t>(M * p.ldt) * 4;
    const int64_t tiles = p.row_tiles * p.rank_chunks;
    p.partial_bytes =
        p.splits > 1 ? static_cast<size_t>(tiles * p.splits * kGemvRows * kGemvRank) * 4 : 0;
    p.counters = p.splits > 1 ? static_cast<size_t>(tiles) : 0;
    p.x_layout = p.v_layout = p.u_layout = Layout::kStrided;  // chosen by the gemv launcher
    return p;
  }

  p.x_layout = operand_layout(a.x, M, a.in, a.ldx, 1);
  p.v_layout = operand_layout(a.V, a.rank, a.in, a.v_sj, a.v_sk);
  p.u_layout = operand_layout(a.U, a.out, a.rank, a.u_sn, a.u_sj);
  if (p.x_layout != Layout::kRows || p.v_layout == Layout::kStrided) {
    p.x_layout = p.v_layout = Layout::kStrided;  // one generic down kernel for odd layouts
  }

  // down: a grid of at least 2 blocks per SM (>= 2 waves of the SM count: latency hiding, an
  // even load; what issue 9 asks at every M), the cheapest such (tile, split count, reduction)
  // by the cost model, whenever the work splits that far and the model puts it within
  // kFillMargin of the cheapest grid of all; otherwise that cheapest grid. At the benchmark's
  // shapes (in = out = 4096 / 8192, rank 64-256, M 64-16384) the filling grids cost up to ~20%
  // more by the model (wave quantisation: 320 blocks on 132 SMs; partials through L2), closer
  // than its unmeasured figures can tell apart; four are declined at 1.26-1.36x (M = 1024,
  // in = 8192, rank 128 / 256; M = 4096, in = 4096, rank 128: 128 blocks of 128 x 128, one per
  // SM, against 288-320; M = 64, in = 4096, rank 64: 16 slices of 256 against 43 of 96).
  // PlanOptions::fill_margin (LRKERNELS_LOWRANK_FILL_MARGIN) replaces kFillMargin, so that a GPU
  // run can time both (bench/lowrank.py's lrkernels-cuda-modelbest provider: 1.0).
  // Candidates: every tile; split counts up to 3 blocks per SM and 64 slices; slices of >= 4 k
  // steps (128 elements: a full 4-stage pipeline), or of 2-3 steps for a grid that fills only
  // so (M = 64, in = 4096, rank 64: 8 row-tile x rank-chunk units need 33 slices). Decode shapes
  // have fewer units of work than 2 x SMs even so (in = 4096, rank 64, M <= 16: 2 rank chunks x
  // 64 slices): there the cheapest grid runs, every block resident, every copy issued at once.
  const Tile tiles[3] = {Tile::k16, Tile::k64, Tile::k128};
  struct Choice {
    double cost = -1;
    Tile tile = Tile::k16;
    int64_t splits = 1, slice = 0;
    Reduce reduce = Reduce::kLastBlock;
  } any, filling;
  const Reduce reduces[2] = {Reduce::kLastBlock, Reduce::kSeparate};
  for (const Tile tile : tiles) {
    if (opt.tile >= 0 && static_cast<int>(tile) != opt.tile) continue;
    const TileDims d = tile_dims(tile);
    const int64_t base = cdiv(M, d.bm) * cdiv(a.rank, d.bn);
    const int64_t max_splits = std::max<int64_t>(
        1, std::min<int64_t>({cdiv(3 * sms, std::max<int64_t>(base, 1)), cdiv(a.in, 64), 64}));
    int64_t prev = 0;
    for (int64_t s = 1; s <= max_splits; ++s) {
      int64_t splits = opt.splits > 0 ? opt.splits : s;
      const int64_t slice = slice_for(a.in, &splits, kTcBK);
      if (splits == prev) continue;  // the same slicing as a smaller request
      prev = splits;
      const bool fills = base * splits >= 2 * sms;
      const bool full_pipeline = slice >= 4 * kTcBK || splits == 1 || opt.splits > 0;
      if (!fills && !full_pipeline) continue;
      for (const Reduce reduce : reduces) {
        if (splits == 1) {
          if (reduce != Reduce::kLastBlock) continue;  // nothing to reduce: one candidate
        } else if (opt.reduce >= 0 && static_cast<int>(reduce) != opt.reduce) {
          continue;
        }
        const Choice c{down_cost_us(M, a.in, a.rank, tile, splits, reduce, sms), tile, splits,
                       slice, reduce};
        if (full_pipeline && (any.cost < 0 || c.cost < any.cost)) any = c;
        if (fills && (filling.cost < 0 || c.cost < filling.cost)) filling = c;
      }
      if (opt.splits > 0) break;
    }
  }
  if (any.cost < 0) any = filling;  // only short slices were candidates (a forced tile)
  const double margin = opt.fill_margin > 0 ? opt.fill_margin : kFillMargin;
  const bool take_filling = filling.cost >= 0 && filling.cost <= margin * any.cost;
  const Choice& down = take_filling ? filling : any;
  p.down_tile = down.tile;
  p.splits = static_cast<int>(down.splits);
  p.slice = down.slice;
  p.reduce = p.splits > 1 ? down.reduce : Reduce::kLastBlock;
  const TileDims dd = tile_dims(p.down_tile);
  p.row_tiles = cdiv(M, dd.bm);
  p.rank_chunks = cdiv(a.rank, dd.bn);
  p.ldt = p.rank_chunks * dd.bn;  // a multiple of 32: whole k steps for `up`

  // up: the cheapest tile by the model. It has no split to trade: a filling grid would mean
  // smaller tiles, each re-reading U (M = 256, out = 4096: 16-row tiles, 2048 blocks, at about
  // twice the estimate of 64-row tiles' 256 blocks).
  double best = -1;
  for (const Tile tile : tiles) {
    if (opt.tile >= 0 && static_cast<int>(tile) != opt.tile) continue;
    const double cost = up_cost_us(M, a.out, p.ldt, tile, sms);
    if (best < 0 || cost < best) {
      best = cost;
      p.up_tile = tile;
    }
  }
  const TileDims du = tile_dims(p.up_tile);
  p.up_row_tiles = cdiv(M, du.bm);
  p.up_col_tiles = cdiv(a.out, du.bn);

  p.t_bytes = static_cast<size_t>(M * p.ldt) * 2;
  const int64_t tiles_down = p.row_tiles * p.rank_chunks;
  p.partial_bytes =
      p.splits > 1 ? static_cast<size_t>(tiles_down * p.splits * dd.bm * dd.bn) * 4 : 0;
  p.counters = p.splits > 1 && p.reduce == Reduce::kLastBlock ? static_cast<size_t>(tiles_down) : 0;
  return p;
}

// The two kernels of each path (workspace: t at offset 0, then the partials, 256-byte aligned;
// counters: plan.counters zeroed uint32, left zeroed). Return cudaErrorInvalidValue for
// arguments the plan cannot serve, and launch nothing when M == 0.
cudaError_t launch_lowrank_tc(const LowRankArgs& args, const LowRankPlan& plan, void* workspace,
                              unsigned* counters, cudaStream_t stream);
cudaError_t launch_lowrank_gemv(const LowRankArgs& args, const LowRankPlan& plan, void* workspace,
                                unsigned* counters, cudaStream_t stream);

// Offset of the partials in the workspace.
inline size_t partial_offset(const LowRankPlan& plan) { return (plan.t_bytes + 255) / 256 * 256; }
inline size_t workspace_bytes(const LowRankPlan& plan) {
  return partial_offset(plan) + plan.partial_bytes;
}

// Checks the buffers against the plan and launches its path.
inline cudaError_t launch_lowrank(const LowRankArgs& args, const LowRankPlan& plan, void* workspace,
                                  size_t workspace_size, unsigned* counters, size_t num_counters,
                                  cudaStream_t stream) {
  if (args.M < 0 || args.in < 1 || args.out < 1 || args.rank < 1) return cudaErrorInvalidValue;
  if (args.M == 0) return cudaSuccess;
  if (args.x == nullptr || args.U == nullptr || args.V == nullptr || args.y == nullptr ||
      workspace == nullptr || workspace_size < workspace_bytes(plan) ||
      num_counters < plan.counters || (plan.counters > 0 && counters == nullptr)) {
    return cudaErrorInvalidValue;
  }
  if (plan.path == Path::kTensorCore) {
    if (args.dtype == DType::kFloat32) return cudaErrorInvalidValue;
    return launch_lowrank_tc(args, plan, workspace, counters, stream);
  }
  return launch_lowrank_gemv(args, plan, workspace, counters, stream);
}

}  // namespace cuda
}  // namespace lrkernels
