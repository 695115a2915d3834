// Tensor-core path of the int8 weight-only ops for float16 / bfloat16 at larger M (compute
// capability >= 8.0: bf16 mma), both directions, as one GEMM C (M, C) = A (M, R) · B (R, C):
//   forward    (transposed = false): A = x (M, K), B = Wᵀ: B[k, n] = W[n, k], R = K, C = N, + bias
//   transposed (transposed = true):  A = dy (M, N), B = W:  B[n, k] = W[n, k], R = N, C = K
//   W[n, k] = q[n, k] · s[n, k >> gshift]; q int8 (N, K) row-major, so B is "column-major" in
//   the forward direction (contiguous along the reduction) and row-major when transposed.
// Numerics: each weight is dequantized as float(q) · float(s) in float32 and rounded once to
// the 16-bit dtype when staged to shared memory for the mma: the same rounding as materialising
// W in the dtype (what torch's dequantize-then-matmul reference does). Products on tensor cores
// (mma.sync m16n8k16, operands from ldmatrix) with float32 accumulators; bias added to the
// float32 accumulator; one final rounding.
// Why PTX and not nvcuda::wmma: the bf16 wmma loads use generic addressing (64-bit addresses),
// which made the 128-row tile spill under the 128-register cap of two blocks per SM.
//
// Tiling: 256 threads (8 warps, 2 x 4), block tile BM x 128 x 32 (BM = 128, or 64 when M is too
// small to fill the GPU with 128-row tiles); warp tile (BM / 2) x 32 = (BM / 32) m16 tiles x 4
// n8 tiles, 2 k16 steps per k step.
//   Per k step of 32: the A tile (BM x 32, 16-bit) is copied as 8-element chunks; the B tile is
//   4 KB of int8 (128 x 32 forward, 32 x 128 transposed): one 16-byte chunk per thread (16
//   weights of one row of W, inside one scale group since G is a multiple of 16 and chunks
//   start at multiples of 16), dequantized with its scale when written to shared memory.
//   Two shared-memory stages: the next k step's global loads are issued into registers before
//   the current stage is multiplied, and stored (dequantized) into the other stage after it.
//   Shared rows are padded by 8 elements (16 bytes): ldmatrix's 8 row reads per phase then hit
//   distinct banks (row strides of 80 and 272 bytes).
//   Epilogue: accumulators -> per-warp float32 scratch (aliasing the stages) -> + bias, round,
//   bounds-checked (16-byte when possible) stores.
// Zero fill: rows >= M, reduction indices >= R and output columns >= C are zeros in shared
// memory (explicit zeros, never 0 · s, so a non-finite scale cannot leak into padding).
// Vector loads: A rows when R % 8 == 0 and a is 16-byte aligned; int8 rows when K % 16 == 0 and
// q is 16-byte aligned (then a chunk is entirely inside or outside W); scalar loads otherwise.
// Grid: one dimension, ceil(M / BM) x ceil(C / 128) blocks, the output-column tile varying
// fastest: consecutive blocks share a row tile of A (read once from DRAM) and sweep W, which is
// small in int8 and stays in L2. Nothing bounds a grid dimension but gridDim.x (2^31 - 1).

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "int8_device_utils.cuh"
#include "int8_kernels.cuh"

namespace lrkernels {
namespace cuda {
namespace {

using int8_detail::ceil_div;
using int8_detail::dequant4;
using int8_detail::from_float;
using int8_detail::min64;
using int8_detail::pack8;
using int8_detail::to_float;

constexpr int kThreads = 256;
constexpr int kBN = 128;  // output columns per block: 4 warp columns x 32
constexpr int kBK = 32;   // reduction step
constexpr int kPad = 8;   // row padding in elements: rows stay 16-byte aligned (ldmatrix) and
                          // consecutive rows start 4 banks apart
constexpr int kLdA = kBK + kPad;     // A tile [m][r]: 40
constexpr int kLdBcol = kBK + kPad;  // forward B tile [c][r]: 40
constexpr int kLdBrow = kBN + kPad;  // transposed B tile [r][c]: 136
// Per-warp epilogue scratch: one 16 x 32 float tile, rows padded to 40 floats so that the
// accumulator stores (float2, rows g = 0..3 per half-warp) hit distinct banks.
constexpr int kLdScratch = 40;
constexpr int kScratchFloats = 16 * kLdScratch;
constexpr int kElemBytes = 2;

template <int kBM, bool kTrans>
struct Layout {
  static constexpr int kAElems = kBM * kLdA;
  static constexpr int kBElems = kTrans ? kBK * kLdBrow : kBN * kLdBcol;
  static constexpr int kStageElems = kAElems + kBElems;
  static constexpr int kBytes = 2 * kStageElems * kElemBytes;
  static_assert(kAElems * kElemBytes % 128 == 0 && kStageElems * kElemBytes % 128 == 0,
                "stages and B tiles stay 128-byte aligned (ldmatrix rows need 16)");
  static_assert(kBytes >= 8 * kScratchFloats * 4, "epilogue scratch fits in the stages");
  static_assert(kBytes <= 48 * 1024, "static shared memory limit");
};

template <typename T>
struct TcParams {
  const T* a;       // (M, R)
  const int8_t* q;  // (N, K)
  const T* scales;
  const T* bias;  // forward only; nullptr: none
  T* y;           // (M, C)
  int64_t M, R, C;
  int64_t K;         // row length of q
  int64_t scale_ld;  // scale of W[n, k]: scales[n * scale_ld + (k >> gshift)]
  int gshift;
  int64_t n_tiles;  // ceil(C / kBN)
  bool vec_out;     // C % 8 == 0 and y 16-byte aligned: 16-byte stores
};

// The A tile (kBM x kBK of a row-major (M, R) matrix) in registers: kBM * 4 chunks of 8
// elements, kPer per thread; chunk i of thread t is row t / 4 + 64 i, columns (t % 4) * 8 ..
// + 7. Row pointers are formed once; out-of-range elements are zeros.
template <typename T, int kBM, bool kVec>
struct ALoader {
  static constexpr int kChunksPerRow = kBK / 8;
  static constexpr int kRowsPerPass = kThreads / kChunksPerRow;  // 64
  static constexpr int kPer = kBM / kRowsPerPass;
  static_assert(kBM % kRowsPerPass == 0, "A tile splits evenly");
  const T* row[kPer];  // nullptr: row >= M
  int col;             // first column of the chunks within the tile
  uint4 reg[kPer];

  __device__ __forceinline__ ALoader(const TcParams<T>& p, int64_t m0) {
    const int t = static_cast<int>(threadIdx.x);
    col = (t % kChunksPerRow) * 8;
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
      const int64_t m = m0 + t / kChunksPerRow + i * kRowsPerPass;
      row[i] = m < p.M ? p.a + m * p.R + col : nullptr;
    }
  }

  __device__ __forceinline__ void load(int64_t R, int64_t r0) {
    const int64_t r = r0 + col;
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
      uint4 v = make_uint4(0u, 0u, 0u, 0u);
      if (row[i] != nullptr) {
        if constexpr (kVec) {
          // R % 8 == 0 and r % 8 == 0: the chunk is entirely inside or outside the row.
          if (r < R) v = __ldg(reinterpret_cast<const uint4*>(row[i] + r0));
        } else {
          const unsigned short* s16 = reinterpret_cast<const unsigned short*>(row[i] + r0);
          uint32_t w[4] = {0u, 0u, 0u, 0u};
#pragma unroll
          for (int e = 0; e < 8; ++e) {
            if (r + e < R) w[e >> 1] |= static_cast<uint32_t>(__ldg(s16 + e)) << ((e & 1) * 16);
          }
          v = make_uint4(w[0], w[1], w[2], w[3]);
        }
      }
      reg[i] = v;
    }
  }

  __device__ __forceinline__ void store(T* s) const {
    const int t = static_cast<int>(threadIdx.x);
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
      *reinterpret_cast<uint4*>(s + (t / kChunksPerRow + i * kRowsPerPass) * kLdA + col) = reg[i];
    }
  }
};

// The int8 B tile: one chunk of 16 consecutive weights of one row of W per thread (4 KB per
// tile = 256 chunks), so a chunk has a single scale.
//   Forward, tile [c][r] (128 x 32): thread t reads row n = c0 + t / 2 of W, k = r0 + (t % 2) *
//     16 ..; the row is fixed, k advances with r0.
//   Transposed, tile [r][c] (32 x 128): thread t reads row n = r0 + t / 8 of W, k = c0 + (t % 8)
//     * 16 ..; the columns are fixed, the row advances with r0.
// `nvalid` (0..16) counts the chunk's weights inside W; the rest are zeros.
template <typename T, bool kTrans, bool kVec>
struct BLoader {
  const int8_t* base;  // chunk start for r0 = 0
  const T* sbase;      // its scale for r0 = 0
  int64_t fixed;       // forward: the row n of W; transposed: the first column k
  int offset;          // forward: k offset (t % 2) * 16; transposed: row offset t / 8
  uint32_t raw[4];
  float scale;
  int nvalid;

  __device__ __forceinline__ BLoader(const TcParams<T>& p, int64_t c0) {
    const int t = static_cast<int>(threadIdx.x);
    if constexpr (kTrans) {
      offset = t / 8;
      fixed = c0 + (t % 8) * 16;
      base = p.q + offset * p.K + fixed;
      sbase = p.scales + offset * p.scale_ld + (fixed >> p.gshift);
    } else {
      offset = (t % 2) * 16;
      fixed = c0 + t / 2;
      base = p.q + fixed * p.K + offset;
      sbase = p.scales + fixed * p.scale_ld;
    }
  }

  __device__ __forceinline__ void load(const TcParams<T>& p, int64_t r0) {
    const int8_t* src;
    const T* sp;
    if constexpr (kTrans) {
      const int64_t n = r0 + offset;
      nvalid = n < p.R ? static_cast<int>(min64(16, int8_detail::max64(0, p.C - fixed))) : 0;
      src = base + r0 * p.K;
      sp = sbase + r0 * p.scale_ld;
    } else {
      const int64_t k = r0 + offset;
      nvalid = fixed < p.C ? static_cast<int>(min64(16, int8_detail::max64(0, p.R - k))) : 0;
      src = base + r0;
      sp = sbase + (k >> p.gshift);
    }
    scale = 0.f;
#pragma unroll
    for (int i = 0; i < 4; ++i) raw[i] = 0u;
    if (nvalid > 0) {
      if constexpr (kVec) {
        // K % 16 == 0 and k % 16 == 0: nvalid is 16 here.
        int8_detail::load_q_vec<16>(src, raw);
      } else {
        int8_detail::load_q_scalar<16>(src, nvalid, raw);
      }
      scale = to_float(*sp);
    }
  }

  // Dequantizes (float(q) * s in float32, rounded to T; zeros outside W) into the tile.
  __device__ __forceinline__ void store(T* s) const {
    const int t = static_cast<int>(threadIdx.x);
    T* dst = kTrans ? s + (t / 8) * kLdBrow + (t % 8) * 16 : s + (t / 2) * kLdBcol + (t % 2) * 16;
    float v[16];
#pragma unroll
    for (int i = 0; i < 4; ++i) dequant4(raw[i], scale, v + 4 * i);
#pragma unroll
    for (int e = 0; e < 16; ++e) {
      if (e >= nvalid) v[e] = 0.f;
    }
    *reinterpret_cast<uint4*>(dst) = pack8<T>(v);
    *reinterpret_cast<uint4*>(dst + 8) = pack8<T>(v + 8);
  }
};

// ---- Warp-level tensor-core primitives (PTX; sm_80+). ----
// ldmatrix .x4: lanes 8i .. 8i + 7 give the row addresses (16 bytes each) of 8x8 matrix i;
// register i of lane l receives elements (l / 4, 2 (l % 4)) and (l / 4, 2 (l % 4) + 1) of matrix
// i (low half first), or with .trans elements (2 (l % 4), l / 4) and (2 (l % 4) + 1, l / 4).
// The "memory" clobber keeps the shared-memory reads between the surrounding barriers.
__device__ __forceinline__ void ldmatrix_x4(uint32_t* r, uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr)
               : "memory");
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t* r, uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr)
               : "memory");
}

// d (16 x 8, float32) += a (16 x 16, row-major) · b (16 x 8, "col": b's columns contiguous).
// Fragments (g = lane / 4, t = lane % 4; pairs are consecutive columns of a / rows of b):
//   a[0]: (g, 2t..2t+1)  a[1]: (g+8, 2t..)  a[2]: (g, 2t+8..)  a[3]: (g+8, 2t+8..)
//   b0: rows 2t..2t+1 of column g   b1: rows 2t+8..2t+9 of column g
//   d[0], d[1]: (g, 2t), (g, 2t+1)   d[2], d[3]: (g+8, 2t), (g+8, 2t+1)
template <typename T>
__device__ __forceinline__ void mma_16816(float* d, const uint32_t* a, uint32_t b0, uint32_t b1) {
  if constexpr (std::is_same<T, __half>::value) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

template <typename T, int kBM, bool kTrans, bool kVecA, bool kVecB>
__global__ void __launch_bounds__(kThreads, 2) int8_gemm_tc_kernel(const TcParams<T> p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // bf16 mma needs sm_80; the launcher never selects this path below 8.0
#else
  using L = Layout<kBM, kTrans>;
  constexpr int kFM = kBM / 32;  // m16 tiles per warp (warp rows: 2 x kBM / 2)
  constexpr int kFN = 4;         // n8 tiles per warp (warp columns: 4 x 32)
  constexpr uint32_t kStageBytes = L::kStageElems * kElemBytes;
  constexpr uint32_t kABytes = L::kAElems * kElemBytes;

  __shared__ __align__(128) unsigned char smem[L::kBytes];
  T* stages = reinterpret_cast<T*>(smem);
  const uint32_t smem_base = static_cast<uint32_t>(__cvta_generic_to_shared(smem));

  const int warp = static_cast<int>(threadIdx.x) >> 5;
  const int lane = static_cast<int>(threadIdx.x) & 31;
  const int wm = warp >> 2;  // warp row: tile rows wm * kBM / 2 ..
  const int wn = warp & 3;   // warp column: tile columns wn * 32 ..
  const int64_t tile_c = static_cast<int64_t>(blockIdx.x) % p.n_tiles;
  const int64_t tile_m = static_cast<int64_t>(blockIdx.x) / p.n_tiles;
  const int64_t m0 = tile_m * kBM;
  const int64_t c0 = tile_c * kBN;

  // This lane's ldmatrix row addresses (bytes, within a stage, for ks = 0 and fragment 0).
  // A: matrices (rows 0-7 | 8-15) x (k 0-7 | 8-15) in register order a[0..3]: lane l points at
  //   row l % 16, k (l / 16) * 8.
  const uint32_t a_off = ((wm * (kBM / 2) + (lane & 15)) * kLdA + (lane >> 4) * 8) * kElemBytes;
  // B, two n8 tiles per ldmatrix.x4, registers {b0, b1} of tile 2jp then of tile 2jp + 1.
  //   Forward, tile [c][r]: matrices (c 0-7, r 0-7), (c 0-7, r 8-15), (c 8-15, r 0-7),
  //     (c 8-15, r 8-15): lane l points at c = l % 8 + (l / 16) * 8, r = ((l / 8) % 2) * 8.
  //   Transposed, tile [r][c], .trans: matrices (r 0-7, c 0-7), (r 8-15, c 0-7), (r 0-7,
  //     c 8-15), (r 8-15, c 8-15): lane l points at r = l % 8 + ((l / 8) % 2) * 8,
  //     c = (l / 16) * 8.
  const uint32_t b_off =
      kTrans
          ? kABytes + (((lane & 7) + ((lane >> 3) & 1) * 8) * kLdBrow + wn * 32 + (lane >> 4) * 8) *
                          kElemBytes
          : kABytes + ((wn * 32 + (lane & 7) + (lane >> 4) * 8) * kLdBcol + ((lane >> 3) & 1) * 8) *
                          kElemBytes;

  float acc[kFM][kFN][4];
#pragma unroll
  for (int i = 0; i < kFM; ++i) {
#pragma unroll
    for (int j = 0; j < kFN; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.f;
    }
  }

  ALoader<T, kBM, kVecA> a_ld(p, m0);
  BLoader<T, kTrans, kVecB> b_ld(p, c0);
  const int64_t nk = ceil_div(p.R, kBK);

  a_ld.load(p.R, 0);
  b_ld.load(p, 0);
  a_ld.store(stages);
  b_ld.store(stages + L::kAElems);
  __syncthreads();

  for (int64_t kt = 0; kt < nk; ++kt) {
    const uint32_t stage = smem_base + static_cast<uint32_t>(kt & 1) * kStageBytes;
    const bool more = kt + 1 < nk;
    if (more) {  // next k step's global loads in flight during the mma below
      a_ld.load(p.R, (kt + 1) * kBK);
      b_ld.load(p, (kt + 1) * kBK);
    }
#pragma unroll
    for (int ks = 0; ks < kBK; ks += 16) {
      uint32_t bf[kFN / 2][4];
#pragma unroll
      for (int jp = 0; jp < kFN / 2; ++jp) {
        if constexpr (kTrans) {
          // Next 16 columns: +16 elements; next 16 rows (ks): +16 rows.
          ldmatrix_x4_trans(bf[jp], stage + b_off + (ks * kLdBrow + jp * 16) * kElemBytes);
        } else {
          ldmatrix_x4(bf[jp], stage + b_off + (jp * 16 * kLdBcol + ks) * kElemBytes);
        }
      }
#pragma unroll
      for (int i = 0; i < kFM; ++i) {
        uint32_t af[4];
        ldmatrix_x4(af, stage + a_off + (i * 16 * kLdA + ks) * kElemBytes);
#pragma unroll
        for (int j = 0; j < kFN; ++j) {
          mma_16816<T>(acc[i][j], af, bf[j >> 1][(j & 1) * 2], bf[j >> 1][(j & 1) * 2 + 1]);
        }
      }
    }
    if (more) {  // the other stage was last read before the previous barrier
      T* next = stages + ((kt + 1) & 1) * L::kStageElems;
      a_ld.store(next);
      b_ld.store(next + L::kAElems);
    }
    __syncthreads();
  }

  // Epilogue, one m16 tile at a time: accumulators -> per-warp float32 scratch (16 x 32,
  // aliasing the stages, free since the loop's last barrier) -> + bias, round, store. Lane l
  // writes row l / 2, columns (l % 2) * 16 .. + 15 of the warp tile, as two 8-column chunks.
  float* scratch = reinterpret_cast<float*>(smem) + warp * kScratchFloats;
  const int g = lane >> 2;
  const int t2 = (lane & 3) * 2;
  const int lr = lane >> 1;
  const int lc = (lane & 1) * 16;
#pragma unroll
  for (int i = 0; i < kFM; ++i) {
#pragma unroll
    for (int j = 0; j < kFN; ++j) {
      *reinterpret_cast<float2*>(scratch + g * kLdScratch + j * 8 + t2) =
          make_float2(acc[i][j][0], acc[i][j][1]);
      *reinterpret_cast<float2*>(scratch + (g + 8) * kLdScratch + j * 8 + t2) =
          make_float2(acc[i][j][2], acc[i][j][3]);
    }
    __syncwarp();
    const int64_t m = m0 + wm * (kBM / 2) + i * 16 + lr;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t c = c0 + wn * 32 + lc + h * 8;
      if (m < p.M && c < p.C) {
        const float* src = scratch + lr * kLdScratch + lc + h * 8;
        float v[8];
#pragma unroll
        for (int e = 0; e < 8; ++e) {
          const float b = (p.bias != nullptr && c + e < p.C) ? to_float(p.bias[c + e]) : 0.f;
          v[e] = src[e] + b;
        }
        T* dst = p.y + m * p.C + c;
        if (p.vec_out) {  // C % 8 == 0 and c % 8 == 0: all 8 columns are inside
          *reinterpret_cast<uint4*>(dst) = pack8<T>(v);
        } else {
#pragma unroll
          for (int e = 0; e < 8; ++e) {
            if (c + e < p.C) dst[e] = from_float<T>(v[e]);
          }
        }
      }
    }
    __syncwarp();  // the scratch is overwritten by the next m16 tile
  }
#endif
}

template <typename T, int kBM, bool kTrans>
cudaError_t launch_tiles(const TcParams<T>& p, bool vec_a, bool vec_b, unsigned blocks,
                         cudaStream_t stream) {
  if (vec_a) {
    if (vec_b) {
      int8_gemm_tc_kernel<T, kBM, kTrans, true, true><<<blocks, kThreads, 0, stream>>>(p);
    } else {
      int8_gemm_tc_kernel<T, kBM, kTrans, true, false><<<blocks, kThreads, 0, stream>>>(p);
    }
  } else {
    if (vec_b) {
      int8_gemm_tc_kernel<T, kBM, kTrans, false, true><<<blocks, kThreads, 0, stream>>>(p);
    } else {
      int8_gemm_tc_kernel<T, kBM, kTrans, false, false><<<blocks, kThreads, 0, stream>>>(p);
    }
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_typed(const Int8Args& a, int num_sms, cudaStream_t stream) {
  TcParams<T> p;
  p.a = static_cast<const T*>(a.a);
  p.q = a.qweight;
  p.scales = static_cast<const T*>(a.scales);
  p.bias = a.transposed ? nullptr : static_cast<const T*>(a.bias);
  p.y = static_cast<T*>(a.y);
  p.M = a.M;
  p.R = a.transposed ? a.N : a.K;
  p.C = a.transposed ? a.K : a.N;
  p.K = a.K;
  int8_detail::scale_layout(a.K, a.group_size, &p.scale_ld, &p.gshift);
  p.n_tiles = ceil_div(p.C, kBN);
  p.vec_out = p.C % 8 == 0 && int8_detail::is_aligned16(p.y);

  // 128-row tiles when they still give two blocks per SM, else 64-row tiles.
  const int64_t sms = num_sms > 0 ? num_sms : 1;
  const bool big = ceil_div(a.M, 128) * p.n_tiles >= 2 * sms;
  const int64_t blocks = ceil_div(a.M, big ? 128 : 64) * p.n_tiles;
  if (blocks > 0x7fffffff) return cudaErrorInvalidConfiguration;  // gridDim.x limit
  const unsigned grid = static_cast<unsigned>(blocks);

  const bool vec_a = p.R % 8 == 0 && int8_detail::is_aligned16(p.a);
  const bool vec_b = a.K % 16 == 0 && int8_detail::is_aligned16(p.q);
  if (a.transposed) {
    return big ? launch_tiles<T, 128, true>(p, vec_a, vec_b, grid, stream)
               : launch_tiles<T, 64, true>(p, vec_a, vec_b, grid, stream);
  }
  return big ? launch_tiles<T, 128, false>(p, vec_a, vec_b, grid, stream)
             : launch_tiles<T, 64, false>(p, vec_a, vec_b, grid, stream);
}

}  // namespace

cudaError_t launch_int8_gemm_tc(const Int8Args& args, int num_sms, cudaStream_t stream) {
  if (args.M < 0 || args.N < 1 || args.K < 1) return cudaErrorInvalidValue;
  if (args.group_size != 0 && args.group_size != 32 && args.group_size != 64 &&
      args.group_size != 128) {
    return cudaErrorInvalidValue;
  }
  if (args.group_size != 0 && args.K % args.group_size != 0) return cudaErrorInvalidValue;
  if (args.transposed && args.bias != nullptr) return cudaErrorInvalidValue;
  if (args.M == 0) return cudaSuccess;
  if (args.a == nullptr || args.qweight == nullptr || args.scales == nullptr || args.y == nullptr) {
    return cudaErrorInvalidValue;
  }
  switch (args.dtype) {
    case Int8DType::kFloat16:
      return launch_typed<__half>(args, num_sms, stream);
    case Int8DType::kBFloat16:
      return launch_typed<__nv_bfloat16>(args, num_sms, stream);
    case Int8DType::kFloat32:
      break;
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace lrkernels
