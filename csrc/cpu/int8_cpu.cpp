// C++ CPU implementation of the int8 weight-only ops, both weight layouts (lrkernels/quant.py):
//   int8_linear[_packed]:            y  = x  · Wᵀ + bias,  W[n, k] = q[n, k] · s[n] (or s[n, k /
//   G]) int8_linear[_packed]_grad_input: dx = dy · W int8_dequantize_packed:          W in the
//   scales' dtype
// The dequantized weight is formed in float32 (float64 for float64 inputs) — a CPU implementation
// for correctness and for exercising the shared checks, not a fast path. A packed weight is
// unpacked first (the permutation the layout documents, inverted).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "../common/checks.h"

namespace lrkernels {
namespace {

at::ScalarType accumulation_type(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// The plain (N, K) int8 weight of a packed one: dims (nb, kb, g, t, j, b1, b0) of the packed
// tensor permuted to (nb, j, g, kb, b1, t, b0) give row 32 nb + 8 j + g, column
// 16 kb + 8 b1 + 2 t + b0.
at::Tensor unpack_qweight(const at::Tensor& packed, int64_t n) {
  const int64_t nb = packed.size(0);
  const int64_t kb = packed.size(1);
  return packed.reshape({nb, kb, 8, 4, 4, 2, 2})
      .permute({0, 4, 2, 1, 5, 3, 6})
      .reshape({nb * 32, kb * 16})
      .narrow(0, 0, n);
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

at::Tensor linear(const char* op, const at::Tensor& x, const at::Tensor& q,
                  const at::Tensor& scales, const std::optional<at::Tensor>& bias, int64_t group) {
  TORCH_CHECK(x.device().is_cpu(), op, " (cpu backend): x must be a CPU tensor, got ", x.device());
  const at::ScalarType acc = accumulation_type(x);
  const at::Tensor w = dequantize_cpu(q, scales, group, acc);
  const at::Tensor x2d = x.reshape({-1, x.size(-1)}).to(acc);
  const at::Tensor y = bias.has_value() ? at::addmm(bias->to(acc), x2d, w.t()) : at::mm(x2d, w.t());
  return y.to(x.scalar_type()).reshape(with_last_dim(x, q.size(0)));
}

at::Tensor grad_input(const char* op, const at::Tensor& dy, const at::Tensor& q,
                      const at::Tensor& scales, int64_t group) {
  TORCH_CHECK(dy.device().is_cpu(), op, " (cpu backend): dy must be a CPU tensor, got ",
              dy.device());
  const at::ScalarType acc = accumulation_type(dy);
  const at::Tensor w = dequantize_cpu(q, scales, group, acc);
  const at::Tensor dx = at::mm(dy.reshape({-1, dy.size(-1)}).to(acc), w);
  return dx.to(dy.scalar_type()).reshape(with_last_dim(dy, q.size(1)));
}

// `path` (the CUDA kernels' choice) has no meaning here.
at::Tensor int8_linear_cpu(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                           const std::optional<at::Tensor>& bias, int64_t /*path*/) {
  const int64_t group = check_int8_linear_args(x, qweight, scales, bias);
  return linear("int8_linear", x, qweight, scales, bias, group);
}

at::Tensor int8_linear_grad_input_cpu(const at::Tensor& dy, const at::Tensor& qweight,
                                      const at::Tensor& scales, int64_t /*path*/) {
  const int64_t group = check_int8_grad_input_args(dy, qweight, scales);
  return grad_input("int8_linear_grad_input", dy, qweight, scales, group);
}

at::Tensor int8_linear_packed_cpu(const at::Tensor& x, const at::Tensor& qweight,
                                  const at::Tensor& scales, const std::optional<at::Tensor>& bias,
                                  int64_t /*path*/) {
  const int64_t group = check_int8_packed_linear_args(x, qweight, scales, bias);
  return linear("int8_linear_packed", x, unpack_qweight(qweight, scales.size(0)), scales, bias,
                group);
}

at::Tensor int8_linear_packed_grad_input_cpu(const at::Tensor& dy, const at::Tensor& qweight,
                                             const at::Tensor& scales, int64_t /*path*/) {
  const int64_t group = check_int8_packed_grad_input_args(dy, qweight, scales);
  return grad_input("int8_linear_packed_grad_input", dy, unpack_qweight(qweight, scales.size(0)),
                    scales, group);
}

at::Tensor int8_dequantize_packed_cpu(const at::Tensor& qweight, const at::Tensor& scales) {
  const int64_t group = check_int8_dequantize_packed_args(qweight, scales);
  TORCH_CHECK(qweight.device().is_cpu(),
              "int8_dequantize_packed (cpu backend): qweight must be a CPU tensor, got ",
              qweight.device());
  return dequantize_cpu(unpack_qweight(qweight, scales.size(0)), scales, group, at::kFloat)
      .to(scales.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(lrkernels, CPU, m) {
  m.impl("int8_linear", &int8_linear_cpu);
  m.impl("int8_linear_grad_input", &int8_linear_grad_input_cpu);
  m.impl("int8_linear_packed", &int8_linear_packed_cpu);
  m.impl("int8_linear_packed_grad_input", &int8_linear_packed_grad_input_cpu);
  m.impl("int8_dequantize_packed", &int8_dequantize_packed_cpu);
}

}  // namespace lrkernels
