// Launch API of the LoRA CUDA kernels (lora_gemv.cu). Torch-free, like int8_kernels.cuh: the .cu
// file includes only CUDA headers; lora_cuda.cpp (host compiler) does the torch side.
//
//   y = x · Wᵀ + s · round(t) · Bᵀ + bias,  t = (keep ⊙ x) · Aᵀ       (one adapter, or one per row)
//
// Every tensor contiguous row-major. The base W is dense (N, K) in the activation dtype, or int8
// q (N, K) with scales (N,) per output channel or (N, K / G) per group (G in {32, 64, 128}),
// dequantized in registers. Adapters are stacked: A (n, R, K), B (n, N, R) (one adapter: n = 1,
// index == nullptr); row m uses adapter index[m] (outside [0, n): the base only), the first
// ranks[a] columns (clamped to [0, R]; nullptr: all R) and scale scales[a] (nullptr: `scale`).
// keep is the counter-based dropout mask of csrc/cuda/lora_dropout.h (threshold 0: none).
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace lrkernels {
namespace cuda {

enum class LoraDType { kFloat32, kFloat16, kBFloat16 };

// Largest adapter rank (R_max) of the CUDA kernels (t lives in registers / shared memory).
constexpr int64_t kLoraMaxRank = 64;
// Largest M of the weight-streaming GEMV.
constexpr int64_t kLoraGemvMaxRows = 16;

struct LoraAdapters {
  const void* A;         // (n, R, K)
  const void* B;         // (n, N, R)
  const int32_t* index;  // (M,) or nullptr: every row uses adapter 0
  const int32_t* ranks;  // (n,) or nullptr: R
  const float* scales;   // (n,) or nullptr: `scale`
  float scale;
  int64_t n_adapters;
  int64_t rank;  // R (R_max for stacked adapters), 1..kLoraMaxRank
};

// Shrink: partial[s, m, j] = Σ_{k in split s} keep(m, k) · x[m, k] · A[a_m, j, k] in float32 for
// j < rank of a_m (0 otherwise, and for rows without an adapter). Splits: `k_splits` equal
// slices of K (lora_shrink_splits); the consumers sum them in split order and round to the dtype.
struct LoraShrinkArgs {
  const void* x;  // (M, K)
  LoraAdapters adapters;
  float* partial;  // (k_splits, M, R)
  int64_t M;
  int64_t K;
  int64_t k_splits;
  uint32_t dropout_threshold;  // 0: no dropout
  const int64_t* seed;         // one element on the device, read when the threshold is > 0
  LoraDType dtype;
};
int64_t lora_shrink_splits(int64_t M, int64_t K, int num_sms);
cudaError_t launch_lora_shrink(const LoraShrinkArgs& args, cudaStream_t stream);

// Weight-streaming GEMV for M <= kLoraGemvMaxRows with the LoRA expand fused in its epilogue:
// y[m, n] = x[m] · W[n] + s_m · round(t[m]) · B[a_m, n, :r_m] + bias[n], t from the shrink's
// partials. Writes t (M, R) rounded to the dtype to t_out when not nullptr (the forward's saved
// intermediate).
struct LoraGemvArgs {
  const void* x;       // (M, K)
  const void* weight;  // (N, K) dense or int8
  const void* scales;  // nullptr: dense; else (N,) or (N, K / group_size)
  int64_t group_size;  // 0: per channel
  LoraAdapters adapters;
  const float* partial;  // the shrink's output
  int64_t k_splits;
  const void* bias;  // (N,) or nullptr
  void* y;           // (M, N)
  void* t_out;       // (M, R) or nullptr
  int64_t M;
  int64_t N;
  int64_t K;
  LoraDType dtype;
  // Launch as a programmatic dependent of the shrink just before it (common/pdl.cuh; compute
  // capability 9.0 and newer): the weight stream overlaps the shrink, t is read after the wait.
  bool pdl = false;
};
cudaError_t launch_lora_gemv(const LoraGemvArgs& args, cudaStream_t stream);

// Expand-accumulate for any M: y[m, n] += s_m · round(t[m]) · B[a_m, n, :r_m] (rows without an
// adapter untouched), t from the shrink's partials. The large-M path adds the LoRA term to a base
// product computed by cuBLAS or the int8 GEMM.
struct LoraExpandArgs {
  LoraAdapters adapters;
  const float* partial;
  int64_t k_splits;
  void* y;  // (M, N), read and written
  int64_t M;
  int64_t N;
  LoraDType dtype;
};
cudaError_t launch_lora_expand(const LoraExpandArgs& args, cudaStream_t stream);

// out = keep ⊙ in over (M, K) (in == out allowed): the masked operand of the gradients.
struct LoraMaskArgs {
  const void* in;
  void* out;
  int64_t M;
  int64_t K;
  uint32_t dropout_threshold;
  const int64_t* seed;
  LoraDType dtype;
};
cudaError_t launch_lora_mask(const LoraMaskArgs& args, cudaStream_t stream);

}  // namespace cuda
}  // namespace lrkernels
