// Argument checks shared by the CPU and CUDA implementations of every op, so that the CPU
// tests in CI exercise exactly the checks the GPU path runs. Every check names the argument
// and what was expected, and runs before any kernel launch.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

namespace lrkernels {

// lowrank_linear(x, U, V, bias): x (..., in), V (rank, in), U (out, rank), bias (out,) or None.
// Checks: floating dtypes (float64/float32/float16/bfloat16; a backend may take fewer), all tensors
// share x's dtype and device, x has at least one dimension, V and U are 2-D with matching rank
// (rank >= 1), in matches, bias is 1-D of size out.
void check_lowrank_linear_args(const at::Tensor& x, const at::Tensor& U, const at::Tensor& V,
                               const std::optional<at::Tensor>& bias);

// int8_linear(x, qweight, scales, bias): x (..., K) float, qweight int8 (N, K) 2-D, scales in x's
// dtype of shape (N,) (per output channel) or (N, K / group) with group in {32, 64, 128} dividing
// K, bias (N,) or None, all on x's device. Returns the group size (0 for per-channel).
int64_t check_int8_linear_args(const at::Tensor& x, const at::Tensor& qweight,
                               const at::Tensor& scales, const std::optional<at::Tensor>& bias);

// int8_linear_grad_input(dy, qweight, scales): dy (..., N), the rest as above. Returns the group
// size (0 for per-channel).
int64_t check_int8_grad_input_args(const at::Tensor& dy, const at::Tensor& qweight,
                                   const at::Tensor& scales);

}  // namespace lrkernels
