// Argument checks shared by the CPU and CUDA implementations of every op, so that the CPU
// tests in CI exercise exactly the checks the GPU path runs. Every check names the argument
// and what was expected, and runs before any kernel launch.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

namespace lrkernels {

// lowrank_linear(x, U, V, bias): x (..., in), V (rank, in), U (out, rank), bias (out,) or None.
// Checks: floating dtypes (float64/float32/float16/bfloat16; a backend may take fewer), all tensors share x's dtype and device,
// x has at least one dimension, V and U are 2-D with matching rank (rank >= 1), in matches,
// bias is 1-D of size out.
void check_lowrank_linear_args(const at::Tensor& x, const at::Tensor& U, const at::Tensor& V,
                               const std::optional<at::Tensor>& bias);

}  // namespace lrkernels
