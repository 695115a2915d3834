// LoRA CUDA kernels (launch API: lora_kernels.cuh): the decode / serving path, and the pieces the
// large-M path adds to a cuBLAS or int8 base product.
//
//   shrink  partial[s, m, :] = Σ_{k in slice s} keep(m, k) · x[m, k] · A[a_m, :r_m, k]    (fp32)
//   gemv    y[m, n] = x[m] · W[n] + s_m · round(Σ_s partial[s, m]) · B[a_m, n, :r_m] + bias[n]
//   expand  y[m, n] += s_m · round(Σ_s partial[s, m]) · B[a_m, n, :r_m]
//   mask    out = keep ⊙ in
//
// Decode (M <= 16) is two launches: the shrink (tiny: M x R x K multiply-adds, A read from L2),
// then the weight-streaming GEMV with the expand and the bias fused in its epilogue. They cannot
// be one launch without a grid-wide dependency (every output needs all of t, which needs all of
// K); what the fusion saves is every pass over y and over the weight but one: the base weight
// (the bytes that matter) is read exactly once, y is written once, t never leaves L2.
//
// GEMV: a warp owns one output column n (a row of W) and streams it with 16-byte loads (8 bf16 /
//   fp16, 4 fp32 or 16 int8 weights per lane per step, one 512-byte coalesced segment per warp
//   step), dequantizing int8 in registers (`load_weights`: the one place this file turns a
//   weight into floats; a new int8 layout changes it alone) and multiplying against all M rows of
//   x (16-byte loads, L1-resident: M x K x 2 bytes <= 128 KiB at K = 4096). Warp-shuffle sums,
//   then lane m finishes row m: + s_m · t[m] · B[a_m, n] (t staged once per block in shared
//   memory, already rounded to the dtype) + bias, one rounding. 8 warps per block, N / 8 blocks
//   (512 at N = 4096: about 4 resident per SM on 132 SMs, one wave).
// Expected on an H200 (4.3 TB/s), 4096 x 4096, r = 16, M = 16: bf16 base 32 MiB -> ~8 us at
//   full bandwidth (int8: 16 MiB -> ~4 us); the shrink reads x (128 KiB) and A (128 KiB) over
//   ~2 x 132 blocks, < 1 us. The GEMV is launched as a programmatic dependent of the shrink
//   (common/pdl.cuh): the shrink lets it start at once, it streams W and x while the shrink runs
//   and waits (griddepcontrol.wait) only before reading the partials, so the boundary and the
//   shrink hide under the weight stream: expected ~1.05x the base alone on bf16 (the target)
//   and ~1.1x on int8 (4 us of weight against ~0.5 us of epilogue), from ~1.1-1.5x without it.
// Shrink: a block (128 threads) owns one row m and one slice of K, every thread keeps the R
//   running sums of its k's (R <= 64 registers), the dropout hash computed once per element; the
//   block reduces them in shared memory. Slices: enough blocks for ~2 waves at small M.
// Expand: a block owns 256 columns of one row (rows without an adapter return at once).
// No atomics anywhere: every sum has a fixed order (deterministic).
// Static report (nvcc 13.0 -O3, sm_90a, cuobjdump -res-usage; none spills, no local memory):
//   gemv dense 16-byte path 48 registers (fp32 48), int8 16-byte path 63 (fp32 62), scalar
//   fallbacks 48-78 (the weight stream before the t staging keeps x, W and t apart); 5.3 KiB
//   static shared memory (t and the rows' adapters);
//   shrink 72 / 128 / 254 registers for R <= 16 / 32 / 64 (the R running sums live in
//   registers); expand 32; mask 18-30.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "common/convert.cuh"
#include "common/pdl.cuh"
#include "common/util.cuh"
#include "lora_dropout.h"
#include "lora_kernels.cuh"
#include "lowrank_launch.cuh"

namespace lrkernels {
namespace cuda {
namespace {

constexpr int kGemvThreads = 256;
constexpr int kGemvWarps = kGemvThreads / 32;
constexpr int kShrinkThreads = 128;
constexpr int kShrinkWarps = kShrinkThreads / 32;
constexpr int kExpandThreads = 256;
constexpr int kMaskThreads = 256;
constexpr int64_t kMinSliceK = 256;  // a shrink slice covers at least this many k
constexpr int64_t kMaxSplits = 64;
constexpr int64_t kMaxGridY = 65535;

using cvt::from_float;
using cvt::to_float;
using util::ceil_div;
using util::warp_sum;

// Rounds to T and back: the value a tensor of dtype T would hold.
template <typename T>
__device__ __forceinline__ float round_to(float v) {
  return to_float(from_float<T>(v));
}

struct RowAdapter {
  int adapter;  // -1: the base only
  int rank;
  float scale;
};

// Row m's adapter; indices outside [0, n) mean the base only, ranks are clamped to [0, R].
__device__ __forceinline__ RowAdapter row_adapter(const LoraAdapters& ad, int64_t m) {
  const int64_t a = ad.index != nullptr ? ad.index[m] : 0;
  if (a < 0 || a >= ad.n_adapters) return {-1, 0, 0.f};
  int64_t r = ad.ranks != nullptr ? ad.ranks[a] : ad.rank;
  r = r < 0 ? 0 : (r > ad.rank ? ad.rank : r);
  return {static_cast<int>(a), static_cast<int>(r), ad.scales != nullptr ? ad.scales[a] : ad.scale};
}

// ------------------------------------------------------------------------------------ shrink

template <typename T, int kRank>
__global__ void __launch_bounds__(kShrinkThreads) lora_shrink_kernel(LoraShrinkArgs args) {
  __shared__ float sums[kShrinkWarps][kRank];
  const int64_t m = blockIdx.x;
  const int64_t split = blockIdx.y;
  const int64_t K = args.K;
  const int R = static_cast<int>(args.adapters.rank);
  const int tid = static_cast<int>(threadIdx.x);
  pdl::launch_dependents();  // the GEMV (or int8 kernel) after it may start streaming weights
  const RowAdapter ra = row_adapter(args.adapters, m);
  const int64_t slice = ceil_div(K, args.k_splits);
  const int64_t k0 = split * slice;
  const int64_t k1 = k0 + slice < K ? k0 + slice : K;

  float acc[kRank];
#pragma unroll
  for (int j = 0; j < kRank; ++j) acc[j] = 0.f;
  if (ra.adapter >= 0 && ra.rank > 0) {
    const T* xrow = static_cast<const T*>(args.x) + m * K;
    const T* a = static_cast<const T*>(args.adapters.A) + static_cast<int64_t>(ra.adapter) * R * K;
    const uint32_t threshold = args.dropout_threshold;
    const uint32_t key =
        threshold != 0 ? lora::dropout_rowkey(static_cast<uint64_t>(*args.seed), m) : 0u;
    for (int64_t k = k0 + tid; k < k1; k += kShrinkThreads) {
      float xv = to_float(xrow[k]);
      if (threshold != 0 && !lora::dropout_keep(key, k, threshold)) xv = 0.f;
#pragma unroll
      for (int j = 0; j < kRank; ++j) {
        if (j < ra.rank) acc[j] += xv * to_float(a[j * K + k]);
      }
    }
  }
  const int warp = tid / 32;
  const int lane = tid % 32;
#pragma unroll
  for (int j = 0; j < kRank; ++j) {
    const float v = warp_sum(acc[j]);
    if (lane == 0) sums[warp][j] = v;
  }
  __syncthreads();
  if (tid < R) {
    float v = 0.f;
#pragma unroll
    for (int w = 0; w < kShrinkWarps; ++w) v += sums[w][tid];
    args.partial[(split * args.M + m) * R + tid] = v;
  }
}

// -------------------------------------------------------------------------------------- gemv

// kVec consecutive weights of row n starting at k, as floats: dense T (one 16-byte load), or
// int8 dequantized q · s in float32 (one 16-byte load; the 16 weights share one scale, since
// 16 divides every group size). kVec == 1: scalar loads.
template <typename T, bool kInt8, int kVec>
__device__ __forceinline__ void load_weights(const LoraGemvArgs& args, int64_t n, int64_t k,
                                             float* w) {
  if constexpr (kInt8) {
    const int8_t* q = static_cast<const int8_t*>(args.weight) + n * args.K + k;
    const T* scales = static_cast<const T*>(args.scales);
    const float s =
        to_float(args.group_size > 0 ? scales[n * (args.K / args.group_size) + k / args.group_size]
                                     : scales[n]);
    if constexpr (kVec == 16) {
      alignas(16) int8_t v[16];
      *reinterpret_cast<uint4*>(v) = *reinterpret_cast<const uint4*>(q);
#pragma unroll
      for (int i = 0; i < 16; ++i) w[i] = static_cast<float>(v[i]) * s;
    } else {
      w[0] = static_cast<float>(q[0]) * s;
    }
  } else {
    const T* p = static_cast<const T*>(args.weight) + n * args.K + k;
    if constexpr (kVec * sizeof(T) == 16) {
      alignas(16) T v[kVec];
      *reinterpret_cast<uint4*>(v) = *reinterpret_cast<const uint4*>(p);
#pragma unroll
      for (int i = 0; i < kVec; ++i) w[i] = to_float(v[i]);
    } else {
      w[0] = to_float(p[0]);
    }
  }
}

// kVec consecutive activations at p (16-byte aligned when kVec > 1), as floats.
template <typename T, int kVec>
__device__ __forceinline__ void load_x(const T* p, float* out) {
  if constexpr (kVec == 1) {
    out[0] = to_float(p[0]);
  } else {
    constexpr int kChunks = kVec * static_cast<int>(sizeof(T)) / 16;
    alignas(16) T v[kVec];
#pragma unroll
    for (int c = 0; c < kChunks; ++c) {
      reinterpret_cast<uint4*>(v)[c] = reinterpret_cast<const uint4*>(p)[c];
    }
#pragma unroll
    for (int i = 0; i < kVec; ++i) out[i] = to_float(v[i]);
  }
}

template <typename T, bool kInt8, int kVec>
__global__ void __launch_bounds__(kGemvThreads) lora_gemv_kernel(LoraGemvArgs args) {
  __shared__ float t_s[kLoraGemvMaxRows][kLoraMaxRank];
  __shared__ int adapter_s[kLoraGemvMaxRows];
  __shared__ int rank_s[kLoraGemvMaxRows];
  __shared__ float scale_s[kLoraGemvMaxRows];
  const int tid = static_cast<int>(threadIdx.x);
  const int M = static_cast<int>(args.M);
  const int R = static_cast<int>(args.adapters.rank);
  const int64_t N = args.N;
  const int64_t K = args.K;
  const int warp = tid / 32;
  const int lane = tid % 32;
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kGemvWarps + warp;

  // The weight stream first: launched as a programmatic dependent of the shrink (common/pdl.cuh),
  // this part overlaps it. x and W are not written by the shrink (x by a kernel before it, which
  // completed before the shrink started); the shrink's partials are read after pdl::wait().
  const T* x = static_cast<const T*>(args.x);
  float acc[kLoraGemvMaxRows];
#pragma unroll
  for (int m = 0; m < kLoraGemvMaxRows; ++m) acc[m] = 0.f;
  const int64_t k_end = n < N ? K : 0;  // warps past N stream nothing (but reach the barrier)
  for (int64_t k = static_cast<int64_t>(lane) * kVec; k < k_end; k += 32 * kVec) {
    float w[kVec];
    load_weights<T, kInt8, kVec>(args, n, k, w);
#pragma unroll
    for (int m = 0; m < kLoraGemvMaxRows; ++m) {
      if (m < M) {
        float xv[kVec];
        load_x<T, kVec>(x + m * K + k, xv);
#pragma unroll
        for (int i = 0; i < kVec; ++i) acc[m] += w[i] * xv[i];
      }
    }
  }

  pdl::wait();  // the shrink's partials are complete and visible
  // t = round(Σ_s partial[s]), once per block; block 0 also writes it out.
  for (int i = tid; i < M * R; i += kGemvThreads) {
    const int m = i / R;
    const int j = i % R;
    float v = 0.f;
    for (int64_t s = 0; s < args.k_splits; ++s) v += args.partial[(s * M + m) * R + j];
    const T tv = from_float<T>(v);
    t_s[m][j] = to_float(tv);
    if (blockIdx.x == 0 && args.t_out != nullptr) static_cast<T*>(args.t_out)[m * R + j] = tv;
  }
  if (tid < M) {
    const RowAdapter ra = row_adapter(args.adapters, tid);
    adapter_s[tid] = ra.adapter;
    rank_s[tid] = ra.rank;
    scale_s[tid] = ra.scale;
  }
  __syncthreads();
  if (n >= N) return;  // no barrier follows

  float mine = 0.f;
#pragma unroll
  for (int m = 0; m < kLoraGemvMaxRows; ++m) {
    if (m < M) {
      const float v = warp_sum(acc[m]);
      if (lane == m) mine = v;
    }
  }
  if (lane < M) {
    float v = mine;
    if (args.bias != nullptr) v += to_float(static_cast<const T*>(args.bias)[n]);
    const int a = adapter_s[lane];
    if (a >= 0) {
      const T* b = static_cast<const T*>(args.adapters.B) + (static_cast<int64_t>(a) * N + n) * R;
      float lora = 0.f;
      for (int j = 0; j < rank_s[lane]; ++j) lora += t_s[lane][j] * to_float(b[j]);
      v += scale_s[lane] * lora;
    }
    static_cast<T*>(args.y)[lane * N + n] = from_float<T>(v);
  }
}

// ------------------------------------------------------------------------------------ expand

template <typename T>
__global__ void __launch_bounds__(kExpandThreads) lora_expand_kernel(LoraExpandArgs args) {
  __shared__ float t_s[kLoraMaxRank];
  const int tid = static_cast<int>(threadIdx.x);
  const int R = static_cast<int>(args.adapters.rank);
  const int64_t N = args.N;
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kExpandThreads + tid;
  for (int64_t m = blockIdx.y; m < args.M; m += gridDim.y) {
    const RowAdapter ra = row_adapter(args.adapters, m);  // uniform over the block
    if (ra.adapter < 0 || ra.rank == 0) continue;
    __syncthreads();  // t_s of the previous row is no longer read
    if (tid < R) {
      float v = 0.f;
      for (int64_t s = 0; s < args.k_splits; ++s) v += args.partial[(s * args.M + m) * R + tid];
      t_s[tid] = round_to<T>(v);
    }
    __syncthreads();
    if (n < N) {
      const T* b =
          static_cast<const T*>(args.adapters.B) + (static_cast<int64_t>(ra.adapter) * N + n) * R;
      float lora = 0.f;
      for (int j = 0; j < ra.rank; ++j) lora += t_s[j] * to_float(b[j]);
      T* y = static_cast<T*>(args.y) + m * N + n;
      *y = from_float<T>(to_float(*y) + ra.scale * lora);
    }
  }
}

// -------------------------------------------------------------------------------------- mask

template <typename T>
__global__ void __launch_bounds__(kMaskThreads) lora_mask_kernel(LoraMaskArgs args) {
  const int64_t total = args.M * args.K;
  const uint64_t seed = static_cast<uint64_t>(*args.seed);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kMaskThreads;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kMaskThreads + threadIdx.x; i < total;
       i += stride) {
    const int64_t m = i / args.K;
    const int64_t k = i - m * args.K;
    const bool keep = lora::dropout_keep(lora::dropout_rowkey(seed, m), k, args.dropout_threshold);
    static_cast<T*>(args.out)[i] = keep ? static_cast<const T*>(args.in)[i] : from_float<T>(0.f);
  }
}

// --------------------------------------------------------------------------------- dispatch

bool adapters_valid(const LoraAdapters& ad) {
  return ad.A != nullptr && ad.B != nullptr && ad.n_adapters >= 1 && ad.rank >= 1 &&
         ad.rank <= kLoraMaxRank;
}

template <typename T>
cudaError_t shrink_typed(const LoraShrinkArgs& args, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(args.M), static_cast<unsigned>(args.k_splits));
  if (args.adapters.rank <= 16) {
    lora_shrink_kernel<T, 16><<<grid, kShrinkThreads, 0, stream>>>(args);
  } else if (args.adapters.rank <= 32) {
    lora_shrink_kernel<T, 32><<<grid, kShrinkThreads, 0, stream>>>(args);
  } else {
    lora_shrink_kernel<T, 64><<<grid, kShrinkThreads, 0, stream>>>(args);
  }
  return cudaGetLastError();
}

template <typename T, bool kInt8>
cudaError_t gemv_typed(const LoraGemvArgs& args, cudaStream_t stream) {
  constexpr int kVec = kInt8 ? 16 : static_cast<int>(16 / sizeof(T));
  const bool vec =
      args.K % kVec == 0 && util::is_aligned16(args.x) && util::is_aligned16(args.weight);
  const dim3 grid(static_cast<unsigned>(ceil_div(args.N, kGemvWarps)));
  // A programmatic dependent of the shrink (its partials are read after pdl::wait()).
  return lowrank_launch::launch(
      args.pdl, vec ? lora_gemv_kernel<T, kInt8, kVec> : lora_gemv_kernel<T, kInt8, 1>, grid,
      dim3(kGemvThreads), 0, stream, args);
}

template <typename T>
cudaError_t expand_typed(const LoraExpandArgs& args, cudaStream_t stream) {
  const int64_t rows = args.M < kMaxGridY ? args.M : kMaxGridY;
  const dim3 grid(static_cast<unsigned>(ceil_div(args.N, kExpandThreads)),
                  static_cast<unsigned>(rows));
  lora_expand_kernel<T><<<grid, kExpandThreads, 0, stream>>>(args);
  return cudaGetLastError();
}

template <typename T>
cudaError_t mask_typed(const LoraMaskArgs& args, cudaStream_t stream) {
  const int64_t blocks = ceil_div(args.M * args.K, kMaskThreads);
  lora_mask_kernel<T>
      <<<static_cast<unsigned>(blocks < 4096 ? blocks : 4096), kMaskThreads, 0, stream>>>(args);
  return cudaGetLastError();
}

}  // namespace

int64_t lora_shrink_splits(int64_t M, int64_t K, int num_sms) {
  if (M <= 0) return 1;
  int64_t splits = ceil_div(2 * static_cast<int64_t>(num_sms > 0 ? num_sms : 1), M);
  const int64_t by_len = K / kMinSliceK > 0 ? K / kMinSliceK : 1;
  if (splits > by_len) splits = by_len;
  if (splits > kMaxSplits) splits = kMaxSplits;
  return splits < 1 ? 1 : splits;
}

cudaError_t launch_lora_shrink(const LoraShrinkArgs& args, cudaStream_t stream) {
  if (!adapters_valid(args.adapters) || args.M < 0 || args.K < 1 || args.k_splits < 1 ||
      args.k_splits > kMaxGridY || args.partial == nullptr || args.x == nullptr ||
      args.M > 2147483647 || (args.dropout_threshold != 0 && args.seed == nullptr) ||
      args.dropout_threshold > 65535) {
    return cudaErrorInvalidValue;
  }
  if (args.M == 0) return cudaSuccess;
  switch (args.dtype) {
    case LoraDType::kFloat32:
      return shrink_typed<float>(args, stream);
    case LoraDType::kFloat16:
      return shrink_typed<__half>(args, stream);
    case LoraDType::kBFloat16:
      return shrink_typed<__nv_bfloat16>(args, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_lora_gemv(const LoraGemvArgs& args, cudaStream_t stream) {
  const bool int8 = args.scales != nullptr;
  if (!adapters_valid(args.adapters) || args.M < 0 || args.M > kLoraGemvMaxRows || args.N < 1 ||
      args.K < 1 || args.k_splits < 1 || args.partial == nullptr || args.y == nullptr ||
      (int8 && args.group_size != 0 &&
       (args.group_size % 16 != 0 || args.K % args.group_size != 0))) {
    return cudaErrorInvalidValue;
  }
  if (args.M == 0) return cudaSuccess;
  switch (args.dtype) {
    case LoraDType::kFloat32:
      return int8 ? gemv_typed<float, true>(args, stream) : gemv_typed<float, false>(args, stream);
    case LoraDType::kFloat16:
      return int8 ? gemv_typed<__half, true>(args, stream)
                  : gemv_typed<__half, false>(args, stream);
    case LoraDType::kBFloat16:
      return int8 ? gemv_typed<__nv_bfloat16, true>(args, stream)
                  : gemv_typed<__nv_bfloat16, false>(args, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_lora_expand(const LoraExpandArgs& args, cudaStream_t stream) {
  if (!adapters_valid(args.adapters) || args.M < 0 || args.N < 1 || args.k_splits < 1 ||
      args.partial == nullptr || args.y == nullptr ||
      ceil_div(args.N, kExpandThreads) > 2147483647) {
    return cudaErrorInvalidValue;
  }
  if (args.M == 0) return cudaSuccess;
  switch (args.dtype) {
    case LoraDType::kFloat32:
      return expand_typed<float>(args, stream);
    case LoraDType::kFloat16:
      return expand_typed<__half>(args, stream);
    case LoraDType::kBFloat16:
      return expand_typed<__nv_bfloat16>(args, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_lora_mask(const LoraMaskArgs& args, cudaStream_t stream) {
  if (args.in == nullptr || args.out == nullptr || args.seed == nullptr || args.M < 0 ||
      args.K < 1 || args.dropout_threshold > 65535) {
    return cudaErrorInvalidValue;
  }
  if (args.M == 0) return cudaSuccess;
  switch (args.dtype) {
    case LoraDType::kFloat32:
      return mask_typed<float>(args, stream);
    case LoraDType::kFloat16:
      return mask_typed<__half>(args, stream);
    case LoraDType::kBFloat16:
      return mask_typed<__nv_bfloat16>(args, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace lrkernels
