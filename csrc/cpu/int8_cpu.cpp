// C++ CPU implementation of the int8 weight-only ops:
//   int8_linear:            y  = x  · Wᵀ + bias,  W[n, k] = q[n, k] · s[n] (or s[n, k / G])
//   int8_linear_grad_input: dx = dy · W
// The dequantized weight is formed in float32 (float64 for float64 inputs) — a CPU
// implementation for correctness and for exercising the shared checks, not a fast path.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "../common/checks.h"

namespace lrkernels {
namespace {

at::ScalarType accumulation_type(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// W (N, K) in `acc` from q (N, K) int8 and scales (N,) or (N, K / group).
at::Tensor dequantize_cpu(const at::Tensor& qweight, const at::Tensor& scales, int64_t group,
                          at::ScalarType acc) {
  const at::Tensor q = qweight.to(acc);
  const at::Tensor s = scales.to(acc);
  if (group == 0) {
    return q * s.unsqueeze(1);
  }
  const int64_t n = qweight.size(0);
  const int64_t k = qweight.size(1);
  return (q.view({n, k / group, group}) * s.unsqueeze(2)).view({n, k});
}

std::vector<int64_t> with_last_dim(const at::Tensor& t, int64_t last) {
  std::vector<int64_t> shape(t.sizes().begin(), t.sizes().end());
  shape.back() = last;
  return shape;
}

at::Tensor int8_linear_cpu(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                           const std::optional<at::Tensor>& bias) {
  const int64_t group = check_int8_linear_args(x, qweight, scales, bias);
  TORCH_CHECK(x.device().is_cpu(), "int8_linear (cpu backend): x must be a CPU tensor, got ",
              x.device());
  const at::ScalarType acc = accumulation_type(x);
  const at::Tensor w = dequantize_cpu(qweight, scales, group, acc);
  const at::Tensor x2d = x.reshape({-1, x.size(-1)}).to(acc);
  const at::Tensor y = bias.has_value() ? at::addmm(bias->to(acc), x2d, w.t()) : at::mm(x2d, w.t());
  return y.to(x.scalar_type()).reshape(with_last_dim(x, qweight.size(0)));
}

at::Tensor int8_linear_grad_input_cpu(const at::Tensor& dy, const at::Tensor& qweight,
                                      const at::Tensor& scales) {
  const int64_t group = check_int8_grad_input_args(dy, qweight, scales);
  TORCH_CHECK(dy.device().is_cpu(), "int8_linear_grad_input (cpu backend): dy must be a CPU ",
              "tensor, got ", dy.device());
  const at::ScalarType acc = accumulation_type(dy);
  const at::Tensor w = dequantize_cpu(qweight, scales, group, acc);
  const at::Tensor dx = at::mm(dy.reshape({-1, dy.size(-1)}).to(acc), w);
  return dx.to(dy.scalar_type()).reshape(with_last_dim(dy, qweight.size(1)));
}

}  // namespace

TORCH_LIBRARY_IMPL(lrkernels, CPU, m) {
  m.impl("int8_linear", &int8_linear_cpu);
  m.impl("int8_linear_grad_input", &int8_linear_grad_input_cpu);
}

}  // namespace lrkernels
