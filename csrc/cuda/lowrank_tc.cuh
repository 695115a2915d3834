// The tensor-core machinery shared by the two low-rank kernels (lowrank_tc_down.cu: t = x · Vᵀ,
// lowrank_tc_up.cu: y = t · Uᵀ + bias): tile shapes, the operand tile loaders and the multistage
// cp.async -> ldmatrix -> mma.sync main loop. CUDA headers only.
//
// A block computes a BM x BN float32 tile acc = A · Bᵀ over a range of k, A (rows x k) and B
// (cols x k) both read as "element (r, k) at p[r * s_r + k * s_k]". Warps are laid out
// kWarpsM x kWarpsN, each owning a (BM / kWarpsM) x (BN / kWarpsN) sub-tile of m16n8 fragments.
// Shared memory holds kStages stages of (A tile, B tile), BK = 32 deep:
//   A, and B in Layout::kRows / kStrided: [rows][BK + 8] (80-byte pitch: the 8 rows an ldmatrix
//     reads start 20 words apart, so they fall in 8 distinct 4-bank groups, conflict-free);
//   B in Layout::kCols: [BK][BN + 8] (pitch BN + 8: 36 or 68 words, again 8 distinct bank
//     groups), read with ldmatrix.trans.
// Pipeline (kStages = 4): 3 k steps in flight while one is multiplied; the stage refilled at step
// kt was last read at step kt - 1, before this step's barrier.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "common/convert.cuh"
#include "common/ptx.cuh"
#include "lowrank_kernels.cuh"

namespace lrkernels {
namespace cuda {
namespace lowrank_tc {

template <int kBM_, int kBN_, int kWarpsM_, int kWarpsN_>
struct Shape {
  static constexpr int kBM = kBM_, kBN = kBN_, kWarpsM = kWarpsM_, kWarpsN = kWarpsN_;
  static constexpr int kThreads = 32 * kWarpsM * kWarpsN;
  static constexpr int kWM = kBM / kWarpsM, kWN = kBN / kWarpsN;
  static constexpr int kMI = kWM / 16;  // m16 fragments per warp
  static constexpr int kNI = kWN / 8;   // n8 fragments per warp
  // Blocks per SM the register allocation must allow (__launch_bounds__): 128 registers each.
  static constexpr int kMinBlocks = 65536 / (128 * kThreads);
  static_assert(kWM % 16 == 0 && kWN % 16 == 0, "warp tiles are whole 16 x 16 blocks");
};
// Must match tile_dims() in lowrank_kernels.cuh.
using Shape16 = Shape<16, 32, 1, 2>;
using Shape64 = Shape<64, 64, 2, 2>;
using Shape128 = Shape<128, 128, 4, 2>;

constexpr int kBK = kTcBK;
constexpr int kStages = 4;
constexpr int kPitch = kBK + 8;

template <class S>
constexpr bool shape_matches(Tile t) {
  return tile_dims(t).bm == S::kBM && tile_dims(t).bn == S::kBN &&
         tile_dims(t).threads == S::kThreads;
}
static_assert(shape_matches<Shape16>(Tile::k16) && shape_matches<Shape64>(Tile::k64) &&
                  shape_matches<Shape128>(Tile::k128),
              "tile shapes disagree with the planner");

// A matrix as the main loop reads it: element (r, k) at p[r * s_r + k * s_k], zero outside
// [0, rows) x [0, ks).
template <typename T>
struct Operand {
  const T* p;
  int64_t s_r, s_k;
  int64_t rows, ks;
};

// Shared-memory elements of one stage's B tile, by layout.
template <class S, Layout kB>
constexpr int b_tile_elems() {
  return kB == Layout::kCols ? kBK * (S::kBN + 8) : S::kBN * kPitch;
}

template <typename T, class S, Layout kA, Layout kB>
struct Mainloop {
  static constexpr int kAElems = S::kBM * kPitch;
  static constexpr int kStageElems = kAElems + b_tile_elems<S, kB>();
  static constexpr int kSmemBytes = kStages * kStageElems * static_cast<int>(sizeof(T));
  static_assert(kAElems * sizeof(T) % 16 == 0 && kStageElems * sizeof(T) % 16 == 0,
                "stages stay 16-byte aligned");

  // A [kRows][kPitch] tile from rows r0.. and k0.. of `op`, Layout::kRows: 16-byte copies (each
  // chunk of 8 elements entirely inside or outside: ks % 8 == 0, s_r % 8 == 0, aligned base).
  template <int kRows>
  __device__ static void load_rows(T* dst, const Operand<T>& op, int64_t r0, int64_t k0) {
    constexpr int kChunks = kRows * (kBK / 8);
    static_assert(kChunks % S::kThreads == 0, "whole chunks per thread");
#pragma unroll
    for (int i = 0; i < kChunks / S::kThreads; ++i) {
      const int c = static_cast<int>(threadIdx.x) + i * S::kThreads;
      const int r = c >> 2, kc = (c & 3) * 8;
      const bool valid = r0 + r < op.rows && k0 + kc < op.ks;
      const T* src = valid ? op.p + (r0 + r) * op.s_r + (k0 + kc) : op.p;
      ptx::cp_async_16(dst + r * kPitch + kc, src, valid);
    }
  }

  // The same tile from any strides: element loads, stored synchronously (this stage is not
  // being read: see the pipeline note at the top).
  template <int kRows>
  __device__ static void load_strided(T* dst, const Operand<T>& op, int64_t r0, int64_t k0) {
    constexpr int kElems = kRows * kBK;
    static_assert(kElems % S::kThreads == 0, "whole elements per thread");
#pragma unroll 4
    for (int i = 0; i < kElems / S::kThreads; ++i) {
      const int e = static_cast<int>(threadIdx.x) + i * S::kThreads;
      const int r = e / kBK, k = e % kBK;  // kBK is a power of two: shifts
      T v = cvt::from_bits<T>(0u);
      if (r0 + r < op.rows && k0 + k < op.ks) v = op.p[(r0 + r) * op.s_r + (k0 + k) * op.s_k];
      dst[r * kPitch + k] = v;
    }
  }

  // B [kBK][BN + 8] tile of a Layout::kCols operand (contiguous along r: s_r == 1, s_k % 8 == 0,
  // rows % 8 == 0, aligned base), rows r0.. and k0..: 16-byte copies along r.
  __device__ static void load_cols(T* dst, const Operand<T>& op, int64_t r0, int64_t k0) {
    constexpr int kPerRow = S::kBN / 8;
    constexpr int kChunks = kBK * kPerRow;
    static_assert(kChunks % S::kThreads == 0, "whole chunks per thread");
#pragma unroll
    for (int i = 0; i < kChunks / S::kThreads; ++i) {
      const int c = static_cast<int>(threadIdx.x) + i * S::kThreads;
      const int kk = c / kPerRow, rc = (c % kPerRow) * 8;  // powers of two: shifts
      const bool valid = k0 + kk < op.ks && r0 + rc < op.rows;
      const T* src = valid ? op.p + (k0 + kk) * op.s_k + (r0 + rc) : op.p;
      ptx::cp_async_16(dst + kk * (S::kBN + 8) + rc, src, valid);
    }
  }

  __device__ static void load_a(T* stage, const Operand<T>& a, int64_t r0, int64_t k0) {
    if constexpr (kA == Layout::kRows) {
      load_rows<S::kBM>(stage, a, r0, k0);
    } else {
      static_assert(kA == Layout::kStrided, "A is read row by row");
      load_strided<S::kBM>(stage, a, r0, k0);
    }
  }

  __device__ static void load_b(T* stage, const Operand<T>& b, int64_t r0, int64_t k0) {
    T* dst = stage + kAElems;
    if constexpr (kB == Layout::kRows) {
      load_rows<S::kBN>(dst, b, r0, k0);
    } else if constexpr (kB == Layout::kCols) {
      load_cols(dst, b, r0, k0);
    } else {
      load_strided<S::kBN>(dst, b, r0, k0);
    }
  }

  // acc += A_stage · B_stageᵀ for this warp's sub-tile (warp origin wm0, wn0 in the tile).
  __device__ static void compute(const T* stage, int wm0, int wn0,
                                 float (&acc)[S::kMI][S::kNI][4]) {
    const int lane = static_cast<int>(threadIdx.x) & 31;
    const T* a_tile = stage;
    const T* b_tile = stage + kAElems;
#pragma unroll
    for (int ks = 0; ks < kBK; ks += 16) {
      // A fragments: matrices (rows 0-7 | 8-15) x (k 0-7 | 8-15), addressed by lanes 0-31 as
      // row lane % 16, k half lane / 16: registers a0..a3 in mma order.
      uint32_t a[S::kMI][4];
#pragma unroll
      for (int mi = 0; mi < S::kMI; ++mi) {
        const T* p = a_tile + (wm0 + mi * 16 + (lane & 15)) * kPitch + ks + (lane >> 4) * 8;
        ptx::ldmatrix_x4(a[mi], ptx::smem_addr(p));
      }
      // B fragments, two n8 fragments per ldmatrix.x4: matrix i = lane / 8 covers n half i / 2
      // and k half i % 2, giving b0, b1 of fragment 2j and b0, b1 of fragment 2j + 1.
      const int i = lane >> 3, r = lane & 7;
#pragma unroll
      for (int nj = 0; nj < S::kNI / 2; ++nj) {
        uint32_t b[4];
        const int n = wn0 + nj * 16 + (i >> 1) * 8;
        const int k = ks + (i & 1) * 8;
        if constexpr (kB == Layout::kCols) {
          ptx::ldmatrix_x4_trans(b, ptx::smem_addr(b_tile + (k + r) * (S::kBN + 8) + n));
        } else {
          ptx::ldmatrix_x4(b, ptx::smem_addr(b_tile + (n + r) * kPitch + k));
        }
#pragma unroll
        for (int mi = 0; mi < S::kMI; ++mi) {
          ptx::mma_m16n8k16<T>(acc[mi][2 * nj], a[mi], b[0], b[1]);
          ptx::mma_m16n8k16<T>(acc[mi][2 * nj + 1], a[mi], b[2], b[3]);
        }
      }
    }
  }

  // The whole k range [k_begin, k_end) of this block: acc = A[r0a.., k] · B[r0b.., k]ᵀ.
  // `before_a` runs after the B tiles of the prologue are issued and before any A tile is read
  // (the up kernel waits there for the grid that writes A); `after_prologue` after all prologue
  // copies are issued. Ends with every copy landed and a barrier: shared memory is free.
  template <class BeforeA, class AfterPrologue>
  __device__ static void run(T* smem, const Operand<T>& a, int64_t r0a, const Operand<T>& b,
                             int64_t r0b, int64_t k_begin, int64_t k_end,
                             float (&acc)[S::kMI][S::kNI][4], BeforeA before_a,
                             AfterPrologue after_prologue) {
    const int warp = static_cast<int>(threadIdx.x) >> 5;
    const int wm0 = (warp / S::kWarpsN) * S::kWM;
    const int wn0 = (warp % S::kWarpsN) * S::kWN;
#pragma unroll
    for (int mi = 0; mi < S::kMI; ++mi) {
#pragma unroll
      for (int ni = 0; ni < S::kNI; ++ni) {
#pragma unroll
        for (int q = 0; q < 4; ++q) acc[mi][ni][q] = 0.f;
      }
    }
    const int nk = static_cast<int>((k_end - k_begin + kBK - 1) / kBK);

#pragma unroll
    for (int s = 0; s < kStages - 1; ++s) {
      if (s < nk) load_b(smem + s * kStageElems, b, r0b, k_begin + s * kBK);
    }
    before_a();
#pragma unroll
    for (int s = 0; s < kStages - 1; ++s) {
      if (s < nk) load_a(smem + s * kStageElems, a, r0a, k_begin + s * kBK);
      ptx::cp_async_commit();  // one group per stage (group 0 also holds the early B tiles)
    }
    after_prologue();

    for (int kt = 0; kt < nk; ++kt) {
      ptx::cp_async_wait<kStages - 2>();  // step kt's group has landed (for this thread)
      __syncthreads();                    // ... for every thread; step kt - 1 is consumed
      const int next = kt + kStages - 1;
      if (next < nk) {
        T* stage = smem + (next % kStages) * kStageElems;
        load_a(stage, a, r0a, k_begin + static_cast<int64_t>(next) * kBK);
        load_b(stage, b, r0b, k_begin + static_cast<int64_t>(next) * kBK);
      }
      ptx::cp_async_commit();  // possibly empty: keeps one group per step
      compute(smem + (kt % kStages) * kStageElems, wm0, wn0, acc);
    }
    ptx::cp_async_wait<0>();
    __syncthreads();
  }
};

// Internal launchers (lowrank_tc_down.cu, lowrank_tc_up.cu).
cudaError_t launch_tc_down(const LowRankArgs& args, const LowRankPlan& plan, void* t,
                           float* partial, unsigned* counters, cudaStream_t stream);
cudaError_t launch_tc_reduce(const LowRankArgs& args, const LowRankPlan& plan, void* t,
                             const float* partial, cudaStream_t stream);
cudaError_t launch_tc_up(const LowRankArgs& args, const LowRankPlan& plan, const void* t,
                         cudaStream_t stream);

}  // namespace lowrank_tc
}  // namespace cuda
}  // namespace lrkernels
