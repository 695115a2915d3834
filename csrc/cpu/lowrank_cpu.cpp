// C++ CPU implementation of lowrank_linear: y = (x · Vᵀ) · Uᵀ + bias.
//
// Same numerics as the GPU kernels: products accumulate in float32 (float64 for float64); for
// float16/bfloat16 the rank-r intermediate t = x · Vᵀ is rounded to the input dtype before the
// second product (what the tensor-core kernels do, and what torch's two same-dtype matmuls do).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "../common/checks.h"

namespace lrkernels {
namespace {

at::Tensor lowrank_linear_cpu(const at::Tensor& x, const at::Tensor& U, const at::Tensor& V,
                              const std::optional<at::Tensor>& bias) {
  check_lowrank_linear_args(x, U, V, bias);
  TORCH_CHECK(x.device().is_cpu(), "lowrank_linear (cpu backend): x must be a CPU tensor, got ",
              x.device());
  const int64_t in_features = x.size(-1);
  const int64_t out_features = U.size(0);
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = out_features;

  // float64 stays float64; every other dtype accumulates in float32.
  const at::ScalarType acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor x2d = x.reshape({-1, in_features}).to(acc);
  at::Tensor t = at::mm(x2d, V.to(acc).t());
  if (x.scalar_type() != acc) {
    t = t.to(x.scalar_type()).to(acc);  // round the intermediate like the GPU kernels
  }
  at::Tensor y =
      bias.has_value() ? at::addmm(bias->to(acc), t, U.to(acc).t()) : at::mm(t, U.to(acc).t());
  return y.to(x.scalar_type()).reshape(out_shape);
}

}  // namespace

TORCH_LIBRARY_IMPL(lrkernels, CPU, m) { m.impl("lowrank_linear", &lowrank_linear_cpu); }

}  // namespace lrkernels
